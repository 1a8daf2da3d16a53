"""The training page (``/train``): a text in, a model out, the curve live. Behind the
admin token, as ``/admin`` is.

``/train`` takes a bundled corpus or an uploaded text, a preset, a budget and a name, and
starts the run (``training_runs``: the training command in its own process, one at a
time); ``/train/<name>`` follows it: its curves and samples stream from the run's own
records (``/train/<name>/events``, server-sent events), and without JavaScript the page
shows the latest figures and refreshes itself. When the run ends the model is reloaded
into every worker and the page links to it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, redirect, render_template, request, url_for
from werkzeug.datastructures import MultiDict

from app.pages.events import sse_event
from app.platform.settings import get_settings
from app.platform.web import ADMIN_CHALLENGE, has_admin_token
from app.serving.registry import get_registry
from app.serving.reload import get_reloader

from . import training_runs
from .training_runs import MAX_MINUTES, MIN_MINUTES, PRESETS, RunRefused, TrainingRuns

log = logging.getLogger(__name__)

bp = Blueprint("train", __name__, url_prefix="/train")

STREAM_S = 30.0  # an event stream ends after this; EventSource comes back where it left off
POLL_S = 0.5
MAX_STREAMS = 8  # event streams one worker serves at once (each holds a thread)
TAIL_BYTES = 256 * 1024  # what the page without JavaScript reads of a run's records
BUNDLED_MAX_BYTES = 64 * 1024 * 1024  # bigger corpora take too long to prepare for a page's run
BUNDLED_TTL_S = 300.0
FIELDS = {"text": "Text", "upload": "Text file", "preset": "Preset", "minutes": "Minutes",
          "name": "Name"}

_streams = threading.BoundedSemaphore(MAX_STREAMS)


@bp.before_request
def _require_admin():
    if not has_admin_token(basic=True):
        return render_template("admin_denied.html", kind="train"), 401, ADMIN_CHALLENGE
    return None


def get_runs() -> TrainingRuns:
    runs = current_app.extensions.get("fable.training")
    if runs is None:
        settings = get_settings()
        runs = TrainingRuns(settings.train_dir, settings.checkpoint_dir, settings.experiments_dir,
                            threads=settings.train_threads, quota_bytes=settings.train_quota_bytes)
        current_app.extensions["fable.training"] = runs
    return runs


def bundled_texts() -> dict[str, tuple[str, int]]:
    """The corpora on this machine a run can train on: reference -> (what it is, bytes),
    as ``fable data list --json`` finds them (asked once per worker: the app imports no
    training code). Text files only, and none too big to prepare for a page's run."""
    cached = current_app.extensions.get("fable.training.bundled")
    if cached is not None and time.monotonic() < cached[0]:
        return cached[1]
    found: dict[str, tuple[str, int]] = {}
    try:
        done = subprocess.run([sys.executable, "-m", "training.corpora", "list", "--json"],
                              capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                              env=training_runs.training_environment())
        corpora = json.loads(done.stdout) if done.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        log.warning("cannot list the bundled corpora: %s", e)
        corpora = []
    for corpus in corpora:
        if not corpus.get("text"):
            continue
        for file in corpus.get("files", []):
            size = file.get("bytes")
            if file.get("path") and size and size <= BUNDLED_MAX_BYTES:
                found[file["reference"]] = (corpus["about"], size)
    # asked again now and then: a corpus fetched meanwhile shows up without a restart
    current_app.extensions["fable.training.bundled"] = (time.monotonic() + BUNDLED_TTL_S, found)
    return found


def _page(form: MultiDict | None = None, errors: dict | None = None, status: int = 200):
    settings, runs = get_settings(), get_runs()
    bundled = bundled_texts()
    if form is None:
        first = next(iter(bundled), "upload")
        form = MultiDict({"text": first, "preset": "char-gpt", "minutes": "5", "name": ""})
    errors = errors or {}
    return render_template(
        "train.html", kind="train", form=form, errors=errors,
        first_error=next((k for k in errors if k), None), bundled=bundled, presets=PRESETS,
        runs=runs.all(), running=training_runs.running_name(runs.root),
        used_bytes=runs.used_bytes(), quota_bytes=runs.quota_bytes,
        upload_bytes=settings.train_upload_bytes, threads=runs.threads,
        min_minutes=MIN_MINUTES, max_minutes=MAX_MINUTES, on_space=bool(settings.space_id),
        fields=FIELDS, vendor=False), status


@bp.get("")
def index():
    return _page()


@bp.post("")
def start():
    form = request.form
    errors: dict[str | None, str] = {}
    name = form.get("name", "").strip()
    preset = form.get("preset", "")
    text = form.get("text", "")
    try:
        minutes = int(form.get("minutes", ""))
    except ValueError:
        minutes = MIN_MINUTES  # said below; the other fields are still checked
        errors["minutes"] = f"Give a whole number of minutes, {MIN_MINUTES} to {MAX_MINUTES}."
    for refusal in get_runs().refusals(name, preset, minutes):
        errors.setdefault(refusal.field, refusal.message)
    upload, corpus, label = None, None, None
    if text == "upload":
        file = request.files.get("upload")
        if file is None or not file.filename:
            errors["upload"] = "Choose a text file to upload."
        else:
            upload = file.read()
            problem = upload_problem(upload)
            if problem:
                errors["upload"] = problem
    elif text in bundled_texts():
        corpus, label = text, text
    else:
        errors["text"] = "Choose a bundled text or upload one."
    if not errors:
        try:
            status = get_runs().start(name, preset, minutes, upload=upload, corpus=corpus,
                                      corpus_label=label, on_exit=_reload_when_done())
        except RunRefused as e:
            field = "upload" if e.field == "text" and upload is not None else e.field
            errors[field] = e.message
        else:
            return redirect(url_for("train.run_page", name=status.name), 303)
    return _page(form, errors, 409 if None in errors else 400)


def upload_problem(data: bytes) -> str | None:
    """What makes an upload unusable before anything is written; the training command
    checks the rest (enough text for its context) with its own words."""
    if not data:
        return "The file is empty: there is no text to train on."
    nul = data.find(b"\0")
    if nul >= 0:
        return (f"This is a binary file (a NUL byte at offset {nul:,}), not text: "
                "upload a plain UTF-8 text file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return (f"This file is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                f"{e.start:,}): save it as UTF-8 and upload it again.")
    if not text.strip():
        return "The file holds only white space: there is no text to train on."
    return None


def _reload_when_done():
    """``on_exit`` for a run: a model that was written is loaded by every worker."""
    reloader = get_reloader()

    def after(status) -> None:
        if status.state == "done":
            reloader.reload()
    return after


# ---- one run ----------------------------------------------------------------------------

def _status_or_404(name: str):
    status = get_runs().status(name)
    if status is None:
        abort(404)
    return status


@bp.get("/<name>")
def run_page(name: str):
    status = _status_or_404(name)
    served = name in get_registry()
    if status.state == "done" and not served:  # ended where no worker saw it: load it now
        get_reloader().reload()
        served = name in get_registry()
    latest = latest_records(get_runs().metrics_path(name))
    return render_template("train_run.html", kind="train", run=status, latest=latest,
                           served=served, default_model=getattr(get_registry().default(), "name", None),
                           now=time.time(), sample_every=training_runs.SAMPLE_EVERY, vendor=False)


@bp.post("/<name>/cancel")
def cancel(name: str):
    _status_or_404(name)
    get_runs().cancel(name)
    return redirect(url_for("train.run_page", name=name), 303)


@bp.post("/<name>/finish")
def finish(name: str):
    _status_or_404(name)
    get_runs().finish(name)
    return redirect(url_for("train.run_page", name=name), 303)


@bp.post("/<name>/delete")
def delete(name: str):
    status = _status_or_404(name)
    try:
        get_runs().delete(name)
    except RunRefused as e:
        return _page(errors={None: e.message}, status=409)
    if status.state == "done":
        get_reloader().reload()
    return redirect(url_for("train.index"), 303)


def latest_records(path: Path) -> dict:
    """The last train and validation figures and the last sample in a run's records (the
    end of the file only)."""
    latest: dict = {"train": None, "validation": None, "sample": None}
    try:
        start = max(0, path.stat().st_size - TAIL_BYTES)
    except OSError:
        return latest
    # a line cut by the start is no JSON object: _read_from leaves it out
    for record in _read_from(path, start)[0]:
        if record.get("group") in latest:
            latest[record["group"]] = record
    return latest


def _parse(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# ---- the live stream --------------------------------------------------------------------

@bp.get("/<name>/events")
def events(name: str):
    """The run's records as they are written, from the byte offset in Last-Event-ID (a
    reconnecting EventSource sends it): ``records`` events (a JSON list each, its id the
    offset after it), then ``end`` with the outcome once the run is over."""
    _status_or_404(name)
    if not _streams.acquire(blocking=False):
        return Response("too many training streams at once; reload the page in a minute\n",
                        status=503, mimetype="text/plain", headers={"Retry-After": "10"})
    try:
        offset = int(request.headers.get("Last-Event-ID", "0") or 0)
    except ValueError:
        offset = 0
    model_url = url_for("models.model_page", name=name)
    response = Response(_follow(get_runs(), name, max(0, offset), model_url),
                        mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(_streams.release)  # also when the stream never started
    return response


def _follow(runs: TrainingRuns, name: str, offset: int, model_url: str) -> Iterator[str]:
    yield "retry: 2000\n\n"
    path = runs.metrics_path(name)
    deadline = time.monotonic() + STREAM_S
    while True:
        status = runs.status(name)  # before reading: what a finished run wrote is all there
        records, offset = _read_from(path, offset)
        if records:
            yield sse_event(json.dumps(records), "records", str(offset))
        if status is None or not status.running:
            yield sse_event(json.dumps(_outcome(status, model_url)), "end", str(offset))
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(POLL_S)


def _read_from(path: Path, offset: int) -> tuple[list[dict], int]:
    """Whole lines from ``offset`` on, and the offset after the last one."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = [r for r in map(_parse, data[:end].decode("utf-8", "replace").splitlines()) if r]
    return records, offset + end


def _outcome(status, model_url: str) -> dict:
    if status is None:
        return {"state": "deleted", "message": "This run was deleted."}
    return {"state": status.state, "message": status.message,
            "model": model_url if status.state == "done" else None}
