"""The app's security wiring: response headers on every response, CSRF and rate limit.

``init_app(app, settings)`` (called once from ``create_app``) installs

- the headers below on every response (pages, JSON, errors, static files, streams);
- the Origin check against cross-site form posts (``app.csrf``);
- the per-client rate limit on generation, when ``FABLE_RATE_LIMIT`` is set
  (``app.ratelimit``; the views that generate text count each request themselves).

The Content-Security-Policy allows no inline script and no eval: the pages load only
/static/app.js and htmx from /static/vendor/, with nothing inline (templates/base.html
turns htmx's eval and its injected indicator ``<style>`` off through its
``htmx-config`` meta tag, so ``style-src`` needs no 'unsafe-inline' either). The page
may be framed by itself and by Hugging Face, which shows a Space inside an iframe on
huggingface.co (so there is no ``X-Frame-Options: DENY``; ``frame-ancestors`` says who
may frame it, and browsers that know it ignore X-Frame-Options anyway).

``Referrer-Policy: same-origin`` sends no Referer to other sites (the stream URLs carry
the prompt) and keeps the ``Origin`` of same-origin form posts, which the CSRF check
needs: with ``no-referrer`` browsers would send ``Origin: null``.
"""

from __future__ import annotations

from flask import Flask, Response

from . import csrf, ratelimit
from .settings import Settings

#: Who may show the pages in a frame: the app itself and Hugging Face (Spaces are shown
#: on huggingface.co and served from *.hf.space).
FRAME_ANCESTORS = ("'self'", "https://huggingface.co", "https://*.huggingface.co",
                   "https://*.hf.space")

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",  # no 'unsafe-inline', no 'unsafe-eval'
    "style-src 'self'",
    "img-src 'self'",  # the favicon and the admin page's curve PNGs
    "connect-src 'self'",  # htmx posts and its EventSource
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors " + " ".join(FRAME_ANCESTORS),
])

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # the pages use none of these; nothing they load may ask for them either
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}


def init_app(app: Flask, settings: Settings) -> None:
    app.after_request(add_security_headers)
    csrf.init_app(app)
    ratelimit.init_app(app, settings)


def add_security_headers(response: Response) -> Response:
    """``after_request``: the headers above, unless a view set its own."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
