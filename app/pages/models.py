"""The model pages: ``/models`` lists the loaded models, ``/models/<name>`` shows one (its
card, configuration, per-layer parameters, evaluation, health, samples, and for admins
its training curves), ``/models/<name>/files/<filename>`` downloads a file of its
checkpoint.

Only loaded models have pages, looked up by exact name (``ModelRegistry.get``), and only
the regular files directly in that model's checkpoint directory can be downloaded, looked
up by exact name among them: a name in a URL never becomes a path. Every file is read
through ``models_src.safe_files``, so a link or a special file is never followed or
served. Nothing here generates text (the page links to the generate page instead).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from flask import Blueprint, abort, render_template, request, send_file, url_for

from app.pages.cards import render_card
from app.pages.downloads import send_bounded
from app.platform.settings import get_settings
from app.platform.web import has_admin_token
from app.serving.registry import LoadedModel, get_registry
from models_src import records, safe_files
from models_src.summary import layer_rows, size_mb

log = logging.getLogger(__name__)

bp = Blueprint("models", __name__)

CURVE_RUNS = 3  # a model's newest runs whose loss curves its page shows (to admins)
RUN_SCAN = 200  # recent runs searched for this model's
SAMPLE_CHARS = 300  # a sample is cut near here on the page (the card has it whole)
#: What each checkpoint file holds, for the download list.
FILE_NOTES = {
    "config.json": "architecture, tokenizer kind, training summary and evaluation",
    "model.safetensors": "the weights",
    "model.safetensors.index.json": "which shard holds each weight",
    "tokenizer.json": "the vocabulary",
    "tokenizer_config.json": "tokenizer settings (special tokens, chat template)",
    "README.md": "the model card",
    "health.json": "the training health report",
}


# ---- what the page shows ----------------------------------------------------------------

def _loaded(name: str) -> LoadedModel:
    loaded = get_registry().get(name)
    if loaded is None:
        abort(404, description=f"No model called {name!r} is loaded.")
    return loaded


def _directory(loaded: LoadedModel) -> Path:
    """Absolute: Flask reads a relative folder as relative to the app's package."""
    return Path(loaded.checkpoint.path or get_registry().directory / loaded.name).absolute()


def file_note(filename: str) -> str | None:
    """What a checkpoint file holds (a shard of the weights too), or None."""
    shard = SHARD_NAME.fullmatch(filename)
    if shard:
        return f"the weights, part {int(shard[1])} of {int(shard[2])}"
    return FILE_NOTES.get(filename)


SHARD_NAME = re.compile(r"model-(\d+)-of-(\d+)\.safetensors")


def checkpoint_files(directory: Path) -> dict[str, int]:
    """The downloadable files (name -> size): regular, non-hidden files directly in the
    checkpoint directory; links (even to a file beside them), FIFOs, devices and folders
    are left out."""
    try:
        files = safe_files.regular_files(directory, recursive=False)
    except (OSError, safe_files.UnsafeFile):
        return {}
    return {name: status.st_size for name, status in files.items() if not name.startswith(".")}


def layer_table(model) -> tuple[list[dict[str, Any]], float]:
    """``models_src.summary.layer_rows`` as rows (layer, type, params, shapes) and the size
    in memory (MB)."""
    rows = [{"layer": layer, "type": kind, "params": params,
             "shapes": re.sub(r"(?<=\d)x(?=\d)", "×", shapes)}
            for layer, kind, params, shapes in layer_rows(model)]
    return rows, size_mb(model)


def _texts(values: list[str] | None) -> list[str]:
    return [v.strip() for v in values or [] if v.strip()]


def _evaluation(loaded: LoadedModel) -> dict[str, Any]:
    """What ``python -m training.evaluate`` stored (config.json "evaluation"), with BLEU
    from there or the training summary; the figures themselves come from ModelFacts."""
    evaluation, summary = loaded.checkpoint.evaluation, loaded.checkpoint.training
    return {"bleu": evaluation.bleu if evaluation.bleu is not None else summary.bleu,
            "split": evaluation.split, "date": evaluation.date, "tokens": evaluation.tokens,
            "characters": evaluation.characters, "command": evaluation.command}


def _samples(card_samples: list[str], loaded: LoadedModel) -> list[str]:
    """The card's samples, else any stored with the evaluation or the training summary;
    cut to SAMPLE_CHARS each."""
    checkpoint = loaded.checkpoint
    samples = (card_samples or _texts(checkpoint.evaluation.samples)
               or _texts(checkpoint.training.samples))
    return [s if len(s) <= SAMPLE_CHARS else s[:SAMPLE_CHARS].rsplit(None, 1)[0] + " …"
            for s in samples]


def _curve_runs(loaded: LoadedModel) -> list[dict] | None:
    """This model's newest runs with loss curves, for admins only (None: not an admin),
    from the records the admin page reads."""
    if not has_admin_token(basic=True):
        return None
    root = get_settings().experiments_dir
    names = {loaded.name, loaded.checkpoint.training.name}
    try:
        runs = records.recent_runs(root, RUN_SCAN)
    except Exception as e:  # a broken record must not take the page down
        log.warning("cannot read the experiment records in %s: %s", root, e)
        return []
    return [run for run in runs if run["model"] in names][:CURVE_RUNS]


# ---- routes -----------------------------------------------------------------------------

@bp.get("/models")
def index():
    return render_template("models.html", kind="models", models=get_registry().facts(),
                           vendor=False)


@bp.get("/models/<name>")
def model_page(name: str):
    loaded = _loaded(name)
    directory = _directory(loaded)
    card = render_card(directory, loaded.name)
    layers, memory_mb = layer_table(loaded.model)
    facts = loaded.facts
    try_args = {"model": facts.name} | ({"prompt": facts.prompt} if facts.prompt else {})
    html = render_template(
        "model.html", kind="models", vendor=False, m=facts, config=loaded.checkpoint.config,
        card=card, layers=layers, size_mb=memory_mb, evaluation=_evaluation(loaded),
        samples=_samples(card.samples, loaded), curves=_curve_runs(loaded),
        files=checkpoint_files(directory), file_note=file_note,
        generate_url=url_for("ui.generate_page", **try_args),
        infill_url=url_for("ui.infill_page", model=facts.name) if facts.can_infill else None)
    return html, 200, {"Vary": "Authorization"}  # the curves are there for admins only


@bp.get("/models/<name>/files/<filename>")
def download(name: str, filename: str):
    directory = _directory(_loaded(name))
    if filename not in checkpoint_files(directory):
        abort(404)
    return send_bounded(lambda: _send_file(directory, filename))


def _send_file(directory: Path, filename: str):
    """The file as an attachment, opened safely: the name listed a moment ago may have
    been swapped for a link since."""
    try:
        handle = safe_files.open_file(directory, filename, cap=None)
    except (OSError, safe_files.UnsafeFile):
        abort(404)
    try:
        status = os.fstat(handle.fileno())
        response = send_file(handle, as_attachment=True, download_name=filename,
                             conditional=False, last_modified=status.st_mtime,
                             etag=f"{status.st_ino:x}-{status.st_mtime_ns:x}-{status.st_size:x}")
        response.content_length = status.st_size
        return response.make_conditional(request, accept_ranges=True,
                                         complete_length=status.st_size)
    except BaseException:
        handle.close()
        raise
