"""``GET /metrics``: the metric families of app/platform/telemetry.py in Prometheus's text format.

Under gunicorn a scrape, whichever worker answers it, adds up every worker's samples
from ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode; gunicorn.conf.py
creates the folder empty at start-up and marks exited workers dead). Without that
variable (the Flask development server, tests) the process's own registry is served.
When ``FABLE_ADMIN_TOKEN`` is set, ``/metrics`` needs it (``Authorization: Bearer``),
which Prometheus sends with ``authorization: {credentials: ...}``.
"""

from __future__ import annotations

import os

from flask import Blueprint, Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from app.platform import telemetry
from app.platform.web import has_admin_token, json_error

bp = Blueprint("metrics", __name__)

#: The methods counted under their own name; any other a client makes up counts as "other"
#: (one label each would let a client grow the scrape without bound).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.after_request(_count)


def _count(response: Response) -> Response:
    rule = request.url_rule
    method = request.method if request.method in KNOWN_METHODS else "other"
    telemetry.REQUESTS.labels(rule.rule if rule is not None else "unmatched", method,
                              str(response.status_code)).inc()
    return response


@bp.get("/metrics")
def scrape():
    if not has_admin_token():
        response = json_error(401, "/metrics needs the admin token: send "
                                   "'Authorization: Bearer <FABLE_ADMIN_TOKEN>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    response = Response(body, headers={"Cache-Control": "no-store"})
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response
