"""Which size preset suits this machine?

    python -m training.presets [--arch gpt] [--vocab-size 2048]

Looks at the GPU (and its memory), the CPU cores and the RAM, prints every preset's
parameter count for the architecture, and recommends the largest one that trains at a
useful speed here (the rule of thumb behind it: docs/training.md).
"""

from __future__ import annotations

import argparse
import os

import torch

from models_src import ModelConfig, build_model
from models_src.summary import count_parameters

from .config import PRESETS


def machine() -> dict:
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    facts = {"cores": len(os.sched_getaffinity(0)), "ram_gb": pages * page_size / 2**30,
             "gpu": None, "gpu_gb": 0.0}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_gb=props.total_memory / 2**30)
    return facts


def recommend(facts: dict) -> tuple[str, str]:
    """(preset, reason) for a machine described by ``machine()``."""
    if facts["gpu"]:
        if facts["gpu_gb"] >= 40:
            return "large", f"{facts['gpu']} with {facts['gpu_gb']:.0f} GB"
        if facts["gpu_gb"] >= 12:
            return "medium", f"{facts['gpu']} with {facts['gpu_gb']:.0f} GB"
        return "small", f"{facts['gpu']} with only {facts['gpu_gb']:.0f} GB"
    if facts["cores"] >= 16 and facts["ram_gb"] >= 32:
        return "small", f"CPU only, {facts['cores']} cores"
    if facts["cores"] >= 4:
        return "micro", f"CPU only, {facts['cores']} cores"
    return "nano" if facts["ram_gb"] < 4 else "micro", f"CPU only, {facts['cores']} cores"


def preset_sizes(arch: str, vocab_size: int) -> list[tuple[str, int, dict]]:
    family = "recurrent" if arch in ("rnn", "gru", "lstm") else "attention"
    rows = []
    for name, sizes in PRESETS[family].items():
        with torch.device("meta"):
            model = build_model(ModelConfig(arch=arch, vocab_size=vocab_size, sep_id=5, **sizes))
        rows.append((name, count_parameters(model), sizes))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt", choices=["rnn", "gru", "lstm", "gpt", "seq2seq"])
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    facts = machine()
    choice, reason = recommend(facts)
    gpu = f"{facts['gpu']} ({facts['gpu_gb']:.0f} GB)" if facts["gpu"] else "no GPU"
    print(f"machine: {facts['cores']} cores, {facts['ram_gb']:.0f} GB RAM, {gpu}")
    for name, params, sizes in preset_sizes(args.arch, args.vocab_size):
        mark = "  <- recommended" if name == choice else ""
        shape = ", ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"  {name:7} {params / 1e6:8.2f}M parameters  {shape}{mark}")
    print(f"recommended: model.preset={choice} ({reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
