"""The admin page (``/admin``): the loaded models, checkpoints that failed to load, the
best training runs and their loss curves (``/admin/curves/<run_id>.png``). With
``FABLE_ADMIN_TOKEN`` set it needs the token, as a Basic password or a Bearer token.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict

from flask import Blueprint, Response, abort, current_app, render_template, request

from app.pages.render import store_problem
from app.platform.settings import get_settings
from app.platform.web import ADMIN_CHALLENGE, has_admin_token
from app.serving.registry import get_registry
from app.serving.reload import get_reloader
from app.serving.service import get_service
from models_src import records

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/admin")

BEST_ROWS = 10  # rows of the best-runs table
CURVE_RUNS = 6  # runs whose curves are drawn, newest first (a curve needs two steps: not evaluations)
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # also safe inside a glob


@bp.before_request
def _require_admin():
    if not has_admin_token(basic=True):
        html = render_template("admin_denied.html", kind="admin")
        return html, 401, ADMIN_CHALLENGE
    return None


# ---- the page -------------------------------------------------------------------------

@bp.get("")
def index(reloaded: dict | None = None):
    settings, registry, service = get_settings(), get_registry(), get_service()
    root = settings.experiments_dir
    best_rows, runs, store_error = [], [], None
    try:
        best_rows = records.leaderboard(root, BEST_ROWS)
        runs = records.recent_runs(root, CURVE_RUNS)
    except Exception as e:  # a broken file must not take the page down
        log.warning("cannot read the experiment records in %s: %s", root, e)
        store_error = store_problem(e, root)
    return render_template("admin.html", kind="admin", models=registry.facts(),
                           load_errors=registry.errors, device=registry.device,
                           stats=service.stats(), checkpoint_dir=registry.directory,
                           experiments_dir=root, best_rows=best_rows, runs=runs,
                           store_error=store_error, reloaded=reloaded, vendor=False)


@bp.post("/reload")
def reload_models():
    """The page's Reload button (a form: the CSRF Origin check applies): every worker
    matches the checkpoint directory; the page says what changed here."""
    return index(reloaded=get_reloader().reload())


# ---- training curves ------------------------------------------------------------------

class PngCache:
    """Rendered curve PNGs by (run id, its files' paths, sizes and mtimes): a run that is
    still training gets a fresh plot after each evaluation is logged. Bounded, LRU."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: tuple, png: bytes) -> None:
        with self._lock:
            self._items[key] = png
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


def _cache() -> PngCache:
    return current_app.extensions.setdefault("fable.admin.curves", PngCache())


@bp.get("/curves/<run_id>.png")
def curves(run_id: str):
    if not RUN_ID.match(run_id):
        abort(404)
    root = get_settings().experiments_dir
    files = sorted(root.glob(f"*/{run_id}.parquet"))  # not health/<run_id>.parquet
    if not files:
        abort(404)
    key = (run_id, *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    png = _cache().get(key)
    if png is None:
        png = records.loss_curves_png(root, run_id)
        if png is None:  # no finite loss to draw
            abort(404)
        _cache().put(key, png)
    response = Response(png, mimetype="image/png",
                        headers={"Cache-Control": "private, no-cache"})
    response.set_etag(hashlib.sha256(repr(key).encode()).hexdigest()[:32])
    return response.make_conditional(request)
