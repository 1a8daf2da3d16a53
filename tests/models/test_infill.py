"""Story infilling: sentence splitting, the training format, generation that stops at the
end marker, training and evaluating an infilling model."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from models_src.base import LanguageModel
from models_src.infill import (infill, infill_example_ids, infill_prompt_ids, stream_infill,
                               trained_to_infill)
from models_src.config import ModelConfig
from models_src.records import TrainingSummary
from models_src.sampling import SamplingParams
from models_src.tokenization import Tokenizer
from training import generate as generate_cli
from training.config import ConfigError, load_config
from training.data import DataConfig, load_documents
from training.evaluate import evaluate
from training.examples import (Examples, as_stream, build_examples, collate, example_batch, split_sentences,
                               split_story)
from training.train import Trainer

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam"]
THINGS = ["ball", "kite", "cat", "boat", "hat"]


def make_story(rng: random.Random) -> str:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    middle = [f"{name} played with the {thing} every day.", f"One day the {thing} was lost.",
              f"{name} looked under the bed.", f'"Where are you?" said {name}.']
    rng.shuffle(middle)
    return " ".join([f"{name} had a {thing}."] + middle[: rng.randint(1, 4)] + [f"{name} was happy again."])


def write_stories(path, count=400, seed=0):
    rng = random.Random(seed)
    stories = [make_story(rng) for _ in range(count)] + ["Too short.", "Two. Sentences."]
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n")
    return path


@pytest.mark.parametrize("text, sentences", [
    ('"Hi!" said Tom. He ran home.', ['"Hi!" said Tom.', "He ran home."]),
    ("Mr. Smith met Dr. Brown. They talked.", ["Mr. Smith met Dr. Brown.", "They talked."]),
    ("She waited... Then she left. The end.", ["She waited...", "Then she left.", "The end."]),
    ('Tom said, "Look at the sky. It is blue!" Mia smiled.',
     ['Tom said, "Look at the sky. It is blue!"', "Mia smiled."]),
    ('"Can we go?" asked Lily. "Yes," said Mom.', ['"Can we go?" asked Lily.', '"Yes," said Mom.']),
    ("One line\nbroken across\nlines. Next one.", ["One line broken across lines.", "Next one."]),
])
def test_sentence_splitter_hard_cases(text, sentences):
    assert split_sentences(text) == sentences


def test_split_story_and_stories_without_a_middle():
    assert split_story("Tom ran. Mia sat down. They ate cake. It was fun.") == (
        "Tom ran.", "Mia sat down. They ate cake.", "It was fun.")
    assert split_story("Only one.") is None and split_story("Tom ran. Mia sat.") is None


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(1)
    return Tokenizer.train_char([make_story(rng) for _ in range(50)] + ["He lost it. More."])


def test_training_format(tokenizer):
    tok = tokenizer
    ids, start = infill_example_ids(tok, "Tom had a ball.", "He lost it.", "Tom was happy.")
    blank, sep = ids.index(tok.blank_id), ids.index(tok.sep_id)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and start == sep + 1
    assert tok.decode(ids[1:blank]) == "Tom had a ball."
    assert tok.decode(ids[blank + 1:sep]) == " Tom was happy."
    assert tok.decode(ids[start:-1]) == " He lost it."
    assert infill_prompt_ids(tok, "Tom had a ball.", "Tom was happy.") == ids[:start]


def test_examples_count_skipped_stories_and_mask_padding(tokenizer):
    docs = ["Tom ran. Mia sat. Ben ate.", "Too short.", "Tom ran. Mia sat. Ben ate. It was fun."]
    ex = build_examples(docs, tokenizer, "infill", 1.0, max_len=100, seed=0)
    assert len(ex) == 2 and ex.skipped == 1
    x, y = collate(ex, [0, 1], tokenizer.pad_id)
    assert x.shape == y.shape and (y[0, len(ex.ids(0)) - 1:] == -100).all()  # padding not scored
    _, scored = collate(ex, [0], tokenizer.pad_id, only_scored=True)
    first_scored = int((scored[0] != -100).nonzero()[0])
    assert x[0, first_scored] == tokenizer.sep_id  # the sep position predicts the middle's first token
    _, y_middle = collate(ex, [0, 1, 1], tokenizer.pad_id, only_scored=True)
    # only_scored scores exactly each example's middle and eos
    assert (y_middle != -100).sum() == sum(len(ex.ids(i)) - 1 - ex.scored_from[i] for i in [0, 1, 1])
    mixed = build_examples(docs * 20, tokenizer, "infill+lm", 0.5, max_len=100, seed=0)
    assert 0 < mixed.infill.sum() < len(mixed)  # both kinds, plain stories keep short ones


def test_example_batches_draw_every_example_and_group_similar_lengths():
    # example i is i + 2 copies of the token i + 1, so a row's first token names its example
    lengths = np.arange(2, 102)
    tokens = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)]).astype(np.int32)
    ex = Examples(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  scored_from=np.zeros(100, dtype=np.int64), infill=np.zeros(100, dtype=bool))
    generator, uniform = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    seen, grouped_padding, uniform_padding = set(), [], []
    for _ in range(400):
        x, y = example_batch(ex, 8, generator, pad_id=0)
        seen.update(x[:, 0].tolist())
        assert all((row[row != 0] == row[0]).all() for row in x)  # whole examples, one a row
        grouped_padding.append(float((y == -100).float().mean()))
        _, y = collate(ex, torch.randint(100, (8,), generator=uniform).tolist(), pad_id=0)
        uniform_padding.append(float((y == -100).float().mean()))
    assert seen == set(range(1, 101))  # every example is drawn
    assert np.mean(grouped_padding) < 0.5 * np.mean(uniform_padding)


class Counts(list):
    """Scripted's state: each row's calls so far."""

    def select(self, rows):
        return Counts(self[i] for i in rows.tolist())

    def append(self, other):
        return Counts([*self, *other])


class Scripted(LanguageModel):
    """A model that, after <sep>, writes a fixed middle and then <eos> (or keeps going)."""

    def __init__(self, tok, middle: list[int], then_eos: bool = True):
        super().__init__(ModelConfig(arch="gru", vocab_size=tok.vocab_size))
        self.tok, self.middle, self.then_eos = tok, middle, then_eos
        self.max_context = None
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    device = property(lambda self: torch.device("cpu"))

    def init_state(self, batch):
        return Counts([0] * batch)

    def step(self, tokens, state, lengths=None):
        B, T = tokens.shape
        logits = torch.full((B, T, self.tok.vocab_size), -1e9)
        for b in range(B):
            n = state[b]  # calls so far = tokens generated so far
            nxt = self.middle[n] if n < len(self.middle) else (
                self.tok.eos_id if self.then_eos else self.middle[-1])
            logits[b, :, nxt] = 0.0
            state[b] += 1
        return logits, state


def test_generation_stops_at_the_end_marker(tokenizer):
    middle = tokenizer.encode(" He lost it.")
    model = Scripted(tokenizer, middle)
    out = infill(model, tokenizer, "Tom had a ball.", "Tom was happy.", SamplingParams(temperature=0))
    assert out.text == "He lost it." and out.finish_reason == "stop"
    assert "".join(stream_infill(model, tokenizer, "Tom had a ball.", "Tom was happy.",
                                 SamplingParams(temperature=0))).strip() == "He lost it."


def test_the_middle_never_repeats_the_last_sentence(tokenizer):
    middle = tokenizer.encode(" He lost it. Tom was happy. More.")
    model = Scripted(tokenizer, middle, then_eos=False)
    out = infill(model, tokenizer, "Tom had a ball.", "Tom was happy.",
                 SamplingParams(temperature=0, max_new_tokens=60))
    assert out.text == "He lost it."


def test_a_recurrent_model_reads_whole_examples_as_one_shuffled_stream(tokenizer):
    docs = [f"Tom ran {i} times. Mia sat. Ben ate. It was fun." for i in range(12)]
    ex = build_examples(docs, tokenizer, "infill+lm", 0.5, max_len=None, seed=0)
    stream = as_stream(ex, seed=1)
    rows = [ex.ids(i).tolist() for i in range(len(ex))]
    assert sorted(stream.tolist()) == sorted(t for r in rows for t in r)  # every example once
    starts = [i for i, t in enumerate(stream.tolist()) if t == tokenizer.bos_id]
    read = [stream[a:b].tolist() for a, b in zip(starts, starts[1:] + [len(stream)])]
    assert sorted(read) == sorted(rows) and read != rows  # whole, in another order
    assert stream[0] == tokenizer.bos_id and stream[-1] == tokenizer.eos_id


MODELS = {"gpt": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 192},
          "seq2seq": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 192},
          "lstm": {"n_layer": 1, "n_embd": 32, "n_hidden": 64}}  # read by truncated BPTT


@pytest.mark.train
@pytest.mark.parametrize("arch", MODELS)
def test_train_and_evaluate_an_infilling_model(tmp_path, capsys, arch):
    corpus = write_stories(tmp_path / "stories.txt")
    raw = {"name": "tiny-infill",
           "model": {"arch": arch, **MODELS[arch]},
           "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "task": "infill+lm",
                    "infill_fraction": 0.7, "max_seq_len": 48 if arch == "lstm" else None},
           "tokenizer": {"kind": "char"},
           "training": {"batch_size": 8, "learning_rate": 3e-3, "max_steps": 40, "warmup_steps": 5,
                        "eval_every": 20, "eval_batches": 3, "save_every": 20, "num_threads": 1},
           "output": {"dir": str(tmp_path / "runs/{name}"), "experiments_dir": str(tmp_path / "exp")}}
    summary = Trainer(load_config(raw=raw), quiet=True).fit()
    assert summary.val_loss < 3.2  # from ln(vocab) ~ 3.7: it learned something
    ckpt = str(tmp_path / "runs/tiny-infill/final")
    both = evaluate(ckpt, task="infill", given="first+last", bleu=3, experiments_dir=str(tmp_path / "exp"))
    first = evaluate(ckpt, task="infill", given="first", experiments_dir=None)
    assert both["stories"] > 10 and both["tokens"] > 0
    assert first["tokens"] > 0 and both["perplexity"] > 1 and 0 <= both["bleu"] <= 100
    assert len(both["examples"]) == 3
    # plain language modelling reads each story from <bos>, as the model was trained
    lm = evaluate(ckpt, experiments_dir=None, samples=0)
    docs = load_documents(DataConfig(path=str(corpus)))["validation"]
    assert lm["reads"] == "documents" and lm["tokens"] == sum(len(d) + 1 for d in docs)
    assert generate_cli.main(["--checkpoint", ckpt, "--first_sentence", "Tom had a kite.",
                              "--last_sentence", "Tom was happy again.", "--max_tokens", "40",
                              "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Tom had a kite. ") and out.rstrip().endswith("Tom was happy again.")
    # the kept candidate's complete sentences, never a sentence run into the ending
    assert re.search(r"[.!?][\"'”’)\]]* Tom was happy again\.$", out.rstrip())


@pytest.mark.train
def test_middle_only_asks_for_batches_of_examples_not_a_stream(tmp_path):
    corpus = write_stories(tmp_path / "stories.txt", count=40)
    raw = {"name": "tiny", "model": {"arch": "lstm", **MODELS["lstm"]},
           "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "task": "infill",
                    "middle_only": True},
           "tokenizer": {"kind": "char"}, "training": {"max_steps": 1},
           "output": {"dir": str(tmp_path / "runs/{name}"), "experiments_dir": str(tmp_path / "exp")}}
    with pytest.raises(ConfigError, match="training.tbptt=false"):
        Trainer(load_config(raw=raw), quiet=True)
    raw["training"]["tbptt"] = False  # whole examples in batches, each from a fresh state
    assert Trainer(load_config(raw=raw), quiet=True).examples is not None


@pytest.mark.train
def test_an_epoch_of_whole_examples_is_each_example_once(tmp_path):
    corpus = write_stories(tmp_path / "stories.txt", count=120)
    raw = {"name": "tiny", "model": {"arch": "gpt", **MODELS["gpt"]},
           "data": {"path": str(corpus), "cache_dir": str(tmp_path / "cache"), "task": "infill+lm",
                    "infill_fraction": 0.5},
           "tokenizer": {"kind": "char"}, "training": {"batch_size": 8, "epochs": 2},
           "output": {"dir": str(tmp_path / "runs/{name}"), "experiments_dir": str(tmp_path / "exp")}}
    trainer = Trainer(load_config(raw=raw), quiet=True)
    train = trainer.examples["train"]
    assert trainer.max_steps == 2 * (len(train) // 8)
    # tokens/s and tokens seen count the examples' tokens, not rows padded to the context
    assert trainer.tokens_per_step == round(len(train.tokens) / len(train) * 8)


def test_a_model_infills_only_when_it_learned_the_format():
    tok = Tokenizer.train_char(["Lily saw a ball. The end."])
    def trained_on(**data):
        return TrainingSummary(config={"data": data})
    assert trained_to_infill(trained_on(task="infill", infill_fraction=0.5), tok)
    assert trained_to_infill(trained_on(task="infill+lm", infill_fraction=0.3), tok)
    assert not trained_to_infill(trained_on(task="infill+lm", infill_fraction=0.0), tok)
    assert not trained_to_infill(trained_on(task="lm", infill_fraction=0.5), tok)
    assert not trained_to_infill(TrainingSummary(), tok)  # no record of its training: the markers alone say nothing
    assert trained_to_infill(TrainingSummary(infill=True), tok)  # an imported model declares it
    assert not trained_to_infill(TrainingSummary(infill=False, config={"data": {"task": "infill"}}), tok)
