"""A model's sampling defaults: what a request leaves unset, read from and written to
generation_config.json as transformers spells it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from models_src.checkpoint import CheckpointError, load_checkpoint
from models_src.sampling_defaults import GENERATION_CONFIG, NEUTRAL, SamplingDefaults


def test_a_request_value_wins_and_the_rest_are_the_models():
    own = SamplingDefaults(temperature=0.7, top_p=0.9, min_p=0.05, max_new_tokens=50)
    params = own.params({"temperature": 1.2, "seed": 3}, prompt_tokens=20, context=320, cap=512)
    assert (params.temperature, params.top_p, params.min_p, params.seed) == (1.2, 0.9, 0.05, 3)
    assert params.max_new_tokens == 50  # the model's own length before the context's room
    assert own.params({"max_new_tokens": 7}, prompt_tokens=20, context=320,
                      cap=512).max_new_tokens == 7


@pytest.mark.parametrize("context, cap, length, expected", [
    (320, 512, None, 300),   # to the end of the context
    (320, 128, None, 128),   # never past the server's cap
    (None, 512, None, 512),  # no context limit (an RNN): the cap
    (320, 512, 64, 64),      # a server-wide default length wins over the room
    (20, 512, None, 10),     # a prompt that fills the context: half a context more
])
def test_the_length_left_unset_runs_to_the_end_of_the_context(context, cap, length, expected):
    params = NEUTRAL.params({}, prompt_tokens=20, context=context, cap=cap, length=length)
    assert params.max_new_tokens == expected


def test_transformers_spelling_both_ways():
    own = SamplingDefaults(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02,
                           repetition_penalty=1.1, max_new_tokens=200)
    assert SamplingDefaults.from_hf(own.to_hf()) == own
    assert SamplingDefaults.from_hf({"do_sample": False, "temperature": 0.7}).temperature == 0
    # missing keys are this library's neutral values, not transformers' (top_k 50)
    assert SamplingDefaults.from_hf({"bos_token_id": 1}) == NEUTRAL
    assert SamplingDefaults.from_hf({"top_k": 0, "top_p": 1.0}) == NEUTRAL
    assert NEUTRAL.to_hf() == {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                               "repetition_penalty": 1.0}
    assert own.described() == "temperature 0.8, top-k 40, top-p 0.95, min-p 0.02, repetition penalty 1.1"
    assert SamplingDefaults(temperature=0, top_p=0.9).described() == "greedy"


@pytest.mark.parametrize("config, message", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"min_p": "0.1"}, "min_p must be a number"),
    ({"top_k": True}, "top_k must be a number"),
    ([1, 2], "not a JSON object"),
])
def test_a_bad_setting_is_refused_with_its_name(config, message):
    with pytest.raises(ValueError, match=message):
        SamplingDefaults.from_hf(config)


def test_a_checkpoint_loads_its_defaults_and_names_a_bad_file(checkpoint_dir, tmp_path):
    tiny_checkpoint = Path(shutil.copytree(checkpoint_dir / "tiny-gpt", tmp_path / "tiny-gpt"))
    assert load_checkpoint(tiny_checkpoint).defaults == NEUTRAL  # no file: neutral
    (tiny_checkpoint / GENERATION_CONFIG).write_text(json.dumps({"temperature": 0.6, "top_p": 0.8}))
    assert load_checkpoint(tiny_checkpoint).defaults == SamplingDefaults(temperature=0.6, top_p=0.8)
    (tiny_checkpoint / GENERATION_CONFIG).write_text('{"top_p": 7}')
    with pytest.raises(CheckpointError, match=f"{GENERATION_CONFIG}: top_p must be in"):
        load_checkpoint(tiny_checkpoint)
    (tiny_checkpoint / GENERATION_CONFIG).write_text("{")
    with pytest.raises(CheckpointError, match=GENERATION_CONFIG):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.subprocess
def test_the_sweep_prints_its_table_and_writes_the_choice(checkpoint_dir, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    model = Path(shutil.copytree(checkpoint_dir / "tiny-gpt", tmp_path / "tiny-gpt"))
    corpus = tmp_path / "text.txt"
    corpus.write_text("Once upon a time there was a girl. She liked to play outside.\n" * 200)
    done = subprocess.run([sys.executable, "benchmarks/sampling_defaults.py", "--checkpoint", str(model),
                           "--data", str(corpus), "--seeds", "2", "--prompt", "Once", "--write"],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| temperature")]
    assert len(rows) == 25 and "| validation text (reference) |" in done.stdout
    chosen = re.search(r"^chosen: (.+)$", done.stdout, re.MULTILINE).group(1)
    assert load_checkpoint(model).defaults.described() == chosen  # written, and it loads
