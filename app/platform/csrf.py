"""Cross-site request forgery protection for the HTML forms: an Origin check, no token.

A POST (or other unsafe method) outside the JSON APIs is refused with 403 unless its
Origin is this site's, or without Origin, its Sec-Fetch-Site is same-origin or none. So
is a GET that starts a generation (a view marked ``web.generates``: the event streams,
``/compare/start``, ``/compare?run=1``): another site's page must not spend this
server's work through an ``<img>``, a link or an EventSource. Requests with neither
header (curl, other clients) pass. Why no cookie token, and why the APIs are exempt:
docs/web-app.md.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, request
from werkzeug.exceptions import Forbidden

from app.platform.web import VLLM_PATHS, request_generates

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
EXEMPT_PREFIXES = ("/api", "/v1", *VLLM_PATHS)  # the JSON APIs (see the module docstring)
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
DEFAULT_PORTS = {"http": 80, "https": 443}
#: How a refusal names what was refused, and what to do instead.
FORM_WORDS = ("this form was submitted", "open the page on this site and submit the form again")
GET_WORDS = ("this generation was asked for", "open the page on this site and start it there")


class CrossSiteRequest(Forbidden):
    """A form submitted from another site (or a sandboxed frame)."""


def init_app(app: Flask) -> None:
    app.before_request(check_origin)


def exempt(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in EXEMPT_PREFIXES)


def normalise(scheme: str, netloc: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, without the scheme's default port; None when
    it does not parse."""
    scheme = scheme.lower()
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number, a malformed IPv6 literal
        return None
    if not host or parts.path or parts.query or parts.username is not None:
        return None
    host = f"[{host}]" if ":" in host else host
    if port is None or port == DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def own_origin() -> str | None:
    """This site's origin: the request's scheme and host (behind trusted proxies, what
    ProxyFix read from X-Forwarded-Proto and X-Forwarded-Host)."""
    return normalise(request.scheme, request.host)


def refusal(words: tuple[str, str] = FORM_WORDS) -> str | None:
    """Why this request must be refused as cross-site, or None when it may go on."""
    what, instead = words
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        given = normalise(parts.scheme, parts.netloc) if parts.scheme and parts.netloc else None
        if given is not None and given == own_origin():
            return None
        shown = origin if len(origin) <= 100 else origin[:97] + "..."
        return f"{what} from another site (Origin {shown}); {instead}"
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ALLOWED_FETCH_SITES:
        return f"{what} from another site (Sec-Fetch-Site {site[:40]}); {instead}"
    return None


def check_origin() -> None:
    """``before_request``: refuse cross-site form submissions, and cross-site GETs that
    would generate, with 403."""
    if exempt(request.path) or request.routing_exception is not None:
        return  # a 404 or 405 is answered as such: nothing would run anyway
    words = FORM_WORDS
    if request.method in SAFE_METHODS:
        if request.method not in ("GET", "HEAD") or not request_generates():
            return  # reading a page changes nothing
        words = GET_WORDS
    reason = refusal(words)
    if reason is not None:
        raise CrossSiteRequest(reason)
