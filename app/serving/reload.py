"""Models without restarts: every worker matches the checkpoint directory on request.

A reload (``POST /api/models/reload``, the admin page's button, or ``SIGHUP`` to the
gunicorn master) refreshes the registry of the worker that got it at once
(``ModelRegistry.refresh``: new directories loaded, changed ones reloaded, removed ones
unloaded; one that fails keeps its loaded version) and touches a stamp file. Every
worker watches that stamp (``FABLE_RELOAD_STAMP``, which gunicorn.conf.py sets) and
refreshes itself within a second of it changing, so all of them converge. Generations
already running keep the model they started with until they end.

Without gunicorn (the development server, tests) there is one process and no stamp.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from flask import current_app

from app.serving.registry import ModelRegistry

log = logging.getLogger(__name__)

STAMP_VARIABLE = "FABLE_RELOAD_STAMP"
POLL_S = 1.0


def environment_stamp() -> Path | None:
    value = os.environ.get(STAMP_VARIABLE)
    return Path(value) if value else None


def read_stamp(stamp: Path | None) -> str | None:
    try:
        return stamp.read_text() if stamp is not None else None
    except OSError:
        return None


class Reloader:
    """``seen``: the stamp as it was *before* the registry was loaded, so that a reload
    asked for by another worker while this one was loading is not missed."""

    def __init__(self, registry: ModelRegistry, stamp: Path | None, seen: str | None,
                 on_refresh=lambda registry: None) -> None:
        self.registry = registry
        self.stamp = stamp
        self._on_refresh = on_refresh
        self._seen = seen
        self._thread: threading.Thread | None = None

    def reload(self) -> dict[str, list[str]]:
        """Refresh this worker now, and tell the others (through the stamp)."""
        report = self._refresh()
        if self.stamp is not None:
            value = f"{os.getpid()} {time.time_ns()}"
            self.stamp.write_text(value)
            self._seen = value
        return report

    def watch(self) -> None:
        """Follow the stamp in a daemon thread (a worker calls this once it is set up)."""
        if self.stamp is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._follow, name="fable-reload", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while True:
            time.sleep(POLL_S)
            seen = read_stamp(self.stamp)
            if seen != self._seen:
                self._seen = seen
                try:
                    self._refresh()
                except Exception:  # noqa: BLE001 - the next stamp tries again
                    log.exception("reloading the models failed")

    def _refresh(self) -> dict[str, list[str]]:
        report = self.registry.refresh()
        changed = {k: v for k, v in report.items() if v and k != "unchanged"}
        log.info("models reloaded: %s", changed or "nothing changed")
        self._on_refresh(self.registry)
        return report


def get_reloader() -> Reloader:
    return current_app.extensions["fable.reloader"]
