"""Continuous batching: independent generations decoded together, one step at a time.

``sampling.generate`` decodes a batch that starts together and waits for its longest row.
A server gets requests at any moment, each with its own prompt, settings and length. A
``Batch`` lets sequences join between steps and leave the moment they end, so every step
is one forward pass over all sequences still running (continuous batching, as in Orca and
vLLM). Each sequence keeps its own sampling settings, random generator (a seed gives the
same text whatever runs beside it, up to the rounding of batched arithmetic), stop strings
and streaming detokenizer: the pieces of ``sampling`` (``sample_next``, ``TextStream``)
applied per row.

    batch = Batch(model, tokenizer)
    seq, = batch.add([(prompt_ids, params)])   # prefilled now; sampled from the next step
    while batch:
        for seq, piece in batch.step():         # one new token per running sequence
            ...                                  # seq.completion is set once it has ended
    batch.remove(seq)                           # e.g. its client went away

Rows are regrouped with the model's ``select_rows``/``concat_rows`` (one copy of the
state when sequences join or leave, none per step). A sequence that fills the model's
context is re-primed on its own from the last half-context, as ``sampling`` does.
Not thread-safe: one thread (a server's scheduler) owns a batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .sampling import Completion, SamplingParams, TextStream, _accept, _prefill, sample_next


class Sequence:
    """One generation in a batch; ``completion`` is set when it ends."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer, vocab_size: int,
                 device) -> None:
        self.prompt_ids, self.params = prompt_ids, params
        self.stream = TextStream(tokenizer, params.stop)
        self.eos_id = None if params.ignore_eos else tokenizer.eos_id
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy, without touching torch's global generator
        else:
            self.generator.manual_seed(params.seed)
        self.seen = None  # (1, V) tokens in the prompt or generated: only the penalty needs it
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, prompt_ids] = True
        self.generated = 0  # tokens sampled, eos included
        self.filled = 0  # tokens the state holds (the context limit counts them)
        self.finish_reason: str | None = None
        self.completion: Completion | None = None

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        s = self.stream
        self.completion = Completion(s.text, s.ids, reason, len(self.prompt_ids), self.generated)


class Batch:
    """Sequences decoded together by one model; see the module docstring."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.sequences: list[Sequence] = []  # row i of the state is sequences[i]
        self._state = None
        self._logits: torch.Tensor | None = None  # (B, V): next-token logits of each row

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
            self._keep([s is not seq for s in self.sequences])

    def step(self) -> list[tuple[Sequence, str]]:
        """Sample one token for every sequence; return (sequence, new text) for each
        (text may be ""). Sequences that end get their ``completion`` and leave."""
        if not self.sequences:
            return []
        with torch.inference_mode():
            tokens = torch.cat([sample_next(self._logits[i:i + 1], s.params, s.generator, s.seen)
                                for i, s in enumerate(self.sequences)])
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

    def _advance(self, tokens: torch.Tensor, running: list[bool]) -> None:
        """Feed each running sequence its new token; re-prime those whose context is full."""
        ctx = self.model.max_context
        full = [r and ctx is not None and s.filled + 1 > ctx for s, r in zip(self.sequences, running)]
        keep = [r and not f for r, f in zip(running, full)]
        overflow = [s for s, f in zip(self.sequences, full) if f]
        if not all(keep):
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            self._keep(keep)
        if self.sequences:
            logits, self._state = self.model.step(tokens[:, None], self._state)
            self._logits = logits[:, -1]
            for s in self.sequences:
                s.filled += 1
        if overflow:  # restart from the last half-context: the next overflow is ctx // 2 away
            self._join(overflow, [s.prompt_ids + s.stream.ids for s in overflow], max(1, ctx // 2))

    def _join(self, seqs: list[Sequence], rows: list[list[int]], keep: int | None) -> None:
        state, logits, _ = _prefill(self.model, rows, keep)
        for s, row in zip(seqs, rows):
            s.filled = len(row) if keep is None else min(len(row), keep)
        if self.sequences:
            state = self.model.concat_rows([self._state, state])
            logits = torch.cat([self._logits, logits])
        self._state, self._logits = state, logits
        self.sequences = self.sequences + seqs

    def _keep(self, mask: list[bool]) -> None:
        rows = [i for i, k in enumerate(mask) if k]
        self.sequences = [self.sequences[i] for i in rows]
        if not rows:
            self._state = self._logits = None
            return
        index = torch.tensor(rows, device=self._logits.device)
        self._state = self.model.select_rows(self._state, index)
        self._logits = self._logits[index]
