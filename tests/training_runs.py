"""Tiny training runs for the tests: a generated corpus and a config dict around it."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

WORDS = "the a cat dog bird sat ran saw ate on under near big small red mat tree house".split()


def make_corpus(path: Path, sentences: int = 3000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
             for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def raw_config(tmp_path: Path, arch: str = "gpt", **training) -> dict:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        make_corpus(corpus)
    model = (dict(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=32) if arch in ("gpt", "seq2seq")
             else dict(arch=arch, n_layer=2, n_embd=32, n_hidden=48, dropout=0.1, weight_drop=0.2))
    return {
        "name": f"tiny-{arch}",
        "model": model,
        "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "max_seq_len": 32},
        "tokenizer": {"kind": "char"},
        "training": {"batch_size": 8, "learning_rate": 3e-3, "max_steps": 30, "warmup_steps": 5,
                     "eval_every": 10, "eval_batches": 4, "save_every": 10, "num_threads": 1,
                     **training},
        "output": {"dir": str(tmp_path / "runs" / "{name}"), "experiments_dir": str(tmp_path / "exp")},
    }


def write_config(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path

