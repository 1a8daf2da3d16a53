"""The worker's decoding thread: every running request, decoded together.

Request threads never run the model. They hand a ``Ticket`` to the ``EngineLoop``,
whose one thread keeps a ``models_src.generation.Batch`` per model: tickets join between
steps, finished or cancelled ones leave at once, and each step's text goes out through
``Ticket.deliver``. One compute thread per worker also means torch's threads never
compete with each other.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from models_src.generation import Batch, Sequence
from models_src.sampling import Completion, SamplingParams

from . import telemetry

log = logging.getLogger(__name__)


@dataclass
class Finished:
    completion: Completion


@dataclass
class Failed:
    error: BaseException


class Ticket:
    """One request's channel from the engine loop to its reader.

    The loop calls ``deliver`` with each text piece, then one ``Finished`` or ``Failed``.
    The reader takes them with ``next_event``; a reader that wants only the end calls
    ``collect_only``, after which pieces are held (``held_text``) instead of queued, so
    its thread wakes once rather than once per token. ``on_end`` runs once, when the
    ticket ends or is cancelled (the service gives its row back there).
    """

    def __init__(self, loaded, prompt_ids: list[int], params: SamplingParams, *,
                 on_end: Callable[[], None] = lambda: None) -> None:
        self.loaded, self.prompt_ids, self.params = loaded, prompt_ids, params
        self.first_piece_ns: int | None = None  # when the loop decoded the first text
        # the sequence's log-probabilities as the loop appends them (set when it joins;
        # None unless the request asked), read by the reader's thread as they grow
        self.logprobs: list | None = None
        self.joined = threading.Event()  # its prompt is in the batch (or it already ended)
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._collecting = False
        self._held: list[str] = []
        self._on_end: Callable[[], None] | None = on_end

    # ---- the engine loop's side ----------------------------------------------------

    def deliver(self, event: str | Finished | Failed) -> None:
        """A text piece, or the end."""
        if isinstance(event, str):
            if not event:
                return
            if self.first_piece_ns is None:
                self.first_piece_ns = time.perf_counter_ns()
            with self._lock:
                if self._collecting:
                    self._held.append(event)
                    return
        else:
            self._finish()
            self.joined.set()
        self._events.put(event)

    @property
    def cancelled(self) -> bool:
        return self._on_end is None

    # ---- the reader's side ---------------------------------------------------------

    def next_event(self, timeout: float) -> str | Finished | Failed:
        """The next piece or the end; ``queue.Empty`` after ``timeout`` seconds."""
        return self._events.get(timeout=timeout)

    def collect_only(self) -> None:
        with self._lock:
            self._collecting = True

    def held_text(self) -> str:
        """Pieces held back while collecting (a deadline's partial text)."""
        with self._lock:
            return "".join(self._held)

    def cancel(self) -> None:
        """The reader is done (it ended or went away); the loop drops it before its next step."""
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()


class EngineLoop:
    """Owns the decoding thread and one ``Batch`` per model."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._joining: list[Ticket] = []
        # one running batch per loaded model: a model reloaded under the same name is a new
        # LoadedModel, so the generations running on the old weights finish on them
        self._batches: dict[object, Batch] = {}
        self._owner: dict[Sequence, Ticket] = {}
        self._thread: threading.Thread | None = None

    def submit(self, ticket: Ticket) -> None:
        """Join the ticket's request at the next step."""
        with self._cond:
            self._joining.append(ticket)
            self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fable-engine", daemon=True)
                self._thread.start()

    def decoding(self) -> int:
        """Sequences in the running batches right now (cancelled ones leave within a step)."""
        return sum(len(b) for b in list(self._batches.values()))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._joining and not self._owner:
                    self._cond.wait()
                joining, self._joining = self._joining, []
            self._join(joining)
            for loaded in list(self._batches):
                self._step(loaded)

    def _join(self, tickets: list[Ticket]) -> None:
        by_model: dict[object, list[Ticket]] = {}
        for t in tickets:
            if not t.cancelled:
                by_model.setdefault(t.loaded, []).append(t)
        for loaded, group in by_model.items():
            batch = self._batches.setdefault(loaded, Batch(loaded.model, loaded.tokenizer))
            try:
                seqs = batch.add([(t.prompt_ids, t.params) for t in group])
            except Exception as error:  # noqa: BLE001 - reported to each request
                log.exception("joining failed for %s", loaded.name)
                for t in group:
                    t.deliver(Failed(error))
                continue
            for t, seq in zip(group, seqs):
                t.logprobs = seq.logprobs
                t.joined.set()
                if seq.completion is not None:  # asked for no tokens
                    t.deliver(Finished(seq.completion))
                else:
                    self._owner[seq] = t

    def _step(self, loaded) -> None:
        batch = self._batches[loaded]
        for seq in [s for s in batch.sequences if self._owner[s].cancelled]:
            batch.remove(seq)
            del self._owner[seq]
        if not batch:
            del self._batches[loaded]  # an idle model holds no state (nor its old weights)
            return
        telemetry.BATCH.labels(loaded.name).observe(len(batch))
        try:
            events = batch.step()
        except Exception as error:  # noqa: BLE001 - every request of the batch is told
            log.exception("decoding step failed for %s", loaded.name)
            for seq in batch.sequences:
                self._owner.pop(seq).deliver(Failed(error))
            del self._batches[loaded]
            return
        for seq, piece in events:
            ticket = self._owner[seq]
            ticket.deliver(piece)
            if seq.completion is not None:
                del self._owner[seq]
                ticket.deliver(Finished(seq.completion))
