"""The one-row products of a batch-1 decoding step, kernel by kernel: what each of
torch's CPU matrix kernels takes for the 17 products of one token of the TinyStories GPT
(4 blocks of 256 -> 768, 256 -> 256, 256 -> 1024, 1024 -> 256, then the 256 -> 8,192 head).
Fable's own kernels (``models_src/row_products.c``: what decoding runs where this machine's
C compiler builds them) and torch's.

    python benchmarks/decode_products.py [--threads 1 2] [--repeats 300]

Random weights of those shapes, one input row; each kernel's time for all 17 products,
best of three runs of ``--repeats``. The kernels: Fable's float32 and int8 (weights
rounded per output row, rows in float32); float32 ``addmm`` from (in, out) copies (what
``decode_precision: float32`` runs without a C compiler) and ``F.linear``; fbgemm's int8
with per-row weights (``decode_precision: int8`` without one) and per-tensor; fbgemm's
fp16 weights; bfloat16 ``addmm``; MKL's packed ``_mkl_linear``;
``torch._weight_int8pack_mm``; and ``torch._int_mm`` on int8 inputs (the product alone,
no quantizing).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from _common import environment

from models_src.row_products import RowProduct, library  # noqa: E402

SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256)] * 4 + [(256, 8192)]


def f32_addmm(w, b):
    wt = w.t().contiguous()
    return lambda x: torch.addmm(b, x, wt)


def f32_linear(w, b):
    return lambda x: F.linear(x, w, b)


def fbgemm_int8(w, b, per_row=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated
        if per_row:
            s = (w.abs().amax(1) / 127).double()
            q = torch.quantize_per_channel(w, s, torch.zeros_like(s, dtype=torch.long), 0, torch.qint8)
        else:
            q = torch.quantize_per_tensor(w, float(w.abs().max() / 127), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(q, b)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def fbgemm_fp16(w, b):
    packed = torch.ops.quantized.linear_prepack_fp16(w, b)
    return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)


def bf16_addmm(w, b):
    wt, bb = w.t().contiguous().bfloat16(), b.bfloat16()
    return lambda x: torch.addmm(bb, x.bfloat16(), wt).float()


def mkl_packed(w, b):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, 1)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, b, 1)


def weight_int8pack(w, b):
    s = w.abs().amax(1) / 127
    q = torch.round(w / s[:, None]).to(torch.int8).contiguous()
    return lambda x: torch._weight_int8pack_mm(x, q, s) + b


def int_mm(w, b):
    q = torch.randint(-127, 127, w.t().shape, dtype=torch.int8)
    return lambda x: torch._int_mm(x.to(torch.int8), q)


KERNELS = {"Fable's float32 kernel": lambda w, b: RowProduct(library(), w, b),
           "Fable's int8 kernel": lambda w, b: RowProduct(library(), w, b, int8=True),
           "float32 addmm, (in, out) weights": f32_addmm, "float32 F.linear": f32_linear,
           "fbgemm int8, per-row weights": fbgemm_int8,
           "fbgemm int8, per-tensor weights": lambda w, b: fbgemm_int8(w, b, per_row=False),
           "fbgemm fp16 weights": fbgemm_fp16, "bfloat16 addmm": bf16_addmm,
           "MKL packed _mkl_linear": mkl_packed, "_weight_int8pack_mm": weight_int8pack,
           "_int_mm (int8 in, int32 out)": int_mm}


def per_token_ms(make, repeats: int) -> float:
    torch.manual_seed(0)
    weights = [(torch.randn(o, i) * 0.05, torch.randn(o) * 0.01) for i, o in SHAPES]
    rows = {i: torch.randn(1, i) for i in {i for i, _ in SHAPES}}
    products = [(make(w, b), rows[w.shape[1]]) for w, b in weights]

    def token():
        for product, x in products:
            product(x)
    for _ in range(20):
        token()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            token()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    if library() is None:
        raise SystemExit("Fable's kernels could not be built here (see the warning above): no C compiler?")
    print(f"# 17 one-row products of a TinyStories GPT token, ms per token -- {environment()}")
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, make in KERNELS.items():
                print(f"{threads} thread(s)  {name:34s} {per_token_ms(make, args.repeats):6.3f} ms",
                      flush=True)


if __name__ == "__main__":
    main()
