"""Training tokens/s in float32 against bf16 autocast (and, with --compile, torch.compile
under bf16), on the shapes the TinyStories sweep compares.

    python benchmarks/train_precision.py [--threads 1] [--steps 6] [--compile]

Each variant is built once; rounds alternate between them, and each ratio is the median
of the rounds' ratios against float32 (the machines drift). bf16 pays off on CPUs with
bf16 matrix units (AMX, AVX512-BF16), which is what ``training.precision: auto`` checks.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from _common import environment

from models_src import ModelConfig, build_model

SHAPES = {  # name -> model config; batch 16 x 320 tokens for GPTs, 32 x 128 for the LSTM
    "gpt 4x192, 8K BPE": dict(arch="gpt", vocab_size=8192, n_layer=4, n_head=6, n_embd=192,
                              block_size=320, dropout=0.1),
    "gpt 4x256, 8K BPE": dict(arch="gpt", vocab_size=8192, n_layer=4, n_head=8, n_embd=256,
                              block_size=320, dropout=0.1),
    "lstm 2x1024, 4K BPE": dict(arch="lstm", vocab_size=4096, n_layer=2, n_embd=256, n_hidden=1024,
                                tie_weights=True, dropout=0.2, dropout_hidden=0.1, weight_drop=0.2),
}


class Variant:
    def __init__(self, config: dict, bf16: bool, compiled: bool) -> None:
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(**config))
        self.recurrent = config["arch"] != "gpt"
        self.run = torch.compile(self.model) if compiled else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=True)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        B, T = (32, 128) if self.recurrent else (16, 320)
        V = config["vocab_size"]
        self.x, self.y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def step(self) -> float:
        """Seconds for one optimizer step."""
        started = time.perf_counter()
        with self.autocast:
            if self.recurrent:
                logits, _ = self.model.step(self.x, self.model.init_state(self.x.size(0)))
                loss = self.model.loss(logits, self.y)
            else:
                loss = self.run(self.x, self.y)[1]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    @property
    def tokens(self) -> int:
        return self.x.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6, help="alternating rounds (after one warm-up)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile under bf16 (GPTs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# training precision — {environment()}, {args.threads} thread(s)")
    for name, config in SHAPES.items():
        variants = {"float32": Variant(config, False, False), "bf16": Variant(config, True, False)}
        if args.compile and config["arch"] == "gpt":
            started = time.perf_counter()
            variants["bf16 + compile"] = Variant(config, True, True)
            variants["bf16 + compile"].step()
            print(f"  {name}: torch.compile took {time.perf_counter() - started:.0f} s")
        for v in variants.values():
            v.step()  # warm-up
        times = {key: [] for key in variants}
        for _ in range(args.steps):
            for key, v in variants.items():
                times[key].append(v.step())
        base = times["float32"]
        for key, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts))
            rate = variants[key].tokens / statistics.median(ts)
            print(f"  {name:22s} {key:15s} {rate:8,.0f} tokens/s   {ratio:.2f}x float32")


if __name__ == "__main__":
    main()
