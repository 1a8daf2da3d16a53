"""Admission: how many generations a worker runs at once, and who waits for a row.

At most ``max_batch`` rows are held (all models together): a generation holds one, an
infill one per candidate middle, handed all at once. Up to ``max_queue`` more requests
wait, first come first served, each for at most its timeout. Beyond that a
request is refused at once (``QueueFull``): a fast 503 the client may retry beats a
latency nobody bounds. Decoding itself is the engine loop's (``app.serving.engine_loop``).
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
        # requests waiting, first come first served: each is handed all its rows at once,
        # so no request ever holds some rows while it waits for more (two infills holding
        # half the rows each would wait for each other until their timeouts)
        self._waiting: deque[_Waiter] = deque()

    def acquire(self, timeout: float, rows: int = 1) -> None:
        """Hold ``rows`` rows (1 to max_batch), waiting up to ``timeout`` seconds in the
        queue for them; ``QueueFull`` or ``QueueTimeout`` when they do not come."""
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"a request holds 1 to {self.max_batch} rows, not {rows}")
        with self._lock:
            if not self._waiting and self._rows + rows <= self.max_batch:
                self._rows += rows
                self._on_change(self._rows, len(self._waiting))
                return
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            waiter = _Waiter(rows)
            self._waiting.append(waiter)
            self._on_change(self._rows, len(self._waiting))
        if waiter.handed.wait(timeout):
            return
        with self._lock:
            if waiter.handed.is_set():  # handed its rows just as the wait ran out: keep them
                return
            self._waiting.remove(waiter)
            self._hand_out()  # a smaller request behind it may fit now
            self._on_change(self._rows, len(self._waiting))
        raise QueueTimeout

    def try_acquire(self, rows: int) -> int:
        """Up to ``rows`` more rows, only those free now with nobody waiting (never
        waits): how many were taken."""
        with self._lock:
            if self._waiting:
                return 0
            taken = max(0, min(rows, self.max_batch - self._rows))
            if taken:
                self._rows += taken
                self._on_change(self._rows, len(self._waiting))
            return taken

    def release(self, rows: int = 1) -> None:
        """Give rows back: to the requests waiting, first come first served, or free."""
        with self._lock:
            self._rows -= rows
            self._hand_out()
            self._on_change(self._rows, len(self._waiting))

    def _hand_out(self) -> None:
        """Hand rows to the waiting requests in order while the first one's all fit
        (called with the lock)."""
        while self._waiting and self._rows + self._waiting[0].rows <= self.max_batch:
            waiter = self._waiting.popleft()
            self._rows += waiter.rows
            waiter.handed.set()

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def queued(self) -> int:
        return len(self._waiting)


class _Waiter:
    __slots__ = ("rows", "handed")

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.handed = threading.Event()  # set when its rows are handed to it
