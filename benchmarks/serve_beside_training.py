"""What a training run beside the server costs a visitor: batch-1 generation over HTTP
with and without a training started from the server's own training page.

    python benchmarks/serve_beside_training.py [--model tinystories-gpt]
        [--data ../shared/data/tinyshakespeare/input.txt] [--preset char-gpt]
        [--train-threads N] [--seconds 15] [--rounds 3] [--max-tokens 128]

A real gunicorn (``make serve``'s command, tests/gunicorn_server.py) serves the bundled
models with one worker and ``FABLE_TORCH_THREADS=1``; one client sends ``POST
/v1/completions`` (greedy, ``max_tokens``, one of eight story starts by turn) as soon as
its last one is answered, for ``--seconds``. Each round measures that alone and beside a
training: ``--data`` uploaded to ``POST /train`` with ``--preset`` (the training page:
its command in its own process, niced, ``FABLE_TRAIN_THREADS`` threads, by default the
server's own default, cores - 1), given a few seconds to reach its steps and cancelled
(``POST /train/<name>/cancel``) after. The order alternates between rounds; each round
prints both figures and their ratio, then the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from _common import ROOT, environment  # puts the repository on sys.path

from llama_server import closed_loop  # noqa: E402  (the same client as against llama-server)
from tests.gunicorn_server import GunicornServer  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


class Training:
    """A run started on the server's training page, cancelled when the block ends (the
    page stops its process and leaves nothing behind)."""

    def __init__(self, server: GunicornServer, runs: Path, args: argparse.Namespace,
                 name: str) -> None:
        self.server, self.runs, self.args, self.name = server, runs, args, name

    def __enter__(self) -> Training:
        response = httpx.post(self.server.url + "/train", timeout=120, data={
            "text": "upload", "preset": self.args.preset, "minutes": "30", "name": self.name},
            files={"upload": (self.args.data.name, self.args.data.read_bytes())})
        if response.status_code != 303:
            raise SystemExit(f"the training page refused the run ({response.status_code})")
        self.pid = json.loads((self.runs / self.name / "run.json").read_text())["pid"]
        records = self.runs / self.name / "work" / self.name / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not records.exists() or b'"train"' not in records.read_bytes():
            if time.monotonic() > deadline or not Path(f"/proc/{self.pid}").exists():
                raise SystemExit("the training did not start: " +
                                 (self.runs / self.name / "log.txt").read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(self.args.train_warmup)  # past its first steps, at its own pace
        return self

    def cpu_seconds(self) -> float:
        """The training process's CPU time so far (user + system, from /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        httpx.post(f"{self.server.url}/train/{self.name}/cancel", timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--model", default="tinystories-gpt")
    parser.add_argument("--data", type=Path, default=SHAKESPEARE, help="the text the training reads")
    parser.add_argument("--preset", default="char-gpt")
    parser.add_argument("--train-threads", type=int,
                        help="FABLE_TRAIN_THREADS (default: the server's, cores - 1)")
    parser.add_argument("--train-warmup", type=float, default=3.0,
                        help="seconds the training gets, once stepping, before the client starts")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file; give --data a UTF-8 text")
    threads = {"FABLE_TRAIN_THREADS": str(args.train_threads)} if args.train_threads else {}
    print(f"# {args.model} over HTTP, 1 client, FABLE_TORCH_THREADS=1, alone and beside "
          f"a training page's run of {args.preset} on {args.data.name} "
          f"({args.train_threads or 'default'} thread(s)), {args.seconds:g} s each -- "
          f"{os.cpu_count()} CPUs -- {environment()}", flush=True)
    rates: dict[str, list[float]] = {"alone": [], "beside a training": []}
    with tempfile.TemporaryDirectory() as tmp, \
            GunicornServer(args.checkpoints, env={
                "FABLE_TORCH_THREADS": "1", "FABLE_WORKERS": "1", "FABLE_TRAIN_DIR": f"{tmp}/runs",
                "FABLE_EXPERIMENTS_DIR": f"{tmp}/experiments", **threads}) as server:
        closed_loop(server.url, args.model, 1, 3, args.max_tokens)  # warm-up
        for round_ in range(args.rounds):
            order = list(rates) if round_ % 2 == 0 else list(rates)[::-1]
            for case in order:
                if case == "alone":
                    tokens, wall, failed = closed_loop(server.url, args.model, 1, args.seconds,
                                                       args.max_tokens)
                    trained = ""
                else:
                    with Training(server, Path(tmp) / "runs", args,
                                  f"beside-{round_ + 1}") as training:
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
