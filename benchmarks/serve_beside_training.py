"""What a training run beside the server costs a visitor: batch-1 generation over HTTP
with and without ``fable train`` running on the same machine.

    python benchmarks/serve_beside_training.py [--model tinystories-gpt]
        [--data ../shared/data/tinyshakespeare/input.txt] [--preset char-gpt]
        [--train-threads 1] [--nice 10] [--seconds 15] [--rounds 3] [--max-tokens 128]

A real gunicorn (``make serve``'s command, tests/gunicorn_server.py) serves the bundled
models with one worker and ``FABLE_TORCH_THREADS=1``; one client sends ``POST
/v1/completions`` (greedy, ``max_tokens``, one of eight story starts by turn) as soon as
its last one is answered, for ``--seconds``. Each round measures that alone and beside a
training: ``python -m training.train --preset P --data FILE`` in its own process, with
``training.num_threads=--train-threads`` and ``nice --nice`` (what a training page would
start: its threads capped, below the server's priority), given a few seconds to reach its
steps first and stopped (its process group killed) after. The order alternates between
rounds; each round prints both figures and their ratio, then the range.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, environment  # puts the repository on sys.path

from llama_server import closed_loop  # noqa: E402  (the same client as against llama-server)
from tests.gunicorn_server import GunicornServer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


class Training:
    """``python -m training.train --preset ...`` in a session of its own, until the block
    ends (then its whole process group is killed: nothing is left behind)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.command = [sys.executable, "-m", "training.train", "--preset", args.preset,
                        "--data", str(args.data), "--name", "beside-the-server",
                        "--checkpoint-dir", str(workdir / "trained"), "--overwrite",
                        "--minutes", "30", "--quiet", f"training.num_threads={args.train_threads}",
                        f"output.dir={workdir / 'runs' / '{name}'}",
                        f"output.experiments_dir={workdir / 'experiments'}"]
        self.nice, self.workdir, self.warmup = args.nice, workdir, args.train_warmup

    def __enter__(self) -> Training:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(self.command, cwd=self.workdir, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True,
                                        preexec_fn=lambda: os.nice(self.nice))
        time.sleep(self.warmup)  # data prepared, model built, the loop under way
        if self.process.poll() is not None:
            raise SystemExit(f"the training exited ({self.process.returncode}): "
                             f"{self.process.stderr.read().decode(errors='replace')[-2000:]}")
        return self

    def cpu_seconds(self) -> float:
        """The training process's CPU time so far (user + system, from /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process.stderr.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--model", default="tinystories-gpt")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text the training reads")
    parser.add_argument("--preset", default="char-gpt")
    parser.add_argument("--train-threads", type=int, default=1)
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--train-warmup", type=float, default=8.0,
                        help="seconds the training gets before the clients start")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file; give --data a UTF-8 text")
    print(f"# {args.model} over HTTP, 1 client, FABLE_TORCH_THREADS=1, alone and beside "
          f"`training.train --preset {args.preset}` ({args.train_threads} thread(s), nice "
          f"{args.nice}), {args.seconds:g} s each -- {os.cpu_count()} CPUs -- {environment()}",
          flush=True)
    rates: dict[str, list[float]] = {"alone": [], "beside a training": []}
    with tempfile.TemporaryDirectory() as tmp, \
            GunicornServer(args.checkpoints, env={"FABLE_TORCH_THREADS": "1", "FABLE_WORKERS": "1"}) as server:
        closed_loop(server.url, args.model, 1, 3, args.max_tokens)  # warm-up
        for round_ in range(args.rounds):
            order = list(rates) if round_ % 2 == 0 else list(rates)[::-1]
            for case in order:
                if case == "alone":
                    tokens, wall, failed = closed_loop(server.url, args.model, 1, args.seconds,
                                                       args.max_tokens)
                    trained = ""
                else:
                    with Training(args, Path(tmp)) as training:
                        before = training.cpu_seconds()
                        tokens, wall, failed = closed_loop(server.url, args.model, 1, args.seconds,
                                                           args.max_tokens)
                        trained = (f"; the training used {training.cpu_seconds() - before:.1f} "
                                   f"CPU-s of the {wall:.1f} s")
                rates[case].append(tokens / wall)
                print(f"round {round_ + 1}: {case:18s} {tokens / wall:6,.0f} tokens/s "
                      f"({failed} failed){trained}", flush=True)
    ratios = [b / a for a, b in zip(rates["alone"], rates["beside a training"])]
    print(f"alone {statistics.median(rates['alone']):,.0f} tokens/s, beside a training "
          f"{statistics.median(rates['beside a training']):,.0f} (medians); beside / alone "
          f"{min(ratios):.2f}-{max(ratios):.2f} round by round")


if __name__ == "__main__":
    main()
