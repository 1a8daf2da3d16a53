"""Faults: a server told to stop mid-stream, a disk that fills while training saves a
checkpoint, and checkpoints that are broken when the server starts.

    python -m pytest tests/platform/test_faults.py -o addopts="" -q

- SIGTERM to a real gunicorn while a stream is in flight: the stream finishes whole
  (``done: true``), the master exits 0 within ``graceful_timeout``, and the port then
  refuses connections. ``gunicorn.conf.py``'s default ``graceful_timeout`` must cover the
  generation deadline, or a restart would cut streams that are still allowed to run.
- ENOSPC (or a crash) partway through writing a training checkpoint: the previous
  ``last/`` stays byte-identical and loadable, no temporary directory is left, and the
  error the user reads names the path and says the previous checkpoint is intact.
- At start-up, a truncated ``model.safetensors``, a ``config.json`` written by another
  program and an empty directory are each skipped and reported while the rest serve
  (tests/apis/test_ollama_api.py already covers a config.json that is not JSON and a missing or
  empty checkpoint root).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.app_support import ENDLESS_CHAR, wait_until
from tests.gunicorn_server import ROOT, GunicornServer, server_environment
from models_src import checkpoint as checkpoint_module
from models_src.checkpoint import load_checkpoint, save_checkpoint
from tests.training_runs import raw_config, write_config
from training import train as train_module
from training.config import load_config
from training.train import Trainer


# ---- SIGTERM: graceful drain ------------------------------------------------------------

def configured(*cases: tuple[str, dict[str, str]]) -> list:
    """The value gunicorn.conf.py gives each (setting, server environment) case, as
    gunicorn's master reads it: in one fresh interpreter, the file run anew per case."""
    code = ("import json, os, runpy, sys\n"
            "out = []\n"
            "for name, env in json.load(sys.stdin):\n"
            "    os.environ.clear(); os.environ.update(env)\n"
            "    out.append(runpy.run_path('gunicorn.conf.py')[name])\n"
            "print(json.dumps(out))")
    jobs = [(name, server_environment(0, env)) for name, env in cases]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=json.dumps(jobs),
                          env=server_environment(0, {}), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.subprocess
def test_graceful_timeout_covers_the_generation_deadline():
    default, longer, shorter, given = configured(
        ("graceful_timeout", {}), ("graceful_timeout", {"FABLE_REQUEST_TIMEOUT_S": "120"}),
        ("graceful_timeout", {"FABLE_REQUEST_TIMEOUT_S": "2.5"}),
        ("graceful_timeout", {"GUNICORN_GRACEFUL_TIMEOUT": "7"}))
    assert default >= 60  # FABLE_REQUEST_TIMEOUT_S's default
    assert longer >= 120 and shorter >= 2.5
    assert given == 7  # still wins


@pytest.mark.subprocess
def test_gunicorn_reads_the_apps_settings():
    """gunicorn.conf.py takes workers and its thread pool from the app's settings, so each
    default is written once (app/platform/settings.py)."""
    workers, workers_3, workers_2, threads, threads_small, threads_8 = configured(
        ("workers", {}), ("workers", {"WEB_CONCURRENCY": "3"}),
        ("workers", {"WEB_CONCURRENCY": "3", "FABLE_WORKERS": "2"}),
        ("threads", {}), ("threads", {"FABLE_MAX_BATCH": "4", "FABLE_MAX_QUEUE": "6"}),
        ("threads", {"FABLE_THREADS": "8"}))
    assert (workers, workers_3, workers_2) == (1, 3, 2)
    # every decoding row and queued request, and spare threads for the rest (a 503, /healthz)
    assert (threads, threads_small, threads_8) == (16 + 48 + 16, 10 + 16, 8)


def read_stream(url: str, body: dict, lines: list, times: list, failures: list) -> None:
    """POST a streaming request; append each NDJSON object and when it came."""
    try:
        with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    times.append(time.monotonic())
    except Exception as e:  # reported by the test, which runs in another thread
        failures.append(e)


@pytest.mark.server
def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(checkpoint_dir, tmp_path):
    # The endless model streams until its deadline, deadline_s after it starts, and then
    # ends cleanly (done_reason "length"): a stream that lasts a known time, whatever
    # this machine's speed. The SIGTERM comes early in it.
    deadline_s = 6
    env = {"FABLE_REQUEST_TIMEOUT_S": str(deadline_s), "FABLE_MAX_NEW_TOKENS": "1000000",
           "FABLE_TORCH_THREADS": "1"}
    [graceful_timeout] = configured(("graceful_timeout", env))
    assert graceful_timeout >= deadline_s
    server = GunicornServer(checkpoint_dir, env=env, log_path=tmp_path / "server.log").start()
    try:
        lines, times, failures = [], [], []
        reader = threading.Thread(target=read_stream, args=(server.url, {
            "model": "endless", "prompt": "x", "options": {"num_predict": 1_000_000}},
            lines, times, failures))
        reader.start()
        wait_until(lambda: len(lines) >= 3 or failures or not reader.is_alive(), 30)
        assert len(lines) >= 3, failures
        time.sleep(0.5)  # into the stream, well before its deadline
        assert reader.is_alive(), "the stream ended before the SIGTERM"
        signalled = time.monotonic()
        server.terminate()

        reader.join(graceful_timeout + 10)
        assert not reader.is_alive() and not failures, failures
        *pieces, final = lines
        assert final["done"] is True and final["done_reason"] == "length", final
        assert all(p["done"] is False and p["response"] == ENDLESS_CHAR for p in pieces)
        assert final["eval_count"] == len(pieces)  # every token it counted was delivered
        assert sum(t > signalled for t in times) > 1, "nothing was streamed after the SIGTERM"

        status = server.process.wait(graceful_timeout + 10)
        assert status == 0, server.log_text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        log = server.log_text()
        assert "Handling signal: term" in log and "Shutting down: Master" in log
        # drained, not killed at graceful_timeout (gunicorn logs "was sent SIGKILL!" then)
        assert "Worker exiting" in log and "SIGKILL" not in log, log
    finally:
        server.stop()


# ---- a full disk (or a crash) while training writes a checkpoint -------------------------

def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


class FailingWriter:
    """Wraps a file writer (``save_file(tensors, path)``, ``torch.save(obj, path)``): the
    first ``succeed`` calls write normally; the next one writes ``PARTIAL`` bytes of junk
    to its file (as a disk does until it is full) and raises ``error``. Just before, it
    records what ``watched`` held: the checkpoint the failing write must not touch."""
    PARTIAL = 4096

    def __init__(self, real, succeed: int, error: BaseException, watched: Path) -> None:
        self.real, self.succeed, self.error, self.watched = real, succeed, error, watched
        self.calls = 0
        self.before: dict[str, bytes] | None = None

    def __call__(self, obj, path, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.succeed:
            return self.real(obj, path, *args, **kwargs)
        self.before = snapshot(self.watched) if self.watched.exists() else {}
        Path(path).write_bytes(b"\0" * self.PARTIAL)
        raise self.error


def enospc(path: str = "model.safetensors") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def leftovers(run: Path) -> list[str]:
    """save_checkpoint's temporary (.x.tmp-*) and set-aside (.x.old-*) directories."""
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


@pytest.mark.train
@pytest.mark.parametrize("writer,succeed", [
    ("weights", 1),        # the weights of last/ at step 20, after a good save at step 10
    ("trainer state", 1),  # the optimizer state, the last file of last/ at step 20
    ("weights", 0),        # the very first save: there is no previous checkpoint
])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(
        tmp_path, monkeypatch, capsys, writer, succeed):
    # Saves: last/ at steps 10 and 20 (no evaluation before 30, so no best/ to interleave).
    raw = raw_config(tmp_path, max_steps=30, save_every=10, eval_every=1000)
    config = write_config(tmp_path, raw)
    last = tmp_path / "runs" / "tiny-gpt" / "last"
    real = checkpoint_module.save_file if writer == "weights" else torch.save
    failing = FailingWriter(real, succeed, enospc(), watched=last)
    if writer == "weights":
        monkeypatch.setattr(checkpoint_module, "save_file", failing)
    else:
        monkeypatch.setattr(torch, "save", failing)  # the trainer's resume state

    assert train_module.main(["--config", str(config), "--quiet"]) == 1
    monkeypatch.undo()
    error = capsys.readouterr().err
    assert failing.before is not None, "the failing write never happened"
    assert f"could not write the checkpoint {last} at step {10 * (succeed + 1)}" in error
    assert "No space left on device" in error and "Training stopped" in error
    assert leftovers(last.parent) == []  # no temporary directory left behind
    assert not (last.parent / "final").exists()
    if succeed:
        assert "the previous checkpoint there (step 10) is intact" in error
        assert snapshot(last) == failing.before  # byte-identical
        assert load_checkpoint(last).training.step == 10
    else:
        assert "there was no previous checkpoint there" in error
        assert not last.exists()


@pytest.mark.train
def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    # Ctrl-C (or any exception) partway through writing the weights of the second save.
    raw = raw_config(tmp_path, max_steps=30, save_every=10, eval_every=1000)
    last = tmp_path / "runs" / "tiny-gpt" / "last"
    failing = FailingWriter(checkpoint_module.save_file, 1, KeyboardInterrupt(), watched=last)
    monkeypatch.setattr(checkpoint_module, "save_file", failing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(raw=raw), quiet=True).fit()
    monkeypatch.undo()
    assert snapshot(last) == failing.before and load_checkpoint(last).training.step == 10
    assert leftovers(last.parent) == []


def test_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    # The last step of a save renames the new directory into place after moving the old
    # one aside; when that rename fails the old one must come back, not stay hidden.
    from models_src import ModelConfig, build_model
    from models_src.tokenization import Tokenizer

    tokenizer = Tokenizer.train_char(["abc"])
    model = build_model(ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, n_layer=1,
                                    n_embd=16, n_head=2, block_size=8))
    target = save_checkpoint(tmp_path / "m", model, tokenizer, {"step": 1})
    before = snapshot(target)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".m.tmp-"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real_rename(src, dst)
    monkeypatch.setattr(checkpoint_module.os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(target, model, tokenizer, {"step": 2})
    monkeypatch.undo()
    assert snapshot(target) == before and load_checkpoint(target).training.to_dict() == {"step": 1}
    assert leftovers(tmp_path) == []


# ---- broken checkpoints at start-up -----------------------------------------------------

#: A Hugging Face transformers config.json: another program's file under the same name.
FOREIGN_CONFIG = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2,
                  "n_embd": 64, "n_head": 2, "vocab_size": 50257, "transformers_version": "4.57.0"}


def broken_checkpoints(source: Path, directory: Path) -> dict[str, str]:
    """``directory`` with the good tiny-gpt and one broken checkpoint per way of breaking;
    returns each broken name -> what its reported reason must say."""
    shutil.copytree(source / "tiny-gpt", directory / "tiny-gpt")
    expected = {}
    weights = (source / "tiny-gpt" / "model.safetensors").read_bytes()
    for name, size in (("truncated-half", len(weights) // 2), ("truncated-header", 5),
                       ("zero-bytes", 0)):
        shutil.copytree(source / "tiny-gpt", directory / name)
        (directory / name / "model.safetensors").write_bytes(weights[:size])
        expected[name] = "model.safetensors: weights are corrupt or truncated"
    foreign = directory / "hf-gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps(FOREIGN_CONFIG))
    (foreign / "model.safetensors").write_bytes(weights)
    # a GPT-2 directory goes to the importer, which names what it lacks
    expected["hf-gpt2"] = "no tokenizer files: a GPT-2-format directory needs tokenizer.json"
    (directory / "empty").mkdir()
    expected["empty"] = "not a checkpoint (no config.json)"
    return expected


def test_broken_checkpoints_at_start_up_are_skipped_and_reported(checkpoint_dir, tmp_path,
                                                                  make_app, caplog):
    directory = tmp_path / "checkpoints"
    expected = broken_checkpoints(checkpoint_dir, directory)
    with caplog.at_level("WARNING", logger="app.serving.registry"):
        client = make_app(FABLE_CHECKPOINT_DIR=str(directory)).test_client()

    assert [m["name"] for m in client.get("/api/tags").json["models"]] == ["tiny-gpt"]
    errors = client.get("/api/models").json["errors"]
    assert sorted(errors) == sorted(expected)
    for name, reason in expected.items():
        assert reason in errors[name], (name, errors[name])
        assert str(directory) not in errors[name]  # no server paths in what clients see
        assert f"skipping checkpoint {name}: " in caplog.text  # in the server's log too
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json["errors"] == len(expected)
    served = client.post("/api/generate", json={"model": "tiny-gpt", "prompt": "Once",
                                                "stream": False, "options": {"num_predict": 5}})
    assert served.status_code == 200 and served.json["done"] is True
    for name in expected:
        refused = client.post("/api/generate", json={"model": name, "prompt": "x", "stream": False})
        assert refused.status_code == 404 and "not found" in refused.json["error"]


def test_a_writer_killed_between_the_renames_loses_nothing(tmp_path):
    """kill -9 after the old checkpoint was set aside and before the new one took its
    place: the next read puts the old one back, the next save clears the leftovers."""
    from tests.app_support import build_checkpoints

    source = build_checkpoints(tmp_path / "source") / "tiny-gpt"
    runs = tmp_path / "run"
    runs.mkdir()
    shutil.copytree(source, runs / ".last.old-1a2b3c4d")  # what the kill leaves behind
    (runs / ".last.tmp-zz").mkdir()
    (runs / ".last.tmp-zz" / "model.safetensors").write_bytes(b"half a file")
    loaded = load_checkpoint(runs / "last")
    assert (runs / "last" / "config.json").exists()
    assert not list(runs.glob(".last.old-*"))
    save_checkpoint(runs / "last", loaded.model, loaded.tokenizer, {"step": 2})
    assert sorted(p.name for p in runs.iterdir()) == ["last"]
