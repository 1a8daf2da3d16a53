"""How many checkpoint files one worker sends at once.

A download holds a request thread until its last byte is written, and a file is megabytes:
clients that ask for one and read slowly (or never) could otherwise take every thread.
Each worker sends at most ``FABLE_MAX_DOWNLOADS`` files at once; another download gets 503
with Retry-After at once. (A client that stops reading is dropped after
``FABLE_WRITE_TIMEOUT_S`` by the HTTP worker, which frees its slot.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask import Response, current_app
from werkzeug.exceptions import ServiceUnavailable

from app.platform.settings import get_settings


def send_bounded(send: Callable[[], Response]) -> Response:
    """``send()``'s response, holding a download slot until the response is closed (its
    last byte written, or the client dropped); 503 when every slot is taken."""
    slots = current_app.extensions.get("fable.downloads")
    if slots is None:
        slots = current_app.extensions.setdefault(
            "fable.downloads", threading.BoundedSemaphore(get_settings().max_downloads))
    if not slots.acquire(blocking=False):
        raise ServiceUnavailable(f"{get_settings().max_downloads} downloads are under way; "
                                 f"retry in a moment", retry_after=1)
    try:
        response = send()
    except BaseException:
        slots.release()
        raise
    # werkzeug hands a passed-through file to the server as it is and never runs
    # call_on_close for it: iterated instead (8 KB blocks), the slot is given back when the
    # response closes, and each block's write has its own deadline
    response.direct_passthrough = False
    response.call_on_close(slots.release)
    return response
