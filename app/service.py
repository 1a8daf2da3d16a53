"""The one place that runs generation, for every blueprint (Ollama API, OpenAI API, pages).

One ``GenerationService`` per worker process (created by ``create_app``). Its interface
is deliberately small, so the internals can become a continuous-batching scheduler
without touching the blueprints:

    service.generate(model, prompt, params)            -> models_src Completion
    service.infill(model, first, last, params)         -> Completion (middle, stripped)
    service.stream(model, prompt, params)              -> GenerationStream
    service.stream_infill(model, first, last, params)  -> GenerationStream

A ``GenerationStream`` behaves like ``models_src.sampling.Stream`` (iterate the text
pieces; ``.completion`` is set at the end) and must be iterated to the end or closed.

Concurrency: at most ``max_concurrent`` generations run at once in a worker (default 2:
two interleaved generations keep two streaming users moving instead of one waiting for
the other's whole text; torch's threads default to cores // (workers x max_concurrent),
so the generations running at once never ask for more threads than there are cores,
which makes OpenMP threads spin against each other). A request
waits up to ``queue_timeout_s`` for a slot, then gets ``ServerBusy`` (HTTP 503 +
Retry-After: a transient refusal that clients may retry). A stream takes its slot when
it is created, so "busy" is an HTTP status and not an error in the middle of a stream,
and gives it back when it ends, is closed (a client that disconnects: the WSGI server
closes the response iterable) or is garbage-collected.

Deadline: a generation may run ``request_timeout_s`` seconds from the moment it gets its
slot. When the deadline passes the stream ends early, cleanly, with ``finish_reason``
"length" (the text was cut by a server limit, exactly what "length" means to OpenAI and
Ollama clients, which know no "timeout" value) and ``stream.timed_out`` set. Token counts
of a timed-out completion are recounted from its text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

import torch
from flask import current_app

from models_src.infill import infill_prompt_ids, stream_infill as library_stream_infill
from models_src.sampling import Completion, SamplingParams, Stream, stream as library_stream

from .registry import LoadedModel, ModelRegistry

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A generation that cannot be run; ``status`` is the HTTP status it maps to."""
    status = 500
    param: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(ServiceError):
    status, param = 404, "model"

    def __init__(self, name: object) -> None:
        shown = repr(name if not isinstance(name, str) or len(name) <= 100 else name[:100] + "...")
        super().__init__(f"model {shown} not found")
        self.name = name


class CannotInfill(ServiceError):
    status, param = 400, "suffix"

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} cannot infill "
                         f"(its tokenizer has no <blank>/<sep> tokens)")


class ServerBusy(ServiceError):
    status = 503

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"server busy: no generation slot became free in {waited_s:g} s; "
                         f"retry later")


class GenerationStream:
    """Text pieces of one generation, as they are decoded; ``completion`` is set at the end.

    The pieces concatenate to ``completion.text``. Holds a generation slot until it ends
    or ``close()`` is called (also a context manager). Timings, in nanoseconds from
    ``time.perf_counter_ns``: ``queued_ns`` (waiting for the slot), ``started_ns``,
    ``first_piece_ns`` and ``finished_ns`` (None until they happen).
    """

    def __init__(self, model_name: str, source: Stream, *, deadline: float,
                 clock: Callable[[], float], release: Callable[[], None],
                 count_prompt: Callable[[], int], encode: Callable[[str], list[int]],
                 queued_ns: int = 0, strip: bool = False) -> None:
        self.model_name = model_name
        self.completion: Completion | None = None
        self.timed_out = False
        self.queued_ns = queued_ns
        self.started_ns = time.perf_counter_ns()
        self.first_piece_ns: int | None = None
        self.finished_ns: int | None = None
        self._source: Stream | None = source
        self._deadline, self._clock = deadline, clock
        self._release: Callable[[], None] | None = release
        self._count_prompt, self._encode = count_prompt, encode
        self._strip = strip
        self._held = ""  # whitespace not yet handed out (strip mode)
        self._pieces: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            if self._source is None:
                raise StopIteration
            if self._clock() >= self._deadline:
                self._time_out()
                raise StopIteration
            try:
                with torch.inference_mode():  # per step: the mode is thread-local state
                    piece = next(self._source)
            except StopIteration:
                completion = self._source.completion
                if self._strip and completion is not None:
                    completion.text = completion.text.strip()
                self._end(completion)
                raise
            except BaseException:
                self._end(None)
                raise
            if self._strip:  # whitespace is held back until text follows; the ends drop it
                raw = self._held + piece if self._pieces else piece.lstrip()
                piece = raw.rstrip()
                self._held = raw[len(piece):]
                if not piece:
                    continue
            if self.first_piece_ns is None:
                self.first_piece_ns = time.perf_counter_ns()
            self._pieces.append(piece)
            return piece

    def collect(self) -> Completion:
        """Run to the end (or the deadline) and return the completion."""
        with self:
            for _ in self:
                pass
        assert self.completion is not None
        return self.completion

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return "".join(self._pieces)

    def _time_out(self) -> None:
        self.timed_out = True
        text = self.text
        log.warning("generation with %s hit the request deadline after %d characters",
                    self.model_name, len(text))
        ids = self._encode(text)
        self._end(Completion(text, ids, "length", self._count_prompt(), len(ids)))

    def _end(self, completion: Completion | None) -> None:
        self.completion = completion
        self.finished_ns = time.perf_counter_ns()
        self._source = None  # dropping the library's generator stops it
        release, self._release = self._release, None
        if release is not None:
            release()

    def close(self) -> None:
        """Stop generating (a client went away) and give the slot back; idempotent."""
        if self._release is not None:
            self._end(self.completion)

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: a stream nobody closed must not keep a slot
        try:
            self.close()
        except Exception:
            pass


class GenerationService:
    """Runs generation for every blueprint; bounds concurrency and enforces the deadline."""

    def __init__(self, registry: ModelRegistry, *, max_concurrent: int = 2,
                 queue_timeout_s: float = 30.0, request_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.registry = registry
        self.max_concurrent = max_concurrent
        self.queue_timeout_s = queue_timeout_s
        self.request_timeout_s = request_timeout_s
        self._clock = clock
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._lock = threading.Lock()
        self._active = 0

    @classmethod
    def from_settings(cls, settings, registry: ModelRegistry) -> GenerationService:
        return cls(registry, max_concurrent=settings.max_concurrent,
                   queue_timeout_s=settings.queue_timeout_s,
                   request_timeout_s=settings.request_timeout_s)

    # ---- the interface ------------------------------------------------------------

    def model(self, name: object) -> LoadedModel:
        """The loaded model called exactly ``name``; ``UnknownModel`` otherwise."""
        loaded = self.registry.get(name)
        if loaded is None:
            raise UnknownModel(name)
        return loaded

    def stream(self, model_name: str, prompt: str,
               params: SamplingParams | None = None) -> GenerationStream:
        """Continue ``prompt`` ("" starts from bos), yielding text as it is decoded."""
        loaded = self.model(model_name)
        tok = loaded.tokenizer
        return self._start(loaded, lambda: library_stream(loaded.model, tok, prompt, params),
                           count_prompt=lambda: 1 + len(tok.encode(prompt)))

    def stream_infill(self, model_name: str, first: str, last: str,
                      params: SamplingParams | None = None) -> GenerationStream:
        """The middle of a story between ``first`` and ``last``, as it is written, without
        whitespace at its ends (as ``models_src.infill.infill`` returns it); the last
        sentence is never repeated."""
        loaded = self.model(model_name)
        if not loaded.facts.can_infill:
            raise CannotInfill(loaded.name)
        tok = loaded.tokenizer
        return self._start(
            loaded, lambda: library_stream_infill(loaded.model, tok, first, last, params),
            count_prompt=lambda: len(infill_prompt_ids(tok, first, last)), strip=True)

    def generate(self, model_name: str, prompt: str,
                 params: SamplingParams | None = None) -> Completion:
        return self.stream(model_name, prompt, params).collect()

    def infill(self, model_name: str, first: str, last: str,
               params: SamplingParams | None = None) -> Completion:
        return self.stream_infill(model_name, first, last, params).collect()

    @property
    def active(self) -> int:
        """Generations holding a slot right now."""
        return self._active

    def stats(self) -> dict:
        return {"active": self._active, "max_concurrent": self.max_concurrent,
                "queue_timeout_s": self.queue_timeout_s,
                "request_timeout_s": self.request_timeout_s}

    # ---- internals ----------------------------------------------------------------

    def _start(self, loaded: LoadedModel, make: Callable[[], Stream], *,
               count_prompt: Callable[[], int], strip: bool = False) -> GenerationStream:
        waited = time.perf_counter_ns()
        if not self._slots.acquire(timeout=self.queue_timeout_s):
            raise ServerBusy(self.queue_timeout_s)
        waited = time.perf_counter_ns() - waited
        with self._lock:
            self._active += 1
        try:
            source = make()
        except BaseException:
            self._give_back()
            raise
        return GenerationStream(
            loaded.name, source, deadline=self._clock() + self.request_timeout_s,
            clock=self._clock, release=self._give_back, count_prompt=count_prompt,
            encode=loaded.tokenizer.encode, queued_ns=waited, strip=strip)

    def _give_back(self) -> None:
        with self._lock:
            self._active -= 1
        self._slots.release()


def get_service() -> GenerationService:
    """The current app's service (inside a request or app context)."""
    return current_app.extensions["fable.service"]
