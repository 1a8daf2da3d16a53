"""A GPT-2-style decoder: learned positions, pre-LayerNorm blocks, tied embeddings.

The layout and parameter names follow GPT-2 so that `models_src.hf_export` can hand
the weights to `transformers.GPT2LMHeadModel` unchanged (bar the Conv1D transpose).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import LanguageModel, right_pad
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

    def step(self, tokens, state: KVCache, lengths=None):
        if self.training:  # the module path, dropout included
            positions = state.begin(tokens.size(1), lengths)
            x = self.drop(self.wte(tokens) + self.wpe(positions))
            for i, block in enumerate(self.blocks):
                x = block(x, cache=state, layer=i)
            state.end()
            return self.lm_head(self.ln_f(x)), state
        B, T = tokens.shape
        with aten_kernels():  # oneDNN's per-call set-up would be most of GELU's cost here
            return self._head(self._decode([(state, tokens, lengths)])).view(B, T, -1), state

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
        if prompts:
            padded, lengths = right_pad(prompts, self.wte.weight.device)
            fresh = self.init_state(len(prompts))
            groups.append((fresh, padded, lengths))
        if not groups:
            raise ValueError("a step needs a running row or a prompt")
        with aten_kernels():
            x = self._decode(groups)
            if prompts:  # every running row's token, then each prompt's last (rows padded to T)
                T = padded.size(1)
                last = [running + b * T + len(p) - 1 for b, p in enumerate(prompts)]
                x = x[torch.tensor([*range(running), *last], device=x.device)]
            logits = self._head(x)
        if prompts:
            state = fresh if tokens is None else state.append(fresh)
        return logits, state

    def _decode(self, groups: list[tuple[KVCache, torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        """The blocks' output (N, C) for the tokens of each (cache, tokens (B, T), lengths)
        group, flattened one group after another; each cache is advanced.
        Generation's path: the same arithmetic as the module path on (N, C) rows without
        module calls or nn.Module.__getattr__ (see Block.decode): on a CPU, Python overhead
        is most of the cost of a one-token step."""
        modules = self._modules
        caches = [cache for cache, _, _ in groups]
        positions = [cache.begin(tokens.size(1), lengths) for cache, tokens, lengths in groups]
        if len(groups) == 1:
            ids, positions = groups[0][1].reshape(-1), positions[0].reshape(-1)
        else:
            ids = torch.cat([tokens.reshape(-1) for _, tokens, _ in groups])
            positions = torch.cat([p.reshape(-1) for p in positions])
        x = (torch.embedding(modules["wte"]._parameters["weight"], ids)
             + torch.embedding(modules["wpe"]._parameters["weight"], positions))
        for i, block in enumerate(modules["blocks"]._modules.values()):
            x = block.decode(x, caches, i)
        for cache in caches:
            cache.end()
        return x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of the blocks' output rows (N, C)."""
        modules = self._modules
        ln_f = modules["ln_f"]
        x = torch.layer_norm(x, ln_f.normalized_shape, ln_f._parameters["weight"],
                             ln_f._parameters["bias"], ln_f.eps)
        head, = decode_weights(self, [modules["lm_head"]._parameters["weight"]])
        return torch.mm(x, head)
