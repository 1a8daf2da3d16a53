"""What a run writes for the app's training page to follow: metrics.jsonl (the jsonl
logger), text samples during training (training.sample_every), the one command trained on
a fetched corpus (--corpus), and `fable data list --json`.

The corpora here are tmp_path folders found through FABLE_DATA_DIR, with ../shared/data
moved out of the way: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import pytest

from models_src.records import query
from training import corpora
from training import train as train_module
from training.config import ConfigError, load_config
from training.loggers import METRICS_FILE, Loggers
from training.report import RunReport
from training.train import SAMPLE_PROMPT_TOKENS, Trainer
from tests.training.test_cli import some_text
from tests.training_runs import raw_config


def records(path: Path) -> list[dict]:
    """Every line of a metrics.jsonl, read as strict JSON (NaN or Infinity would fail)."""
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line, parse_constant=no_constant) for line in lines]


def of_group(rows: list[dict], group: str) -> list[dict]:
    return [r for r in rows if r.get("group") == group]


def tiny_run(tmp_path: Path, arch: str = "gpt", **training) -> tuple[Trainer, list[dict]]:
    """A six-step run logging to metrics.jsonl; the trainer and the file's records."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = raw_config(tmp_path, arch, **{"max_steps": 6, "eval_every": 3, **training})
    raw["output"]["loggers"] = ["jsonl"]
    trainer = Trainer(load_config(raw=raw), quiet=True)
    trainer.fit()
    return trainer, records(trainer.run_dir / METRICS_FILE)


# ---- metrics.jsonl -----------------------------------------------------------------------------


@pytest.mark.train
def test_metrics_jsonl_holds_the_start_every_step_every_evaluation_and_the_samples(tmp_path):
    trainer, rows = tiny_run(tmp_path, sample_every=1, sample_tokens=20)
    [start] = [r for r in rows if "event" in r]
    assert rows[0] is start and set(start) == {"event", "run_id", "step", "time"}
    assert (start["event"], start["step"]) == ("start", 0)
    assert start["run_id"] == trainer.report.run_id
    assert all(isinstance(r["time"], float) and r["time"] == round(r["time"], 3) for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)

    train = of_group(rows, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"step", "group", "time", "values"} for r in train)
    assert all(set(r["values"]) == {"loss", "learning_rate", "tokens_per_s"} for r in train)
    assert train[-1]["values"]["loss"] == pytest.approx(trainer.state.last_train_loss, rel=1e-6)

    experiment_rows = query(tmp_path / "exp", "SELECT step, val_loss FROM experiments ORDER BY timestamp")
    validation = of_group(rows, "validation")
    assert [(r["step"], pytest.approx(r["values"]["loss"], rel=1e-6)) for r in validation] == \
        [(row["step"], row["val_loss"]) for row in experiment_rows]  # steps 3 and 6, then the final one
    assert "bits_per_char" in validation[-1]["values"]

    samples = of_group(rows, "sample")
    assert [r["step"] for r in samples] == [3, 6]
    assert all(set(r) == {"step", "group", "time", "text"} for r in samples)
    prompt = trainer.sample_prompt()
    assert 0 < len(prompt) <= SAMPLE_PROMPT_TOKENS  # characters: a char tokenizer
    assert all(r["text"].startswith(prompt) for r in samples)
    # each sample follows its step's evaluation
    assert [rows.index(r) - 1 for r in samples] == [rows.index(r) for r in validation[:2]]


def test_non_finite_values_are_null_and_a_resumed_run_appends(tmp_path):
    cfg = load_config(raw=raw_config(tmp_path))
    path = cfg.run_dir / METRICS_FILE

    def log(start_step: int, values: dict) -> None:
        loggers = Loggers(cfg, ["jsonl"])
        loggers.start("run-1", start_step)
        loggers.scalars(start_step + 1, values, "health")
        loggers.text(start_step + 1, "text", 'a "quoted"\nline\u2028and é')
        loggers.close()
        loggers.close()  # again is harmless

    log(0, {"layer0/grad_norm": math.nan, "up": math.inf, "down": -math.inf, "ok": 0.1234567891})
    first = records(path)
    assert first[1]["values"] == {"layer0/grad_norm": None, "up": None, "down": None, "ok": 0.1234568}
    assert first[2]["text"] == 'a "quoted"\nline\u2028and é'
    assert len(path.read_text().splitlines()) == 3  # one record a line, whatever the text holds

    log(5, {"ok": 1.0})  # resumed at step 5: goes on after the first run's records
    assert [(r.get("event"), r["step"]) for r in records(path)] == \
        [("start", 0), (None, 1), (None, 1), ("start", 5), (None, 6), (None, 6)]
    log(0, {"ok": 2.0})  # a new run in the same directory starts the file again
    assert [(r.get("event"), r["step"]) for r in records(path)] == [("start", 0), (None, 1), (None, 1)]


def test_every_logger_takes_the_samples(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    fake = types.ModuleType("wandb")  # no W&B run: what the run is asked to log
    fake.init = lambda **kwargs: types.SimpleNamespace(log=lambda values, step: logged.append((step, values)),
                                                       finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    raw = raw_config(tmp_path)
    raw["output"]["loggers"] = ["jsonl", "tensorboard", "wandb"]
    report = RunReport(load_config(raw=raw), main=True, quiet=False)
    report.start_bar(None, 0)
    report.sample(3, "Once upon a time")
    report.close_bar()
    report.close()
    assert "sample at step 3:\nOnce upon a time\n" in capsys.readouterr().err
    assert logged == [(3, {"samples/text": "Once upon a time"})]
    run = tmp_path / "runs/tiny-gpt"
    assert of_group(records(run / METRICS_FILE), "sample")[0]["text"] == "Once upon a time"
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    [tag] = events.Tags()["tensors"]
    [event] = events.Tensors(tag)
    assert tag.startswith("samples/text") and event.step == 3
    assert event.tensor_proto.string_val == [b"Once upon a time"]


# ---- samples during training -------------------------------------------------------------------


@pytest.mark.train
def test_no_sample_is_written_when_sample_every_is_0(tmp_path, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated a sample with sample_every 0")

    monkeypatch.setattr(train_module, "generate", no_generation)
    _, rows = tiny_run(tmp_path)
    assert not of_group(rows, "sample") and of_group(rows, "validation")


@pytest.mark.train
def test_samples_leave_the_training_as_it_is(tmp_path):
    """The LSTM's dropout draws from torch's global generator: a sample that drew from it
    would change every loss after it."""
    plain, plain_rows = tiny_run(tmp_path / "plain", "lstm", max_steps=9)
    sampled, sampled_rows = tiny_run(tmp_path / "sampled", "lstm", max_steps=9, sample_every=1)
    assert [r["step"] for r in of_group(sampled_rows, "sample")] == [3, 6, 9]
    assert not of_group(plain_rows, "sample")
    assert [r["values"]["loss"] for r in of_group(sampled_rows, "train")] == \
        [r["values"]["loss"] for r in of_group(plain_rows, "train")]
    assert sampled.state.last_train_loss == plain.state.last_train_loss
    assert sampled.model.training  # back in training mode after each sample


@pytest.mark.train
def test_a_trained_model_writes_a_sample_of_sample_tokens(tmp_path):
    trainer, _ = tiny_run(tmp_path, max_steps=30, eval_every=30)  # no samples on the way
    trainer.t.sample_tokens = 12
    text = trainer.sample_text()
    prompt = trainer.sample_prompt()
    assert text.startswith(prompt) and len(prompt) < len(text) <= len(prompt) + 12
    assert trainer.sample_text() == text  # its own fixed seed
    assert trainer.model.training


@pytest.mark.parametrize("key, value, message", [
    ("sample_every", -1, "training.sample_every must be 0 (off) or a number of evaluations"),
    ("sample_tokens", 0, "training.sample_tokens must be at least 1"),
    ("sample_every", "often", "training.sample_every must be a number, not 'often'"),
])
def test_sample_settings_are_checked(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(raw=raw_config(tmp_path, **{key: value}))


# ---- fetched corpora: --corpus and `fable data list --json` -------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty FABLE_DATA_DIR, and no ../shared/data: only what a test puts there is found."""
    monkeypatch.setenv("FABLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(corpora, "SHARED", tmp_path / "no-shared")
    return tmp_path / "data"


@pytest.fixture
def built(monkeypatch) -> list:
    """The configs the one command would train, with no training."""
    configs = []

    class NoTraining:
        def __init__(self, cfg, **kwargs):
            configs.append(cfg)
            self.dist = types.SimpleNamespace(main=False)  # nor a model card

        def fit(self, resume=False):
            pass

    monkeypatch.setattr(train_module, "Trainer", NoTraining)
    return configs


def one_command(tmp_path: Path, *source: str) -> int:
    return train_module.main(["--preset", "char-gpt", *source, "--name", "my-model", "--steps", "1",
                              "--checkpoint-dir", str(tmp_path / "served"), "--quiet"])


def test_corpus_trains_on_the_fetched_file_as_data_would(tmp_path, data_dir, built, capsys):
    text = data_dir / "tinyshakespeare" / "input.txt"
    text.parent.mkdir(parents=True)
    text.write_text(some_text(3000))
    assert one_command(tmp_path, "--corpus", "tinyshakespeare/input.txt") == 0
    assert one_command(tmp_path, "--data", str(text)) == 0
    by_corpus, by_data = built
    assert by_corpus.data.path == str(text) and by_corpus.to_dict() == by_data.to_dict()

    text.write_text("Too short.\n")  # checked as --data's file is
    assert one_command(tmp_path, "--corpus", "tinyshakespeare/input.txt") == 2
    assert f"error: {text} is too short for char-gpt's 128-token context" in capsys.readouterr().err


@pytest.mark.parametrize("reference, message", [
    ("tinyshakespeare/input.txt",
     r"error: corpus tinyshakespeare is not here yet \(looked in .*no-shared/tinyshakespeare/input.txt "
     r"and .*data/tinyshakespeare/input.txt\): `fable data fetch tinyshakespeare` \(or `make data`\) "
     r"downloads it\n"),
    ("shakespeare/input.txt",
     r"error: --corpus shakespeare/input.txt: unknown corpus 'shakespeare'; Fable fetches "
     r"tinyshakespeare, .* \(for a file of your own, use --data\)\n"),
])
def test_a_corpus_that_is_not_here_says_how_to_get_it(tmp_path, data_dir, built, capsys, reference, message):
    assert one_command(tmp_path, "--corpus", reference) == 2
    assert not built
    err = capsys.readouterr().err
    assert re.fullmatch(message, err), err
    assert not (tmp_path / "served").exists()


def test_a_corpus_folder_names_its_files(tmp_path, data_dir, built, capsys):
    (data_dir / "tinystories").mkdir(parents=True)
    assert one_command(tmp_path, "--corpus", "tinystories") == 2
    assert capsys.readouterr().err == ("error: --corpus tinystories is a folder: name a text file in it "
                                       "(tinystories/train.txt, tinystories/valid.txt)\n")


@pytest.mark.parametrize("arguments, message", [
    (["--preset", "char-gpt", "--data", "a.txt", "--corpus", "tinyshakespeare/input.txt", "--name", "m"],
     "argument --corpus: not allowed with argument --data"),
    (["--preset", "char-gpt", "--name", "m"], "--preset needs --data FILE (or --corpus CORPUS/FILE) and --name NAME"),
    (["--config", "c.yaml", "--corpus", "tinyshakespeare/input.txt"],
     "--data, --corpus, --name, --checkpoint-dir and --overwrite go with --preset"),
])
def test_corpus_goes_with_preset_and_instead_of_data(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_module.main(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_data_list_json_marks_the_files_that_are_here(data_dir, capsys):
    text = data_dir / "tinyshakespeare" / "input.txt"
    text.parent.mkdir(parents=True)
    text.write_text("First Citizen:\n")
    (data_dir / "tinystories").mkdir()
    (data_dir / "tinystories" / "valid.txt").write_text("one story\n")  # half a corpus
    assert corpora.main(["list", "--json"]) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert list(listed) == list(corpora.CORPORA)
    shakespeare = listed["tinyshakespeare"]
    assert {k: shakespeare[k] for k in ("about", "licence", "size_mb")} == \
        {"about": corpora.CORPORA["tinyshakespeare"].about, "licence": "public domain", "size_mb": 1.1}
    assert shakespeare["files"] == [{"reference": "tinyshakespeare/input.txt", "path": str(text.resolve()),
                                     "bytes": len("First Citizen:\n")}]
    assert listed["tinystories"]["files"] == [
        {"reference": "tinystories/train.txt", "path": None, "bytes": None},
        {"reference": "tinystories/valid.txt", "path": str((data_dir / "tinystories/valid.txt").resolve()),
         "bytes": 10}]
    assert all(f["path"] is None for f in listed["books"]["files"])
    assert [f["reference"] for f in listed["books"]["files"]] == \
        [f"books/{name}" for name in corpora.CORPORA["books"].files()]


def test_a_sample_starts_at_the_start_of_a_line_when_the_split_cuts_one():
    """A validation split of one long text starts mid-line: the prompt starts on its next
    line; a text with no line break keeps its first tokens."""
    from types import SimpleNamespace

    import torch

    from models_src.tokenization import Tokenizer

    tokenizer = Tokenizer.train_char(["ing the ball.\nLILY: Hello there, Tom.\n"])

    def prompt_of(text: str) -> str:
        ids = torch.tensor(tokenizer.encode(text))
        fake = SimpleNamespace(data=SimpleNamespace(splits={"validation": ids}), tokenizer=tokenizer)
        return Trainer.sample_prompt(fake)

    assert prompt_of("ing the ball.\nLILY: Hello there, Tom.\n") == "LILY: He"
    assert prompt_of("ing the ball. Hello") == "ing the "
    assert prompt_of("ing the ball.\n") == "ing the "  # nothing after the break


def test_a_model_of_ones_own_text_offers_its_first_words_as_the_prompt(tmp_path):
    """The card's widget prompt (the pages' placeholder and the card's samples) for an own
    text: its first line's first words; "The" when there is nothing to read."""
    from training.model_card import corpus_of

    text = tmp_path / "text.txt"
    text.write_text("\n  \nFirst Citizen: Before we proceed any further, hear me speak.\n")
    assert corpus_of(str(text))["prompt"] == "First Citizen: Before"
    assert corpus_of(str(tmp_path / "gone.txt"))["prompt"] == "The"
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    assert corpus_of(str(tmp_path / "blank.txt"))["prompt"] == "The"
    assert corpus_of("tinyshakespeare/input.txt")["prompt"] == "ROMEO:"  # a known corpus's own
