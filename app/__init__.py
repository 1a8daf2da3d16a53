"""Fable's web app: a Flask factory, flaskr style.

``create_app()`` runs once per gunicorn worker (no ``--preload``: torch and CUDA must not
start in the master before the fork). It reads the settings, sets torch's threads, loads
every checkpoint into a ``ModelRegistry``, builds the worker's ``GenerationService`` and
registers the blueprints; they reach these through ``app.extensions`` ("fable.settings",
"fable.registry", "fable.service"), read by ``get_settings()``, ``get_registry()`` and
``get_service()``.
"""

from __future__ import annotations

import io
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, make_response, render_template, request
from werkzeug.exceptions import BadRequest, HTTPException, InternalServerError, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix

__version__ = "0.1.0"

ROOT = Path(__file__).resolve().parent.parent


def _folder(name: str) -> Path:
    """templates/ or static/: inside the package when installed (pyproject.toml puts them
    there), else the checkout's, beside app/."""
    installed = Path(__file__).resolve().parent / name
    return installed if installed.is_dir() else ROOT / name

log = logging.getLogger(__name__)


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """The app; ``test_config`` overrides ``FABLE_*`` settings and Flask config keys."""
    import torch

    from app.pages import filters
    from app.pages.jobs import job_token_signer
    from app.platform import metrics, security, telemetry
    from app.platform.settings import Settings, SettingsError, resolve_device
    from app.serving.registry import ModelRegistry
    from app.serving.reload import Reloader, environment_stamp, read_stamp
    from app.serving.service import GenerationService
    from models_src.chat import ChatTemplateError

    app = Flask(__name__, static_folder=str(_folder("static")),
                template_folder=str(_folder("templates")))
    _configure_logging(app)
    settings = Settings.load(overrides=test_config)
    app.config.from_mapping(MAX_CONTENT_LENGTH=settings.max_body_bytes)
    if test_config is not None:
        app.config.from_mapping(test_config)
    app.json.sort_keys = False  # keep the documented field order of Ollama/OpenAI objects
    if settings.proxy_hops:  # the client's address, scheme and host as the proxies saw them
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)

    torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    stamp = environment_stamp()
    seen = read_stamp(stamp)  # before loading: a reload asked for meanwhile is not missed
    registry = ModelRegistry.load(settings.checkpoint_dir, device,
                                  load_timeout_s=settings.load_timeout_s)
    if not len(registry):
        log.warning("no model loaded from %s (%d failed)", settings.checkpoint_dir,
                    len(registry.errors))
    app.extensions["fable.settings"] = settings
    # Signs the pages' job tokens. Under gunicorn the key is set (FABLE_SECRET_KEY, or the
    # master's own for its workers: gunicorn.conf.py); a lone process makes its own.
    app.extensions["fable.job_tokens"] = job_token_signer(settings.secret_key
                                                          or secrets.token_urlsafe(32))
    if settings.default_model and settings.default_model not in registry:
        log.warning("FABLE_DEFAULT_MODEL=%s is not loaded: the pages start on %s",
                    settings.default_model, getattr(registry.default(), "name", "no model"))
    app.extensions["fable.registry"] = registry
    try:
        app.extensions["fable.service"] = GenerationService.from_settings(settings, registry)
    except ChatTemplateError as e:
        raise SettingsError(f"FABLE_CHAT_TEMPLATE: {e}") from None

    security.init_app(app, settings)  # headers, CSRF Origin check, rate limit
    filters.register(app)
    app.before_request(_apply_body_limit)  # first: nothing may read the body before them
    app.before_request(_read_chunked_body)
    _register_blueprints(app)
    metrics.init_app(app)  # /metrics, and every answer counted
    telemetry.load_errors(registry)
    reloader = Reloader(registry, stamp, seen, on_refresh=telemetry.load_errors)
    app.extensions["fable.reloader"] = reloader
    reloader.watch()
    _register_error_handlers(app)
    return app


def _register_blueprints(app: Flask) -> None:
    from app.apis import ollama_api, openai_api, tokenizer_api
    from app.pages import admin, compare, experiments, models, story, train

    app.register_blueprint(ollama_api.bp)  # /api/* (Ollama's), /healthz, /openapi.json
    app.register_blueprint(openai_api.bp)  # /v1/*
    app.register_blueprint(tokenizer_api.bp)  # /tokenize, /detokenize, /tokenizer_info (vLLM's)
    app.register_blueprint(story.bp)  # the pages: / (generate) and /infill
    app.register_blueprint(compare.bp)  # /compare: 2-4 models side by side
    app.register_blueprint(models.bp)  # /models, /models/<name>, its files
    app.register_blueprint(experiments.bp)  # /experiments: runs, filters, loss curves
    app.register_blueprint(train.bp)  # /train: training runs from the browser
    app.register_blueprint(admin.bp)  # /admin


def _configure_logging(app: Flask) -> None:
    """Under gunicorn, the package's loggers write where gunicorn's error log does."""
    gunicorn_log = logging.getLogger("gunicorn.error")
    package_log = logging.getLogger(__name__)
    if gunicorn_log.handlers and not package_log.handlers:
        package_log.handlers = list(gunicorn_log.handlers)
        package_log.setLevel(gunicorn_log.level)
        package_log.propagate = False


def _apply_body_limit() -> None:
    """``before_request``: this request's body limit, larger for the training page's upload
    by a client allowed to train (app.platform.web.is_train_upload, the rule the worker
    applied to the head, so it buffered that much); a body declared over it is a 413 here,
    whatever the path, as a chunked one is in ``_read_chunked_body``."""
    from app.platform.settings import get_settings
    from app.platform.web import is_train_upload

    settings = get_settings()
    # script_root + path: the path as the client sent it, as the worker judged it (gunicorn
    # strips a SCRIPT_NAME from PATH_INFO)
    if is_train_upload(request.method, request.script_root + request.path,
                       request.headers.get("Authorization"), settings.admin_token):
        request.max_content_length = settings.train_upload_bytes
    limit = request.max_content_length
    if limit is not None and (request.content_length or 0) > limit:
        raise RequestEntityTooLarge()


def _read_chunked_body() -> None:
    """``before_request``: a body sent without Content-Length (chunked) is read here, to
    one byte past the limit: over it is a 413, as it would be with a Content-Length
    (werkzeug would otherwise cut it silently at the limit, and a form would lose the
    fields past the cut). Within it, the request goes on as if it had a Content-Length."""
    environ = request.environ
    if environ.get("CONTENT_LENGTH") or "wsgi.input" not in environ:
        return
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return
    limit = request.max_content_length  # this request's: _apply_body_limit's
    try:
        body = environ["wsgi.input"].read(limit + 1)
    except Exception as e:  # the server's parser refused the framing (its own error types)
        raise BadRequest(f"the chunked request body is malformed ({type(e).__name__})") from None
    if len(body) > limit:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))


def _register_error_handlers(app: Flask) -> None:
    from app.platform.web import json_error, wants_json

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if not wants_json():
            return _error_page(e)
        messages = {
            404: f"not found: {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}"
                 + (f"; use {', '.join(sorted(e.valid_methods))}"
                    if isinstance(e, MethodNotAllowed) and e.valid_methods else ""),
            413: f"request body too large; the limit is {request.max_content_length} bytes",
        }
        response = json_error(e.code or 500, messages.get(e.code, e.description or e.name))
        for name, value in e.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value  # e.g. Allow on a 405
        return response

    @app.errorhandler(Exception)
    def unexpected_error(e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        if not wants_json():
            return _error_page(InternalServerError())
        return json_error(500, "internal server error")


def _error_page(e: HTTPException):
    """The site's own page for an HTTP error (its navigation, the reason in words), with
    the error's headers (Allow on a 405); werkzeug's bare page if that cannot be drawn."""
    try:
        html = render_template("error.html", kind=None, vendor=False, name=e.name,
                               description=e.description)
    except Exception:
        log.exception("the error page for %s could not be drawn", e.code)
        return e
    response = make_response(html, e.code or 500)
    for name, value in e.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response

