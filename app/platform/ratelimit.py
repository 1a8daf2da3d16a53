"""An optional rate limit on the requests that generate text: ``FABLE_RATE_LIMIT``
generations a minute per client address, a token bucket per client in each worker's
memory; beyond it 429 with Retry-After. What counts and why: docs/web-app.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from functools import wraps

from flask import Flask, current_app, request
from werkzeug.exceptions import TooManyRequests

from app.platform.settings import Settings, get_settings

EXTENSION = "fable.rate_limit"
MAX_CLIENTS = 10_000  # buckets kept per worker; idle (full) ones are dropped first


class TokenBuckets:
    """One token bucket per key; thread-safe (gthread workers serve requests in threads)."""

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = MAX_CLIENTS) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        self.capacity = float(per_minute)
        self.refill_per_s = per_minute / 60.0
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, when = self._buckets.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - when) * self.refill_per_s)

    def take(self, key: str) -> float:
        """Spend one of ``key``'s tokens: 0.0 when there was one, else the seconds until
        there will be (nothing is spent then)."""
        with self._lock:
            now = self.clock()
            tokens = self._tokens(key, now)
            allowed = tokens >= 1.0
            self._buckets.pop(key, None)  # re-inserted last: the dict stays oldest-first
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_clients:
                self._forget(now)
            return 0.0 if allowed else (1.0 - tokens) / self.refill_per_s

    def _forget(self, now: float) -> None:
        """Drop the buckets that have refilled (forgetting them changes nothing), then,
        if there are still too many, the longest idle."""
        for key in [k for k in self._buckets if self._tokens(k, now) >= self.capacity]:
            del self._buckets[key]
        while len(self._buckets) > self.max_clients:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


def init_app(app: Flask, settings: Settings) -> None:
    if settings.rate_limit:
        app.extensions[EXTENSION] = TokenBuckets(settings.rate_limit)


def wait_needed() -> float:
    """Count one generation for this request's client: 0.0 when it may go on, else the
    seconds to wait. Always 0.0 without a limit."""
    buckets: TokenBuckets | None = current_app.extensions.get(EXTENSION)
    return 0.0 if buckets is None else buckets.take(request.remote_addr or "unknown")


def retry_after(wait: float) -> int:
    """Whole seconds for Retry-After: rounded up, at least 1."""
    return max(1, math.ceil(wait))


def message(wait: float) -> str:
    per_minute = get_settings().rate_limit
    return (f"too many generation requests: the limit is {per_minute} a minute per client; "
            f"try again in {retry_after(wait)} s")


def enforce() -> None:
    """Count one generation; raise 429 (with Retry-After) when the client has none left."""
    wait = wait_needed()
    if wait > 0:
        raise TooManyRequests(message(wait), retry_after=retry_after(wait))


def rate_limited(view: Callable) -> Callable:
    """The view generates text: every call counts against the client's limit."""
    @wraps(view)
    def wrapper(*args, **kwargs):
        enforce()
        return view(*args, **kwargs)
    return wrapper
