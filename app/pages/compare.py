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

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, render_template, request, stream_with_context, url_for
from werkzeug.datastructures import MultiDict

from app.pages.comparison import (FIELD_ORDER, MAX_MODELS, MIN_MODELS, MODES, infill_unavailable, read_comparison,
                                   run_comparison)
from app.pages.events import job_events, sse_event
from app.pages.jobs import FALLBACK_PROMPT, MAX_JOB_CHARS, FormErrors, Job, Result, form_bounds, output_tokens
from app.pages.render import vendor_ready
from app.pages.token_view import run_stats, token_data
from app.platform import ratelimit
from app.platform.settings import get_settings
from app.platform.web import STREAM_HEADERS, generates
from app.serving.registry import get_registry
from app.serving.service import GenerationStream

bp = Blueprint("compare", __name__)

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
