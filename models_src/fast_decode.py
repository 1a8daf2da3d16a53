"""The GPT's inference path, in one place.

A one-token decoding step on a CPU is ~100 small ops, and the Python around them (module
calls, no-op dropouts, ``nn.Module.__getattr__`` on every ``self.attn``-style access)
costs more than their arithmetic. So in eval mode the GPT's ``step``, ``prefill`` and
``join_step`` run the same operations as the module path (``Block.forward``), in the
same order, on the step's tokens flattened to (N, C) rows, reading weights from the
parameter dicts directly and laid out (in, out) for one-row products. Module hooks do
not fire. ``tests/models/test_models.py`` holds it to the module path. The figures are in
benchmarks/README.md.

On a CPU, where this machine's C compiler builds them, Fable's own kernels
(``row_products``) run the products, and a one-token step (every row's token real: most
decoding steps) runs each block in one call of them; elsewhere torch's operators do.

``model.decode_precision`` (a checkpoint's ``decode_precision``) picks the products' weights:
"float32" (the default, the module path's numbers to ~1e-6) or "int8": each weight matrix
quantized per output row, a quarter of the bytes read per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .config import ACTIVATIONS
from .layers import KVCache
from .row_products import MAX_HEAD_DIM, GPTStep, RowProduct, library


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
    if len(groups) == 1 and rows is None and (storage := caches[0].one_token_storage()) is not None:
        if step := _one_token_step(model):
            logits = step(x, *storage)
            caches[0].end()
            return logits
    approximate = ACTIVATIONS[model.config.activation]  # the GELU the module path uses
    for i, block in enumerate(modules["blocks"]._modules.values()):
        x = _block(block, x, caches, i, approximate, model.decode_precision)
    for cache in caches:
        cache.end()
    if rows is not None:
        x = x[rows]
    ln_f = modules["ln_f"]
    # torch.layer_norm, not F.layer_norm: the same op without the Python wrapper
    x = torch.layer_norm(x, ln_f.normalized_shape, ln_f._parameters["weight"],
                         ln_f._parameters["bias"], ln_f.eps)
    head, = decode_products(model, [(modules["lm_head"]._parameters["weight"], None)],
                            model.decode_precision)
    return head(x)


def _block(block, x, caches: list[KVCache], layer: int, approximate: str,
           precision: str) -> torch.Tensor:
    """``Block.forward(x, cache=cache, layer=layer)`` in eval mode on (N, C) rows."""
    modules = block._modules
    attn = modules["attn"]
    ln_1, ln_2 = modules["ln_1"], modules["ln_2"]
    qkv_of, proj_of, fc_of, mlp_of = _block_products(block, precision)
    C = x.size(1)
    h = torch.layer_norm(x, (C,), ln_1._parameters["weight"], ln_1._parameters["bias"], ln_1.eps)
    qkv = qkv_of(h)
    if len(caches) == 1:
        y = caches[0].attend(layer, qkv, attn.n_head)
    else:
        parts = qkv.split([c.step_rows for c in caches])
        y = torch.cat([c.attend(layer, part, attn.n_head) for c, part in zip(caches, parts)])
    x = x + proj_of(y)
    h = torch.layer_norm(x, (C,), ln_2._parameters["weight"], ln_2._parameters["bias"], ln_2.eps)
    h = _gelu_(fc_of(h), approximate)
    return x + mlp_of(h)


def _block_products(block, precision: str) -> list[Product]:
    """The block's four products: attention's qkv and projection, the MLP's two."""
    attn, mlp = block._modules["attn"]._modules, block._modules["mlp"]._modules
    return decode_products(block, [(m._parameters["weight"], m._parameters["bias"]) for m in (
        attn["c_attn"], attn["c_proj"], mlp["c_fc"], mlp["c_proj"])], precision)


def _one_token_step(model) -> GPTStep | None:
    """The model's one-token step in one call of Fable's kernel, where its products are the
    kernel's (float32 or int8 weights on a CPU, the library built); kept on the model (None
    too) and made again when a tensor it reads changes (a training step, a load, a move, a
    new parameter) or the precision does. Checked every step, so kept cheap."""
    modules = model._modules
    blocks = list(modules["blocks"]._modules.values())
    tensors = []
    for block in blocks:
        parts, attn, mlp = block._modules, block._modules["attn"]._modules, block._modules["mlp"]._modules
        for module in (parts["ln_1"], attn["c_attn"], attn["c_proj"], parts["ln_2"], mlp["c_fc"], mlp["c_proj"]):
            tensors += module._parameters.values()
    tensors += [*modules["ln_f"]._parameters.values(), modules["lm_head"]._parameters["weight"]]
    tensors = [t for t in tensors if t is not None]  # a model without biases has None's
    key = ([(id(t), t.data_ptr(), t._version) for t in tensors], model.decode_precision)
    cached = model.__dict__.get("_decode_one_token_step")
    if cached is not None and cached[0] == key:
        return cached[1]
    step = _make_one_token_step(model, blocks, tensors)
    model.__dict__["_decode_one_token_step"] = (key, step)
    return step


def _make_one_token_step(model, blocks: list, tensors: list[torch.Tensor]) -> GPTStep | None:
    modules, precision = model._modules, model.decode_precision
    heads = model.config.n_head
    parts = [(_block_products(b, precision), b._modules["ln_1"], b._modules["ln_2"]) for b in blocks]
    head, = decode_products(model, [(modules["lm_head"]._parameters["weight"], None)], precision)
    products = [p for block, _, _ in parts for p in block] + [head]
    if (not blocks or not all(isinstance(p, RowProduct) for p in products)
            or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
            or model.config.n_embd // heads > MAX_HEAD_DIM):
        return None
    return GPTStep(head.lib, parts, modules["ln_f"], head, heads, ACTIVATIONS[model.config.activation])


Product = Callable[[torch.Tensor], torch.Tensor]
PRECISIONS = ("float32", "int8")


def decode_products(module: nn.Module, linears: list[tuple[torch.Tensor, torch.Tensor | None]],
                    precision: str = "float32") -> list[Product]:
    """``x -> F.linear(x, weight, bias)`` for each (weight, bias) (nn.Linear's (out, in)
    weight), at ``precision``; what they need is kept on ``module`` and made again when
    any weight or bias changes (a training step, a load, a move to another dtype or
    device) or the precision does."""
    tensors = [t for pair in linears for t in pair if t is not None]
    key = ([(t.data_ptr(), t._version, t.dtype, t.device) for t in tensors], precision)
    cached = module.__dict__.get("_decode_products")
    if cached is None or cached[0] != key:
        # fbgemm is a CPU kernel: elsewhere (a GPU) the products stay in floating point
        int8 = precision == "int8" and all(t.device.type == "cpu" for t in tensors)
        make = _int8_product if int8 else _float_product
        with torch.no_grad():
            cached = (key, [make(w.detach(), None if b is None else b.detach()) for w, b in linears])
        module.__dict__["_decode_products"] = cached
    return cached[1]


def _float_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """Fable's kernel for float32 on a CPU (``row_products``), else torch's ``addmm`` from a
    contiguous (in, out) copy, the layout from which MKL multiplies one row faster. Either
    adds in another order than the module path, so logits differ in the last bits (~1e-6)."""
    if weight.dtype == torch.float32 and weight.device.type == "cpu" and (lib := library()):
        return RowProduct(lib, weight, bias)
    weight_t = weight.t().contiguous()
    if bias is None:
        return lambda x: torch.mm(x, weight_t)
    return lambda x: torch.addmm(bias, x, weight_t)


def _int8_product(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """The weight symmetric per output row. Fable's kernel (``row_products``) keeps the
    rows in float32; where it can't be built, fbgemm's product quantizes them too, on each
    call over their own range (``reduce_range``, as torch's dynamic quantization sets it on
    x86: 7-bit activations keep AVX2's paired 8-bit multiplies from saturating)."""
    dtype = weight.dtype
    if lib := library():
        product = RowProduct(lib, weight, bias, int8=True)
        if dtype != torch.float32:
            return lambda x: product(x.float()).to(dtype)
        return product
    weight, bias = weight.float(), None if bias is None else bias.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # quantized tensors are deprecated, not yet replaced on CPU
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long),
                                       0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(q, bias)
    if dtype != torch.float32:  # the kernel takes and gives float32 rows
        return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, True).to(dtype)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def _gelu_(h: torch.Tensor, approximate: str) -> torch.Tensor:
    """``F.gelu(h, approximate=approximate)``, in place, by ATen's own kernel. oneDNN
    (whose per-call set-up costs more than the arithmetic on a few rows) takes only
    contiguous inputs, so the kernel is handed the same memory as a transposed view;
    torch's process-wide oneDNN switch would change the kernels of every thread."""
    torch._C._nn.gelu_(h.view(2, -1).t(), approximate=approximate)
    return h

