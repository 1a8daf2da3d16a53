"""The server-sent event stream of one page job (the story pages' and the compare columns'):
its text as it is decoded, a failure in words, and always a last ``done`` event that the
page renders. Why the events are as they are: docs/web-app.md.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator

from flask import request
from markupsafe import escape

from app.pages.jobs import TOKEN_VIEW_ALTERNATIVES, FormErrors, Job, finish_note, job_from_token
from app.platform import ratelimit
from app.serving.service import GenerationStream, ServiceError

log = logging.getLogger(__name__)

FLUSH_S = 0.04  # pieces decoded closer together than this share one event

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


def failed_event(message: str) -> str:
    return sse_event(f'<p class="stream-error-text">{escape(message)}</p>', "failed")


#: Renders a stream's last event from the finish note, and the job and its stream once
#: one ran (None when it never started).
DoneEvent = Callable[[str, "Job | None", "GenerationStream | None"], str]


def job_events(kind: str, done: DoneEvent) -> Iterator[str]:
    """The events of the job whose token is this request's ``?job=``: ``message`` (the
    next text, HTML-escaped), ``failed`` (what went wrong) and always last ``done``,
    rendered by ``done``. The job runs with the token view's log-probabilities."""
    token = request.args.get("job", "")
    resumed = request.headers.get("Last-Event-ID") is not None
    yield ": fable\n\n"  # sends the headers now; EventSource ignores comments
    if resumed:
        yield failed_event("The connection was interrupted; generate again for a new text.")
        yield done("Interrupted", None, None)
        return
    wait = ratelimit.wait_needed()  # the htmx path generates here: this is what counts
    if wait:
        yield failed_event(f"Not started: {ratelimit.message(wait)}.")
        yield done("Not started", None, None)
        return
    try:
        job = job_from_token(kind, token)
        stream = job.open(TOKEN_VIEW_ALTERNATIVES)
    except FormErrors as e:
        yield failed_event(next(iter(e.errors.values())))
        yield done("Not started", None, None)
        return
    except ServiceError as e:
        yield failed_event(e.message)
        yield done("Not started", None, None)
        return
    with stream:  # closed however this ends, the client going away included
        try:
            for number, text in enumerate(coalesce(stream), start=1):
                yield sse_event(str(escape(text)), event_id=str(number))
        except Exception as e:
            log.exception("generation with %s failed mid-stream", job.model)
            yield failed_event(f"Generation failed ({type(e).__name__}).")
        yield done(finish_note(stream, job.seed), job, stream)


