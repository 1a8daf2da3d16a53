"""Admission: how many generations a worker runs at once, and who waits for a row.

At most ``max_batch`` generations hold a row (all models together); up to ``max_queue``
more wait for one, first come first served, each for at most its timeout. Beyond that a
request is refused at once (``QueueFull``): a fast 503 the client may retry beats a
latency nobody bounds. Decoding itself is the engine loop's (``app.engine_loop``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class QueueFull(Exception):
    """Every row is busy and the queue is full."""


class QueueTimeout(Exception):
    """No row became free within the wait allowed."""


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int,
                 on_change: Callable[[int, int], None] = lambda rows, queued: None) -> None:
        """``on_change(rows, queued)`` runs (under the lock) whenever either changes."""
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self._on_change = on_change
        self._lock = threading.Lock()
        self._rows = 0  # rows held
        self._waiting: deque[threading.Event] = deque()  # set when handed a row

    def acquire(self, timeout: float) -> None:
        """Hold a row, waiting up to ``timeout`` seconds in the queue for one;
        ``QueueFull`` or ``QueueTimeout`` when there is none."""
        with self._lock:
            if self._rows < self.max_batch and not self._waiting:
                self._rows += 1
                self._on_change(self._rows, len(self._waiting))
                return
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            handed = threading.Event()
            self._waiting.append(handed)
            self._on_change(self._rows, len(self._waiting))
        if handed.wait(timeout):
            return
        with self._lock:
            if handed.is_set():  # handed a row just as the wait ran out: keep it
                return
            self._waiting.remove(handed)
            self._on_change(self._rows, len(self._waiting))
        raise QueueTimeout

    def release(self) -> None:
        """Give a row back: to the first request waiting, or free."""
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the row passes on; the count stays
            else:
                self._rows -= 1
            self._on_change(self._rows, len(self._waiting))

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def queued(self) -> int:
        return len(self._waiting)
