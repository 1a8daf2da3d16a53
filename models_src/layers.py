"""Transformer pieces shared by the GPT decoder and the encoder–decoder model.

The key/value cache is pre-allocated once per generation and written in place, so a
decoding step costs the same at token 10 and at token 1,000 (up to the attention
over the cached keys), and rows of a batch may have different lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for ``batch`` sequences of up to ``max_len`` tokens.

    ``lengths[b]`` is how many tokens row b holds. A step first calls ``begin(T, lengths)``
    (positions and attention mask are computed once for all layers), then each layer
    calls ``update``, then ``end()`` advances the lengths.
    """

    def __init__(self, n_layer, batch, n_head, max_len, head_dim, *, device, dtype):
        # The storage may hold spare rows (a batch that shrank, room to grow); k and v
        # are views of its first ``len(lengths)`` rows, the ones in use. Positions are
        # allocated as they fill (doubling, up to max_len; ``_make_room``), so a prompt's
        # fresh cache holds only the prompt, not max_len positions of fresh zeroed memory.
        shape = (n_layer, batch, n_head, 0, head_dim)
        self._k_rows = torch.zeros(shape, device=device, dtype=dtype)
        self._v_rows = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._use_rows(batch)
        # While every row has the same length we know it as a Python int: the common
        # case (batch 1, equal prompts) then needs no index tensors and no mask.
        self.uniform: int | None = 0

    def _use_rows(self, n: int) -> None:
        self.k, self.v = self._k_rows[:, :n], self._v_rows[:, :n]

    @property
    def capacity(self) -> int:
        """Rows the storage holds."""
        return self._k_rows.size(1)

    @property
    def positions(self) -> int:
        """Positions the storage holds in every row (at most max_len)."""
        return self._k_rows.size(3)

    def _make_room(self, rows: int, positions: int) -> None:
        """Room for ``rows`` rows of ``positions`` positions. When the storage lacks either,
        new storage doubles it (or takes what is asked, if more) and the rows in use are
        copied once. Positions past a row's length are never attended to (the mask), so they
        may hold zeros or a former row's finite values."""
        new_rows = _doubled(rows, self.capacity)
        new_positions = min(self.max_len, _doubled(positions, self.positions))
        if (new_rows, new_positions) == (self.capacity, self.positions):
            return
        shape = list(self._k_rows.shape)
        shape[1], shape[3] = new_rows, new_positions
        n, have = len(self.lengths), self.positions
        k_rows, v_rows = self._k_rows.new_zeros(shape), self._v_rows.new_zeros(shape)
        k_rows[:, :n, :, :have], v_rows[:, :n, :, :have] = self.k, self.v
        self._k_rows, self._v_rows = k_rows, v_rows
        self._use_rows(n)

    def begin(self, T: int, lengths: torch.Tensor | None) -> torch.Tensor:
        """Prepare a step of T tokens; return their positions (B, T)."""
        self._T, self._step_lengths = T, lengths
        # Every row at the same length and every token real: one slice for all rows.
        self._uniform_step = self.uniform is not None and lengths is None
        if self._uniform_step:
            start = self.uniform
            self._end = start + T
        else:
            positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
            self._end = int(positions[:, -1].max()) + 1
        if self._end > self.max_len:
            raise ValueError(f"sequence of {self._end} tokens exceeds the context of {self.max_len}")
        self._make_room(self.capacity, self._end)
        self._views = None  # made by the first update: a step attended by row_products needs none
        if self._uniform_step:
            self._start = start
            return torch.arange(start, self._end, device=self.lengths.device).expand(len(self.lengths), T)
        self._index = positions[:, None, :, None]
        return positions

    def _layer_views(self):
        """Every layer's views for this step at once (one op each, not one per layer: a
        one-token step is mostly per-op overhead): keys and values seen, those written,
        the mask and whether the step is causal."""
        T, end = self._T, self._end
        seen = _layers(self.k[..., :end, :]), _layers(self.v[..., :end, :])
        if self._uniform_step:
            start = self._start
            mask = None if T == 1 or start == 0 else self._offset_mask(torch.full_like(self.lengths, start), T)
            now = _layers(self.k[..., start:end, :]), _layers(self.v[..., start:end, :])
            return seen, now, mask, start == 0 and T > 1
        return seen, (_layers(self.k), _layers(self.v)), self._offset_mask(self.lengths, T), False

    def _offset_mask(self, offsets: torch.Tensor, T: int) -> torch.Tensor:
        """(B, 1, T, L) additive mask: query i of row b may see key j iff j <= offsets[b] + i.
        Additive (0 or -inf), made once a step for every layer: SDPA would convert a
        boolean mask into one in every layer."""
        keys = torch.arange(self._end, device=offsets.device)
        allowed = keys[None, None, :] <= (offsets[:, None] + torch.arange(T, device=offsets.device))[:, :, None]
        mask = torch.zeros(allowed.shape, dtype=self._k_rows.dtype, device=offsets.device)
        return mask.masked_fill_(~allowed, float("-inf"))[:, None]

    @property
    def step_rows(self) -> int:
        """Tokens in the step begun, padding included (rows x T)."""
        return len(self.lengths) * self._T

    def attend(self, layer: int, qkv: torch.Tensor, n_head: int) -> torch.Tensor:
        """Self-attention of the step begun, on its tokens flattened: ``qkv`` (B * T, 3C)
        holds their queries, keys and values; the keys and values are stored, and the
        output (B * T, C) is returned."""
        N, C3 = qkv.shape
        qkv = qkv.view(N // self._T, self._T, 3, n_head, C3 // (3 * n_head))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        k, v, mask, causal = self.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return y.transpose(1, 2).reshape(N, C3 // 3)

    def one_token_storage(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """In a one-token step where every row's token is real (most decoding steps): the
        whole key and value storage (layers, rows, heads, positions, head dim), which may
        hold spare rows and positions, and the position each row's token takes (int32);
        else None. For a step that stores and attends in one call (``row_products``)."""
        if self._T != 1 or self._step_lengths is not None:
            return None
        return self._k_rows, self._v_rows, self.lengths.to(torch.int32)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, T, D); return all keys, values, mask and causality."""
        if self._views is None:
            self._views = self._layer_views()
        (k_seen, v_seen), (k_now, v_now), mask, causal = self._views
        if self._uniform_step:
            k_now[layer].copy_(k)
            v_now[layer].copy_(v)
        else:
            index = self._index.expand_as(k)
            k_now[layer].scatter_(2, index, k)
            v_now[layer].scatter_(2, index, v)
        return k_seen[layer], v_seen[layer], mask, causal

    def end(self) -> None:
        if self._uniform_step:
            self.uniform += self._T
            self.lengths += self._T
        else:
            step = self._step_lengths if self._step_lengths is not None else self._T
            self.lengths += step
            self.uniform = None

    # ---- regrouping rows (continuous batching) ------------------------------------
    # Rows join and leave a running batch many times a second, so both work in place and
    # copy only the rows that move: ``select`` moves the rows it keeps into the free
    # slots, ``append`` writes the new rows after the running ones and grows the storage
    # (doubling, ``_make_room``) only when it is full.

    def _regrouped(self, lengths: torch.Tensor) -> KVCache:
        self.lengths = lengths
        self._use_rows(len(lengths))
        # one host sync per regrouping (not per step): equal rows keep the fast path
        self.uniform = int(lengths[0]) if len(lengths) and bool((lengths == lengths[0]).all()) else None
        return self

    def select(self, rows: torch.Tensor) -> KVCache:
        """This cache holding only ``rows``, in that order. Rows are moved in place, so
        the cache is changed: use the one returned (it is this one)."""
        moved = [(dst, src) for dst, src in enumerate(rows.tolist()) if dst != src]
        if moved and not {d for d, _ in moved} & {s for _, s in moved}:
            # no row is both read and written (a batch's leavers replaced by its last rows):
            # a copy per row, cheaper than a gather and a scatter
            for dst, src in moved:
                self._k_rows[:, dst].copy_(self._k_rows[:, src])
                self._v_rows[:, dst].copy_(self._v_rows[:, src])
        elif moved:  # gathered before written: any order of rows is safe
            dst, src = (torch.tensor(side, device=self.lengths.device) for side in zip(*moved))
            self._k_rows[:, dst] = self._k_rows[:, src]
            self._v_rows[:, dst] = self._v_rows[:, src]
        return self._regrouped(self.lengths[rows])

    def append(self, other: KVCache) -> KVCache:
        """This cache with the rows of ``other`` after its own (changed in place and
        returned; ``other``'s rows are copied)."""
        if other.max_len != self.max_len:
            raise ValueError("caches of different context lengths cannot be joined")
        n, m, p = len(self.lengths), len(other.lengths), other.positions
        self._make_room(n + m, max(self.positions, p))
        # only the positions it holds (the rest are never attended to)
        self._k_rows[:, n:n + m, :, :p] = other.k
        self._v_rows[:, n:n + m, :, :p] = other.v
        return self._regrouped(torch.cat([self.lengths, other.lengths]))


def _doubled(need: int, have: int) -> int:
    """``have`` when it is enough, else room for as many again (or ``need``, if more)."""
    return have if need <= have else max(need, 2 * have)


def _layers(t: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``t``'s views along its first dimension, one per layer. ``unbind`` makes them all
    in one call; with grad enabled (a step through the cache that autograd records) ``t``
    itself is returned, so that each view is taken when it is written, as autograd wants
    for in-place writes."""
    return t if torch.is_grad_enabled() else t.unbind(0)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, causal: bool) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head, self.causal, self.dropout = config.n_head, causal, config.dropout
        self.c_attn = nn.Linear(d, 3 * d, bias=config.bias)
        self.c_proj = nn.Linear(d, d, bias=config.bias)

    def forward(self, x, *, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        causal = self.causal and mask is None
        if cache is not None:
            k, v, mask, causal = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class CrossAttention(nn.Module):
    """Decoder attends to the encoder's output; its keys/values are computed once."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head, self.dropout = config.n_head, config.dropout
        self.q_proj = nn.Linear(d, d, bias=config.bias)
        self.kv_proj = nn.Linear(d, 2 * d, bias=config.bias)
        self.c_proj = nn.Linear(d, d, bias=config.bias)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, C = memory.shape
        k, v = self.kv_proj(memory).view(B, S, 2, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x, memory_kv, memory_mask):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k, v = memory_kv
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=memory_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # Exact (erf) GELU, as nanoGPT: on CPU it is several times faster than GPT-2's tanh
        # approximation, backward included; the export names it ("gelu") for transformers.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; with ``cross=True`` a decoder block."""

    def __init__(self, config: ModelConfig, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config, causal)
        if cross:
            self.ln_cross = nn.LayerNorm(config.n_embd, bias=config.bias)
            self.cross = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, *, mask=None, cache=None, layer=0, memory_kv=None, memory_mask=None):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), mask=mask, cache=cache, layer=layer))
        if memory_kv is not None:
            x = x + self.resid_dropout(self.cross(self.ln_cross(x), memory_kv, memory_mask))
        return x + self.mlp(self.ln_2(x))


def init_transformer_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·layers)."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
