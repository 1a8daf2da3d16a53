"""Cross-site request forgery protection for the HTML forms: an Origin check, no token.

A state-changing request (POST, PUT, PATCH, DELETE) to anything but the JSON API is
refused with 403 unless it comes from this site's own pages:

    Origin present       it must be this site's origin: the request's scheme and Host
                         (behind FABLE_PROXY_HOPS trusted proxies, such as the Hugging Face
                         Spaces front end, the X-Forwarded-Proto and X-Forwarded-Host they
                         set, read by werkzeug's ProxyFix). ``Origin: null`` (sandboxed
                         frames, some redirects) is refused.
    Origin absent        Sec-Fetch-Site decides: ``same-origin`` and ``none`` (typed by
                         the user) pass, ``same-site`` and ``cross-site`` are refused.
    both absent          allowed: every browser that still sends neither is too old to
                         matter, and only browsers carry the ambient credentials (cookies,
                         a remembered Basic password) that make a forgery worth anything.

Why not a CSRF token in a cookie: the app runs as a Hugging Face Space, inside an iframe
on huggingface.co, where browsers block third-party cookies; a cookie-bound token would
fail for every visitor there. Origin needs no state, works across gunicorn workers and
is set by the browser itself, which a page on another site cannot override.

This needs the pages' ``Referrer-Policy`` to be one that keeps the Origin of same-origin
POSTs (``same-origin`` does; ``no-referrer`` would turn it into ``null``): see
app/security.py.

The JSON API (``/api/*``, ``/v1/*``) is exempt: its clients are programs that send no
cookies and no token, and it acts on no ambient credential (its admin routes take the
token as a Bearer header only, which a browser never adds by itself), so a request
forged from another site can do nothing its author could not do directly.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, request
from werkzeug.exceptions import Forbidden

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
EXEMPT_PREFIXES = ("/api", "/v1")  # the JSON APIs (see the module docstring)
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
DEFAULT_PORTS = {"http": 80, "https": 443}


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


def refusal() -> str | None:
    """Why this request must be refused as cross-site, or None when it may go on."""
    origin = request.headers.get("Origin")
    if origin is not None:
        parts = urlsplit(origin.strip())
        given = normalise(parts.scheme, parts.netloc) if parts.scheme and parts.netloc else None
        if given is not None and given == own_origin():
            return None
        shown = origin if len(origin) <= 100 else origin[:97] + "..."
        return (f"this form was submitted from another site (Origin {shown}); "
                f"open the page on this site and submit the form again")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ALLOWED_FETCH_SITES:
        return (f"this form was submitted from another site (Sec-Fetch-Site {site[:40]}); "
                f"open the page on this site and submit the form again")
    return None


def check_origin() -> None:
    """``before_request``: refuse cross-site form submissions with 403."""
    if request.method in SAFE_METHODS or exempt(request.path):
        return
    if request.routing_exception is not None:
        return  # a 404 or 405 is answered as such: nothing would run anyway
    reason = refusal()
    if reason is not None:
        raise CrossSiteRequest(reason)
