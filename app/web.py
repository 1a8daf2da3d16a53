"""HTTP helpers the blueprints share: error shapes, streamed responses, the admin check.

Errors are Ollama's ``{"error": "..."}`` everywhere but under ``/v1``, where they take
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterator

from flask import Request, Response, current_app, jsonify, request

from .schema import GenerationRequest, RequestError, json_type
from .service import GenerationStream, ServiceError, get_service
from .settings import get_settings

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


def retry_headers(e: ServiceError) -> dict:
    return {"Retry-After": "1"} if e.status == 503 else {}


# ---- requests -----------------------------------------------------------------------------

def read_json_object(req: Request) -> dict:
    """The request body as a JSON object.

    A body without a Content-Type is read as JSON (as Ollama does, for hand-written
    clients); any other type than ``application/json`` (or ``*+json``) is a 415. A body
    over ``MAX_CONTENT_LENGTH`` raises werkzeug's 413 from ``get_data``.
    """
    mimetype = req.mimetype
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise RequestError(None, f"Content-Type must be application/json, got {mimetype}",
                           status=415)
    raw = req.get_data(cache=True)
    if not raw.strip():
        raise RequestError(None, "request body is empty; send a JSON object")
    body = parse_json(raw, req.mimetype_params.get("charset", "utf-8"))
    if not isinstance(body, dict):
        raise RequestError(None, f"request body must be a JSON object, got {json_type(body)}")
    return body


MAX_JSON_DEPTH = 32  # no request body nests deeper; Python's parser would recurse to a crash


def parse_json(raw: bytes, charset: str = "utf-8"):
    """A request's JSON body, or ``RequestError`` saying why
    not: invalid UTF-8 or JSON, NaN or Infinity, nesting deeper than MAX_JSON_DEPTH, or a
    number too long to read."""
    try:
        text = raw.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise RequestError(None, "request body is not valid UTF-8") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH:
        raise RequestError(None, f"request body nests arrays and objects more than "
                                 f"{MAX_JSON_DEPTH} deep")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_int=_integer)
    except json.JSONDecodeError as e:
        raise RequestError(None, f"request body is not valid JSON: {e}") from None
    except ValueError as e:  # NaN / Infinity, an integer of thousands of digits
        raise RequestError(None, str(e)) from None


def _depth(text: str) -> int:
    """How deep brackets nest, strings skipped (a linear scan: no recursion to exhaust)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > 100:  # beyond any setting's range; int() would refuse at 4,300
        raise ValueError(f"request body has an integer of {len(digits)} digits; numbers "
                         f"here have at most 100")
    return int(digits)


def _refuse_constant(name: str):
    raise ValueError(f"request body is not valid JSON: {name} is not a JSON number")


#: What an admin page answers a browser without the token: ask for it (HTTP Basic), and
#: keep the refusal out of caches.
ADMIN_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Fable admin", charset="UTF-8"',
                   "Cache-Control": "no-store"}


def has_admin_token(*, basic: bool = False) -> bool:
    """True when no admin token is configured or the request carries it, as a Bearer token
    or, with ``basic`` (the admin page, which browsers sign in to), as a Basic password."""
    token = get_settings().admin_token
    if token is None:
        return True
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = credentials.strip()
    elif scheme.lower() == "basic" and basic and request.authorization is not None:
        given = request.authorization.password or ""
    else:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


#: What a page route that generates answers a browser without the key (FABLE_PROTECT_PAGES):
#: ask for it (HTTP Basic, the key as the password), and keep the refusal out of caches.
PAGE_KEY_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Fable", charset="UTF-8"',
                      "Cache-Control": "no-store"}


# ---- page routes that generate ------------------------------------------------------------

def generates(when: Callable[[], bool] | None = None):
    """Marks a page view that starts generating, whatever its method (``when``: only for
    the requests it accepts, e.g. ``/compare?run=1``): the checks before every request
    refuse it cross-site (app.csrf) and, with FABLE_PROTECT_PAGES, without a key
    (app.api_access)."""
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


# ---- generation ---------------------------------------------------------------------------

def open_stream(req: GenerationRequest) -> GenerationStream:
    """Start the generation a validated request asks for (raises ServiceError before any
    text is produced: unknown model, cannot infill, busy)."""
    service = get_service()
    if req.messages is not None:
        return service.stream_chat(req.model, req.messages, req.sampling)
    if req.suffix is not None:
        return service.stream_infill(req.model, req.prompt, req.suffix, req.sampling,
                                     req.candidates)
    return service.stream(req.model, req.prompt, req.sampling)


def streamed(lines: Iterator[str], stream: GenerationStream, mimetype: str) -> Response:
    """A streaming response whose generator closes ``stream`` however it ends: finished,
    failed, or closed by the WSGI server because the client went away."""
    def body():
        try:
            yield from lines
        finally:
            stream.close()
    return Response(body(), mimetype=mimetype, headers=STREAM_HEADERS)
