"""A training started from the page, with the real training command under a real gunicorn,
when the server stops: stopped with it (no process left behind) and marked stopped when a
server starts again; and when the server is killed outright, stopped by the next one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.gunicorn_server import GunicornServer
from tests.pages.test_browser_train import story_text

pytestmark = [pytest.mark.server, pytest.mark.train, pytest.mark.subprocess]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to read its status has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def start_run(server: GunicornServer, runs: Path, name: str) -> int:
    response = httpx.post(server.url + "/train", timeout=60, data={
        "text": "upload", "preset": "char-gpt", "minutes": "5", "name": name},
        files={"upload": ("story.txt", story_text(20_000).encode())})
    assert response.status_code == 303, response.text
    pid = json.loads((runs / name / "run.json").read_text())["pid"]
    deadline = time.monotonic() + 60
    while not (runs / name / "work" / name / "metrics.jsonl").exists():  # the command is training
        assert time.monotonic() < deadline and alive(pid), (runs / name / "log.txt").read_text()
        time.sleep(0.1)
    return pid


def state_on_page(server: GunicornServer, name: str) -> str:
    page = httpx.get(f"{server.url}/train/{name}", timeout=30).text
    return page.split('id="train-state" class="tag train-state train-', 1)[1].split('"', 1)[0]


def test_a_run_stops_with_the_server_and_a_killed_servers_run_is_stopped_by_the_next(
        checkpoint_dir, tmp_path):
    models, runs = tmp_path / "models", tmp_path / "runs"
    shutil.copytree(checkpoint_dir / "tiny-gpt", models / "tiny-gpt")
    env = {"FABLE_TRAIN_DIR": str(runs), "FABLE_EXPERIMENTS_DIR": str(tmp_path / "experiments"),
           "FABLE_TRAIN_THREADS": "1"}

    with GunicornServer(models, env=env) as server:
        pid = start_run(server, runs, "graceful")
    assert not alive(pid)  # gunicorn's exit stopped it: nothing left behind
    with GunicornServer(models, env=env) as server:
        assert state_on_page(server, "graceful") == "stopped"
        pid = start_run(server, runs, "killed")
        for worker in server.worker_pids():
            os.kill(worker, signal.SIGKILL)
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
        assert alive(pid)  # nobody stopped it: a server killed outright runs no hook
        with GunicornServer(models, env=env) as again:
            assert not alive(pid)  # the next server stopped it as it started
            assert state_on_page(again, "killed") == "stopped"
            assert "did not finish under the last server" in again.log_text()


def test_every_worker_serves_the_model_a_run_wrote(checkpoint_dir, tmp_path):
    """Two workers: the run's end reloads the worker that started it, which tells the other
    (the reload stamp); every answer from either lists the new model."""
    models, runs = tmp_path / "models", tmp_path / "runs"
    shutil.copytree(checkpoint_dir / "tiny-gpt", models / "tiny-gpt")
    env = {"FABLE_TRAIN_DIR": str(runs), "FABLE_EXPERIMENTS_DIR": str(tmp_path / "experiments"),
           "FABLE_TRAIN_THREADS": "1", "FABLE_WORKERS": "2", "FABLE_TORCH_THREADS": "1"}
    with GunicornServer(models, env=env) as server:
        server.wait_for_workers(2, models=1)
        start_run(server, runs, "shared")
        assert httpx.post(f"{server.url}/train/shared/finish", timeout=30).status_code == 303
        deadline = time.monotonic() + 120
        while not (runs / "shared" / "exit.json").exists():
            assert time.monotonic() < deadline, (runs / "shared" / "log.txt").read_text()
            time.sleep(0.2)
        deadline = time.monotonic() + 30
        while True:  # each connection may land on either worker
            seen = [any(m["name"] == "shared" for m in httpx.get(
                f"{server.url}/api/tags", timeout=10).json()["models"]) for _ in range(20)]
            if all(seen):
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.5)
        page = httpx.get(f"{server.url}/train/shared", timeout=30).text
        assert 'class="tag train-state train-done"' in page
        loaded = re.findall(r"\[(\d+)\] \[INFO\] loaded shared \(", server.log_text())
        assert set(loaded) == set(map(str, server.worker_pids())) and len(loaded) == 2
