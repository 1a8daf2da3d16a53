"""A GPT-2-style decoder: learned positions, pre-LayerNorm blocks, tied embeddings.

The layout and parameter names follow GPT-2 so that `models_src.hf_export` can hand
the weights to `transformers.GPT2LMHeadModel` unchanged (bar the Conv1D transpose).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LanguageModel
from .config import ModelConfig
from .kernels import aten_kernels
from .layers import Block, KVCache, decode_weights, init_transformer_weights


class GPT(LanguageModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.max_context = config.block_size
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.n_layer))
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

    def select_rows(self, state: KVCache, rows) -> KVCache:
        return state.select(rows)

    def concat_rows(self, states: list[KVCache]) -> KVCache:
        return KVCache.concat(states)

    def step(self, tokens, state: KVCache, lengths=None):
        with aten_kernels():  # oneDNN's per-call set-up would be most of GELU's cost here
            return self._step(tokens, state, lengths)

    def _step(self, tokens, state: KVCache, lengths):
        positions = state.begin(tokens.size(1), lengths)
        if self.training:
            x = self.drop(self.wte(tokens) + self.wpe(positions))
            for i, block in enumerate(self.blocks):
                x = block(x, cache=state, layer=i)
            state.end()
            return self.lm_head(self.ln_f(x)), state
        # Generation: the same arithmetic on (B * T, C) rows without module calls or
        # nn.Module.__getattr__ (see Block.decode): on a CPU, Python overhead is most of
        # the cost of a one-token step.
        modules = self._modules
        B, T = tokens.shape
        x = (torch.embedding(modules["wte"]._parameters["weight"], tokens.reshape(-1))
             + torch.embedding(modules["wpe"]._parameters["weight"], positions.reshape(-1)))
        for i, block in enumerate(modules["blocks"]._modules.values()):
            x = block.decode(x, state, i, B)
        state.end()
        ln_f = modules["ln_f"]
        x = torch.layer_norm(x, ln_f.normalized_shape, ln_f._parameters["weight"],
                             ln_f._parameters["bias"], ln_f.eps)
        head, = decode_weights(self, [modules["lm_head"]._parameters["weight"]])
        return torch.mm(x, head).view(B, T, -1), state
