"""The HTML pages: write a story (``/``) and fill in a story's middle (``/infill``).

A form posted through htmx gets a fragment that opens a server-sent event stream for its
job token (the validated request itself, so any worker can serve it); without
JavaScript the same form is a plain POST answered with the finished text. The stream's
events and why they are what they are: docs/web-app.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import secrets
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import (Blueprint, Response, current_app, render_template, request,
                   stream_with_context, url_for)
from markupsafe import escape

from . import ratelimit
from .registry import get_registry
from .schema import GenerationRequest, check_form, make_params, request_models, sampling_values
from .service import GenerationStream, ServiceError
from .settings import get_settings
from .web import STREAM_HEADERS, open_stream, parse_json

log = logging.getLogger(__name__)

bp = Blueprint("ui", __name__)

TEXT_FIELDS = {"generate": ("prompt",), "infill": ("first", "last")}
SAMPLING_FIELDS = ("temperature", "max_new_tokens", "top_k", "top_p", "seed",
                   "repetition_penalty", "stop")
#: Longest job token: "GET /infill/stream?job=<token> HTTP/1.1" stays under gunicorn's
#: default limit_request_line (4094 bytes) and any proxy's.
MAX_JOB_CHARS = 3800
MAX_JOB_JSON_BYTES = 256 * 1024  # a token never inflates past this (zip-bomb guard)
JOB_TTL_S = 600  # a stream's link works this long after the form was posted, then expires
FLUSH_S = 0.04  # pieces decoded closer together than this share one event
SEED_RANGE = 2 ** 31  # seeds picked for the user: short enough to read and retype
VENDOR_FILES = ("htmx.min.js", "sse.js")
DEFAULT_TEMPERATURE = "0.8"
FALLBACK_PROMPT = "Once upon a time"  # the placeholder for a model whose card offers none


class FormErrors(Exception):
    """Every problem of one submitted form: field name -> message (None: the whole form)."""

    def __init__(self, errors: dict[str | None, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = errors


@dataclass(frozen=True)
class Job:
    """One validated generation request from a page: what a job token carries."""
    kind: str  # "generate" or "infill"
    model: str
    texts: dict[str, str]  # generate: prompt; infill: first, last
    values: dict[str, Any] = field(default_factory=dict)  # SamplingParams kwargs, seed set

    @property
    def seed(self) -> int:
        return self.values["seed"]

    def to_token(self) -> str:
        data = json.dumps({"kind": self.kind, "model": self.model, **self.texts, **self.values,
                           "issued": int(time.time())},
                          separators=(",", ":"), ensure_ascii=False).encode()
        return base64.urlsafe_b64encode(zlib.compress(data, 9)).rstrip(b"=").decode("ascii")

    def open(self) -> GenerationStream:
        """Start generating (raises ServiceError: busy, unknown model, cannot infill)."""
        params = make_params(self.values, get_settings().limits)
        if self.kind == "infill":
            return open_stream(GenerationRequest(self.model, self.texts["first"],
                                                 self.texts["last"], True, params))
        return open_stream(GenerationRequest(self.model, self.texts["prompt"], None, True, params))


# ---- reading forms and tokens ---------------------------------------------------------

def _unescape_stop(text: str) -> str:
    r"""A stop string as typed in a one-line box: ``\n`` is a line break, ``\t`` a tab,
    ``\\`` a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def read_job(kind: str, raw: Mapping[str, Any], *, from_form: bool = True) -> Job:
    """A validated ``Job`` from form fields (strings) or a decoded token (typed values);
    raises ``FormErrors`` with every problem found, each under its field's name."""
    models = request_models(get_settings().limits)
    values = {name: raw.get(name) for name in ("model", *TEXT_FIELDS[kind], *SAMPLING_FIELDS)}
    if from_form:
        for name in TEXT_FIELDS[kind]:
            if isinstance(values[name], str):  # browsers send a textarea's lines as CRLF
                values[name] = values[name].replace("\r\n", "\n")
        if isinstance(values["stop"], str):
            values["stop"] = _unescape_stop(values["stop"]) if values["stop"] else None
    form, errors = check_form(models.infill_form if kind == "infill" else models.generate_form,
                              values)
    if "model" not in errors:
        loaded = get_registry().get(values["model"])
        if loaded is None:
            errors["model"] = (f"'model' must be one of the loaded models; "
                               f"{values['model']!r} is not loaded")
        elif kind == "infill" and not loaded.facts.can_infill:
            errors["model"] = (f"'model' must be a model that infills; {values['model']!r} "
                               f"was not trained to")
    if kind == "infill" and not errors.keys() & {"first", "last"}:
        for name, label in (("first", "first sentence"), ("last", "last sentence")):
            if not (values[name] or "").strip():
                errors[name] = f"'{name}' is required: the story's {label}"
    if errors:  # in the order the form shows the fields
        order = ("model", *TEXT_FIELDS[kind], *SAMPLING_FIELDS)
        raise FormErrors(dict(sorted(errors.items(), key=lambda item: _position(order, item[0]))))
    texts = {name: getattr(form, name) or "" for name in TEXT_FIELDS[kind]}
    values = sampling_values(form, dict(zip(SAMPLING_FIELDS, SAMPLING_FIELDS)))
    values.setdefault("seed", secrets.randbelow(SEED_RANGE))  # shown, so a text can be redone
    return Job(kind, form.model, texts, values)


def _position(order: tuple[str, ...], field: str) -> int:
    name = field.split("[")[0]
    return order.index(name) if name in order else len(order)


def job_from_token(kind: str, token: str) -> Job:
    """The job a token describes, validated again from scratch (it came from a URL)."""
    invalid = FormErrors({None: "this generation link is invalid; submit the form again"})
    if not token or len(token) > MAX_JOB_CHARS * 2:
        raise invalid
    try:
        blob = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        inflate = zlib.decompressobj()
        data = inflate.decompress(blob, MAX_JOB_JSON_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            raise ValueError("truncated or too large")
        body = parse_json(data)
    except (binascii.Error, zlib.error, ValueError):  # RequestError is a ValueError
        raise invalid from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise invalid
    issued = body.get("issued")
    if not isinstance(issued, int) or isinstance(issued, bool) or issued > time.time() + 60:
        raise invalid
    if time.time() - issued > JOB_TTL_S:
        raise FormErrors({None: "this generation link has expired; submit the form again"})
    return read_job(kind, body, from_form=False)


# ---- results --------------------------------------------------------------------------

@dataclass
class Result:
    """What a result panel shows: the texts given, the text generated so far, and either
    the finish note or the URL of the stream that will write them."""
    job: Job
    text: str = ""
    note: str | None = None
    error: str | None = None
    status: int = 200  # the HTTP status an error maps to
    stream_url: str | None = None


def finish_note(stream: GenerationStream, seed: int) -> str:
    completion = stream.completion
    if completion is None:
        return f"Stopped · seed {seed}"
    if stream.timed_out:
        reason = "Stopped at the time limit"
    elif completion.finish_reason == "length":
        reason = "Reached the token limit"
    else:
        reason = "Finished"
    seconds = ((stream.finished_ns or time.perf_counter_ns()) - stream.started_ns) / 1e9
    tokens = completion.completion_tokens
    plural = "" if tokens == 1 else "s"
    return f"{reason} · {tokens:,} token{plural} in {seconds:.1f} s · seed {seed}"


def run_to_end(job: Job) -> Result:
    """Generate the whole text now (the no-JavaScript path)."""
    try:
        stream = job.open()
    except ServiceError as e:
        return Result(job, error=e.message, status=e.status)
    try:
        completion = stream.collect()
    except Exception as e:
        log.exception("generation with %s failed", job.model)
        return Result(job, text=stream.text, error=f"generation failed ({type(e).__name__})",
                      status=500)
    return Result(job, text=completion.text, note=finish_note(stream, job.seed))


# ---- rendering ------------------------------------------------------------------------

def vendor_ready() -> bool:
    """htmx and its SSE extension are installed in static/vendor/ (``make assets``)."""
    folder = Path(current_app.static_folder or "static") / "vendor"
    return all((folder / name).is_file() for name in VENDOR_FILES)


def default_form(kind: str) -> dict[str, str]:
    model = get_registry().default(get_settings().default_model, infill=kind == "infill")
    return {"model": model.name if model else "", "temperature": DEFAULT_TEMPERATURE,
            "max_new_tokens": str(get_settings().default_new_tokens)}


def _first_error(kind: str, errors: Mapping[str | None, str]) -> str | None:
    for name in ("model", *TEXT_FIELDS[kind], *SAMPLING_FIELDS):
        if name in errors:
            return name
    return None


def _context(kind: str, form: Mapping[str, Any], errors: Mapping[str | None, str] | None = None,
             **extra) -> dict[str, Any]:
    errors = dict(errors or {})
    return {"kind": kind, "form": form, "errors": errors, "first_error": _first_error(kind, errors),
            "models": get_registry().facts(infill=kind == "infill"), "limits": get_settings().limits,
            "fallback_prompt": FALLBACK_PROMPT, **extra}


def render_page(kind: str, form: Mapping[str, Any], *, errors=None, result: Result | None = None,
                status: int = 200, headers: dict | None = None):
    html = render_template(f"{kind}.html", vendor=vendor_ready(), result=result,
                           **_context(kind, form, errors))
    return html, status, headers or {}


def render_fragment(kind: str, form: Mapping[str, Any], result: Result, *, busy: bool) -> str:
    """The htmx answer: the result panel, and the form again out of band (errors cleared,
    its button disabled while the text streams)."""
    return (render_template(f"partials/{kind}_result.html", result=result)
            + render_template(f"partials/{kind}_form.html", oob=True, busy=busy,
                              **_context(kind, form)))


def _page_post(kind: str):
    """A form posted without JavaScript: the whole page, with the finished text."""
    wait = ratelimit.wait_needed()
    if wait:  # the page again, the form as it was, the reason on top
        return render_page(kind, request.form, errors={None: ratelimit.message(wait)},
                           status=429, headers={"Retry-After": str(ratelimit.retry_after(wait))})
    try:
        job = read_job(kind, request.form)
    except FormErrors as e:
        return render_page(kind, request.form, errors=e.errors, status=400)
    result = run_to_end(job)
    if result.error is not None and not result.text:
        headers = {"Retry-After": "1"} if result.status == 503 else {}
        return render_page(kind, request.form, errors={None: result.error},
                           status=result.status, headers=headers)
    return render_page(kind, request.form, result=result)


def _start(kind: str):
    """A form posted through htmx: a fragment that opens the stream, or the form with its
    errors (swapped in place of the form, status 200 so that htmx swaps it)."""
    try:
        job = read_job(kind, request.form)
    except FormErrors as e:
        html = render_template(f"partials/{kind}_form.html", oob=False, busy=False,
                               **_context(kind, request.form, e.errors))
        return html, 200, {"HX-Retarget": f"#{kind}-form", "HX-Reswap": "outerHTML"}
    token = job.to_token()
    if len(token) > MAX_JOB_CHARS:  # cannot travel in a URL: answer with the whole text
        ratelimit.enforce()  # generates here, so it counts (otherwise the stream does)
        result = run_to_end(job)
        return render_fragment(kind, request.form, result, busy=False)
    result = Result(job, stream_url=url_for(f"ui.{kind}_stream", job=token))
    return render_fragment(kind, request.form, result, busy=True)


# ---- server-sent events ---------------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_event(data: str, event: str | None = None, event_id: str | None = None) -> str:
    """One event; each line of ``data`` is its own ``data:`` line (the browser joins them
    with newlines), as SSE framing requires."""
    head = ([f"id: {event_id}"] if event_id else []) + ([f"event: {event}"] if event else [])
    return "\n".join(head + [f"data: {line}" for line in _LINE_BREAK.split(data)]) + "\n\n"


def coalesce(pieces: Iterable[str], interval: float = FLUSH_S) -> Iterator[str]:
    """The pieces, joined while they arrive less than ``interval`` seconds apart (the first
    one goes out at once)."""
    held: list[str] = []
    last = -math.inf
    for piece in pieces:
        held.append(piece)
        now = time.monotonic()
        if now - last >= interval:
            yield "".join(held)
            held, last = [], now
    if held:
        yield "".join(held)


def _done(kind: str, note: str) -> str:
    html = (f'<span class="status-text">{escape(note)}</span>'
            + render_template("partials/submit_button.html", kind=kind, busy=False,
                              button_oob=True))
    return sse_event(html, "done")


def _failed(message: str) -> str:
    return sse_event(f'<p class="stream-error-text">{escape(message)}</p>', "failed")


def event_stream(kind: str) -> Response:
    token = request.args.get("job", "")
    resumed = request.headers.get("Last-Event-ID") is not None

    def events() -> Iterator[str]:
        yield ": fable\n\n"  # sends the headers now; EventSource ignores comments
        if resumed:
            yield _failed("The connection was interrupted; generate again for a new text.")
            yield _done(kind, "Interrupted")
            return
        wait = ratelimit.wait_needed()  # the htmx path generates here: this is what counts
        if wait:
            yield _failed(f"Not started: {ratelimit.message(wait)}.")
            yield _done(kind, "Not started")
            return
        try:
            job = job_from_token(kind, token)
            stream = job.open()
        except FormErrors as e:
            yield _failed(next(iter(e.errors.values())))
            yield _done(kind, "Not started")
            return
        except ServiceError as e:
            yield _failed(e.message)
            yield _done(kind, "Not started")
            return
        with stream:  # closed however this ends, the client going away included
            try:
                for number, text in enumerate(coalesce(stream), start=1):
                    yield sse_event(str(escape(text)), event_id=str(number))
            except Exception as e:
                log.exception("generation with %s failed mid-stream", job.model)
                yield _failed(f"Generation failed ({type(e).__name__}).")
            yield _done(kind, finish_note(stream, job.seed))

    # stream_with_context: the generator validates and renders with the app's settings
    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers=STREAM_HEADERS)


# ---- routes ---------------------------------------------------------------------------

@bp.get("/")
def generate_page():
    return render_page("generate", default_form("generate"))


@bp.post("/")
def generate_submit():
    return _page_post("generate")


@bp.post("/generate/start")
def generate_start():
    return _start("generate")


@bp.get("/generate/stream")
def generate_stream():
    return event_stream("generate")


@bp.get("/infill")
def infill_page():
    return render_page("infill", default_form("infill"))


@bp.post("/infill")
def infill_submit():
    return _page_post("infill")


@bp.post("/infill/start")
def infill_start():
    return _start("infill")


@bp.get("/infill/stream")
def infill_stream():
    return event_stream("infill")
