"""An encoder–decoder Transformer that speaks the same one-sequence contract.

A row ``source <sep> target`` is split at its first separator: the encoder reads the
source with full (bidirectional) attention, the decoder reads ``<sep> target`` with
causal attention plus cross-attention to the encoder. The infilling format
``first <blank> last <sep> middle <eos>`` is therefore the same for this model and
for the decoder-only GPT. A row without a separator has an empty source and the
model is a plain language model. Logits are only meaningful from the separator on:
earlier positions are zeros and are never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import IGNORE_INDEX, LanguageModel
from .config import ModelConfig
from .layers import Block, KVCache, init_transformer_weights


@dataclass
class Split:
    """One batch split at each row's first separator."""
    source: torch.Tensor  # (B, S) source tokens, right-padded
    source_mask: torch.Tensor  # (B, S) True where real
    target: torch.Tensor  # (B, D) `<sep> target...`, right-padded
    target_lengths: torch.Tensor  # (B,)
    target_start: torch.Tensor  # (B,) where the target begins in the row


def split_at_separator(ids: torch.Tensor, lengths: torch.Tensor, sep_id: int) -> Split:
    B, T = ids.shape
    arange = torch.arange(T, device=ids.device)
    is_sep = (ids == sep_id) & (arange < lengths[:, None])
    start = torch.where(is_sep.any(1), is_sep.int().argmax(1), torch.zeros_like(lengths))
    S = int(start.max())
    target_lengths = lengths - start
    D = int(target_lengths.max())
    gather = (start[:, None] + arange[:D]).clamp(max=T - 1)
    return Split(ids[:, :S], arange[:S] < start[:, None], ids.gather(1, gather),
                 target_lengths, start)


@dataclass
class Seq2SeqState:
    cache: KVCache  # decoder self-attention
    memory_kv: list | None = None  # per decoder layer, computed at the first step
    memory_mask: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> Seq2SeqState:
        """A state holding only ``rows``, in that order (the cache is regrouped in place)."""
        if self.memory_kv is None:
            return Seq2SeqState(self.cache.select(rows))
        return Seq2SeqState(self.cache.select(rows), [(k[rows], v[rows]) for k, v in self.memory_kv],
                            self.memory_mask[rows])

    def append(self, other: Seq2SeqState) -> Seq2SeqState:
        """This state's rows, then ``other``'s. Rows join after their first step (the encoder
        has run); sources of different lengths are padded to the longest, the padding
        masked out."""
        if self.memory_kv is None or other.memory_kv is None:
            raise ValueError("a seq2seq state joins a batch only after its first step")
        S = max(self.memory_mask.size(-1), other.memory_mask.size(-1))

        def pad(t, dim, value):  # to S along ``dim``: memory k/v (B, H, S', D), mask (B, 1, 1, S')
            shape = list(t.shape)
            shape[dim] = S - t.size(dim)
            return torch.cat([t, t.new_full(shape, value)], dim) if shape[dim] else t

        memory_kv = [tuple(torch.cat([pad(a, 2, 0.0), pad(b, 2, 0.0)]) for a, b in zip(mine, theirs))
                     for mine, theirs in zip(self.memory_kv, other.memory_kv)]
        mask = torch.cat([pad(self.memory_mask, 3, False), pad(other.memory_mask, 3, False)])
        return Seq2SeqState(self.cache.append(other.cache), memory_kv, mask)


class Seq2SeqTransformer(LanguageModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_context = config.block_size
        d, n_dec = config.n_embd, config.n_decoder_layer or config.n_layer
        self.wte = nn.Embedding(config.vocab_size, d)
        self.enc_wpe = nn.Embedding(config.block_size, d)
        self.dec_wpe = nn.Embedding(config.block_size, d)
        # A learned memory slot: even an empty source leaves the decoder something to
        # attend to, so cross-attention is never over an empty set.
        self.null_memory = nn.Parameter(torch.zeros(1, 1, d))
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.ln_enc = nn.LayerNorm(d, bias=config.bias)
        self.decoder = nn.ModuleList(Block(config, causal=True, cross=True) for _ in range(n_dec))
        self.ln_f = nn.LayerNorm(d, bias=config.bias)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        init_transformer_weights(self, config.n_layer + n_dec)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight

    def _encode(self, source, source_mask):
        B, S = source.shape
        x = self.drop(self.wte(source) + self.enc_wpe(torch.arange(S, device=source.device)))
        mask = source_mask[:, None, None, :]  # keys that are padding are never attended to
        # A fully padded row would give NaNs in attention; let it see its padding (ignored later).
        mask = mask | ~source_mask.any(1)[:, None, None, None]
        for block in self.encoder if S else ():
            x = block(x, mask=mask)
        memory = torch.cat([self.null_memory.expand(B, 1, -1), self.ln_enc(x)], dim=1)
        memory_mask = torch.cat([source_mask.new_ones(B, 1), source_mask], dim=1)[:, None, None, :]
        memory_kv = [block.cross.memory_kv(memory) for block in self.decoder]
        return memory_kv, memory_mask

    def _scatter_back(self, logits, split: Split, T: int):
        """Place target-side logits at their positions in the original rows."""
        B, D, V = logits.shape
        full = logits.new_zeros(B, T, V)
        index = (split.target_start[:, None] + torch.arange(D, device=logits.device)).clamp(max=T - 1)
        valid = torch.arange(D, device=logits.device) < split.target_lengths[:, None]
        full.scatter_(1, index[..., None].expand(B, D, V), logits * valid[..., None])
        return full

    def forward(self, input_ids, targets=None):
        B, T = input_ids.shape
        lengths = torch.full((B,), T, device=input_ids.device)
        split = split_at_separator(input_ids, lengths, self.config.sep_id)
        if split.target.size(1) > self.config.block_size or split.source.size(1) > self.config.block_size:
            raise ValueError(f"source or target exceeds block_size {self.config.block_size}")
        memory_kv, memory_mask = self._encode(split.source, split.source_mask)
        D = split.target.size(1)
        x = self.drop(self.wte(split.target) + self.dec_wpe(torch.arange(D, device=input_ids.device)))
        for block, kv in zip(self.decoder, memory_kv):
            x = block(x, memory_kv=kv, memory_mask=memory_mask)
        logits = self._scatter_back(self.lm_head(self.ln_f(x)), split, T)
        if targets is None:
            return logits, None
        before_target = torch.arange(T, device=input_ids.device) < split.target_start[:, None]
        return logits, self.loss(logits, targets.masked_fill(before_target, IGNORE_INDEX))

    def _separator(self, ids: list[int]) -> int | None:
        return ids.index(self.config.sep_id) if self.config.sep_id in ids else None

    def context_length(self, ids: list[int]) -> int:
        """The decoder's state holds ``<sep> target``; the source is the encoder's."""
        sep = self._separator(ids)
        return len(ids) if sep is None else len(ids) - sep

    def context_ids(self, ids: list[int], keep: int) -> list[int]:
        """The source (its last ``block_size`` ids at most), the separator and the last
        ``keep - 1`` target ids: a generation re-primed past its context still reads the
        source it was asked about (cutting the whole row from the left dropped it)."""
        sep = self._separator(ids)
        if sep is None:
            return ids[-keep:]
        target = ids[max(sep + 1, len(ids) - (keep - 1)):]
        return ids[max(0, sep - self.max_context):sep + 1] + target

    def init_state(self, batch_size: int) -> Seq2SeqState:
        c = self.config
        cache = KVCache(len(self.decoder), batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                        device=self.device, dtype=self.wte.weight.dtype)
        return Seq2SeqState(cache)

    def step(self, tokens, state: Seq2SeqState, lengths=None):
        """The first call must carry the whole source and its separator."""
        first = state.memory_kv is None
        if first:
            B, T = tokens.shape
            if lengths is None:
                lengths = torch.full((B,), T, device=tokens.device)
            split = split_at_separator(tokens, lengths, self.config.sep_id)
            state.memory_kv, state.memory_mask = self._encode(split.source, split.source_mask)
            tokens, lengths = split.target, split.target_lengths
        positions = state.cache.begin(tokens.size(1), lengths)
        x = self.drop(self.wte(tokens) + self.dec_wpe(positions))
        for i, (block, kv) in enumerate(zip(self.decoder, state.memory_kv)):
            x = block(x, cache=state.cache, layer=i, memory_kv=kv, memory_mask=state.memory_mask)
        state.cache.end()
        logits = self.lm_head(self.ln_f(x))
        return (self._scatter_back(logits, split, T) if first else logits), state
