"""The experiments page (``/experiments``): the runs of the experiment store in a table,
filtered by experiment, model or architecture, with the chosen runs' training and
validation losses overlaid in one chart (uPlot, from ``/experiments/data``).

The selection lives in the URL (a GET form: ``experiment``, ``model``, ``architecture``,
and ``run`` once per run to draw), so a view can be shared, and the page works without
JavaScript: the server renders the table, and the admin page's curve PNGs stand in for
the chart. The records are admin data, as on the admin page: with ``FABLE_ADMIN_TOKEN``
set, the page and its data need the token (the same check).
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from flask import Blueprint, jsonify, render_template, request, url_for
from werkzeug.datastructures import MultiDict

from app.pages.render import store_problem, vendor_ready
from app.platform.settings import get_settings
from app.platform.web import ADMIN_CHALLENGE, has_admin_token, json_error
from models_src import records

log = logging.getLogger(__name__)

bp = Blueprint("experiments", __name__, url_prefix="/experiments")

FILTERS = ("experiment", "model", "architecture")
DEFAULT_CHART_RUNS = 4  # drawn when the URL names none: the newest runs that match
MAX_CHART_RUNS = 8  # one colour each (static/style.css, --run-0 ... --run-7)
MAX_VALUE_CHARS = 200
UPLOT_FILES = ("uPlot.iife.min.js", "uPlot.min.css")


@bp.before_request
def _require_admin():
    if has_admin_token(basic=True):
        return None
    if request.endpoint == "experiments.data":
        response = json_error(401, "the experiment records need the admin token")
        response.headers.update(ADMIN_CHALLENGE)
        return response
    return render_template("experiments.html", kind="experiments", denied=True), 401, ADMIN_CHALLENGE


@bp.after_request
def _vary(response):
    response.vary.add("Authorization")  # what a request may see depends on its token
    return response


# ---- the selection --------------------------------------------------------------------

@dataclass
class Selection:
    """What the URL asks for: filters (only those given), the runs to draw, and what was
    wrong with it (each problem a sentence; the value in question is left out)."""

    filters: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def query(self, runs: list[str]) -> MultiDict:
        """This selection's filters with ``runs`` to draw, as a URL's query."""
        return MultiDict([*self.filters.items(), *(("run", run) for run in runs)])


def _problem(value: str) -> str | None:
    if len(value) > MAX_VALUE_CHARS:
        return f"is longer than {MAX_VALUE_CHARS} characters"
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
        return "holds control characters"
    return None


def read_selection(args: MultiDict) -> Selection:
    selection = Selection()
    for name in FILTERS:  # the first value of each; blank: no filter
        value = args.get(name, "")
        problem = _problem(value)
        if problem:
            selection.problems.append(f"The {name} filter {problem}; it was left out.")
        elif value.strip():
            selection.filters[name] = value
    runs = [run for run in args.getlist("run") if run.strip()]
    bad = [run for run in runs if _problem(run)]
    if bad:
        one = len(bad) == 1
        selection.problems.append(f"{len(bad)} of the chosen run ids {'is' if one else 'are'} "
                                  f"not valid (at most {MAX_VALUE_CHARS} characters, no "
                                  f"control characters); {'it was' if one else 'they were'} "
                                  "left out.")
    selection.runs = list(dict.fromkeys(run for run in runs if run not in bad))
    return selection


@dataclass
class View:
    """The store as the page shows it for one selection."""

    runs: list[dict]  # every run that matches the filters, newest first
    charted: list[dict]  # those drawn, in table order; each with its "colour" (0-7)
    options: dict[str, list[str]]  # each filter's choices: every value in the store
    notes: list[str]  # what the reader should know about the selection
    store_runs: int = 0


def build_view(root: Path, selection: Selection, curves: bool = False) -> View:
    """With ``curves``, each drawn run has its losses too ("steps", "train_loss",
    "val_loss"). Raises whatever reading the store raises (a broken file)."""
    every = records.run_summaries(root)
    options = {name: sorted({str(run[name]) for run in every if run[name] is not None})
               for name in FILTERS}
    notes = [f"No run in the records has the {name} “{value}”."
             for name, value in selection.filters.items() if value not in options[name]]
    runs = [run for run in every
            if all(run[name] == value for name, value in selection.filters.items())]
    drawable = [run for run in runs if run["losses"]]
    chosen = set(selection.runs)
    missing = chosen - {run["run_id"] for run in every}
    if missing:  # a shared link to runs since deleted (filtered-out ones are simply not drawn)
        notes.append(f"{len(missing)} of the chosen runs {'is' if len(missing) == 1 else 'are'}"
                     " not in the records.")
    # the chosen runs that match the filters; none (a new filter, no choice): the newest
    charted = [run for run in drawable if run["run_id"] in chosen]
    if len(charted) > MAX_CHART_RUNS:
        notes.append(f"At most {MAX_CHART_RUNS} runs are drawn at once: the first "
                     f"{MAX_CHART_RUNS} chosen in the table are.")
        charted = charted[:MAX_CHART_RUNS]
    charted = charted or drawable[:DEFAULT_CHART_RUNS]
    losses = records.run_losses(root, [run["run_id"] for run in charted]) \
        if curves else {}
    empty = {"steps": [], "train_loss": [], "val_loss": []}
    charted = [{**run, "colour": i, **losses.get((run["experiment"], run["run_id"]), empty)}
               for i, run in enumerate(charted)]
    return View(runs, charted, options, notes, len(every))


def uplot_ready() -> bool:
    """uPlot is installed in static/vendor/ (``make assets``)."""
    return vendor_ready(UPLOT_FILES)


def _read(selection: Selection, curves: bool = False) -> tuple[View | None, str | None]:
    """The view, or (None, what is wrong with the store): a broken file must not take the
    page down."""
    root = get_settings().experiments_dir
    try:
        return build_view(root, selection, curves), None
    except Exception as e:
        log.warning("cannot read the experiment records in %s: %s", root, e)
        return None, store_problem(e, root)


# ---- routes ---------------------------------------------------------------------------

@bp.get("")
def index():
    selection = read_selection(request.args)
    view, store_error = _read(selection)
    data_url = None
    if view is not None and view.charted:
        query = selection.query([run["run_id"] for run in view.charted])
        data_url = url_for("experiments.data", **query.to_dict(flat=False))
    html = render_template(
        "experiments.html", kind="experiments", vendor=False, denied=False,
        selection=selection, view=view, store_error=store_error, data_url=data_url,
        charts=uplot_ready(), filters=FILTERS, experiments_dir=get_settings().experiments_dir,
        admin_token=get_settings().admin_token is not None, max_chart_runs=MAX_CHART_RUNS)
    return html, 400 if selection.problems else 200


@bp.get("/data")
def data():
    """The drawn runs' losses as JSON: ``{"runs": [{"experiment", "run_id", "model",
    "architecture", "colour", "steps", "train_loss", "val_loss"}], "notes": [...]}``, the
    losses null at a step without one (or without a finite one); an unreadable store is
    no run and an ``"error"`` saying why."""
    selection = read_selection(request.args)
    if selection.problems:
        return json_error(400, " ".join(selection.problems))
    view, store_error = _read(selection, curves=True)
    if view is None:
        response = jsonify(runs=[], notes=[],
                           error=f"The experiment records cannot be read: {store_error}")
    else:
        keys = ("experiment", "run_id", "model", "architecture", "colour", "steps",
                "train_loss", "val_loss")
        response = jsonify(runs=[{key: run[key] for key in keys} for run in view.charted],
                           notes=view.notes)
    response.headers["Cache-Control"] = "private, no-cache"
    return response
