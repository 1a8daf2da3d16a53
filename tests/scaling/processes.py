"""Processes the scaling tests start, and how they end them: whole process trees, by id.

A launcher (torchrun, gunicorn, nginx) is started in a session of its own, so its process
group is itself and what it forks; torchrun starts each worker in yet another session, so
"a machine dies" means every descendant, found through /proc, not the group alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Until something accepts on 127.0.0.1:``port``; fails if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before port {port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepted on port {port} within {timeout:g} s")
        time.sleep(0.05)


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot); None once it is gone. With the id it
    names one process, so an id reused since is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


def descendants(pid: int) -> dict[int, str]:
    """``pid`` and every process below it, each with its start time."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        started = start_time(current)
        if started is None or current in found:
            continue
        found[current] = started
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def alive(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` (id -> start time) still running."""
    return [pid for pid, started in processes.items() if start_time(pid) == started]


class Tracked:
    """A launcher started in a session of its own, and every process seen below it: the
    ids are kept (with their start times), since torchrun's workers, in sessions of their
    own, outlive a launcher killed alone and are then no longer its descendants."""

    def __init__(self, command: list[str], **popen) -> None:
        self.process = subprocess.Popen(command, start_new_session=True, **popen)
        self.seen: dict[int, str] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def look(self) -> dict[int, str]:
        """Note the processes below the launcher now; returns them."""
        now = descendants(self.process.pid) if self.process.poll() is None else {}
        self.seen.update(now)
        return now

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the launcher's group and every process ever seen below it."""
        self.look()
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in alive(self.seen):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL to whatever is left after ``timeout`` s; reaps the launcher."""
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (self.process.poll() is None or alive(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.kill(signal.SIGKILL)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
