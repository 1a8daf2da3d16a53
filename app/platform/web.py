"""HTTP helpers every blueprint shares: error shapes, streamed responses, the admin check.

Errors are Ollama's ``{"error": "..."}`` everywhere but under ``/v1``, where they take
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator

from flask import Response, current_app, jsonify, request
from werkzeug.datastructures import Authorization

from app.platform.settings import get_settings

#: Paths whose errors are JSON whatever the client accepts (``/v1`` in OpenAI's shape).
JSON_PREFIXES = ("/api", "/v1", "/healthz", "/openapi.json")
#: Headers of every streamed response: proxies (nginx, the HF Spaces front end) must
#: pass each piece on at once instead of buffering the whole body.
STREAM_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 429: "rate_limit_error"}


# ---- errors -------------------------------------------------------------------------------

def ollama_error(status: int, message: str, headers: dict | None = None) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def openai_error(status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> Response:
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    response = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
    response.status_code = status
    response.headers.update(headers or {})
    return response


VLLM_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # vLLM's, beside /v1: OpenAI's errors


def is_openai_path() -> bool:
    return request.path == "/v1" or request.path.startswith("/v1/") or request.path in VLLM_PATHS


def json_error(status: int, message: str) -> Response:
    """An error in the shape of the API the request was for."""
    return (openai_error if is_openai_path() else ollama_error)(status, message)


def wants_json() -> bool:
    """Errors on API paths, or for clients that prefer JSON, are JSON (never HTML)."""
    if any(request.path == p or request.path.startswith(p + "/") for p in JSON_PREFIXES):
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "application/json"


def retry_headers(e) -> dict:
    """A 503's Retry-After, for any error with a ``status`` (a ServiceError)."""
    return {"Retry-After": "1"} if e.status == 503 else {}


#: What an admin page answers a browser without the token: ask for it (HTTP Basic), and
#: keep the refusal out of caches.
ADMIN_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Fable admin", charset="UTF-8"',
                   "Cache-Control": "no-store"}


def has_admin_token(*, basic: bool = False) -> bool:
    """True when no admin token is configured or the request carries it, as a Bearer token
    or, with ``basic`` (the admin page, which browsers sign in to), as a Basic password."""
    return admin_credentials_match(request.headers.get("Authorization"),
                                   get_settings().admin_token, basic=basic)


def admin_credentials_match(authorization: str | None, token: str | None, *,
                            basic: bool) -> bool:
    """The admin check on an ``Authorization`` header's value, outside any request: the
    worker (app/http_worker.py) asks it of a request's head, before its body is read.
    True when ``token`` is None or the header carries it (see ``has_admin_token``)."""
    if token is None:
        return True
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        given = credentials.strip()
    elif scheme.lower() == "basic" and basic:
        parsed = Authorization.from_header(authorization)  # as request.authorization reads it
        if parsed is None:  # not base64, or not UTF-8
            return False
        given = parsed.password or ""
    else:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


#: The training page's upload: the one request that may send FABLE_TRAIN_UPLOAD_BYTES.
TRAIN_UPLOAD = ("POST", "/train")


def is_train_upload(method: str, path: str, authorization: str | None,
                    token: str | None) -> bool:
    """A request that may send FABLE_TRAIN_UPLOAD_BYTES rather than FABLE_MAX_BODY_BYTES:
    the training page's upload (``path``: without the query string) from a client allowed
    to train (the admin token, when set, as a Bearer token or a Basic password). The
    worker and the app must both decide with this: the worker buffers a body only up to
    the limit it decided, and a larger limit in the app would read the rest in a thread."""
    return ((method.upper(), path) == TRAIN_UPLOAD
            and admin_credentials_match(authorization, token, basic=True))


#: What a page route that generates answers a browser without the key (FABLE_PROTECT_PAGES):
#: ask for it (HTTP Basic, the key as the password), and keep the refusal out of caches.
PAGE_KEY_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Fable", charset="UTF-8"',
                      "Cache-Control": "no-store"}


# ---- page routes that generate ------------------------------------------------------------

def generates(when: Callable[[], bool] | None = None):
    """Marks a page view that starts generating, whatever its method (``when``: only for
    the requests it accepts, e.g. ``/compare?run=1``): the checks before every request
    refuse it cross-site (app.platform.csrf) and, with FABLE_PROTECT_PAGES, without a key
    (app.platform.api_access)."""
    def mark(view):
        view.fable_generates = when or (lambda: True)
        return view
    return mark


def request_generates() -> bool:
    """This request is for a view marked with ``generates``, which would start work."""
    if request.routing_exception is not None or request.endpoint is None:
        return False
    test = getattr(current_app.view_functions.get(request.endpoint), "fable_generates", None)
    return test is not None and bool(test())


# ---- streamed responses ---------------------------------------------------------------------

def streamed(lines: Iterator[str], stream, mimetype: str) -> Response:
    """A streaming response whose generator closes ``stream`` however it ends: finished,
    failed, or closed by the WSGI server because the client went away."""
    def body():
        try:
            yield from lines
        finally:
            stream.close()
    return Response(body(), mimetype=mimetype, headers=STREAM_HEADERS)
