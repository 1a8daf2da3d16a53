"""TensorBoard and W&B loggers (training.loggers): a tiny run logs to both, W&B offline,
and what they hold matches its experiment rows; a missing package and an unknown logger
are clear errors before any training."""

from __future__ import annotations

import json
import re
import struct
import sys
import types
from pathlib import Path

import pytest

from training import train as train_module
from training.config import ConfigError, load_config
from models_src.records import query
from training.report import RunReport
from training.train import Trainer
from tests.training_runs import make_corpus, raw_config, write_config


VALIDATION = {"loss": "val_loss", "perplexity": "val_perplexity",
              "token_accuracy": "token_accuracy", "bits_per_char": "bits_per_char"}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, writing only under tmp_path, with no key and no server it could reach;
    HOME is a scratch one, to see that W&B leaves it alone."""
    import matplotlib

    monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_cachedir())  # its font cache stays put
    for name, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
        "WANDB_DIR": tmp_path / "wandb-dir", "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config", "WANDB_DATA_DIR": tmp_path / "wandb-data",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # the discard port: nothing listens
        "HOME": tmp_path / "home",
        # quicker: no system metrics sampler, no hardware probe
        "WANDB_X_DISABLE_STATS": "true", "WANDB_X_DISABLE_MACHINE_INFO": "true",
    }.items():
        monkeypatch.setenv(name, str(value))
    for name in ("WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    yield
    if sys.modules.get("wandb"):
        sys.modules["wandb"].teardown()  # stops the wandb-core process and forgets its settings


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a ``.wandb`` file. wandb 0.31 reads these only in its Go core (``wandb
    leet inspect``, seconds per call), so this reads the format it writes: LevelDB's log
    (32 KiB blocks of checksum, length, type and chunk) after a 7-byte header, each record
    a ``wandb_internal_pb2.Record``."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00"  # the magic and version 0
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""
    assert pos == len(data) and not chunks


def wandb_items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.train
def test_a_run_logs_its_rows_to_tensorboard_and_offline_wandb(tmp_path, offline_wandb):
    raw = raw_config(tmp_path, max_steps=6, eval_every=3)
    raw["output"]["loggers"] = ["tensorboard", "wandb"]
    summary = Trainer(load_config(raw=raw), quiet=True).fit()
    rows = query(tmp_path / "exp", "SELECT * FROM experiments ORDER BY timestamp")
    assert [(r["step"], r["kind"]) for r in rows] == [(3, "train_eval"), (6, "train_eval"), (6, "final")]
    run = tmp_path / "runs/tiny-gpt"

    tb = tensorboard_scalars(run / "tensorboard")
    assert [step for step, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in tb["train/tokens_per_s"]] == [1, 2, 3, 4, 5, 6]
    assert all(value > 0 for _, value in tb["train/tokens_per_s"])
    train = {name: dict(tb[f"train/{name}"]) for name in ("loss", "learning_rate")}
    for row in rows[:2]:  # an evaluation's row has the loss and rate of the step before it
        assert train["loss"][row["step"]] == pytest.approx(row["train_loss"], rel=1e-6)  # float32
        assert train["learning_rate"][row["step"]] == pytest.approx(row["learning_rate"], rel=1e-6)
    for name, column in VALIDATION.items():
        assert tb[f"validation/{name}"] == [(r["step"], pytest.approx(r[column], rel=1e-6))
                                            for r in rows if r[column] is not None], name
    assert tb["validation/loss"][-1][1] == pytest.approx(summary.val_loss, rel=1e-6)
    assert not any(tag.startswith("validation/") and tag.removeprefix("validation/") not in VALIDATION
                   for tag in tb)  # step, epoch, parameters... are not scores

    [wandb_file] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(wandb_file))
    [started] = [r.run for r in records if r.HasField("run")]
    assert (started.run_id, started.display_name, started.project) == (rows[0]["run_id"], "tiny-gpt",
                                                                       "fable")
    config = wandb_items(started.config.update)
    for r in records:
        if r.HasField("config"):
            config |= wandb_items(r.config.update)
    assert config["training"]["max_steps"] == 6
    assert config["output"]["loggers"] == ["tensorboard", "wandb"]
    history = {r.history.step.num: wandb_items(r.history.item)
               for r in records if r.HasField("history")}
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    for name in ("loss", "learning_rate", "tokens_per_s"):
        assert [(step, pytest.approx(history[step][f"train/{name}"], rel=1e-6))
                for step in history] == tb[f"train/{name}"]
    # one W&B row per step: at step 6 the final evaluation (the whole split) is the one kept
    for row in (rows[0], rows[2]):
        for name, column in VALIDATION.items():
            assert history[row["step"]].get(f"validation/{name}") == pytest.approx(row[column]), name
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0]  # closed at the end
    assert not list((tmp_path / "home").rglob("*wandb*"))


@pytest.mark.train
def test_tensorboard_shows_a_rerun_once_and_a_resumed_run_whole(tmp_path):
    make_corpus(tmp_path / "corpus.txt", sentences=500)  # three short runs
    raw = raw_config(tmp_path, max_steps=3, eval_every=3)
    raw["output"]["loggers"] = ["tensorboard"]
    Trainer(load_config(raw=raw), quiet=True).fit()
    Trainer(load_config(raw=raw), quiet=True).fit()  # a new run in the same directory
    Trainer(load_config(raw=raw, overrides=["training.max_steps=5"]), quiet=True).fit(resume=True)
    tb = tensorboard_scalars(tmp_path / "runs/tiny-gpt/tensorboard")
    assert [step for step, _ in tb["train/loss"]] == [1, 2, 3, 4, 5]
    exp = tmp_path / "exp"
    [run_id] = {r["run_id"] for r in query(exp, "SELECT run_id FROM experiments WHERE step = 5")}
    rows = query(exp, "SELECT step, val_loss FROM experiments WHERE run_id = ? ORDER BY timestamp", [run_id])
    assert tb["validation/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in rows]
    assert [r["step"] for r in rows] == [3, 3, 5, 5]


def test_other_code_logs_named_values_through_the_report_on_rank_0_only(tmp_path):
    raw = raw_config(tmp_path)
    raw["output"]["loggers"] = ["tensorboard"]
    cfg = load_config(raw=raw)
    for main in (False, True):
        report = RunReport(cfg, main=main, quiet=True)
        report.start_bar(None, 0)
        report.scalars(4, {"layer0/grad_norm": 0.5, "layer1/grad_norm": 2.0}, "health")
        report.scalars(8, {"layer0/grad_norm": 0.25}, "health")
        report.close_bar()
        report.close()
        report.close()  # closing twice is harmless
        if not main:
            assert not (tmp_path / "runs").exists()
    assert tensorboard_scalars(tmp_path / "runs/tiny-gpt/tensorboard") == {
        "health/layer0/grad_norm": [(4, 0.5), (8, 0.25)], "health/layer1/grad_norm": [(4, 2.0)]}


@pytest.mark.parametrize("mode", [None, "online", "disabled"])
def test_wandb_is_offline_unless_wandb_mode_says_otherwise(tmp_path, monkeypatch, mode):
    calls = []
    fake = types.ModuleType("wandb")  # records the call: no run, no network, whatever the mode
    fake.init = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    raw = raw_config(tmp_path)
    raw["output"]["loggers"] = ["wandb"]
    cfg = load_config(raw=raw)
    report = RunReport(cfg, main=True, quiet=True)
    report.start_bar(None, 0)
    assert calls == [dict(project="fable", name="tiny-gpt", id=report.run_id, resume="allow",
                          dir=str(tmp_path / "runs/tiny-gpt"), config=cfg.to_dict(),
                          mode=mode or "offline")]


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_package_is_a_config_error_before_training(tmp_path, monkeypatch, capsys, package):
    raw = raw_config(tmp_path)
    raw["output"]["loggers"] = ["tensorboard", "wandb"]
    path = write_config(tmp_path, raw)
    monkeypatch.setitem(sys.modules, package, None)  # what `import <package>` does without it
    assert train_module.main(["--config", str(path), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"error: output.loggers: {package} needs the {package} package "
                                       f"(pip install {package})\n")
    assert not (tmp_path / "runs/tiny-gpt/last").exists()


def test_no_logger_needs_neither_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(raw=raw_config(tmp_path))
    assert cfg.output.loggers == []
    report = RunReport(cfg, main=True, quiet=True)
    report.start_bar(None, 0)
    report.step(1.0, 1e-3, 100.0, step=1)
    report.close_bar()
    report.close()


def test_unknown_loggers_are_named(tmp_path, capsys):
    raw = raw_config(tmp_path)
    unknown = "output.loggers: unknown logger 'mlflow' (known: jsonl, tensorboard, wandb)"
    with pytest.raises(ConfigError, match=f"^{re.escape(unknown)}$"):
        load_config(raw=raw, overrides=["output.loggers=[tensorboard, mlflow]"])
    with pytest.raises(ConfigError, match=r"^output.loggers must be a list such as \[tensorboard\], "
                                          r"not 'wandb'$"):
        load_config(raw=raw, overrides=["output.loggers=wandb"])
    assert load_config(raw=raw, overrides=["output.loggers=[wandb, wandb]"]).output.loggers == ["wandb"]
    path = write_config(tmp_path, raw)
    assert train_module.main(["--config", str(path), "output.loggers=[mlflow]"]) == 2
    assert capsys.readouterr().err == f"error: {unknown}\n"
