"""The compare page's cost: 4 models at once against the slowest of them alone.

    python benchmarks/compare.py [--checkpoints checkpoints] [--new-tokens 128]
                                 [--rounds 3] [--threads 1] [--logprobs 5] [--device cpu]

In process, through the app itself (``create_app``: its registry, service, scheduler and
engine loop): each bundled model alone, then all of them at once, the way ``/compare``
runs them (``app.compare.run_comparison``: one ordinary generation per model, each read
by its own thread, with the token view's log-probabilities), for the same prompt,
settings and seed (exactly ``--new-tokens`` tokens each: ``ignore_eos``). The singles
and the comparison alternate, ``--rounds`` times, after a warm-up round. Prints each
wall time (the range over the rounds), the ratio of the comparison's wall time to the
slowest model's alone (the issue's target: at most 1.5) and what the engine loop's
design predicts for it: one decoding thread steps every model's batch in turn, so a
comparison costs about the sum of the models' step times, and the ratio is about
sum(alone) / max(alone). The engine's time per step and model is measured too.

``--peer-threads`` adds what the engine loop does not do: the same four generations
decoded by four Python threads at once (``models_src.generation.generate`` each), the
figure a thread per model could reach on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import defaultdict

import torch
from _common import ROOT, environment  # puts the repository on sys.path

from app import create_app
from app.compare import Comparison, run_comparison
from app.pages_common import TOKEN_VIEW_ALTERNATIVES, Job
from models_src.generation import generate
from models_src.sampling import SamplingParams

PROMPT = "Once upon a time"
SEED = 7


def settings(args) -> dict:
    return {"FABLE_CHECKPOINT_DIR": str(args.checkpoints), "FABLE_DEVICE": args.device,
            "FABLE_TORCH_THREADS": args.threads, "FABLE_MAX_BATCH": 16, "FABLE_MAX_QUEUE": 16,
            "FABLE_MAX_NEW_TOKENS": max(args.new_tokens, 512), "FABLE_REQUEST_TIMEOUT_S": 600,
            "FABLE_RATE_LIMIT": 0, "FABLE_LOG_PROMPTS": False, "FABLE_DEFAULT_MODEL": ""}


class StepClock:
    """Wraps the engine loop's per-model step: seconds spent stepping each model."""

    def __init__(self, engine) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps: dict[str, int] = defaultdict(int)
        step = engine._step

        def timed(loaded) -> None:
            start = time.perf_counter()
            step(loaded)
            self.seconds[loaded.name] += time.perf_counter() - start
            self.steps[loaded.name] += 1
        engine._step = timed

    def reset(self) -> None:
        self.seconds.clear()
        self.steps.clear()

    def per_step_ms(self) -> dict[str, float]:
        return {name: 1e3 * self.seconds[name] / self.steps[name] for name in self.seconds}


def run(comparison: Comparison, logprobs: int | None) -> float:
    start = time.perf_counter()
    results = run_comparison(comparison, logprobs)
    wall = time.perf_counter() - start
    for r in results:
        if r.error is not None:
            raise SystemExit(f"{r.job.model}: {r.error}")
    return wall


def peer_threads(app, jobs: list[Job], args) -> float:
    """The four generations in four threads at once, outside the engine loop."""
    registry = app.extensions["fable.registry"]

    def one(job: Job) -> None:
        loaded = registry.get(job.model)
        ids = [loaded.tokenizer.bos_id, *loaded.tokenizer.encode(PROMPT)]
        params = SamplingParams(**job.values, logprobs=args.logprobs)
        generate(loaded.model, loaded.tokenizer, prompt_ids=[ids], params=params)

    threads = [threading.Thread(target=one, args=(job,)) for job in jobs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def span(values: list[float], unit: str = "s", digits: int = 2) -> str:
    low, high = min(values), max(values)
    return (f"{statistics.median(values):.{digits}f} {unit} "
            f"({low:.{digits}f}–{high:.{digits}f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=ROOT / "checkpoints")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logprobs", type=int, default=TOKEN_VIEW_ALTERNATIVES,
                        help="alternatives asked for (the streamed page's); -1: none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peer-threads", action="store_true")
    args = parser.parse_args()
    logprobs = None if args.logprobs < 0 else args.logprobs
    args.logprobs = logprobs

    app = create_app(settings(args))
    torch.set_num_threads(args.threads)  # create_app set it too, from the same value
    names = app.extensions["fable.registry"].names()[:4]
    values = {"max_new_tokens": args.new_tokens, "temperature": 0.8, "seed": SEED,
              "ignore_eos": True}
    jobs = [Job("generate", name, {"prompt": PROMPT}, values) for name in names]
    together = Comparison("generate", jobs)
    clock = StepClock(app.extensions["fable.service"].engine)

    print(f"# compare benchmark — {environment()}, device {args.device}")
    print(f"# {len(names)} models, {args.new_tokens} new tokens each, temperature 0.8, seed "
          f"{SEED}, logprobs {logprobs}; {args.rounds} rounds after a warm-up")
    alone: dict[str, list[float]] = defaultdict(list)
    steps: dict[str, list[float]] = defaultdict(list)
    walls, ratios, predicted, peer = [], [], [], []
    shared_steps: dict[str, list[float]] = defaultdict(list)
    with app.app_context():
        for round_ in range(args.rounds + 1):
            times = {}
            for job in jobs:
                clock.reset()
                times[job.model] = run(Comparison("generate", [job]), logprobs)
                step_ms = clock.per_step_ms()[job.model]
                if round_:
                    alone[job.model].append(times[job.model])
                    steps[job.model].append(step_ms)
            clock.reset()
            wall = run(together, logprobs)
            if round_:
                walls.append(wall)
                ratios.append(wall / max(times.values()))
                predicted.append(sum(times.values()) / max(times.values()))
                for name, ms in clock.per_step_ms().items():
                    shared_steps[name].append(ms)
                if args.peer_threads:
                    peer.append(peer_threads(app, jobs, args) / max(times.values()))

    width = max(len(n) for n in names)
    print(f"{'model':{width}}  {'alone':>22}  {'ms/step alone':>20}  {'ms/step in compare':>20}")
    for name in names:
        print(f"{name:{width}}  {span(alone[name]):>22}  {span(steps[name], 'ms'):>20}  "
              f"{span(shared_steps[name], 'ms'):>20}")
    print(f"{'all ' + str(len(names)) + ' at once':{width}}  {span(walls):>22}")
    print(f"ratio, all at once / slowest alone: {span(ratios, 'x')}   (target <= 1.5)")
    print(f"sum(alone) / slowest alone (one decoding thread's prediction): {span(predicted, 'x')}")
    if peer:
        print(f"peer, 4 Python threads outside the engine / slowest alone: {span(peer, 'x')}")


if __name__ == "__main__":
    main()
