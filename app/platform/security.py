"""The app's security wiring: headers on every response (a strict Content-Security-Policy,
framing by Hugging Face only), the CSRF Origin check, API keys and CORS, and the rate limit. Why each header
is what it is: docs/web-app.md.
"""

from __future__ import annotations

from flask import Flask, Response

from app.platform import api_access, csrf, ratelimit
from app.platform.settings import Settings

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
    api_access.init_app(app)
    ratelimit.init_app(app, settings)


def add_security_headers(response: Response) -> Response:
    """``after_request``: the headers above, unless a view set its own."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
