"""Helpers the benchmark scripts share: timing and the environment line they print."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# the starts of stories that the comparisons with llama.cpp give both sides
STORY_PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, a boy named Tom",
                 "The sun was", "Mom said", "There was a big tree", "Ben and Mia"]
# --precision of the comparisons with llama.cpp: the GGUF it runs (Fable's f32, or int8 against q8_0)
GGUF_OF = {"f32": "f32", "int8": "q8_0"}
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs, in seconds: the least disturbed by a noisy machine."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
