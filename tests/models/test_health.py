"""Training health (models_src/health.py, training/inspect.py): the figures, the
diagnosis in plain words, the records a run stores, and the report on real checkpoints:
the bundled models are healthy, a run with a learning rate 100 times too high is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models_src import health
from models_src.checkpoint import load_checkpoint
from training import inspect as inspect_cli
from training.config import load_config
from models_src.records import connect
from training.train import Trainer
from tests.training_runs import raw_config

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if (p / "config.json").exists())


def metrics(records) -> set[str]:
    return {metric for _, metric, _ in records}


def test_probe_reads_gates_units_and_attention(checkpoint_dir):
    lstm = load_checkpoint(checkpoint_dir / "tiny-lstm").model
    ids = torch.randint(0, 20, (2, 16))
    records = health.probe(lstm, ids)
    assert {"activation_mean", "activation_std", "dead_units", "saturated_gates"} <= metrics(records)
    assert all(0 <= v <= 1 for _, m, v in records if m in ("dead_units", "saturated_gates"))
    gpt = load_checkpoint(checkpoint_dir / "tiny-gpt").model
    records = health.probe(gpt, ids)
    heads = [(layer, v) for layer, m, v in records if m == "attention_entropy_bits"]
    assert heads and all(0 <= v <= 4 + 1e-6 for _, v in heads)  # at most log2(16) bits
    assert heads[0][0].endswith(".attn.head0") and gpt.training is False


def test_gradients_and_updates_are_measured_per_parameter(checkpoint_dir):
    model = load_checkpoint(checkpoint_dir / "tiny-gpt").model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(0, 20, (2, 9))
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    grads = dict((layer, v) for layer, m, v in health.gradient_stats(model))
    assert set(grads) == {name for name, _ in model.named_parameters()}
    before = health.snapshot(model)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ratios = {layer: v for layer, _, v in health.update_ratios(before, model)}
    name, p = next(iter(model.named_parameters()))
    assert ratios[name] == pytest.approx((0.1 * p.grad).norm().item() / before[name].norm().item(),
                                         rel=1e-4)


@pytest.mark.parametrize("records, kind", [
    ([("h.0.mlp.c_fc.weight", "grad_norm", 1e-9)], "vanishing gradients"),
    ([("h.0.mlp.c_fc.weight", "grad_norm", float("inf"))], "exploding gradients"),
    ([("h.0.mlp.c_fc.weight", "update_ratio", 0.4)], "updates too large"),
    ([("h.0.mlp", "dead_units", 0.6)], "dead units"),
    ([("layers.0", "saturated_gates", 0.97)], "saturated gates"),
    ([("h.0.attn.head0", "attention_entropy_bits", 0.0),
      ("h.0.attn.head1", "attention_entropy_bits", 0.01)], "collapsed attention"),
    ([("h.0.ln_1", "activation_std", float("nan"))], "non-finite activations"),
])
def test_diagnose_names_each_problem_with_its_numbers(records, kind):
    problems = health.diagnose(records)
    assert [p.kind for p in problems] == [kind]
    assert problems[0].layer in problems[0].text


def test_healthy_figures_raise_nothing():
    records = [("h.0.mlp.c_fc.weight", "grad_norm", 0.3), ("h.0.mlp.c_fc.weight", "update_ratio", 1e-3),
               ("h.0.mlp", "dead_units", 0.01), ("layers.0", "saturated_gates", 0.5),
               ("h.0.attn.head0", "attention_entropy_bits", 0.0),  # one sharp head is fine
               ("h.0.attn.head1", "attention_entropy_bits", 2.5)]
    assert health.diagnose(records) == []


def train(tmp_path: Path, arch: str, **training) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = raw_config(tmp_path, arch, **{"max_steps": 40, "eval_every": 20, "save_every": 20,
                                        **training})
    Trainer(load_config(raw=raw), quiet=True).fit()
    return tmp_path


@pytest.mark.train
def test_a_run_records_its_health_beside_the_loss(tmp_path):
    train(tmp_path, "gpt", health_every=10)
    with connect(tmp_path / "exp") as con:
        steps = [row[0] for row in con.execute(
            "SELECT DISTINCT step FROM health ORDER BY step").fetchall()]
        kinds = {row[0] for row in con.execute("SELECT DISTINCT metric FROM health").fetchall()}
        runs = con.execute("SELECT count(DISTINCT run_id), count(*) FROM experiments").fetchone()
    assert steps == [10, 20, 30, 40]
    assert {"grad_norm", "update_ratio", "weight_norm", "activation_std", "dead_units",
            "attention_entropy_bits"} <= kinds
    assert runs[0] == 1 and runs[1] > 0  # the experiments view reads no health file


@pytest.mark.train
def test_health_can_be_turned_off(tmp_path):
    train(tmp_path, "lstm", health_every=0)
    assert not list((tmp_path / "exp").glob("*/health/*.parquet"))


@pytest.mark.train
@pytest.mark.parametrize("arch, named", [("lstm", "saturated gates"), ("gpt", "dead units")])
def test_a_learning_rate_100_times_too_high_is_named(tmp_path, arch, named, capsys):
    """The tiny configs train at 3e-3; at 0.3 the LSTM's gates saturate and the GPT's MLP
    units die. The same run at 3e-3 reports nothing."""
    for lr, folder in ((0.3, "broken"), (3e-3, "healthy")):
        run = train(tmp_path / folder, arch, learning_rate=lr, max_steps=60, health_every=20)
        args = ["--checkpoint", str(run / "runs" / f"tiny-{arch}" / "final"),
                "--data", str(run / "corpus.txt")]
        status = inspect_cli.main(args)
        out = capsys.readouterr().out
        assert "update sizes from training step 60" in out
        if folder == "broken":
            assert status == 1 and " problem" in out, out
            inspect_cli.main(args + ["--json"])
            assert named in json.loads(capsys.readouterr().out)["problem_kinds"]
        else:
            assert status == 0 and "No problems found" in out, out


@pytest.mark.bundled
@pytest.mark.parametrize("name", BUNDLED)
def test_the_bundled_models_are_healthy(name, monkeypatch):
    """Probed on their validation text where ../shared has it, else on text they write."""
    monkeypatch.chdir(ROOT)
    report = inspect_cli.inspect(ROOT / "checkpoints" / name)
    assert report["problems"] == [], report["problems"]
    assert report["layers"] and "tokens of" in report["measured_on"]
    saved = json.loads((ROOT / "checkpoints" / name / "health.json").read_text())
    assert saved["problems"] == []  # what the admin page shows
