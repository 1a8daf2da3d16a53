"""A GPT-2-style decoder: learned positions, pre-LayerNorm blocks, tied embeddings.

The layout and parameter names follow GPT-2 so that `models_src.hf_export` can hand
the weights to `transformers.GPT2LMHeadModel` unchanged (bar the Conv1D transpose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_decode
from .base import LanguageModel, right_pad
from .config import ACTIVATIONS, ModelConfig
from .layers import MLP, Block, KVCache, init_transformer_weights


class GeluMLP(MLP):
    """``layers.MLP`` with the GELU ``config.activation`` names: GPT-2 checkpoints use the
    tanh approximation. Only built for those, so Fable's own models keep the shared MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.approximate = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class GPT(LanguageModel):
    # the inference path's products: "float32" or "int8" (fast_decode; a checkpoint's
    # decode_precision), the module path is always in the weights' own dtype
    decode_precision = "float32"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_context = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.n_layer))
        if config.activation != "gelu":  # same parameters; initialised below like the rest
            for block in self.blocks:
                block.mlp = GeluMLP(config)
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_transformer_weights(self, config.n_layer)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight

    def forward(self, input_ids, targets=None):
        T = input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(f"input of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.drop(self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, None if targets is None else self.loss(logits, targets)

    def init_state(self, batch_size: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head,
                       device=self.device, dtype=self.wte.weight.dtype)

    def step(self, tokens, state: KVCache, lengths=None):
        if self.training:  # the module path, dropout included
            positions = state.begin(tokens.size(1), lengths)
            x = self.drop(self.wte(tokens) + self.wpe(positions))
            for i, block in enumerate(self.blocks):
                x = block(x, cache=state, layer=i)
            state.end()
            return self.lm_head(self.ln_f(x)), state
        B, T = tokens.shape
        return fast_decode.decode(self, [(state, tokens, lengths)]).view(B, T, -1), state

    def prefill(self, rows: list[list[int]]):
        if self.training:  # the module path (join_step's default comes back here)
            return super().prefill(rows)
        return self.join_step(None, None, rows)

    def join_step(self, tokens, state: KVCache | None, prompts: list[list[int]]):
        """One pass for the running rows' tokens and the joining prompts together: each
        product runs once on all their tokens, and only the logits returned are computed
        (a prompt's last token, not all of them: at a 50k vocabulary the head is the
        largest product of a prefill)."""
        if self.training:
            return super().join_step(tokens, state, prompts)
        groups = [] if tokens is None else [(state, tokens[:, None], None)]
        running = 0 if tokens is None else tokens.size(0)
        rows = None
        if prompts:
            padded, lengths = right_pad(prompts, self.wte.weight.device)
            fresh = self.init_state(len(prompts))
            groups.append((fresh, padded, lengths))
            T = padded.size(1)  # every running row's token, then each prompt's last
            last = [running + b * T + len(p) - 1 for b, p in enumerate(prompts)]
            rows = torch.tensor([*range(running), *last], device=padded.device)
        if not groups:
            raise ValueError("a step needs a running row or a prompt")
        logits = fast_decode.decode(self, groups, rows)
        if prompts:
            state = fresh if tokens is None else state.append(fresh)
        return logits, state
