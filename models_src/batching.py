"""Continuous batching: independent generations decoded together, one step at a time.

``sampling.generate`` decodes a batch that starts together and waits for its longest row.
A server gets requests at any moment, each with its own prompt, settings and length. A
``Batch`` lets sequences join between steps and leave the moment they end, so every step
is one forward pass over all sequences still running (continuous batching, as in Orca and
vLLM). Each sequence keeps its own sampling settings, random generator, stop strings and
streaming detokenizer (``sampling.TextStream``). Sampling is done for all rows at once:
the processors of ``sampling`` (repetition penalty, temperature, top-k, top-p, in that
order) with a value per row, then ``sample_next``'s draw per row from the row's own
generator, so a seed gives the same text whatever runs beside it, and the same as
``sampling.generate`` gives it alone (up to the rounding of batched arithmetic).

    batch = Batch(model, tokenizer)
    seq, = batch.add([(prompt_ids, params)])   # joins at the next step
    while batch:
        for seq, piece in batch.step():         # one new token per running sequence
            ...                                  # seq.completion is set once it has ended
    batch.remove(seq)                           # e.g. its client went away

A step is one forward pass: each running row is fed the token it sampled last, the
prompts of the sequences that joined since are fed in the same pass
(``model.join_step``), and then every row samples its next token. Rows are regrouped with
the model's ``select_rows`` when sequences leave (never per step); a leaving row's place
goes to the last row, so a state regrouped in place (the GPT's key/value cache) copies
only the rows that move. A sequence that fills the model's context leaves its row and
joins again from the last half-context (``model.context_ids``), as ``sampling`` re-primes.
Not thread-safe: one thread (a server's scheduler) owns a batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .sampling import (GREEDY_BELOW, Completion, SamplingParams, TextStream, _accept,
                       float32_safe, inverse_cdf, make_generator, outside_nucleus, penalise, uniforms)


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
        self.filled = 0  # tokens the state holds (the context limit counts them)
        self.completion: Completion | None = None

    def uniform(self) -> float:
        """The row's next U[0, 1) draw (what ``sampling.uniforms`` would give it).

        Fetched ``DRAW_CHUNK`` at a time from the row's CPU generator, which gives the
        same stream either way: one call per row per step was ~6 % of a 16-row server
        step (py-spy; benchmarks/README.md)."""
        if not self._draws:
            self._draws = uniforms(DRAW_CHUNK, self.generator, "cpu").view(-1).tolist()[::-1]
        return self._draws.pop()

    def _finish(self, reason: str) -> None:
        s = self.stream
        self.completion = Completion(s.text, s.ids, reason, len(self.prompt_ids), self.generated)


class _RowSettings:
    """The sampling settings of a batch's rows as (B, 1) tensors, built when rows change.
    A processor nobody uses is None (skipped); rows without it get a neutral value."""

    def __init__(self, sequences: list[Sequence], vocab_size: int, device) -> None:
        params = [s.params for s in sequences]

        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        self.greedy_list = [p.temperature < GREEDY_BELOW for p in params]
        self.greedy = torch.tensor(self.greedy_list, device=device)
        self.all_greedy = all(self.greedy_list)
        self.temperature = column([1.0 if g else float32_safe(p.temperature)
                                   for p, g in zip(params, self.greedy_list)])
        self.penalty = self.unseen = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.penalty = column([float32_safe(p.repetition_penalty) for p in params])
            self.unseen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
        self.top_k = self.top_p = None
        if any(p.top_k is not None for p in params):  # index of the k-th best, sorted
            self.top_k = column([min(p.top_k or vocab_size, vocab_size) - 1 for p in params], torch.long)
        if any(p.top_p is not None and p.top_p < 1.0 for p in params):
            self.top_p = column([1.0 if p.top_p is None else p.top_p for p in params])


class Batch:
    """Sequences decoded together by one model; see the module docstring."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._running: list[Sequence] = []  # row i of the state is _running[i]
        self._joining: list[tuple[Sequence, list[int]]] = []  # (sequence, ids its new row is fed)
        self._state = None
        self._fed: torch.Tensor | None = None  # (B,): each running row's token, fed by the next step
        self._rows: _RowSettings | None = None  # the rows' sampling settings as tensors

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
            tokens = self._sample(logits.float())
        ctx = self.model.max_context
        events, keep, reprime = [], [], []
        for s, token in zip(self._running, tokens.tolist()):  # the one host sync per step
            s.generated += 1
            if s.seen is not None:
                s.seen[0, token] = True
            piece, reason = _accept(s.stream, token, s.eos_id, s.params.max_new_tokens)
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
        rows = self._settings(logits.device)
        if rows.penalty is not None:
            seen = torch.cat([s.seen if s.seen is not None else rows.unseen for s in self._running])
            logits = penalise(logits, seen, rows.penalty)
        greedy = logits.argmax(dim=-1)
        if rows.all_greedy:
            return greedy
        logits = logits / rows.temperature
        if rows.top_k is not None or rows.top_p is not None:
            ranked, order = logits.sort(dim=-1, descending=True)
            if rows.top_k is not None:  # ties with the k-th are kept, as sampling.apply_top_k
                ranked = ranked.masked_fill(ranked < ranked.gather(1, rows.top_k), float("-inf"))
            if rows.top_p is not None:  # as sampling.apply_top_p
                ranked = ranked.masked_fill(outside_nucleus(ranked, rows.top_p), float("-inf"))
            removed = torch.isinf(ranked)
            logits = logits.masked_fill(removed.scatter(1, order, removed), float("-inf"))
        # sampling.sample_next's draw, one uniform per row from the row's own generator:
        # a seeded request gets the same tokens here as from sampling.generate
        probs = logits.softmax(dim=-1)
        u = torch.tensor([0.0 if g else s.uniform() for s, g in zip(self._running, rows.greedy_list)],
                         device=probs.device)[:, None]
        return torch.where(rows.greedy, greedy, inverse_cdf(probs, u))

    def _settings(self, device) -> _RowSettings:
        if self._rows is None:  # rows joined or left since the last step
            self._rows = _RowSettings(self._running, self.model.config.vocab_size, device)
        return self._rows

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
        self._state = self.model.select_rows(self._state, index)
        self._fed = self._fed[index]
