"""Who may call the JSON APIs, and from which web pages: API keys and CORS, both opt-in.

``FABLE_API_KEYS``: the generation APIs (``/api/*``, ``/v1/*``, vLLM's tokenizer routes) need ``Authorization:
Bearer <key>``; a missing or wrong key is a 401 in the API's own error shape. The pages
stay public (a Space's visitors use them) unless ``FABLE_PROTECT_PAGES`` is on: then
every page route that generates (a view marked ``web.generates``) needs one of the keys
too, as a Basic password (a browser asks for it once and sends it with every form,
htmx request and event stream after) or a Bearer token; reading a page never does.
``/healthz`` (probes) and ``/openapi.json`` need none; ``/api/models`` keeps its admin
token. Keys are compared in constant time, against every key, so the time taken says
nothing about which one nearly matched.

``FABLE_CORS_ORIGINS``: browsers on those origins may call the JSON APIs (preflights
answered, ``Access-Control-Allow-Origin`` on the answers). Unset, no CORS header is ever
sent, so another site's script cannot read an answer. And it cannot spend the server's
(or a visitor's rate limit's) work either: a POST whose ``Origin`` is neither this site
nor an allowed origin is refused with 403 before anything runs, as Ollama refuses origins
outside ``OLLAMA_ORIGINS``. Clients that are not browsers send no ``Origin`` and pass.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from flask import Flask, Response, render_template, request

from app.platform.csrf import SAFE_METHODS, normalise, own_origin
from app.platform.settings import get_settings
from app.platform.web import PAGE_KEY_CHALLENGE, VLLM_PATHS, json_error, request_generates, wants_json

API_PREFIXES = ("/api", "/v1", *VLLM_PATHS)
CORS_PATHS = (*API_PREFIXES, "/healthz", "/openapi.json")
OPEN_PATHS = ("/api/models",)  # guarded by the admin token instead
PREFLIGHT_MAX_AGE_S = 600


def init_app(app: Flask) -> None:
    app.before_request(_preflight_or_key)
    app.before_request(_page_key)
    app.after_request(_allow_origin)


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _origin(value: str) -> str | None:
    """An origin as ``csrf.normalise`` writes it (lower case, no default port), or None."""
    parts = urlsplit(value.strip())
    return normalise(parts.scheme, parts.netloc) if parts.scheme and parts.netloc else None


def _listed(origin: str) -> bool:
    """The origin is one FABLE_CORS_ORIGINS lets call the APIs (or it lists ``*``)."""
    allowed = get_settings().cors_origin_list
    return "*" in allowed or (_origin(origin) or "") in {_origin(o) for o in allowed}


def _allowed_origin() -> str | None:
    """The value of Access-Control-Allow-Origin for this request, if any."""
    origin = request.headers.get("Origin")
    if not origin or not _under(request.path, CORS_PATHS) or not _listed(origin):
        return None
    return "*" if "*" in get_settings().cors_origin_list else origin


def cross_site_refusal() -> str | None:
    """Why a browser's POST from another site must be refused, or None."""
    origin = request.headers.get("Origin")
    if origin is None or request.method in SAFE_METHODS:
        return None
    if _origin(origin) == own_origin() or _listed(origin):
        return None
    shown = origin if len(origin) <= 100 else origin[:97] + "..."
    return (f"cross-site requests to this API are refused (Origin {shown}); the server "
            f"lists the sites that may call it in FABLE_CORS_ORIGINS")


def key_accepted(keys: tuple[str, ...], authorization: str, *, basic: bool = False) -> bool:
    """The ``Authorization`` header carries one of ``keys``: as a Bearer token or, with
    ``basic`` (the pages, which browsers sign in to), as a Basic password."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "bearer":
        given = given.strip()
    elif scheme.lower() == "basic" and basic and request.authorization is not None:
        given = request.authorization.password or ""
    else:
        return False
    given_bytes = given.encode("utf-8")
    matches = [hmac.compare_digest(given_bytes, key.encode("utf-8")) for key in keys]
    return any(matches)


def _preflight_or_key() -> Response | None:
    if request.method == "OPTIONS" and _under(request.path, CORS_PATHS):
        if request.headers.get("Access-Control-Request-Method") and _allowed_origin():
            response = Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
            return response
        return None
    if _under(request.path, API_PREFIXES):
        reason = cross_site_refusal()
        if reason is not None:
            return json_error(403, reason)
    keys = get_settings().api_key_list
    if keys and _under(request.path, API_PREFIXES) and not _under(request.path, OPEN_PATHS):
        if not key_accepted(keys, request.headers.get("Authorization", "")):
            response = json_error(401, "this API needs a key: send 'Authorization: Bearer <key>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
    return None


def _page_key() -> Response | tuple | None:
    """``before_request``: with FABLE_PROTECT_PAGES, a page route that generates needs a
    key (401 and a Basic challenge without one)."""
    settings = get_settings()
    if not settings.protect_pages or not request_generates():
        return None
    if key_accepted(settings.api_key_list, request.headers.get("Authorization", ""), basic=True):
        return None
    message = ("generating here needs a key: sign in with any user name and the key as the "
               "password, or send 'Authorization: Bearer <key>'")
    if wants_json():
        response = json_error(401, message)
        response.headers.update(PAGE_KEY_CHALLENGE)
        return response
    return render_template("key_required.html"), 401, PAGE_KEY_CHALLENGE


def _allow_origin(response: Response) -> Response:
    origin = _allowed_origin()
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"
    if get_settings().cors_origin_list and "*" not in get_settings().cors_origin_list:
        response.vary.add("Origin")  # the answer depends on who asks
    return response
