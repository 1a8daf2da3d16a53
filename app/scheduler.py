"""One generation scheduler per worker: continuous batching across requests.

Request threads (gunicorn's gthread pool) never run the model. They hand a ``Ticket`` to
the ``Scheduler`` and read its text pieces from a queue. The scheduler's one thread
decodes every running sequence of a model together, one step at a time
(``models_src.generation.Batch``): requests that arrive while others are decoding join at
the next step, finished or abandoned ones leave at once, and each keeps its own sampling
settings. One compute thread per worker also means torch's threads never compete with
each other (``FABLE_TORCH_THREADS`` defaults to (cores - 1) // workers).

Capacity: at most ``max_batch`` sequences hold a row at once in a worker (all models
together); up to ``max_queue`` more wait for one, each for at most the queue timeout. A
request beyond that is refused at once (``QueueFull``): a fast 503 the client may retry
beats a latency nobody bounds. A ticket's row is given back the moment it ends or its
reader closes it (a client that went away); the scheduler drops an abandoned sequence
before its next step, so its compute stops within one step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from models_src.generation import Batch, Sequence
from models_src.sampling import Completion, SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Every row is busy and the queue is full."""


@dataclass
class Finished:
    completion: Completion


@dataclass
class Failed:
    error: BaseException


class Ticket:
    """One request's place in the scheduler. Its ``pieces`` queue receives text pieces,
    then one ``Finished`` or ``Failed``. A reader that wants only the end sets
    ``collecting``: from the next piece on, pieces are kept in ``parts`` instead (for a
    deadline's partial text), so the request thread wakes once, not once per token, and
    sixteen such threads stop contending with the decoding thread for the GIL every step."""

    def __init__(self, loaded, prompt_ids: list[int], params: SamplingParams) -> None:
        self.loaded, self.prompt_ids, self.params = loaded, prompt_ids, params
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()
        self.has_row = threading.Event()  # a row is reserved for it
        self.admitted = threading.Event()  # joined: the next step feeds its prompt and samples
        self.cancelled = False
        self.holds_row = False  # guarded by the scheduler's lock
        self.collecting = False  # set once by the reader, read by the scheduler thread
        self.parts: list[str] = []  # pieces kept while collecting, in order after the queued ones
        self.first_part_ns: int | None = None  # when the first of them was decoded


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self._cond = threading.Condition()
        self._rows = 0  # rows held by tickets (reserved, decoding or about to leave)
        self._waiting: deque[Ticket] = deque()  # tickets waiting for a row
        self._admit: list[Ticket] = []  # tickets with a row, to join their batch at the next step
        self._batches: dict[str, Batch] = {}  # model name -> its running batch
        self._owner: dict[Sequence, Ticket] = {}
        self._thread: threading.Thread | None = None

    # ---- request threads ------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """Reserve a row for ``ticket`` or queue it; ``QueueFull`` when neither is possible."""
        with self._cond:
            if self._rows < self.max_batch:
                self._give_row(ticket)
            elif len(self._waiting) < self.max_queue:
                self._waiting.append(ticket)
            else:
                raise QueueFull
            self._start_thread()

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a ticket that is still waiting out of the queue; False if it got a row."""
        with self._cond:
            if ticket.holds_row:
                return False
            self._waiting.remove(ticket)
            return True

    def release(self, ticket: Ticket) -> None:
        """The ticket's reader is done with it (ended or went away); idempotent."""
        with self._cond:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._free_row(ticket)

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def decoding(self) -> int:
        """Sequences in the running batches right now (abandoned ones leave within a step)."""
        return sum(len(b) for b in list(self._batches.values()))

    # ---- the scheduler thread ---------------------------------------------------------

    def _give_row(self, ticket: Ticket) -> None:  # caller holds the lock
        ticket.holds_row = True
        self._rows += 1
        self._admit.append(ticket)
        ticket.has_row.set()
        self._cond.notify()

    def _free_row(self, ticket: Ticket) -> None:  # caller holds the lock
        if not ticket.holds_row:
            return
        ticket.holds_row = False
        self._rows -= 1
        if self._waiting:
            self._give_row(self._waiting.popleft())

    def _start_thread(self) -> None:  # caller holds the lock
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fable-scheduler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._admit and not self._owner:
                    self._cond.wait()
                joining, self._admit = self._admit, []
            self._join(joining)
            for name in list(self._batches):
                self._step(name)

    def _join(self, tickets: list[Ticket]) -> None:
        by_model: dict[str, list[Ticket]] = {}
        for t in tickets:
            if not t.cancelled:
                by_model.setdefault(t.loaded.name, []).append(t)
        for name, group in by_model.items():
            loaded = group[0].loaded
            batch = self._batches.setdefault(name, Batch(loaded.model, loaded.tokenizer))
            try:
                seqs = batch.add([(t.prompt_ids, t.params) for t in group])
            except Exception as error:  # noqa: BLE001 - reported to each request
                log.exception("joining failed for %s", name)
                for t in group:
                    self._end(t, Failed(error))
                continue
            for t, seq in zip(group, seqs):
                t.admitted.set()
                if seq.completion is not None:  # asked for no tokens
                    self._end(t, Finished(seq.completion))
                else:
                    self._owner[seq] = t

    def _step(self, name: str) -> None:
        batch = self._batches[name]
        for seq in [s for s in batch.sequences if self._owner[s].cancelled]:
            batch.remove(seq)
            del self._owner[seq]
        if not batch:
            del self._batches[name]  # an idle model holds no state
            return
        try:
            events = batch.step()
        except Exception as error:  # noqa: BLE001 - every request of the batch is told
            log.exception("decoding step failed for %s", name)
            for seq in batch.sequences:
                self._end(self._owner.pop(seq), Failed(error))
            del self._batches[name]
            return
        for seq, piece in events:
            ticket = self._owner[seq]
            if piece and ticket.collecting:
                if ticket.first_part_ns is None:
                    ticket.first_part_ns = time.perf_counter_ns()
                ticket.parts.append(piece)
            elif piece:
                ticket.pieces.put(piece)
            if seq.completion is not None:
                del self._owner[seq]
                self._end(ticket, Finished(seq.completion))

    def _end(self, ticket: Ticket, outcome: Finished | Failed) -> None:
        with self._cond:  # the row is free now, even if the reader is still sending text
            self._free_row(ticket)
        ticket.admitted.set()
        ticket.pieces.put(outcome)
