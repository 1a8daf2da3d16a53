"""Training end to end on generated text: checkpoints, experiment rows, exact resume
after SIGKILL, torchrun, early stopping, a non-finite loss, evaluation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from models_src.checkpoint import load_checkpoint
from models_src.rnn import RecurrentState
from training import train as train_module
from training.config import ConfigError, load_config
from training.data import DataConfig, TokenizerConfig
from training.evaluate import evaluate
from models_src.records import query
from training.state import TrainState
from training.train import Trainer, TrainingError
from tests.training_runs import make_corpus, raw_config, write_config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.train  # every test here runs the trainer


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_tiny_run_writes_checkpoints_and_experiment_rows(tmp_path, arch):
    cfg = load_config(raw=raw_config(tmp_path, arch))
    summary = Trainer(cfg, quiet=True).fit()
    assert summary.finished and summary.step == 30
    assert summary.val_loss < math.log(summary.vocab_size)  # learned something
    run = tmp_path / "runs" / f"tiny-{arch}"
    for which in ("last", "best", "final"):
        loaded = load_checkpoint(run / which)
        assert loaded.config.arch == arch
    final = load_checkpoint(run / "final")
    assert final.training.to_dict() == json.loads(json.dumps(summary.to_dict()))  # all of it, as it was written
    assert final.training.val_perplexity == pytest.approx(math.exp(final.training.val_loss))
    assert final.training.bits_per_char > 0
    rows = query(tmp_path / "exp", "SELECT step, kind, val_loss, architecture FROM experiments ORDER BY step, kind")
    assert [(r["step"], r["kind"]) for r in rows] == [(10, "train_eval"), (20, "train_eval"),
                                                      (30, "final"), (30, "train_eval")]
    assert all(r["architecture"] == arch for r in rows)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_publish_writes_a_float16_copy_for_the_app(tmp_path):
    raw = raw_config(tmp_path, max_steps=3, eval_every=3)
    raw["output"]["publish"] = str(tmp_path / "checkpoints" / "{name}")
    Trainer(load_config(raw=raw), quiet=True).fit()
    published = load_checkpoint(tmp_path / "checkpoints/tiny-gpt")
    assert json.loads((tmp_path / "checkpoints/tiny-gpt/config.json").read_text())["dtype"] == "float16"
    assert published.training.finished and published.training.val_perplexity > 1


def test_cli_overrides_and_clear_errors(tmp_path, capsys):
    path = write_config(tmp_path, raw_config(tmp_path))
    assert train_module.main(["--config", str(path), "--quiet", "training.max_steps=5",
                              "training.eval_every=5", "model.n_layer=1"]) == 0
    assert load_checkpoint(tmp_path / "runs/tiny-gpt/final").config.n_layer == 1
    assert train_module.main(["--config", str(path), "training.nonsense=1"]) == 2
    assert "unknown keys nonsense" in capsys.readouterr().err
    assert train_module.main(["--config", str(path), "training.learning_rate=fast"]) == 2
    assert "training.learning_rate must be a number, not 'fast'" in capsys.readouterr().err
    # YAML 1.1 would read 2e-3 (no dot) as a string; configs and overrides mean the float
    assert load_config(path, ["training.learning_rate=2e-3"]).training.learning_rate == 0.002
    path.write_text(path.read_text().replace("learning_rate:", "learning_rate: 5E-4 #"))
    assert load_config(path).training.learning_rate == 0.0005
    path = write_config(tmp_path, raw_config(tmp_path))
    assert train_module.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_module.main(["--config", str(path), "data.path=" + str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_config_sections_are_typed_and_unknown_keys_named_as_before(tmp_path, capsys):
    raw = raw_config(tmp_path)
    cfg = load_config(raw=raw)
    assert isinstance(cfg.data, DataConfig) and cfg.data.max_seq_len == 32 and cfg.data.task == "lm"
    assert isinstance(cfg.tokenizer, TokenizerConfig) and cfg.tokenizer.kind == "char"
    assert cfg.model.arch == "gpt" and cfg.model.options["n_layer"] == 2
    recorded = cfg.to_dict()  # what checkpoints and experiment rows keep
    assert recorded["model"] == raw["model"] and recorded["tokenizer"] == raw["tokenizer"]
    assert recorded["data"]["max_seq_len"] == 32 and DataConfig.from_dict(recorded["data"]) == cfg.data
    with pytest.raises(ConfigError, match=r"^unknown data config keys: nonsense$"):
        load_config(raw=raw, overrides=["data.nonsense=1"])
    with pytest.raises(ConfigError, match=r"^tokenizer: kind 'char' has no option\(s\) vocab_size"):
        load_config(raw=raw, overrides=["tokenizer.vocab_size=10"])
    with pytest.raises(ConfigError,
                       match=r"^model: unknown keys nonsense, vocab_size \(known: activation, arch, bias,"):
        load_config(raw=raw, overrides=["model.nonsense=1", "model.vocab_size=10"])
    path = write_config(tmp_path, raw)
    assert train_module.main(["--config", str(path), "data.nonsense=1"]) == 2
    assert capsys.readouterr().err == "error: unknown data config keys: nonsense\n"
    assert train_module.main(["--config", str(path), "model.arch=transformerxl"]) == 2
    assert "error: model: unknown architecture 'transformerxl'" in capsys.readouterr().err


def test_corpus_too_short_for_one_batch_names_the_file(tmp_path, capsys):
    raw = raw_config(tmp_path)
    (tmp_path / "short.txt").write_text("Too short.")
    raw["data"]["path"] = str(tmp_path / "short.txt")
    assert train_module.main(["--config", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "short.txt" in err and "too short for one batch" in err


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "training/configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.arch in ("rnn", "gru", "lstm", "gpt", "seq2seq"), path
    with pytest.raises(ConfigError, match="preset"):
        load_config(configs[0], ["model.preset=gigantic"])


def test_presets_fill_sizes_and_config_keys_win(tmp_path):
    raw = raw_config(tmp_path)
    raw["model"] = {"arch": "gpt", "preset": "nano", "n_layer": 3}
    cfg = load_config(raw=raw)
    assert cfg.model.to_dict() == {"arch": "gpt", "n_layer": 3, "n_head": 2, "n_embd": 64, "block_size": 128}


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(load_config(raw=raw_config(tmp_path, save_every=5)), quiet=True)
    real_forward = trainer.forward

    def forward(x, y):
        loss = real_forward(x, y)
        return loss * float("nan") if trainer.state.step >= 7 else loss
    monkeypatch.setattr(trainer, "forward", forward)
    with pytest.raises(TrainingError, match=r"loss became nan at step 8.*last"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "runs/tiny-gpt/last")
    assert last.training.step == 5 and all(torch.isfinite(p).all() for p in last.model.parameters())


def test_early_stopping(tmp_path, monkeypatch):
    trainer = Trainer(load_config(raw=raw_config(tmp_path, max_steps=100, early_stopping_patience=2,
                                                 eval_every=5)), quiet=True)
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda n: {**real(1), "loss": next(losses)} if n else real(n))
    summary = trainer.fit()
    assert summary.step == 20  # evals at 5, 10 (best), 15, 20: two without improvement
    assert summary.best_val_loss == 2.0


def same(a, b) -> bool:
    """Deep equality of what a TrainState holds: tensors, containers, optimizers, generators."""
    if isinstance(a, torch.Generator):
        return torch.equal(a.get_state(), b.get_state())
    if hasattr(a, "state_dict"):
        return same(a.state_dict(), b.state_dict())
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, RecurrentState):
        return isinstance(b, RecurrentState) and same(a.layers, b.layers)
    return a == b


def test_train_state_is_saved_and_restored_whole(tmp_path):
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return model, TrainState(optimizer, torch.Generator().manual_seed(1), plateau)

    model, state = fresh()
    model(torch.randn(2, 4)).sum().backward()
    state.optimizer.step()
    state.plateau.step(1.0), state.plateau.step(2.0)  # the second lowers the learning rate
    torch.randint(10, (5,), generator=state.generator)
    state.step, state.window = 7, 3
    state.hidden = RecurrentState([(torch.randn(1, 2, 3), torch.randn(1, 2, 3))])
    state.best_val, state.bad_evals, state.train_time, state.loop_time = 1.5, 2, 12.5, 20.0
    state.last_train_loss, state.run_id = 1.25, "20261203-101010-abcdef"
    _, restored = fresh()
    # Every field differs from a fresh state's (a field added to TrainState must be set above),
    for f in fields(TrainState):
        assert not same(getattr(state, f.name), getattr(restored, f.name)), f.name
    state.save(tmp_path / "trainer_state.pt")
    rng = torch.get_rng_state()
    torch.rand(3)  # the global generator (dropout) moves on after the save
    restored.load(tmp_path / "trainer_state.pt", torch.device("cpu"))
    # and every field comes back: the loop's clock with the seconds it had run at the save.
    assert 20.0 <= restored.loop_time < 80.0
    restored.loop_time = state.loop_time
    for f in fields(TrainState):
        assert same(getattr(state, f.name), getattr(restored, f.name)), f.name
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(torch.randint(10**6, (8,), generator=state.generator),
                       torch.randint(10**6, (8,), generator=restored.generator))
    # On a GPU the recurrent state goes to the device; random generator states stay on the
    # CPU, as set_state needs them ("meta" stands in for a device this machine may not have).
    _, on_device = fresh()
    on_device.load(tmp_path / "trainer_state.pt", torch.device("meta"))
    assert all(t.device.type == "meta" for t in on_device.hidden[0])
    saved = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert torch.equal(on_device.generator.get_state(), saved["generator"]) and on_device.step == 7


def interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C inside the loop: the ``call``-th batch is drawn, then KeyboardInterrupt."""
    real, calls = Trainer.next_batch, [0]

    def next_batch(self):
        batch = real(self)
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return batch
    monkeypatch.setattr(Trainer, "next_batch", next_batch)


@pytest.mark.parametrize("arch, optimizer", [("gpt", "adamw"), ("lstm", "adamw"), ("gpt", "muon")])
def test_ctrl_c_saves_last_and_final_and_resume_ends_as_the_uninterrupted_run(
        tmp_path, monkeypatch, capsys, arch, optimizer):
    raw = raw_config(tmp_path, arch, max_steps=30, grad_accum=2, optimizer=optimizer)
    raw["model"]["dropout"] = 0.1  # the global RNG too must be put back
    uninterrupted = Trainer(load_config(raw=raw), quiet=True).fit()
    [first] = query(tmp_path / "exp", "SELECT DISTINCT run_id FROM experiments")
    raw["output"]["dir"] = str(tmp_path / "interrupted" / "{name}")
    config = write_config(tmp_path, raw)
    run = tmp_path / "interrupted" / f"tiny-{arch}"
    # In the second micro-batch of step 3: the first one has moved the batches, the recurrent
    # state, dropout's generator and the gradients on; Ctrl-C must put all of that back.
    interrupt_at(monkeypatch, 6)
    assert train_module.main(["--config", str(config), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err == f"interrupted at step 2: saved {run / 'last'} and {run / 'final'} (--resume continues the run)\n"
    last, final = load_checkpoint(run / "last").training, load_checkpoint(run / "final").training
    assert last.step == final.step == 2 and not final.finished
    assert final.val_loss == last.val_loss and final.bits_per_char > 0  # evaluated
    assert (run / "last" / "trainer_state.pt").is_file() and (run / "loss.png").is_file()
    run_rows = "SELECT step, kind FROM experiments WHERE run_id != ? ORDER BY step, kind"
    assert [(r["step"], r["kind"]) for r in query(tmp_path / "exp", run_rows, [first["run_id"]])] == [
        (2, "final")]
    monkeypatch.undo()
    assert train_module.main(["--config", str(config), "--quiet", "--resume"]) == 0
    resumed = load_checkpoint(run / "final").training
    assert resumed.step == 30 and resumed.finished
    assert abs(resumed.val_loss - uninterrupted.val_loss) < 1e-6
    assert [(r["step"], r["kind"]) for r in query(tmp_path / "exp", run_rows, [first["run_id"]])] == [
        (2, "final"), (10, "train_eval"), (20, "train_eval"), (30, "final"), (30, "train_eval")]


def test_muon_takes_the_hidden_matrices_and_adamw_the_embedding_head_and_vectors(tmp_path):
    from training.optimizers import Paired
    trainer = Trainer(load_config(raw=raw_config(tmp_path, optimizer="muon")), quiet=True)
    muon, adamw = trainer.optimizer.optimizers
    assert isinstance(trainer.optimizer, Paired) and isinstance(muon, torch.optim.Muon)
    model = trainer.model
    named = {id(p): n for n, p in model.named_parameters()}
    on_muon = {named[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {named[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert not on_muon & on_adamw and on_muon | on_adamw == set(named.values())
    assert "wte.weight" in on_adamw and "wpe.weight" in on_adamw  # the head is tied to wte
    assert "blocks.0.attn.c_attn.weight" in on_muon and "blocks.0.ln_1.weight" in on_adamw
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    summary = trainer.fit()
    assert summary.val_loss < math.log(summary.vocab_size)


def test_resuming_with_another_optimizer_is_refused(tmp_path):
    raw = raw_config(tmp_path, max_steps=4, save_every=2, eval_every=2)
    Trainer(load_config(raw=raw), quiet=True).fit()
    raw["training"].update(optimizer="muon", max_steps=8)
    with pytest.raises(TrainingError, match="optimizer"):
        Trainer(load_config(raw=raw), quiet=True).fit(resume=True)


def test_optimizer_must_be_known_and_muon_has_no_plateau_schedule(tmp_path):
    with pytest.raises(ConfigError, match="training.optimizer must be one of adamw, muon"):
        load_config(raw=raw_config(tmp_path, optimizer="sgd"))
    with pytest.raises(ConfigError, match="plateau needs training.optimizer adamw"):
        load_config(raw=raw_config(tmp_path, optimizer="muon", schedule="plateau"))


def test_a_sweep_names_each_run_after_what_it_varies():
    from training.sweep import label
    assert label(["training.optimizer=muon", "model.dropout=0.2"]) == "optimizer=muon_dropout=0.2"
    assert label(["model.arch=gpt"]) == "arch=gpt"  # a string, with no YAML end marker or newline


def test_ctrl_c_ends_a_sweep(tmp_path, monkeypatch, capsys):
    from training import sweep
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, raw_config(tmp_path))
    interrupt_at(monkeypatch, 3)
    assert sweep.main(["--config", str(path), "--vary", "model.arch=gpt,lstm"]) == 130
    assert "interrupted at step 2: saved runs/tiny-gpt-sweep/arch=gpt/last" in capsys.readouterr().err
    assert not (tmp_path / "runs/tiny-gpt-sweep/arch=lstm").exists()  # the sweep went no further


def run_cli(config: Path, *extra: str, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "training.train", "--config", str(config), "--quiet",
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            **kwargs)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path, arch):
    raw = raw_config(tmp_path, arch, max_steps=80, save_every=10, eval_every=20)
    raw["model"].update(n_embd=64, dropout=0.1)  # dropout: the RNG state must resume too
    uninterrupted = Trainer(load_config(raw=raw), quiet=True).fit()

    raw["output"]["dir"] = str(tmp_path / "killed" / "{name}")
    config = write_config(tmp_path, raw)
    last = tmp_path / "killed" / f"tiny-{arch}" / "last"
    proc = run_cli(config)
    deadline = time.monotonic() + 120
    while not (last / "trainer_state.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last).training.step  # whole, never half-written
    assert 0 < killed_at < 80 and not (last.parent / "final").exists()

    resumed = run_cli(config, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    final = load_checkpoint(last.parent / "final").training
    assert final.step == 80
    assert abs(final.val_loss - uninterrupted.val_loss) < 1e-6
    rows = query(tmp_path / "exp", "SELECT DISTINCT run_id FROM experiments WHERE kind = 'final'")
    assert len(rows) == 2  # the uninterrupted run and the killed-then-resumed one


def test_sigint_finishes_the_command_even_when_it_started_with_sigint_ignored(tmp_path):
    """The training page's "Finish now" is SIGINT to the command; a server started as a
    background job (``nohup gunicorn ... &``) hands its children SIGINT ignored, and Python
    would leave it so: the command takes Ctrl-C back, saves last and final, and says 130."""
    raw = raw_config(tmp_path, max_steps=100_000, save_every=5, eval_every=100_000)
    config = write_config(tmp_path, raw)
    last = tmp_path / "runs" / "tiny-gpt" / "last"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$0" "$@"', sys.executable, "-m",
                             "training.train", "--config", str(config), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (last / "trainer_state.pt").exists():  # in the loop, its Ctrl-C handler in place
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a command that ignored the signal would train on after the test
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "interrupted at step" in err.decode()
    assert load_checkpoint(last.parent / "final").training.step > 0


def test_torchrun_two_processes_on_cpu(tmp_path):
    config = write_config(tmp_path, raw_config(tmp_path, max_steps=6, eval_every=3, save_every=3))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "training.train", "--config", str(config),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    final = load_checkpoint(tmp_path / "runs/tiny-gpt/final")
    assert final.training.hardware.startswith("2 x ")
    assert final.training.tokens_seen == 6 * 8 * 32 * 2
    runs = query(tmp_path / "exp", "SELECT count(DISTINCT run_id) AS n FROM experiments")
    assert runs[0]["n"] == 1  # only rank 0 records


def test_evaluate_scores_every_token_and_records_a_row(tmp_path):
    Trainer(load_config(raw=raw_config(tmp_path)), quiet=True).fit()
    ckpt = tmp_path / "runs/tiny-gpt/final"
    held_out = make_corpus(tmp_path / "held_out.txt", sentences=200, seed=1)
    full = evaluate(str(ckpt), str(held_out), "all", experiments_dir=str(tmp_path / "exp"), samples=1)
    text_len = len(held_out.read_text())
    assert full["tokens"] == text_len  # every character, plus eos, minus the first
    strided = evaluate(str(ckpt), str(held_out), "all", stride=8, experiments_dir=None, samples=0)
    assert strided["tokens"] == full["tokens"] and strided["loss"] < full["loss"] + 0.05
    assert full["bits_per_char"] == pytest.approx(full["loss"] * full["tokens"] / math.log(2) / text_len)
    assert len(full["samples"]) == 1
    rows = query(tmp_path / "exp", "SELECT split, kind FROM experiments WHERE kind = 'evaluate'")
    assert rows == [{"split": "all", "kind": "evaluate"}]


def test_sweep_compares_architectures_in_one_table(tmp_path, monkeypatch, capsys):
    from training import sweep
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, raw_config(tmp_path))
    assert sweep.main(["--config", str(path), "--vary", "model.arch=gpt,lstm", "training.max_steps=4",
                       "training.eval_every=4"]) == 0
    table = capsys.readouterr().out
    assert "arch=gpt" in table and "arch=lstm" in table and "val_perplexity" in table
    rows = query(tmp_path / "exp", "SELECT DISTINCT model, architecture FROM experiments ORDER BY 1")
    assert rows == [{"model": "arch=gpt", "architecture": "gpt"}, {"model": "arch=lstm", "architecture": "lstm"}]
    assert (tmp_path / "runs/tiny-gpt-sweep/arch=lstm/final/model.safetensors").is_file()
    assert (tmp_path / "runs/tiny-gpt-sweep/arch=lstm/loss.png").is_file()


def test_a_compiled_models_checkpoint_loads_into_a_plain_one(tmp_path):
    from models_src import ModelConfig, build_model
    from models_src.checkpoint import save_checkpoint
    from models_src.tokenization import Tokenizer
    tok = Tokenizer.train_char(["abc"])
    model = build_model(ModelConfig(arch="gpt", vocab_size=tok.vocab_size, n_layer=1, n_embd=16, n_head=2,
                                    block_size=8))
    save_checkpoint(tmp_path / "c", torch.compile(model), tok)
    loaded = load_checkpoint(tmp_path / "c").model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_time_budget_ends_the_run_and_the_schedule(tmp_path, monkeypatch):
    """The budget is the loop's clock (training.state's), here one that moves 0.1 s each
    time it is read: the run ends on it after a number of steps no machine's speed changes."""
    from types import SimpleNamespace

    from training import state

    ticks = iter(range(10**6))
    monkeypatch.setattr(state, "time", SimpleNamespace(perf_counter=lambda: next(ticks) / 10))
    raw = raw_config(tmp_path, max_time_s=2.0, eval_every=10**6)
    del raw["training"]["max_steps"]
    summary = Trainer(load_config(raw=raw), quiet=True).fit()
    assert 5 < summary.step < 20
    assert load_checkpoint(tmp_path / "runs/tiny-gpt/final").training.finished


def test_a_time_budget_reads_the_clock_every_rank_agrees_on(tmp_path, monkeypatch):
    """Under torchrun each rank has its own clock; the budget's end and its learning rate
    follow rank 0's (``Distributed.agree``), so no rank stops alone (leaving the others in
    DDP's all-reduce) and all take the same steps. Here the agreed clock runs 100 s ahead
    of this process's own: the run ends after its first step, and that step's learning
    rate is the one 100 s into a 200 s cosine budget."""
    agreed: list[float] = []

    def rank_zeros_clock(self, value):
        agreed.append(value + 100.0)
        return agreed[-1]

    monkeypatch.setattr(train_module.Distributed, "agree", rank_zeros_clock)
    raw = raw_config(tmp_path, max_time_s=200.0, eval_every=10**6, schedule="cosine",
                     warmup_steps=0)
    del raw["training"]["max_steps"]
    trainer = Trainer(load_config(raw=raw), quiet=True)
    lrs: list[float] = []
    real_step = trainer._step

    def step(elapsed=0.0):
        real_step(elapsed)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        if len(lrs) == 1:  # from the next reading on, rank 0 is past the budget
            monkeypatch.setattr(train_module.Distributed, "agree", lambda self, value: value + 500.0)
    trainer._step = step
    summary = trainer.fit()
    assert summary.step == 1 and len(agreed) == 1
    t = trainer.t
    halfway = t.min_lr + 0.5 * (1 + math.cos(math.pi * agreed[0] / 200.0)) * (t.learning_rate - t.min_lr)
    assert lrs == [pytest.approx(halfway)]


def test_preset_recommendation_follows_the_machine(capsys):
    from training import presets
    assert presets.recommend({"cores": 2, "ram_gb": 16, "gpu": None, "gpu_gb": 0})[0] == "micro"
    assert presets.recommend({"cores": 32, "ram_gb": 64, "gpu": None, "gpu_gb": 0})[0] == "small"
    assert presets.recommend({"cores": 8, "ram_gb": 64, "gpu": "A100", "gpu_gb": 80})[0] == "large"
    assert presets.recommend({"cores": 8, "ram_gb": 64, "gpu": "T4", "gpu_gb": 16})[0] == "medium"
    assert presets.main(["--arch", "lstm"]) == 0
    out = capsys.readouterr().out
    assert "recommended: model.preset=" in out and "medium" in out and "M parameters" in out


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_score_documents_reads_each_document_from_a_fresh_start(arch):
    from models_src import ModelConfig, build_model
    from training.metrics import score_documents

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, vocab_size=11, n_layer=1, n_head=2, n_embd=16,
                                    n_hidden=16, block_size=16))
    docs = [np.array([1, *rng_ids, 2]) for rng_ids in ([3, 4, 5], list(range(3, 11)) * 5)]  # 5 and 42 ids
    scores = score_documents(model, docs, seq_len=16, stride=8)
    assert scores.tokens == sum(len(d) - 1 for d in docs)  # every id after <bos>, a long one in windows
    short = torch.tensor(docs[0])[None]
    with torch.no_grad():
        logits = model.eval()(short[:, :-1])[0]
    alone = torch.nn.functional.cross_entropy(logits[0], short[0, 1:], reduction="sum").item()
    first = score_documents(model, docs[:1], seq_len=16)
    assert first.nll == pytest.approx(alone, rel=1e-5)  # from position 0 / a fresh state


THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
                    reason="the kernel does not give huge pages on request (madvise)")
@pytest.mark.parametrize("setting, huge", [(None, True), ("0", False)])
def test_training_puts_large_tensors_on_huge_pages_unless_told_not_to(setting, huge):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    script = ("import re, training, torch\n"
              "x = torch.ones(4096, 4096)\n"  # 64 MB, every page touched
              "smaps = open('/proc/self/smaps').read()\n"
              "print(sum(int(kb) for kb in re.findall(r'AnonHugePages:\\s+(\\d+) kB', smaps)))\n")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert (int(out.stdout) >= 32 * 1024) == huge, out.stdout


def test_a_run_records_the_command_that_trains_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: r\nmodel: {arch: gpt}\ndata: {path: x.txt}\ntraining: {max_steps: 5}\n")
    cfg = load_config(path, ["training.max_steps=7", "name=a b"])
    assert cfg.command == f"python -m training.train --config {path} training.max_steps=7 'name=a b'"
    assert load_config(raw={"name": "r", "model": {"arch": "gpt"}, "data": {"path": "x"},
                            "training": {"max_steps": 1}}).command is None
