"""The one place that runs generation, for every blueprint (Ollama API, OpenAI API, pages).

    service.generate(model, prompt, params)            -> models_src Completion
    service.infill(model, first, last, params)         -> Completion (middle, stripped)
    service.stream(model, prompt, params)              -> GenerationStream
    service.stream_infill(model, first, last, params, candidates)
                                                       -> GenerationStream (the chosen middle)
    service.stream_chat(model, messages, params)       -> GenerationStream (the reply)

A request first gets a row from the worker's ``Scheduler`` (admission: 503 when there is
none), then joins the ``EngineLoop``'s running batch. A ``GenerationStream`` holds its row
until it ends, is closed (a client that goes away) or is garbage-collected, and ends
cleanly at the request deadline with finish reason "length" (the text was cut by a
server limit, which is what "length" means to OpenAI and Ollama clients).
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flask import current_app

from app.platform import telemetry
from app.platform.settings import default_of
from app.serving.engine_loop import EngineLoop, Failed, Finished, Ticket
from app.serving.registry import LoadedModel, ModelRegistry
from app.serving.scheduler import QueueFull, QueueTimeout, Scheduler
from app.serving.schema import GenerationRequest
from models_src.chat import TRANSCRIPT_TEMPLATE, ChatTemplate, ChatTemplateError, Message, checked
from models_src.infill import infill_prompt_ids
from models_src.infill_candidates import Choice, candidate_params, choose, complete_sentences
from models_src.sampling import Completion, SamplingParams, TokenLogprob, encode_prompt
from models_src.scoring import prompt_logprobs

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

    def __init__(self, name: str, infillers: list[str]) -> None:
        which = (f"models that do: {', '.join(infillers)}" if infillers
                 else "no loaded model does")
        super().__init__(f"model {name!r} was not trained to infill ({which})")


class TooManyCandidates(ServiceError):
    status, param = 400, "candidates"

    def __init__(self, asked: int, rows: int) -> None:
        super().__init__(f"'candidates' is {asked}, but this server decodes at most {rows} "
                         f"sequences at once (FABLE_MAX_BATCH); ask for {rows} or fewer")


class CannotChat(ServiceError):
    status, param = 400, "messages"


class BadPrompt(ServiceError):
    status, param = 400, "prompt"


class ServerBusy(ServiceError):
    status = 503

    def __init__(self, waited_s: float, queue_full: bool = False) -> None:
        super().__init__("server busy: every generation slot is taken and the queue is full; "
                         "retry later" if queue_full else
                         f"server busy: no generation slot became free in {waited_s:g} s; "
                         f"retry later")


class GenerationStream:
    """Text pieces of one generation, as they are decoded; ``completion`` is set at the end.

    The pieces concatenate to ``completion.text``. Holds a row until it ends or ``close()``
    is called (also a context manager). Timings, in nanoseconds from
    ``time.perf_counter_ns``: ``queued_ns`` (waiting for a row and to join a batch),
    ``started_ns``, ``first_piece_ns`` and ``finished_ns`` (None until they happen).
    """

    def __init__(self, model_name: str, ticket: Ticket, *, deadline: float,
                 clock: Callable[[], float], prompt_tokens: int, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], queued_ns: int = 0,
                 strip: bool = False, counted: bool = True) -> None:
        self.model_name = model_name
        self._counted = counted  # False: its tokens were counted already (an infill's candidates)
        self.completion: Completion | None = None
        self.timed_out = False
        self.queued_ns = queued_ns
        self.started_ns = time.perf_counter_ns()
        self.first_piece_ns: int | None = None
        self.finished_ns: int | None = None
        self._ticket: Ticket | None = ticket
        self._deadline, self._clock = deadline, clock
        self._prompt_tokens, self._encode, self._decode = prompt_tokens, encode, decode
        self._strip = strip
        self._logprobs = ticket.logprobs  # grows as the loop decodes (None: not asked for)
        # the prompt's last id: the left context a token's text is decoded with
        self.prompt_tail: list[int] = list(ticket.prompt_ids[-1:])
        self._logprobs_taken = 0
        self._held = ""  # whitespace not yet handed out (strip mode)
        self._pieces: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while True:
            if self._ticket is None:
                raise StopIteration
            remaining = self._deadline - self._clock()
            try:
                if remaining <= 0:
                    raise queue.Empty
                event = self._ticket.next_event(timeout=remaining)
            except queue.Empty:
                self._time_out()
                raise StopIteration from None
            if isinstance(event, Finished):
                if self._strip:
                    event.completion.text = event.completion.text.strip()
                self._end(event.completion)
                raise StopIteration
            if isinstance(event, Failed):
                self._end(None)
                raise event.error
            piece = event
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
        ticket = self._ticket
        with self:
            if ticket is not None:
                ticket.collect_only()
            for _ in self:
                pass
        if self.first_piece_ns is None and ticket is not None:
            self.first_piece_ns = ticket.first_piece_ns
        assert self.completion is not None
        return self.completion

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return "".join(self._pieces)

    @property
    def wants_logprobs(self) -> bool:
        return self._logprobs is not None

    def new_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities decoded since the last call: a streamed chunk carries
        those of the tokens behind it (and any decoded while it was on its way)."""
        if self._logprobs is None:
            return []
        entries = self._logprobs[self._logprobs_taken:]
        self._logprobs_taken += len(entries)
        return entries

    def token_text(self, token_id: int, *, special: bool = True) -> str:
        """One token as text (a byte-level piece of a character shows as U+FFFD). A special
        token is its own string ("<eos>"), so that each has its own key among a position's
        alternatives; ``special=False``: as it shows in the text (nothing)."""
        return self._decode([token_id], skip_special_tokens=not special)

    def _time_out(self) -> None:
        self.timed_out = True
        text = self.text
        held = self._ticket.held_text() if self._ticket is not None else ""
        if held:  # decoded while collecting
            text += self._held + held
            text = text.strip() if self._strip else text
        log.warning("generation with %s hit the request deadline after %d characters",
                    self.model_name, len(text))
        ids = self._encode(text)
        logprobs = None if self._logprobs is None else list(self._logprobs)
        self._end(Completion(text, ids, "length", self._prompt_tokens, len(ids), logprobs))

    def _end(self, completion: Completion | None) -> None:
        self.completion = completion
        self.finished_ns = time.perf_counter_ns()
        ticket, self._ticket = self._ticket, None
        if completion is not None and ticket is not None and self._counted:
            telemetry.generation(self.model_name, self.started_ns - self.queued_ns,
                                 ticket.first_piece_ns, self.finished_ns,
                                 completion.completion_tokens)
        if ticket is not None:
            ticket.cancel()  # gives the row back; the loop stops decoding it before its next step

    def close(self) -> None:
        """Stop generating (a client went away) and give the row back; idempotent."""
        if self._ticket is not None:
            self._end(self.completion)

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: a stream nobody closed must not keep a row
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class CandidateRows:
    """An infill's candidates for ``_start``: each candidate's settings (one row each), how
    the middle is picked once they have all ended, and how many rows it must have (the
    rest are written only if their rows are free at once)."""
    params: list[SamplingParams]
    pick: Callable[[list[Completion]], Choice]
    at_least: int


class CandidatesTicket:
    """An infill's K candidate middles, read as one ticket: once every candidate has ended
    (each decoded in its own row, under its own deadline), the model picks the middle
    under which the last sentence is likeliest (``models_src.infill_candidates.choose``);
    the reader then gets that middle, and its end. ``choice`` is set then. A lone
    candidate streams as it is written, each sentence once it is complete (a sentence
    that never ends is never shown)."""

    def __init__(self, candidates: list[GenerationStream], prompt_ids: list[int],
                 pick: Callable[[list[Completion]], Choice], logprobs: bool) -> None:
        self.prompt_ids, self.candidates, self._pick = prompt_ids, candidates, pick
        self.first_piece_ns: int | None = None
        self.logprobs: list | None = [] if logprobs else None  # the chosen one's, once chosen
        self.choice: Choice | None = None
        self._events: list = []
        self._written = self._sent = ""  # a lone candidate's text so far, and what went out

    def next_event(self, timeout: float) -> str | Finished | Failed:
        # each candidate keeps its own deadline (the same as the reader's): no wait here outlasts it
        while not self._events:
            if len(self.candidates) == 1 and self.choice is None:
                piece = self._next_sentences()
                if piece:
                    return self._out(piece)
            self._events = self._decide()
        event = self._events.pop(0)
        return self._out(event) if isinstance(event, str) else event

    def _out(self, piece: str) -> str:
        if self.first_piece_ns is None:
            self.first_piece_ns = time.perf_counter_ns()
        self._sent += piece
        return piece

    def _next_sentences(self) -> str:
        """The lone candidate's next complete sentences ("" once it has ended)."""
        for piece in self.candidates[0]:
            self._written += piece
            end = complete_sentences(self._written)
            if end > len(self._sent):
                return self._written[len(self._sent):end]
        return ""

    def _decide(self) -> list:
        try:
            completions = [c.collect() for c in self.candidates]
            # the score is one forward pass over K short texts, here on the reader's
            # thread (tens of ms for the bundled model); decoding never changes the weights
            self.choice = self._pick(completions)
        except Exception as error:  # noqa: BLE001 - told to the reader, as the engine's errors are
            self.cancel()
            return [Failed(error)]
        best = self.choice.best
        if self.logprobs is not None and best.completion.logprobs:
            self.logprobs.extend(best.completion.logprobs)
        # usage is the returned middle's, as its text is (never more than the request
        # asked for); every candidate's tokens are counted in telemetry, and on the page
        completion = Completion(best.text, best.completion.token_ids,
                                "stop" if best.ended else "length",
                                best.completion.prompt_tokens, best.completion.completion_tokens,
                                None if self.logprobs is None else list(self.logprobs))
        # what went out is whole sentences of the chosen text (the cut keeps them all)
        rest = best.text[len(self._sent):] if best.text.startswith(self._sent) else ""
        return [rest, Finished(completion)] if rest else [Finished(completion)]

    def collect_only(self) -> None:
        pass  # the pieces are few: whole sentences, or the chosen middle at once

    def held_text(self) -> str:
        return ""  # no piece is held: an unfinished sentence is never shown

    def cancel(self) -> None:
        for candidate in self.candidates:
            candidate.close()


class InfillStream(GenerationStream):
    """The chosen middle of an infill (see ``GenerationService.stream_infill``)."""

    def __init__(self, *args, ticket: CandidatesTicket, **kwargs) -> None:
        super().__init__(*args, ticket=ticket, **kwargs)
        self.candidates = len(ticket.candidates)
        self._candidates_ticket = ticket

    @property
    def choice(self) -> Choice | None:
        """Every candidate, cut and scored, and the one kept (None until they all ended)."""
        return self._candidates_ticket.choice


class GenerationService:
    """Runs generation for every blueprint: admission, then the engine loop; enforces the
    deadline."""

    def __init__(self, registry: ModelRegistry, *, max_batch: int = default_of("max_batch"),
                 max_queue: int = default_of("max_queue"),
                 queue_timeout_s: float = default_of("queue_timeout_s"),
                 request_timeout_s: float = default_of("request_timeout_s"),
                 chat_template: str | None = None, log_prompts: bool = False,
                 decode_threads: int = 1,
                 infill_candidates: int = default_of("infill_candidates"),
                 max_new_tokens: int = default_of("max_new_tokens"),
                 default_new_tokens: int | None = default_of("default_new_tokens"),
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``chat_template``: for models whose tokenizer has none (None: the transcript);
        raises ChatTemplateError when it does not work."""
        self.registry = registry
        self.chat_template = checked(chat_template or TRANSCRIPT_TEMPLATE)
        self.log_prompts = log_prompts
        self.scheduler = Scheduler(max_batch, max_queue, on_change=telemetry.rows)
        self.engine = EngineLoop(decode_threads)
        self.queue_timeout_s = queue_timeout_s
        self.request_timeout_s = request_timeout_s
        self.infill_candidates = infill_candidates
        self.max_new_tokens, self.default_new_tokens = max_new_tokens, default_new_tokens
        self._clock = clock

    @classmethod
    def from_settings(cls, settings, registry: ModelRegistry) -> GenerationService:
        return cls(registry, max_batch=settings.max_batch, max_queue=settings.max_queue,
                   queue_timeout_s=settings.queue_timeout_s,
                   request_timeout_s=settings.request_timeout_s,
                   chat_template=settings.chat_template, log_prompts=settings.log_prompts,
                   decode_threads=settings.decode_threads,
                   infill_candidates=settings.infill_candidates,
                   max_new_tokens=settings.max_new_tokens,
                   default_new_tokens=settings.default_new_tokens)

    # ---- the interface ------------------------------------------------------------

    def model(self, name: object) -> LoadedModel:
        """The loaded model called exactly ``name``; ``UnknownModel`` otherwise."""
        loaded = self.registry.get(name)
        if loaded is None:
            raise UnknownModel(name)
        return loaded

    # Each generation takes ``params``: a whole SamplingParams (used as it is), or the
    # values a request set (None: none), which the model's own defaults complete.

    def stream(self, model_name: str, prompt: str | Sequence[int],
               params: SamplingParams | Mapping[str, Any] | None = None) -> GenerationStream:
        """Continue ``prompt`` ("" starts from bos; token ids are taken as they are),
        yielding text as it is decoded."""
        loaded = self.model(model_name)
        ids = self.prompt_ids(loaded, prompt)
        self._log("generate", loaded.name, prompt if isinstance(prompt, str) else loaded.tokenizer.decode(ids))
        return self._start(loaded, ids, self.params_for(loaded, params, len(ids)))

    def prompt_ids(self, loaded: LoadedModel, prompt: str | Sequence[int]) -> list[int]:
        """A text prompt encoded as generation encodes it (a bos where the tokenizer adds
        one); token ids checked against the model's vocabulary."""
        if isinstance(prompt, str):
            return encode_prompt(loaded.tokenizer, prompt)
        vocab = loaded.tokenizer.vocab_size
        outside = [i for i in prompt if not 0 <= i < vocab]
        if outside:
            raise BadPrompt(f"'prompt' holds the token id {outside[0]}, which is not in model "
                            f"{loaded.name!r}'s vocabulary (ids 0 to {vocab - 1})")
        return list(prompt)

    def score(self, model_name: str, prompt: str | Sequence[int], top: int = 0
              ) -> tuple[list[int], list[TokenLogprob | None]]:
        """The prompt's ids and each one's log-probability given those before it (the first:
        None), with ``top`` alternatives; it takes a row while the model reads it."""
        loaded = self.model(model_name)
        ids = self.prompt_ids(loaded, prompt)
        if loaded.checkpoint.config.arch == "seq2seq":
            raise BadPrompt(f"model {loaded.name!r} is an encoder-decoder: it does not score a "
                            "prompt token by token")
        context = loaded.model.max_context
        if context is not None and len(ids) > context:
            raise BadPrompt(f"the prompt is {len(ids)} tokens; model {loaded.name!r} scores at "
                            f"most its context, {context}")
        self._acquire(1, 1)
        try:
            return ids, prompt_logprobs(loaded.model, ids, top)
        finally:
            self.scheduler.release(1)

    def stream_infill(self, model_name: str, first: str, last: str,
                      params: SamplingParams | Mapping[str, Any] | None = None,
                      candidates: int | None = None) -> InfillStream:
        """The middle of a story between ``first`` and ``last``: ``candidates`` middles
        (None: the server's ``infill_candidates``, at most ``max_batch``) are written at
        once, one row each, and the one under which the last sentence is likeliest comes
        out once they have all ended (a lone one streams sentence by sentence), cut after
        its last complete sentence when it did not end by itself (finish reason "length"
        then), without whitespace at its ends; the last sentence is never repeated. The
        stream's ``choice`` says which won and why."""
        loaded = self.model(model_name)
        if not loaded.facts.can_infill:
            raise CannotInfill(loaded.name, [f.name for f in self.registry.facts() if f.can_infill])
        count = self.candidates_for(candidates)
        self._log("infill", loaded.name, f"{first} … {last}")
        ids = infill_prompt_ids(loaded.tokenizer, first, last)
        params = self.params_for(loaded, params, len(ids))
        # Asked for, the candidates wait for their rows; by default an infill waits for one
        # and writes as many more as there are free rows: under load it writes fewer
        # candidates rather than holding up everyone behind it.
        rows = CandidateRows(
            candidate_params(params, last, count),
            lambda done: choose(loaded.model, loaded.tokenizer, first, last, done),
            at_least=count if candidates is not None else 1)
        return self._start(loaded, ids, rows, strip=True)

    def candidates_for(self, asked: int | None) -> int:
        """Candidate middles for one infill: ``asked``, or the server's default (no more
        than one worker's rows); asking more than its rows is a 400."""
        if asked is None:
            return min(self.infill_candidates, self.scheduler.max_batch)
        if asked > self.scheduler.max_batch:
            raise TooManyCandidates(asked, self.scheduler.max_batch)
        return asked

    def stream_chat(self, model_name: str, messages: tuple[Message, ...],
                    params: SamplingParams | Mapping[str, Any] | None = None) -> GenerationStream:
        """The assistant's reply to ``messages``, rendered with the model's own chat
        template (its tokenizer config's) or the server's; it ends at the next turn
        marker and has no whitespace at its ends."""
        loaded = self.model(model_name)
        template = self._template(loaded)
        try:
            text = template.render(messages)
        except ChatTemplateError as e:
            raise CannotChat(f"model {loaded.name!r}: {e}") from None
        self._log("chat", loaded.name, messages[-1].content if messages else "")
        ids = encode_prompt(loaded.tokenizer, text)
        params = self.params_for(loaded, params, len(ids))
        params = replace(params, stop=[*params.stop, template.turn_marker])
        return self._start(loaded, ids, params, strip=True)

    def generate(self, model_name: str, prompt: str,
                 params: SamplingParams | Mapping[str, Any] | None = None) -> Completion:
        return self.stream(model_name, prompt, params).collect()

    def infill(self, model_name: str, first: str, last: str,
               params: SamplingParams | Mapping[str, Any] | None = None,
               candidates: int | None = None) -> Completion:
        return self.stream_infill(model_name, first, last, params, candidates).collect()

    def params_for(self, loaded: LoadedModel, params: SamplingParams | Mapping[str, Any] | None,
                   prompt_tokens: int) -> SamplingParams:
        """``params`` as they are, or the values a request set over the model's defaults
        (the length left unset: to the end of its context, at most FABLE_MAX_NEW_TOKENS)."""
        if isinstance(params, SamplingParams):
            return params
        return loaded.defaults.params(params or {}, prompt_tokens=prompt_tokens,
                                      context=loaded.model.max_context, cap=self.max_new_tokens,
                                      length=self.default_new_tokens)

    @property
    def active(self) -> int:
        """Generations holding a row right now."""
        return self.scheduler.rows

    def stats(self) -> dict:
        return {"active": self.scheduler.rows, "queued": self.scheduler.queued,
                "max_batch": self.scheduler.max_batch, "max_queue": self.scheduler.max_queue,
                "queue_timeout_s": self.queue_timeout_s,
                "request_timeout_s": self.request_timeout_s}

    # ---- internals ----------------------------------------------------------------

    def _log(self, kind: str, model: str, text: str) -> None:
        """Prompts reach the log only when FABLE_LOG_PROMPTS asks (they are the users')."""
        if self.log_prompts:
            log.info("%s with %s: %r", kind, model, text[:200])

    def _template(self, loaded: LoadedModel) -> ChatTemplate:
        own = getattr(loaded.tokenizer, "chat_template", None)
        if not own:
            return self.chat_template
        try:
            return checked(own)
        except ChatTemplateError as e:
            raise CannotChat(f"model {loaded.name!r}: {e}") from None

    def _acquire(self, count: int, at_least: int) -> int:
        """Rows for one request: ``at_least`` of them, handed all at once after a wait in
        the queue (ServerBusy when they do not come), then up to ``count`` in all of those
        free now. How many it holds."""
        try:
            self.scheduler.acquire(self.queue_timeout_s, rows=at_least)
        except QueueFull:
            raise ServerBusy(0.0, queue_full=True) from None
        except QueueTimeout:
            raise ServerBusy(self.queue_timeout_s) from None
        return at_least + self.scheduler.try_acquire(count - at_least)

    def _start(self, loaded: LoadedModel, prompt_ids: list[int],
               params: SamplingParams | CandidateRows, *, strip: bool = False) -> GenerationStream:
        """One generation: a row from the scheduler, then the engine loop; or, for
        ``CandidateRows``, one row per candidate, all joining the same step."""
        rows = params.params if isinstance(params, CandidateRows) else [params]
        waited = time.perf_counter_ns()
        held = self._acquire(len(rows), params.at_least if isinstance(params, CandidateRows)
                             else 1)
        tickets = [Ticket(loaded, prompt_ids, p, on_end=self.scheduler.release)
                   for p in rows[:held]]
        for ticket in tickets:
            self.engine.submit(ticket)
        joined_by = time.monotonic() + self.request_timeout_s
        for ticket in tickets:  # their first tokens come at the next step
            if not ticket.joined.wait(max(0.0, joined_by - time.monotonic())):
                for t in tickets:
                    t.cancel()
                raise ServerBusy(self.request_timeout_s)
        deadline, queued_ns = self._clock() + self.request_timeout_s, time.perf_counter_ns() - waited
        streams = [GenerationStream(
            loaded.name, ticket, deadline=deadline, clock=self._clock,
            prompt_tokens=len(prompt_ids), encode=loaded.tokenizer.encode,
            decode=loaded.tokenizer.decode, queued_ns=queued_ns, strip=strip) for ticket in tickets]
        if not isinstance(params, CandidateRows):
            return streams[0]
        ticket = CandidatesTicket(streams, prompt_ids, params.pick,
                                  logprobs=rows[0].logprobs is not None)
        return InfillStream(
            loaded.name, ticket=ticket, deadline=deadline, clock=self._clock,
            prompt_tokens=len(prompt_ids), encode=loaded.tokenizer.encode,
            decode=loaded.tokenizer.decode, queued_ns=queued_ns, counted=False)


def get_service() -> GenerationService:
    """The current app's service (inside a request or app context)."""
    return current_app.extensions["fable.service"]


def open_stream(req: GenerationRequest) -> GenerationStream:
    """Start the generation a validated request asks for (raises ServiceError before any
    text is produced: unknown model, cannot infill, busy)."""
    service = get_service()
    if req.messages is not None:
        return service.stream_chat(req.model, req.messages, req.sampling)
    if req.suffix is not None:
        return service.stream_infill(req.model, req.prompt, req.suffix, req.sampling,
                                     req.candidates)
    return service.stream(req.model, req.prompt, req.sampling)
