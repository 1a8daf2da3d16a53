"""config.json's ``training`` and ``evaluation`` sections as typed records
(models_src.records.TrainingSummary, Evaluation): every checkpoint Fable ever wrote reads,
whatever it holds; nothing is lost when one is saved again; and what is written is what
older Fable reads (the same JSON)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from models_src import ModelConfig, build_model
from models_src.checkpoint import load_checkpoint, save_checkpoint
from models_src.infill import trained_to_infill
from models_src.records import Evaluation, TrainingSummary
from models_src.tokenization import Tokenizer
from tests.app_support import TEXT

BUNDLED = sorted(Path(__file__).resolve().parents[2].glob("checkpoints/*/config.json"))
SECTIONS = {"training": TrainingSummary, "evaluation": Evaluation}

#: A last/ checkpoint as the trainer wrote it before its first evaluation, before runs had
#: ids and commands: null figures, an infinite best loss.
OLD_LAST = {"name": "tiny", "finished": False, "step": 0, "parameters": 1234, "epoch": 0.0,
            "tokens_seen": 0, "train_loss": None, "val_loss": None, "val_perplexity": None,
            "token_accuracy": None, "bits_per_char": None, "best_val_loss": math.inf,
            "training_time_s": 0.0, "data": "data/tiny.txt", "tokenizer": "char", "vocab_size": 40,
            "seq_len": 32, "hardware": "cpu", "config": {"data": {"task": "lm"}}}
#: Unknown keys: what a newer Fable, another tool or a person added.
WITH_EXTRA = {"step": 5, "val_perplexity": 3.5, "note": "five-minute demo",
              "wandb": {"run": "abc", "tags": ["x"]}, "extra": 1}
#: Every typed field given something of another type.
WRONG_TYPES = {"val_perplexity": "3.5", "step": "10", "tokens_seen": 1.5e6, "finished": "yes",
               "val_loss": math.nan, "bits_per_char": True, "epoch": -math.inf,
               "samples": ["a", 2], "config": ["data"], "data": 42, "hardware": None,
               "run_id": 7, "infill": 1, "bleu": {"score": 1}}
WRONG_EVALUATION = {"split": ["validation"], "tokens": 9.5, "characters": "many", "loss": math.nan,
                    "perplexity": None, "date": 20261207, "samples": "one", "bleu": False}


def same_json(a: dict, b: dict) -> bool:
    """Equal as written to config.json, NaN included (a key the fields do not read moves
    after those they do)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.mark.bundled
@pytest.mark.parametrize("path", BUNDLED, ids=lambda p: p.parent.name)
def test_every_bundled_section_is_typed_whole_and_written_back_as_it_was(path):
    config = json.loads(path.read_text())
    for name, section in SECTIONS.items():
        record = section.from_dict(config[name])
        assert record.extra == {}, f"{name}: keys no field types"
        assert json.dumps(record.to_dict()) == json.dumps(config[name])  # the same text, in order
    training, evaluation = TrainingSummary.from_dict(config["training"]), Evaluation.from_dict(config["evaluation"])
    assert training.val_perplexity == config["training"]["val_perplexity"] and training.finished is True
    assert evaluation.bits_per_char == config["evaluation"]["bits_per_char"]


@pytest.mark.parametrize("raw", [OLD_LAST, {"val_perplexity": 3.5}, {}], ids=["last", "one-figure", "imported"])
def test_old_sections_read_with_what_they_lack_as_none(raw):
    summary = TrainingSummary.from_dict(raw)
    assert summary.command is None and summary.run_id is None and summary.samples is None
    assert same_json(summary.to_dict(), raw)


def test_nulls_and_infinities_read_as_missing_and_are_written_back():
    summary = TrainingSummary.from_dict(OLD_LAST)
    assert summary.step == 0 and summary.finished is False and summary.data == "data/tiny.txt"
    assert summary.val_loss is None and summary.best_val_loss is None
    assert summary.extra == {k: v for k, v in OLD_LAST.items() if v is None or v == math.inf}
    assert summary.config_section("data") == {"task": "lm"} and summary.config_section("model") == {}


def test_unknown_keys_are_kept_and_survive_a_round_trip():
    summary = TrainingSummary.from_dict(WITH_EXTRA)
    assert summary.step == 5 and summary.val_perplexity == 3.5
    assert summary.extra == {"note": "five-minute demo", "wandb": {"run": "abc", "tags": ["x"]}, "extra": 1}
    assert summary.to_dict() == WITH_EXTRA


@pytest.mark.parametrize("section, raw", [(TrainingSummary, WRONG_TYPES), (Evaluation, WRONG_EVALUATION)])
def test_values_of_the_wrong_type_read_as_missing_and_are_kept(section, raw):
    record = section.from_dict(raw)
    assert all(getattr(record, key) is None for key in raw)
    assert same_json(record.to_dict(), raw)


@pytest.mark.parametrize("raw", [None, [], "training", 3])
def test_a_section_that_is_no_mapping_reads_as_empty(raw):
    assert TrainingSummary.from_dict(raw) == TrainingSummary()
    assert Evaluation.from_dict(raw).to_dict() == {}


def test_a_field_set_again_wins_over_the_unreadable_value_it_replaces():
    from dataclasses import replace

    summary = replace(TrainingSummary.from_dict({"step": "ten", "note": "kept"}), step=10)
    assert summary.to_dict() == {"step": 10, "note": "kept"}


def test_a_hostile_config_says_nothing_about_infilling():
    tok = Tokenizer.train_char([TEXT])
    for raw in WRONG_TYPES, {"config": {"data": "infill"}}, {"config": {"data": {"task": 3}}}:
        assert not trained_to_infill(TrainingSummary.from_dict(raw), tok)
    assert trained_to_infill(TrainingSummary(infill=True), tok)


# ---- through the checkpoint files ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = Tokenizer.train_char([TEXT])
    model = build_model(ModelConfig(arch="lstm", vocab_size=tokenizer.vocab_size, n_layer=1,
                                    n_embd=16, n_hidden=16))
    return model, tokenizer


def rewrite(path: Path, **sections) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | sections))


def test_an_old_checkpoint_saved_again_keeps_its_sections(tmp_path, tiny):
    model, tokenizer = tiny
    path = save_checkpoint(tmp_path / "old", model, tokenizer)
    rewrite(path, training={**OLD_LAST, **WITH_EXTRA}, evaluation=WRONG_EVALUATION)
    loaded = load_checkpoint(path)
    assert loaded.training.step == 5 and loaded.training.extra["note"] == "five-minute demo"
    assert loaded.evaluation.loss is None and same_json(loaded.evaluation.extra, WRONG_EVALUATION)
    again = save_checkpoint(tmp_path / "again", loaded.model, loaded.tokenizer, loaded.training)
    written = json.loads((again / "config.json").read_text())["training"]
    assert same_json(written, {**OLD_LAST, **WITH_EXTRA})


def test_a_summary_given_as_a_dict_is_written_as_it_is(tmp_path, tiny):
    model, tokenizer = tiny
    path = save_checkpoint(tmp_path / "m", model, tokenizer, {"note": "demo", "step": 1})
    assert json.loads((path / "config.json").read_text())["training"] == {"note": "demo", "step": 1}
    assert load_checkpoint(path).training == TrainingSummary(step=1, extra={"note": "demo"})


def test_the_app_serves_a_checkpoint_whose_sections_hold_the_wrong_types(tmp_path, checkpoint_dir):
    from app.serving.registry import ModelRegistry

    shutil.copytree(checkpoint_dir / "tiny-gpt", tmp_path / "odd")
    rewrite(tmp_path / "odd", training=WRONG_TYPES, evaluation=WRONG_EVALUATION)
    registry = ModelRegistry.load(tmp_path)
    assert registry.names() == ["odd"] and registry.errors == {}
    facts = registry.get("odd").facts
    assert (facts.val_perplexity, facts.val_loss, facts.step, facts.tokens_seen, facts.data,
            facts.hardware, facts.trained_on, facts.can_infill) == (None,) * 7 + (False,)
    json.dumps(facts.to_dict(), allow_nan=False)  # strict JSON for the APIs
