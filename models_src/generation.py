"""The decode engine: every generation, offline or served, runs through ``Batch``.

Sequences join between steps and leave the moment they end (continuous batching, as in
Orca and vLLM); every step is one forward pass over the sequences still running. Each
sequence keeps its own sampling settings, random generator, stop strings and streaming
detokenizer, so a seed gives the same text whatever runs beside it.

    batch = Batch(model, tokenizer)
    seq, = batch.add([(prompt_ids, params)])   # joins at the next step
    while batch:
        for seq, piece in batch.step():         # one new token per running sequence
            ...                                  # seq.completion is set once it has ended
    batch.remove(seq)                           # e.g. its client went away

``generate`` and ``stream`` are the offline drivers: add the prompts, step until the
batch is empty, collect. Not thread-safe: one thread (a server's engine loop) owns a batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Sequence as Seq
from dataclasses import replace

import torch

from .sampling import (Completion, RowSettings, SamplingParams, TextStream, TokenLogprob, Tokenizer,
                       encode_prompt, make_generator, sample, token_logprobs, uniforms)

#: U[0, 1) draws a row fetches from its generator at once (see Sequence.uniform)
DRAW_CHUNK = 64


class Sequence:
    """One generation in a batch; ``completion`` is set when it ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, vocab_size: int,
                 device) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.stream = TextStream(tokenizer, params.stop, context=prompt_ids)
        self.eos_id = None if params.ignore_eos else tokenizer.eos_id
        self.generator = make_generator(params.seed)
        self._draws: list[float] = []  # the generator's next U[0, 1) draws, in order
        self.seen = None  # (1, V) tokens in the prompt or generated: only the penalty needs it
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, prompt_ids] = True
        self.generated = 0  # tokens sampled, eos included
        self.logprobs: list[TokenLogprob] | None = None if params.logprobs is None else []
        self.filled = 0  # tokens the state holds (the context limit counts them)
        self.completion: Completion | None = None

    def uniform(self) -> float:
        """The row's next U[0, 1) draw: fetched ``DRAW_CHUNK`` at a time from the row's CPU
        generator (the same stream as one at a time, for less per-step work)."""
        if not self._draws:
            self._draws = uniforms(DRAW_CHUNK, self.generator, "cpu").view(-1).tolist()[::-1]
        return self._draws.pop()

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> tuple[str, str | None]:
        """Take one sampled token (and its log-probability, when the row asked); return
        the new text and the finish reason (None: goes on)."""
        self.generated += 1
        if self.seen is not None:
            self.seen[0, token] = True
        text, limit = self.stream, self.params.max_new_tokens
        if token == self.eos_id:
            return text.flush(), "stop"
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        piece = text.push(token)
        if not text.stopped and len(text.ids) == limit:
            piece += text.flush()
        return piece, "stop" if text.stopped else "length" if len(text.ids) == limit else None

    def _finish(self, reason: str) -> None:
        s = self.stream
        self.completion = Completion(s.text, s.ids, reason, len(self.prompt_ids), self.generated,
                                     self.logprobs)


class Batch:
    """Sequences decoded together by one model; see the module docstring."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._running: list[Sequence] = []  # row i of the state is _running[i]
        self._joining: list[tuple[Sequence, list[int]]] = []  # (sequence, ids its new row is fed)
        self._state = None
        self._fed: torch.Tensor | None = None  # (B,): each running row's token, fed by the next step
        self._rows: RowSettings | None = None  # the rows' sampling settings as tensors

    @property
    def sequences(self) -> list[Sequence]:
        """Every sequence that has not ended: the running rows, then those joining."""
        return self._running + [s for s, _ in self._joining]

    def __len__(self) -> int:
        return len(self._running) + len(self._joining)

    def add(self, requests: Seq[tuple[list[int], SamplingParams]]) -> list[Sequence]:
        """Add new sequences; the next step feeds their prompts and samples their first token.

        Each prompt needs at least one id (e.g. bos), each below the vocabulary size (a bad
        id fails here, not in a step that other sequences share). A sequence asking for no
        tokens is complete at once and never joins. A prompt longer than the context keeps
        its end (``model.context_ids``).
        """
        model = self.model
        vocab, ctx = model.config.vocab_size, model.max_context
        for ids, _ in requests:
            if not ids:
                raise ValueError("every prompt needs at least one token (e.g. bos)")
            if not all(0 <= i < vocab for i in ids):
                raise ValueError(f"prompt ids must be in [0, {vocab})")
        device = model.device
        seqs = [Sequence(list(ids), params, self.tokenizer, vocab, device) for ids, params in requests]
        for s in seqs:
            if s.params.max_new_tokens == 0:
                s._finish("length")
            else:
                ids = s.prompt_ids if ctx is None else model.context_ids(s.prompt_ids, ctx)
                self._joining.append((s, ids))
        return seqs

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence that has not ended (its completion stays unset)."""
        if seq in self._running:
            with torch.inference_mode():  # the state is regrouped in place
                self._keep([s is not seq for s in self._running])
        else:
            self._joining = [(s, ids) for s, ids in self._joining if s is not seq]

    def step(self) -> list[tuple[Sequence, str]]:
        """Feed every sequence (a new one its prompt) and sample its next token; return
        (sequence, new text) for each (text may be ""). Sequences that end get their
        ``completion`` and leave."""
        if not self:
            return []
        with torch.inference_mode():
            logits = self._forward()
            tokens = self._sample(logits)
            logprobs = self._logprobs(logits, tokens)
        ctx = self.model.max_context
        events, keep, reprime = [], [], []
        for s, token in zip(self._running, tokens.tolist()):  # the one host sync per step
            piece, reason = s.accept(token, logprobs.get(s))
            full = reason is None and ctx is not None and s.filled + 1 > ctx  # no room for its token
            if reason is not None:
                s._finish(reason)
            elif full:
                reprime.append(s)
            keep.append(reason is None and not full)
            events.append((s, piece))
        self._fed = tokens
        if not all(keep):
            with torch.inference_mode():
                self._keep(keep)
        for s in reprime:  # the last half-context: the next overflow is ctx // 2 tokens away
            self._joining.append((s, self.model.context_ids(s.prompt_ids + s.stream.ids, max(1, ctx // 2))))
        return events

    # ---- internals ------------------------------------------------------------------

    def _forward(self) -> torch.Tensor:
        """One pass: the running rows' tokens and the joining prompts; the joining
        sequences become the last rows. Returns each row's next-token logits (B, V)."""
        model, joining = self.model, self._joining
        tokens = self._fed if self._running else None
        logits, self._state = model.join_step(tokens, self._state if self._running else None,
                                              [ids for _, ids in joining])
        self._joining = []  # only now: if the pass fails, they are still this batch's sequences
        for s in self._running:
            s.filled += 1
        for s, ids in joining:
            s.filled = model.context_length(ids)
        if joining:
            self._running = self._running + [s for s, _ in joining]
            self._rows = None
        return logits

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (B,), each row with its own settings and generator."""
        if self._rows is None:  # rows joined or left since the last step
            self._rows = RowSettings([s.params for s in self._running], self.model.config.vocab_size,
                                     logits.device)
        rows, running = self._rows, self._running
        seen = None
        if rows.penalty is not None:
            unseen = torch.zeros(1, logits.size(-1), dtype=torch.bool, device=logits.device)
            seen = torch.cat([s.seen if s.seen is not None else unseen for s in running])
        u = None
        if not rows.all_greedy:
            u = torch.tensor([0.0 if g else s.uniform() for s, g in zip(running, rows.greedy_list)],
                             device=logits.device)[:, None]
        return sample(logits, rows, u, seen)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> dict[Sequence, TokenLogprob]:
        """Log-probabilities for the rows that asked for them, and only those."""
        asking = self._rows.logprobs
        if not asking:
            return {}
        index = torch.tensor([i for i, _ in asking], device=logits.device)
        entries = token_logprobs(logits[index], tokens[index], max(n for _, n in asking))
        return {self._running[i]: replace(e, top=e.top[:n]) for (i, n), e in zip(asking, entries)}

    def _keep(self, mask: list[bool]) -> None:
        """Keep the running rows where ``mask`` is true."""
        # The last rows kept fill the places of the rows that leave, so that a state
        # regrouped in place (the GPT's cache) moves as few rows as there are leavers.
        n = sum(mask)
        tail = [i for i in range(n, len(mask)) if mask[i]]
        rows = [i if mask[i] else tail.pop() for i in range(n)]
        self._running = [self._running[i] for i in rows]
        self._rows = None
        if not rows:
            self._state = self._fed = None
            return
        index = torch.tensor(rows, device=self._fed.device)
        self._state = self._state.select(index)
        self._fed = self._fed[index]


# ---- offline drivers ------------------------------------------------------------------

def _prompt_rows(tokenizer: Tokenizer, prompts, prompt_ids) -> list[list[int]]:
    if (prompts is None) == (prompt_ids is None):
        raise ValueError("pass exactly one of prompts (text) or prompt_ids (token ids)")
    if prompt_ids is not None:
        rows = [list(r) for r in prompt_ids]
        if any(not r for r in rows):
            raise ValueError("every row of prompt_ids needs at least one token (e.g. bos)")
        return rows
    if isinstance(prompts, str):
        prompts = [prompts]
    return [encode_prompt(tokenizer, p) for p in prompts]


def _row_params(params: SamplingParams | None, rows: int) -> list[SamplingParams]:
    """Row i of a seeded batch is seeded with ``seed + i``: its text is what that prompt
    gives alone with that seed, whatever else is in the batch."""
    params = params or SamplingParams()
    if params.seed is None:
        return [params] * rows
    return [replace(params, seed=params.seed + i) for i in range(rows)]


def generate(model, tokenizer: Tokenizer, prompts: str | list[str] | None = None,
             params: SamplingParams | None = None, *,
             prompt_ids: list[list[int]] | None = None) -> list[Completion]:
    """Complete each prompt; one Completion per prompt, in order.

    Text prompts become ``[bos] + encode(prompt)`` (an empty prompt starts from bos);
    ``prompt_ids`` are used exactly as given (e.g. an infilling ``first <blank> last <sep>``).
    """
    rows = _prompt_rows(tokenizer, prompts, prompt_ids)
    batch = Batch(model, tokenizer)
    seqs = batch.add(list(zip(rows, _row_params(params, len(rows)))))
    while batch:
        batch.step()
    return [s.completion for s in seqs]


class Stream:
    """Iterator over the text pieces of one completion; ``completion`` is set at its end.
    The pieces concatenate to exactly ``completion.text``: no partial character and no
    part of a stop string is ever yielded."""

    def __init__(self, batch: Batch, seq: Sequence) -> None:
        self.completion: Completion | None = seq.completion
        self._pieces = self._run(batch, seq)

    def _run(self, batch: Batch, seq: Sequence) -> Iterator[str]:
        while batch:
            for _, piece in batch.step():
                if piece:
                    yield piece
        self.completion = seq.completion

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)


def stream(model, tokenizer: Tokenizer, prompt: str | None = None,
           params: SamplingParams | None = None, *, prompt_ids: list[int] | None = None) -> Stream:
    """Like ``generate`` for one prompt, yielding text as soon as it is certain."""
    rows = _prompt_rows(tokenizer, prompt, None if prompt_ids is None else [prompt_ids])
    batch = Batch(model, tokenizer)
    seq, = batch.add([(rows[0], params or SamplingParams())])
    return Stream(batch, seq)
