"""The worker's decoding threads: every running request, decoded together.

Request threads never run the model. They hand a ``Ticket`` to the ``EngineLoop``, which
keeps a ``models_src.generation.Batch`` per model: tickets join between steps, finished
or cancelled ones leave at once, and each step's text goes out through
``Ticket.deliver``. A model's batch is stepped by one thread at a time; different models
may step at once on ``FABLE_DECODE_THREADS`` threads (settings: the default keeps them
and torch's own threads within the machine's cores).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.platform import telemetry
from models_src.generation import Batch, Sequence
from models_src.sampling import Completion, SamplingParams

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


class _Lane:
    """One loaded model's work: its ``Batch``, the tickets that own its sequences, and
    the tickets waiting to join. At most one decoding thread holds a lane at a time."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.batch = Batch(loaded.model, loaded.tokenizer)
        self.joining: list[Ticket] = []
        self.owner: dict[Sequence, Ticket] = {}
        self.scheduled = False  # in the ready queue, or being stepped


class EngineLoop:
    """Owns the decoding threads and one lane (a ``Batch``) per model being decoded.

    A lane with work waits in a ready queue; a decoding thread takes it, joins its new
    tickets, steps it once and puts it back at the end, so the models take turns and
    one model's steps never overlap. With ``threads`` > 1, different models step at the
    same time (the operators release the GIL): a comparison of several models then costs
    less than the sum of their steps. Threads start on demand, up to ``threads``.
    """

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError("the engine loop needs at least one decoding thread")
        self._cond = threading.Condition()
        # one lane per loaded model: a model reloaded under the same name is a new
        # LoadedModel, so the generations running on the old weights finish on them
        self._lanes: dict[object, _Lane] = {}
        self._ready: deque[_Lane] = deque()
        self._max_threads = threads
        self._threads: list[threading.Thread] = []
        self._idle = 0  # decoding threads waiting for a lane, none of them woken yet

    def submit(self, ticket: Ticket) -> None:
        """Join the ticket's request at its model's next step."""
        with self._cond:
            lane = self._lanes.get(ticket.loaded)
            if lane is None:
                lane = self._lanes[ticket.loaded] = _Lane(ticket.loaded)
            lane.joining.append(ticket)
            self._schedule(lane)

    def decoding(self) -> int:
        """Sequences in the running batches right now (cancelled ones leave within a step)."""
        return sum(len(lane.batch) for lane in list(self._lanes.values()))

    def _schedule(self, lane: _Lane, wake: bool = True) -> None:
        """Queue ``lane`` unless it is queued or held (called with the lock); ``wake``: let
        an idle or new thread take it (a thread putting back the lane it stepped does not
        need one: it takes the next lane itself, so one busy model stays on one thread)."""
        if lane.scheduled:
            return
        lane.scheduled = True
        self._ready.append(lane)
        if not wake:
            return
        if self._idle:
            self._idle -= 1  # that thread is taken now, before it wakes
            self._cond.notify()
        elif len(self._threads) < self._max_threads:
            thread = threading.Thread(target=self._run, daemon=True,
                                      name=f"fable-engine-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    self._idle += 1  # _schedule counts it out when it wakes it
                    self._cond.wait()
                lane = self._ready.popleft()
                joining, lane.joining = lane.joining, []
            self._join(lane, joining)
            self._step(lane)
            with self._cond:
                lane.scheduled = False
                if lane.owner or lane.joining:
                    self._schedule(lane, wake=False)
                elif self._lanes.get(lane.loaded) is lane:
                    # an idle model holds no state (nor its old weights)
                    del self._lanes[lane.loaded]

    def _join(self, lane: _Lane, tickets: list[Ticket]) -> None:
        group = [t for t in tickets if not t.cancelled]
        if not group:
            return
        try:
            seqs = lane.batch.add([(t.prompt_ids, t.params) for t in group])
        except Exception as error:  # noqa: BLE001 - reported to each request
            log.exception("joining failed for %s", lane.loaded.name)
            for t in group:
                t.deliver(Failed(error))
            return
        for t, seq in zip(group, seqs):
            t.logprobs = seq.logprobs
            t.joined.set()
            if seq.completion is not None:  # asked for no tokens
                t.deliver(Finished(seq.completion))
            else:
                lane.owner[seq] = t

    def _step(self, lane: _Lane) -> None:
        batch, owner = lane.batch, lane.owner
        for seq in [s for s in batch.sequences if owner[s].cancelled]:
            batch.remove(seq)
            del owner[seq]
        if not batch:
            return
        telemetry.BATCH.labels(lane.loaded.name).observe(len(batch))
        try:
            events = batch.step()
        except Exception as error:  # noqa: BLE001 - every request of the batch is told
            log.exception("decoding step failed for %s", lane.loaded.name)
            for seq in batch.sequences:
                owner.pop(seq).deliver(Failed(error))
            lane.batch = Batch(lane.loaded.model, lane.loaded.tokenizer)
            return
        for seq, piece in events:
            ticket = owner[seq]
            ticket.deliver(piece)
            if seq.completion is not None:
                del owner[seq]
                ticket.deliver(Finished(seq.completion))
