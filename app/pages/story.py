"""The HTML pages: write a story (``/``) and fill in a story's middle (``/infill``).

A form posted through htmx gets a fragment that opens a server-sent event stream for its
job token (the validated request itself, signed, so any worker can serve it); without
JavaScript the same form is a plain POST answered with the finished text. The jobs, their
tokens and streams are app.pages.jobs's (app.pages.compare shares them); the stream's events
and why they are what they are: docs/web-app.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, render_template, request, stream_with_context, url_for

from app.pages.events import job_events, sse_event
from app.pages.jobs import (FALLBACK_PROMPT, MAX_JOB_CHARS, OPTION_FIELDS, SAMPLING_FIELDS, TEXT_FIELDS, FormErrors,
                            Job, Result, continuation, form_bounds, output_tokens, read_job, run_to_end)
from app.pages.render import vendor_ready
from app.pages.token_view import token_data
from app.platform import ratelimit
from app.platform.settings import MAX_INFILL_CANDIDATES, get_settings
from app.platform.web import STREAM_HEADERS, generates
from app.serving.registry import get_registry
from app.serving.service import GenerationStream, get_service

bp = Blueprint("ui", __name__)


# ---- rendering ------------------------------------------------------------------------

def default_form(kind: str, query: Mapping[str, str] | None = None) -> dict[str, str]:
    """The form a page opens with; a link may choose the model and fill in the text
    (``/?model=<name>&prompt=...``, as a model page's "try it" does). Nothing runs."""
    query = query or {}
    settings, infill = get_settings(), kind == "infill"
    offered = {m.name for m in get_registry().facts(infill=infill)}
    chosen = query.get("model")
    if chosen not in offered:
        model = get_registry().default(settings.default_model, infill=infill)
        chosen = model.name if model else ""
    # the sampling fields start empty: the model's own defaults (its generation_config.json)
    form = {"model": chosen}
    for name in TEXT_FIELDS[kind]:
        if query.get(name):
            form[name] = query[name][:settings.limits.max_prompt_chars]
    return form


def _first_error(kind: str, errors: Mapping[str | None, str]) -> str | None:
    for name in ("model", *TEXT_FIELDS[kind], *OPTION_FIELDS[kind], *SAMPLING_FIELDS):
        if name in errors:
            return name
    return None


def _context(kind: str, form: Mapping[str, Any], errors: Mapping[str | None, str] | None = None,
             **extra) -> dict[str, Any]:
    errors = dict(errors or {})
    # the infill form's candidates: an empty box is the server's default, its placeholder
    candidates = {"default_candidates": get_service().candidates_for(None),
                  "max_candidates": min(MAX_INFILL_CANDIDATES, get_service().scheduler.max_batch)}
    return {"kind": kind, "form": form, "errors": errors, "first_error": _first_error(kind, errors),
            "models": get_registry().facts(infill=kind == "infill"), "limits": get_settings().limits,
            "fallback_prompt": FALLBACK_PROMPT, "bounds": form_bounds(), **candidates, **extra}


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

def _done(kind: str, note: str, job: Job | None = None,
          stream: GenerationStream | None = None) -> str:
    """The last events: for a text cut at the token limit, the form that continues it;
    then the finish note, the token view's data (once a text was written) and the form's
    button enabled again (out of band)."""
    tokens = output_tokens(job, stream)
    html = (render_template("partials/finished_status.html", note=note, stats=None,
                            token_data=token_data(tokens))
            + render_template("partials/submit_button.html", kind=kind, busy=False,
                              button_oob=True))
    fields = continuation(job, stream)
    more = (sse_event(render_template("partials/continue_form.html", fields=fields), "continue")
            if fields else "")
    return more + sse_event(html, "done")


def event_stream(kind: str) -> Response:
    events = job_events(kind, lambda note, job, stream: _done(kind, note, job, stream))
    # stream_with_context: the generator validates and renders with the app's settings
    return Response(stream_with_context(events), mimetype="text/event-stream",
                    headers=STREAM_HEADERS)


# ---- routes ---------------------------------------------------------------------------

@bp.get("/")
def generate_page():
    return render_page("generate", default_form("generate", request.args))


@bp.post("/")
@generates()
def generate_submit():
    return _page_post("generate")


@bp.post("/generate/start")
@generates()
def generate_start():
    return _start("generate")


@bp.get("/generate/stream")
@generates()
def generate_stream():
    return event_stream("generate")


@bp.get("/infill")
def infill_page():
    return render_page("infill", default_form("infill", request.args))


@bp.post("/infill")
@generates()
def infill_submit():
    return _page_post("infill")


@bp.post("/infill/start")
@generates()
def infill_start():
    return _start("infill")


@bp.get("/infill/stream")
@generates()
def infill_stream():
    return event_stream("infill")
