"""The GPT's inference path, in one place.

A one-token decoding step on a CPU is ~100 small ops, and the Python around them (module
calls, no-op dropouts, ``nn.Module.__getattr__`` on every ``self.attn``-style access)
costs more than their arithmetic. So in eval mode the GPT's ``step``, ``prefill`` and
``join_step`` run the same operations as the module path (``Block.forward``), in the
same order, on the step's tokens flattened to (N, C) rows, reading weights from the
parameter dicts directly and laid out (in, out) for one-row products. Module hooks do
not fire. ``tests/models/test_models.py`` holds it to the module path. The figures are in
benchmarks/README.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ACTIVATIONS
from .layers import KVCache


def decode(model, groups: list[tuple[KVCache, torch.Tensor, torch.Tensor | None]],
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (N, V) for the tokens of each (cache, tokens (B, T), lengths) group,
    flattened one group after another (or only for the flattened ``rows`` given); each
    cache is advanced. The rows of several groups share every product, and each group's
    tokens attend only to their own cache."""
    modules = model._modules
    caches = [cache for cache, _, _ in groups]
    positions = [cache.begin(tokens.size(1), lengths) for cache, tokens, lengths in groups]
    if len(groups) == 1:
        ids, positions = groups[0][1].reshape(-1), positions[0].reshape(-1)
    else:
        ids = torch.cat([tokens.reshape(-1) for _, tokens, _ in groups])
        positions = torch.cat([p.reshape(-1) for p in positions])
    x = (torch.embedding(modules["wte"]._parameters["weight"], ids)
         + torch.embedding(modules["wpe"]._parameters["weight"], positions))
    approximate = ACTIVATIONS[model.config.activation]  # the GELU the module path uses
    for i, block in enumerate(modules["blocks"]._modules.values()):
        x = _block(block, x, caches, i, approximate)
    for cache in caches:
        cache.end()
    if rows is not None:
        x = x[rows]
    ln_f = modules["ln_f"]
    # torch.layer_norm, not F.layer_norm: the same op without the Python wrapper
    x = torch.layer_norm(x, ln_f.normalized_shape, ln_f._parameters["weight"],
                         ln_f._parameters["bias"], ln_f.eps)
    head, = decode_weights(model, [modules["lm_head"]._parameters["weight"]])
    return torch.mm(x, head)


def _block(block, x, caches: list[KVCache], layer: int, approximate: str) -> torch.Tensor:
    """``Block.forward(x, cache=cache, layer=layer)`` in eval mode on (N, C) rows."""
    modules = block._modules
    attn, mlp = modules["attn"], modules["mlp"]
    ln_1, ln_2 = modules["ln_1"], modules["ln_2"]
    c_attn, proj = attn._modules["c_attn"]._parameters, attn._modules["c_proj"]._parameters
    fc, mlp_proj = mlp._modules["c_fc"]._parameters, mlp._modules["c_proj"]._parameters
    w_attn, w_proj, w_fc, w_mlp = decode_weights(
        block, [c_attn["weight"], proj["weight"], fc["weight"], mlp_proj["weight"]])
    C = x.size(1)
    h = torch.layer_norm(x, (C,), ln_1._parameters["weight"], ln_1._parameters["bias"], ln_1.eps)
    qkv = _affine(h, w_attn, c_attn["bias"])
    if len(caches) == 1:
        y = caches[0].attend(layer, qkv, attn.n_head)
    else:
        parts = qkv.split([c.step_rows for c in caches])
        y = torch.cat([c.attend(layer, part, attn.n_head) for c, part in zip(caches, parts)])
    x = x + _affine(y, w_proj, proj["bias"])
    h = torch.layer_norm(x, (C,), ln_2._parameters["weight"], ln_2._parameters["bias"], ln_2.eps)
    h = _gelu_(_affine(h, w_fc, fc["bias"]), approximate)
    return x + _affine(h, w_mlp, mlp_proj["bias"])


def decode_weights(module: nn.Module, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """``weights`` (nn.Linear's (out, in)) as contiguous (in, out) copies, kept on
    ``module`` and made again when any of them changes (a training step, a load, a move
    to another dtype or device). MKL multiplies one row faster from this layout; the
    sums come out in another order, so logits differ from the module path's in the last
    bits (~1e-6)."""
    key = [(w.data_ptr(), w._version, w.dtype, w.device) for w in weights]
    cached = module.__dict__.get("_decode_weights")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, [w.detach().t().contiguous() for w in weights])
        module.__dict__["_decode_weights"] = cached
    return cached[1]


def _gelu_(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(h, approximate=approximate)``, in place, by ATen's own kernel. oneDNN
    (whose per-call set-up costs more than the arithmetic on a few rows) takes only
    contiguous inputs, so the kernel is handed the same memory as a transposed view;
    torch's process-wide oneDNN switch would change the kernels of every thread."""
    torch._C._nn.gelu_(h.view(2, -1).t(), approximate=approximate)
    return h


def _affine(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight_t.t(), bias)`` for a weight laid out (in, out)."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
