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
    seq, = batch.add([(prompt_ids, params)])   # prefilled now; sampled from the next step
    while batch:
        for seq, piece in batch.step():         # one new token per running sequence
            ...                                  # seq.completion is set once it has ended
    batch.remove(seq)                           # e.g. its client went away

Rows are regrouped with the model's ``select_rows``/``concat_rows`` when sequences join
or leave (never per step); a leaving row's place goes to the last row, so a state
regrouped in place (the GPT's key/value cache) copies only the rows that move. A
sequence that fills the model's context is re-primed on its own from the last
half-context, as ``sampling`` does.
Not thread-safe: one thread (a server's scheduler) owns a batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .sampling import (GREEDY_BELOW, Completion, SamplingParams, TextStream, _accept, _prefill,
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
        self.sequences: list[Sequence] = []  # row i of the state is sequences[i]
        self._state = None
        self._logits: torch.Tensor | None = None  # (B, V): next-token logits of each row
        self._rows: _RowSettings | None = None  # the rows' sampling settings as tensors

    def __len__(self) -> int:
        return len(self.sequences)

    def add(self, requests: Seq[tuple[list[int], SamplingParams]]) -> list[Sequence]:
        """Prefill new sequences (one forward pass for all) and add them to the batch.

        Each prompt needs at least one id (e.g. bos). A sequence asking for no tokens is
        complete at once and never joins.
        """
        model = self.model
        vocab = model.config.vocab_size
        seqs = [Sequence(list(ids), params, self.tokenizer, vocab, model.device) for ids, params in requests]
        if any(not s.prompt_ids for s in seqs):
            raise ValueError("every prompt needs at least one token (e.g. bos)")
        joining = []
        for s in seqs:
            if s.params.max_new_tokens == 0:
                s._finish("length")
            else:
                joining.append(s)
        if joining:
            with torch.inference_mode():
                self._join(joining, [s.prompt_ids for s in joining], model.max_context)
        return seqs

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence that has not ended (its completion stays unset)."""
        if seq in self.sequences:
            with torch.inference_mode():  # the state is regrouped in place
                self._keep([s is not seq for s in self.sequences])

    def step(self) -> list[tuple[Sequence, str]]:
        """Sample one token for every sequence; return (sequence, new text) for each
        (text may be ""). Sequences that end get their ``completion`` and leave."""
        if not self.sequences:
            return []
        with torch.inference_mode():
            tokens = self._sample(self._logits.float())
        events, running = [], []
        for s, token in zip(self.sequences, tokens.tolist()):  # the one host sync per step
            s.generated += 1
            if s.seen is not None:
                s.seen[0, token] = True
            piece, reason = _accept(s.stream, token, s.eos_id, s.params.max_new_tokens)
            if reason is not None:
                s._finish(reason)
            running.append(reason is None)
            events.append((s, piece))
        with torch.inference_mode():
            self._advance(tokens, running)
        return events

    # ---- internals ------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row (B,), each row with its own settings and generator."""
        rows = self._settings
        if rows.penalty is not None:
            seen = torch.cat([s.seen if s.seen is not None else rows.unseen for s in self.sequences])
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
        u = torch.tensor([0.0 if g else s.uniform() for s, g in zip(self.sequences, rows.greedy_list)],
                         device=probs.device)[:, None]
        return torch.where(rows.greedy, greedy, inverse_cdf(probs, u))

    @property
    def _settings(self) -> _RowSettings:
        if self._rows is None:  # rows joined or left since the last step
            self._rows = _RowSettings(self.sequences, self.model.config.vocab_size, self._logits.device)
        return self._rows

    def _advance(self, tokens: torch.Tensor, running: list[bool]) -> None:
        """Feed each running sequence its new token; re-prime those whose context is full."""
        ctx = self.model.max_context
        full = [r and ctx is not None and s.filled + 1 > ctx for s, r in zip(self.sequences, running)]
        keep = [r and not f for r, f in zip(running, full)]
        overflow = [s for s, f in zip(self.sequences, full) if f]
        if not all(keep):
            rows = self._keep(keep)
            if rows is not None:
                tokens = tokens[rows]
        if self.sequences:
            logits, self._state = self.model.step(tokens[:, None], self._state)
            self._logits = logits[:, -1]
            for s in self.sequences:
                s.filled += 1
        if overflow:  # restart from the last half-context: the next overflow is ctx // 2 away
            self._join(overflow, [s.prompt_ids + s.stream.ids for s in overflow], max(1, ctx // 2))

    def _join(self, seqs: list[Sequence], rows: list[list[int]], keep: int | None) -> None:
        state, logits, held = _prefill(self.model, rows, keep)
        for s, positions in zip(seqs, held):
            s.filled = positions
        if self.sequences:
            state = self.model.concat_rows([self._state, state])
            logits = torch.cat([self._logits, logits])
        self._state, self._logits = state, logits
        self.sequences = self.sequences + seqs
        self._rows = None

    def _keep(self, mask: list[bool]) -> torch.Tensor | None:
        """Keep the rows where ``mask`` is true; return where each kept row came from
        (None when no row is left)."""
        # The last rows kept fill the places of the rows that leave, so that a state
        # regrouped in place (the GPT's cache) moves as few rows as there are leavers.
        n = sum(mask)
        tail = [i for i in range(n, len(mask)) if mask[i]]
        rows = [i if mask[i] else tail.pop() for i in range(n)]
        self.sequences = [self.sequences[i] for i in rows]
        self._rows = None
        if not rows:
            self._state = self._logits = None
            return None
        index = torch.tensor(rows, device=self._logits.device)
        self._state = self.model.select_rows(self._state, index)
        self._logits = self._logits[index]
        return index
