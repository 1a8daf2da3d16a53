"""What a lossy tokenizer drops is charged in bits, so bits per character compare."""

import math
import random

import pytest

from models_src.tokenization import Tokenizer
from training.config import load_config
from training.evaluate import evaluate
from training.lossy import _Backoff, dropped_bits, round_trips
from training.train import Trainer
from tests.training_runs import raw_config

NAMES = ["Tom", "Lily", "Sam", "Mia"]
THINGS = ["ball", "cat", "tree", "kite", "box"]


def story(rng: random.Random, quotes: float = 1.0) -> str:
    """A tiny story whose speech is in quotes with probability ``quotes``."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    quoted = rng.random() < quotes
    said = f'"I like the {thing}!" said {name}.' if quoted else f"I like the {thing}! said {name}."
    return f"Once upon a time, {name} saw a {thing}. {said}\nThe {thing} was happy."


def stories(n: int, seed: int, **kwargs) -> list[str]:
    rng = random.Random(seed)
    return [story(rng, **kwargs) for _ in range(n)]


@pytest.fixture(scope="module")
def word() -> Tokenizer:
    return Tokenizer.train_word(stories(200, seed=0), min_freq=2)


def test_a_byte_level_bpe_drops_nothing():
    docs = stories(50, seed=1)
    bpe = Tokenizer.train_bpe(docs, vocab_size=300)
    assert round_trips(bpe, docs)
    assert dropped_bits(bpe, docs) == {"spacing": 0.0, "case": 0.0, "unknown": 0.0}


def test_a_word_tokenizer_pays_for_case_spacing_and_unknown_words(word):
    docs = stories(50, seed=1)
    assert not round_trips(word, docs)
    bits = dropped_bits(word, docs, primed_on=stories(200, seed=0))
    assert all(bits[part] > 0 for part in ("spacing", "case"))
    assert bits["unknown"] == 0  # every word of these stories is in the vocabulary
    with_unknown = [doc.replace("happy", "Zanzibarian") for doc in docs]
    assert dropped_bits(word, with_unknown, primed_on=stories(200, seed=0))["unknown"] > 0


def test_each_dropped_feature_costs_more_when_there_is_more_of_it(word):
    # where quotes go is information the word tokens drop (they are kept or not at random)
    primed_plain, primed_mixed = stories(200, seed=0, quotes=0.0), stories(200, seed=0, quotes=0.5)
    plain, mixed = stories(50, seed=2, quotes=0.0), stories(50, seed=2, quotes=0.5)
    assert dropped_bits(word, mixed, primed_mixed)["spacing"] > dropped_bits(word, plain, primed_plain)["spacing"]
    shouting = [doc.upper() for doc in plain]
    assert dropped_bits(word, shouting, primed_plain)["case"] > dropped_bits(word, plain, primed_plain)["case"]
    # priming on the training split teaches the side models: the same text then costs less
    assert sum(dropped_bits(word, plain, primed_plain).values()) < sum(dropped_bits(word, plain).values())


def test_backoff_probabilities_sum_to_one():
    model = _Backoff()
    for symbol in "aabacab":
        model.update(("ctx",), symbol)
    seen = sum(2 ** -model.bits(("ctx",), s, lambda: math.inf) for s in "abc")
    escape = 2 ** -model.bits(("ctx",), "z", lambda: 0.0)  # the mass left for unseen symbols
    assert seen + escape == pytest.approx(1.0)


@pytest.mark.train
def test_evaluate_adds_the_dropped_bits_to_a_word_models_bits_per_char(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(stories(300, seed=3)) + "\n")
    raw = raw_config(tmp_path)
    raw["model"] = {"arch": "lstm", "n_layer": 1, "n_embd": 16, "n_hidden": 32}
    raw["data"] = {**raw["data"], "path": str(corpus)}
    raw["tokenizer"] = {"kind": "word", "min_freq": 2}
    raw["training"].update(max_steps=4, eval_every=4)
    Trainer(load_config(raw=raw), quiet=True).fit()
    result = evaluate(str(tmp_path / "runs/tiny-gpt/final"), experiments_dir=None, samples=0)
    dropped = sum(result["dropped_bits_per_char"].values())
    model_only = result["loss"] * result["tokens"] / math.log(2) / result["characters"]
    assert dropped > 0 and result["bits_per_char"] == pytest.approx(model_only + dropped)
