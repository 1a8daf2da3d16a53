"""A real gunicorn serving the app on 127.0.0.1, for tests and ``benchmarks/load.py``.

    with GunicornServer(checkpoint_dir, env={"FABLE_THREADS": "40"}) as server:
        httpx.get(server.url + "/healthz")
        server.worker_memory()          # {pid: Memory(rss_kib, pss_kib)} from /proc
    # leaving the block stops it: SIGTERM (gunicorn's graceful stop), then SIGKILL

The default command is the one ``make serve`` and the Docker image run,
``gunicorn -c gunicorn.conf.py 'app:create_app()'`` from the repository root, with the
virtual environment's gunicorn. The server's environment is the caller's without any
``FABLE_*``, ``GUNICORN*``, ``WEB_CONCURRENCY`` or ``PORT`` (so nothing the developer
exported leaks into a test), plus a free port on 127.0.0.1 and ``env``.

Only the processes this helper started are ever signalled: the master it spawned and
the workers listed as that master's children.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
DEFAULT_COMMAND = [GUNICORN, "-c", "gunicorn.conf.py", "app:create_app()"]
#: Variables of the caller's environment that would change the server's settings.
SERVER_VARIABLES = ("FABLE_", "GUNICORN", "WEB_CONCURRENCY", "PROMETHEUS_MULTIPROC_DIR")
#: The line app/serving/registry.py logs, through gunicorn's error log, for each model a worker loads.
LOADED_LINE = re.compile(r"\[(\d+)\] \[INFO\] loaded \S+ \(")


class ServerError(RuntimeError):
    """gunicorn exited or never became healthy; the message ends with its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (gunicorn's workers, for its master)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None once it is gone: with the id it
    names one process, so an id the system has reused since is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the name before ")" may hold spaces


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return answer


@dataclass(frozen=True)
class Memory:
    """One process's resident memory, in KiB, from ``/proc/<pid>/smaps_rollup``.

    ``pss_kib`` (proportional set size) counts pages shared with other processes (the
    master, the other workers) divided among them, so the workers' PSS add up to what
    they really use; ``rss_kib`` counts every resident page in full."""
    rss_kib: int
    pss_kib: int


def memory(pid: int) -> Memory:
    """Resident memory of ``pid`` (Linux only)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            fields[name] = int(rest.split()[0])  # "Pss:   123456 kB"
    return Memory(rss_kib=fields["Rss"], pss_kib=fields["Pss"])


def server_environment(port: int, env: dict[str, str] | None = None,
                       base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without the server's variables, updated with
    ``env``, and bound to 127.0.0.1:``port`` whatever ``env`` says (never the network)."""
    base = os.environ if base is None else base
    out = {k: v for k, v in base.items() if not k.startswith(SERVER_VARIABLES) and k != "PORT"}
    out.update(env or {})
    out.update({"FABLE_HOST": "127.0.0.1", "PORT": str(port)})
    return out


class GunicornServer:
    """One gunicorn master (and its workers) started by this object; a context manager.

    ``checkpoint_dir`` becomes ``FABLE_CHECKPOINT_DIR`` unless ``env`` sets it; pass
    ``environment`` to give the whole environment yourself (``server_environment`` makes
    one). The log (gunicorn's access and error logs) goes to ``log_path``, by default a
    temporary file that ``stop()`` removes; it ends every ``ServerError`` message."""

    def __init__(self, checkpoint_dir: str | Path | None = None, *,
                 env: dict[str, str] | None = None, environment: dict[str, str] | None = None,
                 command: list[str] | None = None, cwd: str | Path = ROOT,
                 log_path: str | Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        if environment is None:
            settings = {"FABLE_CHECKPOINT_DIR": str(checkpoint_dir)} if checkpoint_dir else {}
            environment = server_environment(self.port, {**settings, **(env or {})})
        self.environment = environment
        self.command = list(command or DEFAULT_COMMAND)
        self.cwd = Path(cwd)
        self._own_log = log_path is None  # a temporary log is removed by stop()
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self._workers: dict[int, str | None] = {}  # id -> start time, for the final SIGKILL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not started"
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- life cycle ---------------------------------------------------------------

    def start(self, timeout: float = 90) -> GunicornServer:
        """Start gunicorn and wait until ``/healthz`` answers 200 (every worker loads the
        models before it accepts: one answer means the first worker is ready) and every
        worker gunicorn was asked for is running."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.environment,
                                            stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerError(f"gunicorn exited with {self.process.returncode}:\n"
                                  f"{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"gunicorn did not become healthy in {timeout:g} s:\n"
                                  f"{self.log_text()}")
            time.sleep(0.1)
        self._remember(self.worker_pids())

    def _remember(self, pids: list[int]) -> None:
        self._workers.update({pid: start_time(pid) for pid in pids if pid not in self._workers})

    def worker_pids(self) -> list[int]:
        """The running workers: the master's children."""
        return children(self.pid) if self.process is not None else []

    def wait_for_workers(self, count: int, models: int, timeout: float = 120) -> list[int]:
        """Wait until ``count`` workers have each loaded ``models`` models (a worker loads
        them after the fork, before it accepts, and logs "loaded <name> ..." for each) and
        return their process ids. ``/healthz`` answering only proves the first one ready."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            loaded = Counter(int(pid) for pid in LOADED_LINE.findall(self.log_text()))
            ready = [pid for pid in pids if loaded[pid] >= models]
            if len(ready) >= count:
                self._remember(pids)
                return ready
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"{len(ready)} of {count} workers ready after {timeout:g} s:\n"
                                  f"{self.log_text()}")
            time.sleep(0.2)

    def worker_memory(self) -> dict[int, Memory]:
        """Each running worker's resident memory, by process id."""
        out = {}
        for pid in self.worker_pids():
            try:
                out[pid] = memory(pid)
            except (OSError, KeyError):  # a worker that just exited
                pass
        return out

    def terminate(self) -> None:
        """Send SIGTERM to the master: gunicorn's graceful stop (running requests finish
        within ``graceful_timeout``)."""
        self._remember(self.worker_pids())
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15) -> int | None:
        """Stop gracefully (SIGTERM), then kill the master and its workers if they are
        still running after ``timeout`` s; returns the master's exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._remember(self.worker_pids())
                self.process.kill()
                self.process.wait(5)
        for pid, started in self._workers.items():  # only workers this server's master forked
            if started is not None and start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
