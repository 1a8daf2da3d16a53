"""Every bundled checkpoint in checkpoints/ loads and generates."""

from pathlib import Path

import pytest

from models_src.checkpoint import load_checkpoint
from models_src.generation import generate
from models_src.sampling import SamplingParams

BUNDLED = sorted(p for p in (Path(__file__).resolve().parent.parent / "checkpoints").iterdir()
                 if p.is_dir() and not p.name.startswith("."))


def test_there_are_bundled_models():
    assert BUNDLED, "checkpoints/ should hold the default models the app serves"


@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.name)
def test_bundled_checkpoint_loads_and_generates(path):
    ckpt = load_checkpoint(path)
    assert (path / "model.safetensors").stat().st_size <= 10 * 2**20  # a Space needs no LFS
    assert ckpt.summary.get("val_perplexity"), "the admin page lists every model's perplexity"
    out = generate(ckpt.model, ckpt.tokenizer, "The ", SamplingParams(max_new_tokens=20, seed=0))[0]
    assert out.completion_tokens > 0 and out.text
