"""The compare page (``/compare``): one prompt, one seed, one set of sampling settings, sent
to 2-4 models at once, their texts side by side with each one's speed and mean
log-probability per character.

The form is a GET, so a comparison's URL holds it (and can be shared): opening one
fills the form in (the page's script starts it), and the form submitted without
JavaScript (``run=1``) answers with the finished columns. Through htmx the form gets
``/compare/start``: one column per model, each an ordinary generation with its own job
token and event stream (``/compare/<kind>/stream``, the generate and infill pages'
events), so every column runs through the engine loop like any other request.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, render_template, request, stream_with_context, url_for
from werkzeug.datastructures import MultiDict

from . import ratelimit
from .pages_common import (FALLBACK_PROMPT, MAX_JOB_CHARS, form_bounds, SAMPLING_FIELDS,
                           SEED_RANGE, TEXT_FIELDS, FormErrors, Job, Result, collect, job_events,
                           in_form_order, output_tokens, read_job, sse_event, vendor_ready)
from .registry import get_registry
from .service import GenerationStream, ServiceError
from .settings import get_settings
from .token_view import run_stats, token_data
from .web import STREAM_HEADERS, generates

bp = Blueprint("compare", __name__)

MIN_MODELS, MAX_MODELS = 2, 4
MODES = ("generate", "infill")
FIELD_ORDER = ("models", "mode", "prompt", "first", "last", *SAMPLING_FIELDS)


@dataclass(frozen=True)
class Comparison:
    """A validated comparison: one job per model, the same texts, settings and seed."""
    kind: str  # "generate" or "infill"
    jobs: list[Job]

    def query(self) -> dict[str, Any]:
        """The URL query that fills the form in with this comparison (its seed included,
        so the shared link writes the same texts)."""
        first = self.jobs[0]
        values = dict(first.values)
        if values.get("stop"):
            values["stop"] = values["stop"][0].replace("\\", "\\\\").replace("\n", "\\n") \
                .replace("\t", "\\t")
        return {"models": [job.model for job in self.jobs], "mode": self.kind,
                **{name: text for name, text in first.texts.items() if text},
                **{name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}}


def _shown(name: str) -> str:
    return repr(name if len(name) <= 100 else name[:100] + "...")


def read_comparison(args: MultiDict) -> Comparison:
    """The comparison a submitted form asks for; ``FormErrors`` with every problem, each
    under its field's name (the models' under "models")."""
    errors: dict[str | None, str] = {}
    kind = args.get("mode") or "generate"
    if kind not in MODES:
        errors["mode"] = f"'mode' must be generate or infill, got {_shown(kind)}"
        kind = "generate"
    names = list(dict.fromkeys(args.getlist("models")))  # each model once, in order
    registry = get_registry()
    if kind == "infill" and infill_unavailable():
        errors["mode"] = infill_unavailable()
    if not MIN_MODELS <= len(names) <= MAX_MODELS:
        chosen = {0: "none is", 1: "1 is"}.get(len(names), f"{len(names)} are")
        errors["models"] = f"choose {MIN_MODELS} to {MAX_MODELS} models to compare; {chosen} chosen"
    for name in names:
        loaded = registry.get(name)
        if loaded is None:
            errors.setdefault("models", f"{_shown(name)} is not a loaded model")
        elif kind == "infill" and not loaded.facts.can_infill:
            errors.setdefault("models", f"{_shown(name)} was not trained to infill; to fill in "
                                        f"the middle, choose models that do")
    fields = {name: args.get(name) for name in (*TEXT_FIELDS[kind], *SAMPLING_FIELDS)}
    if not (fields["seed"] or "").strip():  # one seed for every column, shown in the URL
        fields["seed"] = str(secrets.randbelow(SEED_RANGE))
    jobs = []
    for name in names[:MAX_MODELS] or [""]:
        try:
            jobs.append(read_job(kind, {**fields, "model": name}))
        except FormErrors as e:  # the same for every model but the model's own
            for field, message in e.errors.items():
                if field != "model":
                    errors.setdefault(field, message)
    if errors:
        raise FormErrors(in_form_order(errors, FIELD_ORDER))
    return Comparison(kind, jobs)


def infill_unavailable() -> str | None:
    """Why the models loaded here cannot be compared filling in a middle (fewer than
    ``MIN_MODELS`` of them infill), or None."""
    infillers = [facts.name for facts in get_registry().facts(infill=True)]
    if len(infillers) >= MIN_MODELS:
        return None
    which = f"only {infillers[0]} does" if infillers else "none does"
    return (f"filling in the middle needs {MIN_MODELS} loaded models trained to infill; "
            f"{which}")


# ---- running -------------------------------------------------------------------------------

def run_comparison(comparison: Comparison, logprobs: int | None = 0) -> list[Result]:
    """Every column's finished text and figures (the no-JavaScript path, and the benchmark):
    the generations all start, then run together in the engine loop, each collected by a
    thread of its own (so that each one's timings are its own)."""
    streams: list[GenerationStream | ServiceError] = []
    for job in comparison.jobs:
        try:
            streams.append(job.open(logprobs))
        except ServiceError as e:
            streams.append(e)
    with ThreadPoolExecutor(len(streams)) as pool:
        finished = list(pool.map(_finish, comparison.jobs, streams))
    for result, stream in zip(finished, streams):
        if isinstance(stream, GenerationStream) and result.error is None:
            result.stats = run_stats(stream, output_tokens(result.job, stream))
    return finished


def _finish(job: Job, stream: GenerationStream | ServiceError) -> Result:
    if isinstance(stream, ServiceError):
        return Result(job, error=stream.message, status=stream.status)
    return collect(job, stream)


# ---- rendering ---------------------------------------------------------------------------

def default_form() -> MultiDict:
    # the pages' model and the next best: the comparison a newcomer would ask for first
    names = [m.name for m in get_registry().ranked(get_settings().default_model)]
    # sampling fields left empty: each model samples with its own defaults
    return MultiDict([*(("models", name) for name in names[:MIN_MODELS]), ("mode", "generate")])


def _context(form: MultiDict, errors: Mapping[str | None, str] | None = None,
             **extra) -> dict[str, Any]:
    errors = dict(errors or {})
    first = next((name for name in FIELD_ORDER if name in errors), None)
    mode = form.get("mode") if form.get("mode") in MODES else "generate"
    return {"kind": "compare", "form": form, "chosen": form.getlist("models"), "mode": mode,
            "errors": errors, "first_error": first, "models": get_registry().facts(),
            "limits": get_settings().limits, "fallback_prompt": FALLBACK_PROMPT, "bounds": form_bounds(),
            "infill_unavailable": infill_unavailable(),
            "min_models": MIN_MODELS, "max_models": MAX_MODELS, **extra}


def render_page(form: MultiDict, *, errors=None, results: list[Result] | None = None,
                status: int = 200, headers: dict | None = None, autostart: bool = False):
    html = render_template("compare.html", vendor=vendor_ready(), results=results,
                           autostart=autostart, **_context(form, errors))
    return html, status, headers or {}


def _done(note: str, job: Job | None, stream: GenerationStream | None) -> str:
    """A column's last event: its finish note, figures and token view."""
    tokens = output_tokens(job, stream)
    stats = run_stats(stream, tokens) if stream is not None else None
    return sse_event(render_template("partials/finished_status.html", note=note, stats=stats,
                                     token_data=token_data(tokens)), "done")


# ---- routes ------------------------------------------------------------------------------

@bp.get("/compare")
@generates(when=lambda: bool(request.args.get("run")))  # the form alone generates nothing
def page():
    """The form (filled in from the URL's query), or without JavaScript (``run``) the
    finished comparison."""
    if not request.args:
        return render_page(default_form())
    if not request.args.get("run"):
        return render_page(request.args, autostart=bool(request.args.get("models")))
    try:
        comparison = read_comparison(request.args)
    except FormErrors as e:
        return render_page(request.args, errors=e.errors, status=400)
    wait = max(ratelimit.wait_needed() for _ in comparison.jobs)  # each column counts
    if wait:
        return render_page(request.args, errors={None: ratelimit.message(wait)}, status=429,
                           headers={"Retry-After": str(ratelimit.retry_after(wait))})
    results = run_comparison(comparison)
    if all(r.error is not None and not r.text for r in results):  # nothing ran: why
        status = results[0].status
        return render_page(request.args, errors={None: results[0].error}, status=status,
                           headers={"Retry-After": "1"} if status == 503 else {})
    return render_page(request.args, results=results)


@bp.get("/compare/start")
@generates()
def start():
    """The form through htmx: a column per model, each opening its stream; or the form
    again with its errors, in place."""
    try:
        comparison = read_comparison(request.args)
    except FormErrors as e:
        html = render_template("partials/compare_form.html", oob=False, busy=False,
                               **_context(request.args, e.errors))
        return html, 200, {"HX-Retarget": "#compare-form", "HX-Reswap": "outerHTML"}
    share = url_for("compare.page", **comparison.query())
    tokens = [job.to_token() for job in comparison.jobs]
    if max(len(token) for token in tokens) > MAX_JOB_CHARS:  # cannot travel in a URL
        for _ in comparison.jobs:  # generates here, so each column counts
            ratelimit.enforce()
        results = run_comparison(comparison)
    else:
        results = [Result(job, stream_url=url_for("compare.stream", kind=job.kind, job=token))
                   for job, token in zip(comparison.jobs, tokens)]
    streaming = results[0].stream_url is not None
    html = (render_template("partials/compare_results.html", results=results)
            + render_template("partials/compare_form.html", oob=True, busy=streaming,
                              **_context(request.args)))
    return html, 200, {"HX-Push-Url": share}


@bp.get("/compare/<any(generate, infill):kind>/stream")
@generates()
def stream(kind: str):
    """One column's ``text/event-stream``: the generate page's events, its figures and
    token view in the last one."""
    return Response(stream_with_context(job_events(kind, _done)), mimetype="text/event-stream",
                    headers=STREAM_HEADERS)
