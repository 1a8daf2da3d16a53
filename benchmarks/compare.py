"""The compare page's cost: 4 models at once against the slowest of them alone.

    python benchmarks/compare.py [--checkpoints checkpoints] [--new-tokens 128]
                                 [--rounds 3] [--threads 1] [--decode-threads 1,2]
                                 [--logprobs 5] [--device cpu] [--peer-processes]

In process, through the app itself (``create_app``: its registry, service, scheduler and
engine loop): each bundled model alone, then all of them at once, the way ``/compare``
runs them (``app.pages.comparison.run_comparison``: one ordinary generation per model, each read
by its own thread, with the token view's log-probabilities), for the same prompt,
settings and seed (exactly ``--new-tokens`` tokens each: ``ignore_eos``). One app per
``--decode-threads`` value (``FABLE_DECODE_THREADS``: how many models may step at once);
the singles and each app's comparison alternate, ``--rounds`` times, after a warm-up
round. Prints each wall time (the range over the rounds), the ratio of the comparison's
wall time to the slowest model's alone (the issue's target: at most 1.5), and the
arithmetic beside it: the sum of the models alone over the slowest (what one decoding
thread costs) and that sum spread perfectly over the machine's cores (the floor for any
number of threads).

``--peer-processes`` adds what no thread in one Python process can do: the same four
generations in four processes at once (``models_src.generation.generate`` in each,
models loaded before the clock starts), which share no GIL: the figure for a decoding
process per model, with no web server around it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from _common import ROOT, environment  # puts the repository on sys.path

from app import create_app
from app.pages.comparison import Comparison, run_comparison
from app.pages.jobs import TOKEN_VIEW_ALTERNATIVES, Job
from app.platform.settings import available_cores
from models_src.checkpoint import load_checkpoint
from models_src.generation import generate
from models_src.sampling import SamplingParams

PROMPT = "Once upon a time"
SEED = 7
TEMPERATURE = 0.8


def settings(args, decode_threads: int) -> dict:
    return {"FABLE_CHECKPOINT_DIR": str(args.checkpoints), "FABLE_DEVICE": args.device,
            "FABLE_TORCH_THREADS": args.threads, "FABLE_DECODE_THREADS": decode_threads,
            "FABLE_MAX_BATCH": 16, "FABLE_MAX_QUEUE": 16,
            "FABLE_MAX_NEW_TOKENS": max(args.new_tokens, 512), "FABLE_REQUEST_TIMEOUT_S": 600,
            "FABLE_RATE_LIMIT": 0, "FABLE_LOG_PROMPTS": False, "FABLE_DEFAULT_MODEL": ""}


def run(comparison: Comparison, logprobs: int | None) -> float:
    start = time.perf_counter()
    results = run_comparison(comparison, logprobs)
    wall = time.perf_counter() - start
    for r in results:
        if r.error is not None:
            raise SystemExit(f"{r.job.model}: {r.error}")
    return wall


def _peer_process(directory, values: dict, logprobs, threads: int, ready, go, done) -> None:
    torch.set_num_threads(threads)
    loaded = load_checkpoint(directory)
    ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(PROMPT)]
    params = SamplingParams(**values, logprobs=logprobs)

    def once() -> None:
        generate(loaded.model, loaded.tokenizer, prompt_ids=[ids], params=params)

    once()  # warm-up
    while True:
        ready.put(True)
        if go.get() is None:
            return
        once()
        done.put(time.perf_counter())


class PeerProcesses:
    """One process per model, each generating when told; ``run`` times all of them."""

    def __init__(self, directories: list, values: dict, args) -> None:
        context = multiprocessing.get_context("spawn")
        self.ready, self.done = context.Queue(), context.Queue()
        self.go = [context.Queue() for _ in directories]
        self.processes = [
            context.Process(target=_peer_process, daemon=True,
                            args=(d, values, args.logprobs, args.threads, self.ready, go, self.done))
            for d, go in zip(directories, self.go)]
        for p in self.processes:
            p.start()

    def run(self) -> float:
        for _ in self.processes:
            self.ready.get(timeout=300)
        start = time.perf_counter()
        for go in self.go:
            go.put(True)
        return max(self.done.get(timeout=300) for _ in self.processes) - start

    def close(self) -> None:
        for _ in self.processes:
            self.ready.get(timeout=300)
        for go in self.go:
            go.put(None)
        for p in self.processes:
            p.join(timeout=30)


def span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    low, high = min(values), max(values)
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"({low:.{digits}f}–{high:.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=ROOT / "checkpoints")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--decode-threads", default="1,2",
                        help="comma-separated FABLE_DECODE_THREADS values, one app each")
    parser.add_argument("--logprobs", type=int, default=TOKEN_VIEW_ALTERNATIVES,
                        help="alternatives asked for (the streamed page's); -1: none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peer-processes", action="store_true")
    args = parser.parse_args()
    args.logprobs = None if args.logprobs < 0 else args.logprobs
    decode_threads = [int(n) for n in args.decode_threads.split(",")]

    apps = {n: create_app(settings(args, n)) for n in decode_threads}
    torch.set_num_threads(args.threads)  # create_app set it too, from the same value
    registry = apps[decode_threads[0]].extensions["fable.registry"]
    names = registry.names()[:4]
    values = {"max_new_tokens": args.new_tokens, "temperature": TEMPERATURE, "seed": SEED,
              "ignore_eos": True}
    jobs = [Job("generate", name, {"prompt": PROMPT}, values) for name in names]
    together = Comparison("generate", jobs)
    peer = None
    if args.peer_processes:
        peer = PeerProcesses([Path(args.checkpoints) / n for n in names], values, args)

    cores = available_cores()
    print(f"# compare benchmark — {environment()}, device {args.device}, {cores} cores")
    print(f"# {len(names)} models, {args.new_tokens} new tokens each, temperature {TEMPERATURE}, "
          f"seed {SEED}, logprobs {args.logprobs}; {args.rounds} rounds after a warm-up")
    alone: dict[str, list[float]] = defaultdict(list)
    walls: dict[str, list[float]] = defaultdict(list)
    ratios: dict[str, list[float]] = defaultdict(list)
    sums, floors = [], []
    for round_ in range(args.rounds + 1):
        times = {}
        with apps[decode_threads[0]].app_context():
            for job in jobs:
                times[job.model] = run(Comparison("generate", [job]), args.logprobs)
        slowest = max(times.values())
        together_walls = {}
        for n, app in apps.items():
            with app.app_context():
                together_walls[f"{n} decoding thread{'s' if n > 1 else ''}"] = run(together, args.logprobs)
        if peer is not None:
            together_walls[f"peer: {len(names)} processes"] = peer.run()
        if not round_:
            continue
        for name, t in times.items():
            alone[name].append(t)
        for label, wall in together_walls.items():
            walls[label].append(wall)
            ratios[label].append(wall / slowest)
        sums.append(sum(times.values()) / slowest)
        floors.append(max(1.0, sum(times.values()) / min(cores, len(names)) / slowest))
    if peer is not None:
        peer.close()

    rows = [(f"{name} alone", span(alone[name]), "") for name in names]
    rows += [(f"all at once, {label}", span(walls[label]), span(ratios[label], "x"))
             for label in walls]
    width = max(len(label) for label, _, _ in rows)
    print(f"{'':{width}}  {'wall time':>22}  {'/ slowest alone':>20}")
    for label, wall, ratio in rows:
        print(f"{label:{width}}  {wall:>22}  {ratio:>20}")
    print("target: all at once / slowest alone <= 1.5")
    print(f"sum(alone) / slowest (one decoding thread's cost): {span(sums, 'x')}")
    print(f"sum(alone) / {min(cores, len(names))} cores / slowest (the floor on this machine): "
          f"{span(floors, 'x')}")


if __name__ == "__main__":
    main()
