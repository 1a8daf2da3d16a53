"""Trainings started from the training page: one at a time, each the training command
(``python -m training.train --preset ...``) in its own process, so the app imports no
training code and a training that fails cannot take a worker with it.

Everything is on disk under ``FABLE_TRAIN_DIR``, so any worker, and a restarted server,
finds a run again:

    <train dir>/.lock              held (flock) by the running training for its whole life
    <train dir>/<name>/run.json    what was asked and the process id, written once
    <train dir>/<name>/text.txt    an uploaded text
    <train dir>/<name>/log.txt     the training's output
    <train dir>/<name>/work/<name>/  its run folder (named as the model, as the records say):
                                   metrics.jsonl (curves, samples), checkpoints
    <train dir>/<name>/cancel      made by Cancel (stop, keep nothing)
    <train dir>/<name>/finish      made by Finish now (stop, keep the model as it is)
    <train dir>/<name>/exit.json   how it ended, written once

The lock is taken by the worker that starts a run and handed to the training process as an
inherited descriptor, so it is held exactly while that process lives: a second start, in
any worker, fails to take it. A run's state is read from these files, never kept in memory.
gunicorn's master stops a running training when the server stops and settles whatever an
earlier server left (``stop_running``, ``settle``; gunicorn.conf.py).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".lock"
RUN, TEXT, LOG, WORK, EXIT = "run.json", "text.txt", "log.txt", "work", "exit.json"
CANCEL, FINISH = "cancel", "finish"
METRICS = "metrics.jsonl"  # what the training's jsonl logger writes in its run folder
#: The folder name of a model (as training.train checks it): no hidden or nested folders.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NICE = 10  # serving keeps its priority over a training beside it
STOP_WAIT_S = 5.0  # a training asked to stop gets this long before SIGKILL
CHECK_TIMEOUT_S = 120.0
MIN_MINUTES, MAX_MINUTES = 1, 30

#: The presets the page offers: training.config.RECIPES' names, with the page's words.
PRESETS = {
    "char-gpt": "Character GPT (4 layers × 128, 128-character context)",
    "char-lstm": "Character LSTM",
    "bpe-gpt": "BPE GPT (a 2,048-token tokenizer trained on the text)",
}
#: How often a run evaluates (10 batches) and writes a sample (every other evaluation):
#: every 20 steps a budgeted minute, at most every 200, so that the first minute of any
#: run draws a curve and a long one spends a few per cent of its time on it.
EVAL_STEPS_A_MINUTE, MAX_EVAL_EVERY, EVAL_BATCHES, SAMPLE_EVERY = 20, 200, 10, 2


class RunRefused(Exception):
    """A run that cannot start; the message says why, in the page's words.
    ``field``: the form field at fault (None: the whole form)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class RunStatus:
    name: str
    state: str  # running | done | failed | cancelled | stopped
    asked: dict  # run.json
    message: str | None = None  # why it failed or stopped
    ended: float | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def started(self) -> float:
        return self.asked.get("started", 0.0)


# ---- the lock ---------------------------------------------------------------------------

def _open_lock(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _try_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def running_name(root: Path) -> str | None:
    """The run whose training holds the lock now, or None. (A probe holds the lock for a
    moment: ``start`` tries again for a little while rather than take that for a run.)"""
    if not (root / LOCK).exists():
        return None
    fd = _open_lock(root)
    try:
        if _try_lock(fd, fcntl.LOCK_SH):
            return None
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or None
    finally:
        os.close(fd)  # also drops a probe's shared lock


def _take_lock(root: Path, wait_s: float = 0.5) -> int | None:
    fd = _open_lock(root)
    deadline = time.monotonic() + wait_s
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            os.close(fd)
            return None
        time.sleep(0.02)
    return fd


# ---- files --------------------------------------------------------------------------------

def _write_once(path: Path, value: dict) -> None:
    """A JSON file made whole or not at all (a reader never sees half of it)."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value))
    os.replace(part, path)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def folder_bytes(path: Path) -> int:
    total = 0
    for place, _, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(place, file)).st_size
            except OSError:
                pass
    return total


def log_error(path: Path) -> str | None:
    """The training command's own explanation of a failure: its last ``error: ...`` line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    errors = [line[len("error: "):] for line in tail.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else None


# ---- the runs -------------------------------------------------------------------------------

class TrainingRuns:
    """The training page's runs in ``root``; their models are published to ``models``
    (the app's checkpoint folder) and their records go to ``experiments``."""

    def __init__(self, root: Path, models: Path, experiments: Path, *, threads: int,
                 quota_bytes: int, python: str = sys.executable) -> None:
        self.root, self.models, self.experiments = Path(root), Path(models), Path(experiments)
        self.threads, self.quota_bytes, self.python = threads, quota_bytes, python

    # -- reading ---------------------------------------------------------------------------

    def folder(self, name: str) -> Path:
        if not NAME.fullmatch(name):
            raise KeyError(name)
        return self.root / name

    def status(self, name: str) -> RunStatus | None:
        try:
            folder = self.folder(name)
        except KeyError:
            return None
        asked = _read(folder / RUN)
        if asked is None:
            return None
        ended = _read(folder / EXIT)
        cancelled = (folder / CANCEL).exists()
        if ended is None:
            if running_name(self.root) == name:
                return RunStatus(name, "running", asked)
            # its process ended with nobody to record it: a server that stopped meanwhile
            ended = {"returncode": None, "time": None}
        code, when = ended.get("returncode"), ended.get("time")
        finished_early = (folder / FINISH).exists()
        if self.published(name):  # however it ended (or nobody watched it end): a model
            return RunStatus(name, "done", asked, "Finished early, as asked."
                             if finished_early and code != 0 else None, when)
        if finished_early and not cancelled:
            return RunStatus(name, "cancelled", asked, "Stopped before its first step: "
                             "there was no model to keep.", when)
        if code == 0:
            return RunStatus(name, "failed", asked, "The training ended, but its model was "
                             "not written (the log says why).", when)
        if cancelled:
            return RunStatus(name, "cancelled", asked, "Cancelled.", when)
        if code is None or ended.get("stopped"):
            return RunStatus(name, "stopped", asked, "The server stopped while this run "
                             "trained; it did not finish.", when)
        reason = log_error(folder / LOG) or f"The training stopped with exit code {code}."
        return RunStatus(name, "failed", asked, reason, when)

    def all(self) -> list[RunStatus]:
        """Every run, newest first."""
        if not self.root.is_dir():
            return []
        runs = [self.status(p.name) for p in self.root.iterdir() if p.is_dir()]
        return sorted((r for r in runs if r), key=lambda r: r.started, reverse=True)

    def published(self, name: str) -> bool:
        """Its model is served: weights, config and model card in the checkpoint folder."""
        folder = self.models / name
        return (folder / "config.json").is_file() and (folder / "README.md").is_file()

    def metrics_path(self, name: str) -> Path:
        return self.work(name) / METRICS

    def work(self, name: str) -> Path:
        """The training's own run folder (``output.dir``)."""
        return self.folder(name) / WORK / name

    def log_path(self, name: str) -> Path:
        return self.folder(name) / LOG

    def used_bytes(self) -> int:
        """What the page's runs and their published models take on disk."""
        if not self.root.is_dir():
            return 0
        total = 0
        for run in self.root.iterdir():
            if run.is_dir() and (run / RUN).is_file():
                total += folder_bytes(run)
                if self.published(run.name):
                    total += folder_bytes(self.models / run.name)
        return total

    # -- starting ----------------------------------------------------------------------------

    def check_name(self, name: str) -> None:
        if not NAME.fullmatch(name):
            raise RunRefused("Use up to 64 letters, digits, '.', '_' or '-', starting with a "
                             "letter or digit.", "name")
        if os.path.lexists(self.models / name):
            raise RunRefused(f"A model named {name} is already served; choose another name.",
                             "name")
        if os.path.lexists(self.root / name):
            raise RunRefused(f"A run named {name} exists already; choose another name.", "name")

    def refusals(self, name: str, preset: str, minutes: int) -> list[RunRefused]:
        """What is wrong with a run's name, preset and budget, field by field."""
        found = []
        if preset not in PRESETS:
            found.append(RunRefused(f"Choose one of the presets ({', '.join(PRESETS)}).", "preset"))
        if not MIN_MINUTES <= minutes <= MAX_MINUTES:
            found.append(RunRefused(f"Give {MIN_MINUTES} to {MAX_MINUTES} minutes.", "minutes"))
        try:
            self.check_name(name)
        except RunRefused as e:
            found.append(e)
        return found

    def command(self, name: str, preset: str, minutes: int, data: Path | None,
                corpus: str | None, *, check: bool = False) -> list[str]:
        """The training command of a run (``check``: only check the config and the text)."""
        source = ["--data", str(data)] if data is not None else ["--corpus", str(corpus)]
        command = [self.python, "-m", "training.train", "--preset", preset, *source,
                   "--name", name, "--checkpoint-dir", str(self.models), "--minutes", str(minutes),
                   "--quiet",
                   f"output.dir={self.work(name)}", f"output.experiments_dir={self.experiments}",
                   "output.loggers=[jsonl]", f"training.num_threads={self.threads}",
                   f"training.eval_every={min(MAX_EVAL_EVERY, EVAL_STEPS_A_MINUTE * minutes)}",
                   f"training.eval_batches={EVAL_BATCHES}",
                   f"training.sample_every={SAMPLE_EVERY}"]
        return command + ["--check"] if check else command

    def start(self, name: str, preset: str, minutes: int, *, upload: bytes | None = None,
              corpus: str | None = None, corpus_label: str | None = None,
              on_exit: Callable[[RunStatus], None] | None = None) -> RunStatus:
        """Check, then start the run in the background; RunRefused says why it cannot.
        ``on_exit(status)`` runs in a thread of this process when it ends."""
        for refusal in self.refusals(name, preset, minutes):
            raise refusal
        if (upload is None) == (corpus is None):
            raise RunRefused("Choose a bundled text or upload one.", "text")
        lock = _take_lock(self.root)
        if lock is None:
            current = running_name(self.root)  # none yet: another start is checking its text
            raise RunRefused(f"{current} is training; one run at a time. Wait for it to end, "
                             "or cancel it." if current else
                             "Another run is starting; one run at a time.")
        os.ftruncate(lock, 0)  # the last run's name, until this one's is written
        try:
            return self._start(lock, name, preset, minutes, upload, corpus, corpus_label, on_exit)
        finally:
            os.close(lock)  # the training keeps its own copy, and with it the lock

    def _start(self, lock: int, name: str, preset: str, minutes: int, upload: bytes | None,
               corpus: str | None, corpus_label: str | None,
               on_exit: Callable[[RunStatus], None] | None) -> RunStatus:
        self.check_name(name)  # again, under the lock: two starts of one name
        used = self.used_bytes() + len(upload or b"")
        if used >= self.quota_bytes:
            raise RunRefused(f"The trained models take {used / 2**20:,.0f} MB of the "
                             f"{self.quota_bytes / 2**20:,.0f} MB allowed "
                             "(FABLE_TRAIN_QUOTA_BYTES): delete one to train another.")
        folder = self.root / name
        folder.mkdir(parents=True)
        data = None
        try:
            if upload is not None:
                data = folder / TEXT
                data.write_bytes(upload)
            self._check(name, preset, minutes, data, corpus)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        os.pwrite(lock, name.encode(), 0)
        with open(folder / LOG, "wb") as output:
            process = subprocess.Popen(
                self._niced(self.command(name, preset, minutes, data, corpus)),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                env=training_environment(), pass_fds=(lock,), start_new_session=True)
        asked = {"name": name, "preset": preset, "minutes": minutes,
                 "text": "upload" if upload is not None else corpus,
                 "text_label": corpus_label or ("your text" if upload is not None else corpus),
                 "text_bytes": len(upload) if upload is not None else None,
                 "threads": self.threads, "pid": process.pid, "started": time.time()}
        _write_once(folder / RUN, asked)
        threading.Thread(target=self._wait, args=(process, name, on_exit),
                         name=f"fable-train-{name}", daemon=True).start()
        log.info("training %s started (pid %d, preset %s, %d min)", name, process.pid, preset,
                 minutes)
        return RunStatus(name, "running", asked)

    def _check(self, name: str, preset: str, minutes: int, data: Path | None,
               corpus: str | None) -> None:
        """The training command's own checks of the text and the config (``--check``),
        so that the page says what is wrong before a run exists."""
        try:
            done = subprocess.run(self.command(name, preset, minutes, data, corpus, check=True),
                                  stdin=subprocess.DEVNULL, capture_output=True,
                                  env=training_environment(), timeout=CHECK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RunRefused("Checking the text took too long; try a smaller one.",
                             "text") from None
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").splitlines()
            errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
            if not errors:
                log.error("the training check failed: %s", "\n".join(lines[-20:]))
            message = errors[-1] if errors else "The training command could not start (see the server log)."
            if data is not None:  # the user's file is "your text", not a server path
                message = message.replace(str(data), "Your text")
            raise RunRefused(message, "text")

    @staticmethod
    def _niced(command: list[str]) -> list[str]:
        # nice(1) execs the command: its pid is the training's. (preexec_fn would run
        # Python in a forked copy of this multithreaded worker.)
        nice = shutil.which("nice")
        return [nice, "-n", str(NICE), *command] if nice else command

    def _wait(self, process: subprocess.Popen, name: str,
              on_exit: Callable[[RunStatus], None] | None) -> None:
        code = process.wait()
        folder = self.root / name
        if not (folder / EXIT).exists():
            _write_once(folder / EXIT, {"returncode": code, "time": time.time()})
        # the full-precision checkpoints are for resuming, which a page's run never does:
        # its model is served from the published copy
        for part in ("last", "best", "final"):
            shutil.rmtree(self.work(name) / part, ignore_errors=True)
        status = self.status(name)
        log.info("training %s ended with exit code %d: %s", name, code, status.state)
        if on_exit is not None and status is not None:
            try:
                on_exit(status)
            except Exception:  # noqa: BLE001 - a reload that fails is logged, the run stands
                log.exception("after training %s", name)

    # -- stopping ----------------------------------------------------------------------------

    def cancel(self, name: str) -> bool:
        """Stop the running ``name`` and keep nothing; False when it is not running."""
        if running_name(self.root) != name:
            return False
        (self.folder(name) / CANCEL).touch()
        _stop(self.root, name)
        return True

    def finish(self, name: str) -> bool:
        """Stop the running ``name`` now and keep its model as it is: Ctrl-C for the
        training command (SIGINT), which evaluates, publishes and writes the card. False
        when it is not running."""
        pid = (_read(self.folder(name) / RUN) or {}).get("pid")
        if running_name(self.root) != name or not pid:
            return False
        (self.folder(name) / FINISH).touch()
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return False
        return True

    def delete(self, name: str) -> None:
        """A finished run, and its model when it published one."""
        status = self.status(name)
        if status is None:
            raise KeyError(name)
        if status.running:
            raise RunRefused(f"{name} is training: cancel it first.")
        if (self.models / name).is_dir() and (self.folder(name) / RUN).is_file():
            shutil.rmtree(self.models / name)
        shutil.rmtree(self.folder(name))


def training_environment() -> dict[str, str]:
    """The server's environment without its secrets (a training needs none of them), with
    the folder that holds the ``training`` package first on PYTHONPATH: a checkout's server
    may run from another working directory (``python -m`` looks in the current one)."""
    secret = {"FABLE_ADMIN_TOKEN", "FABLE_API_KEYS", "FABLE_SECRET_KEY"}
    env = {k: v for k, v in os.environ.items() if k not in secret}
    spec = importlib.util.find_spec("training")  # finds it without importing it
    if spec is not None and spec.origin:
        home = str(Path(spec.origin).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([home, *filter(None, [env.get("PYTHONPATH")])])
    return env


def _stop(root: Path, name: str) -> None:
    """SIGTERM to the training's process group, SIGKILL if it is still there after
    STOP_WAIT_S; returns once the lock (and so the process) is gone."""
    asked = _read(root / name / RUN) or {}
    pid = asked.get("pid")
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            if running_name(root) != name:
                return
            time.sleep(0.05)


def stop_running(root: Path) -> str | None:
    """The server is stopping: stop the running training, if any, and mark it stopped
    (gunicorn's master, on exit). Returns its name."""
    name = running_name(Path(root))
    if name is None or not NAME.fullmatch(name):
        return None
    folder = Path(root) / name
    if not (folder / CANCEL).exists() and not (folder / EXIT).exists():
        _write_once(folder / EXIT, {"returncode": None, "stopped": True, "time": time.time()})
    _stop(Path(root), name)
    return name


def settle(root: Path) -> list[str]:
    """At start-up: a training an earlier server left running (it was killed, not stopped)
    is stopped, and every run without an end is marked stopped. Returns their names."""
    root = Path(root)
    if not root.is_dir():
        return []
    settled = []
    leftover = stop_running(root)
    if leftover:
        settled.append(leftover)
    for folder in root.iterdir():
        if (folder / RUN).is_file() and not (folder / EXIT).exists():
            _write_once(folder / EXIT, {"returncode": None, "stopped": True, "time": time.time()})
            settled.append(folder.name)
    return settled
