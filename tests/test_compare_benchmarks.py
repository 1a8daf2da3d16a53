"""The two compare benchmarks run end to end on the test checkpoints (a round of a few
tokens each), so that the commands the README quotes keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.subprocess, pytest.mark.bundled]

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_compare_in_process(checkpoint_dir):
    out = run("compare.py", "--checkpoints", str(checkpoint_dir), "--rounds", "1",
              "--new-tokens", "4", "--decode-threads", "1,2", "--peer-processes")
    for line in ("tiny-gpt alone", "all at once, 1 decoding thread",
                 "all at once, 2 decoding threads", "all at once, peer: 3 processes",
                 "the floor on this machine"):
        assert line in out, out


@pytest.mark.server
def test_compare_over_http(checkpoint_dir):
    out = run("compare_http.py", "--checkpoints", str(checkpoint_dir), "--workers", "1",
              "--rounds", "1", "--new-tokens", "4")
    assert "# endless, tiny-gpt, tiny-lstm" in out, out
    assert "1 worker: median" in out, out
