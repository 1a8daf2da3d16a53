"""What training-health records cost: training tokens/s with ``training.health_every`` at
its default (100) against off (0), on the shipped configs.

    python benchmarks/health_cost.py [--steps 200] [--rounds 3] [--threads 2]
        [--config training/configs/char_gpt_shakespeare.yaml ...]

Two measures. **In-run**: within one run with records on, the steps that take a checkup
against the median of the others (the trainer's own per-step clock); seconds apart, so a
machine whose speed drifts barely moves it. **A/B**: each round trains twice from the same
seed, once each way (alternating which goes first), for ``--steps`` steps with no
evaluation and no checkpoint between, and compares the trainer's tokens/s (tokens seen /
training time, the clock that covers the records). Needs the configs' corpora
(../shared/data).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from _common import ROOT, environment  # puts the repository on sys.path
from training.config import load_config
from training.train import Trainer

# The char LSTM's steps take seconds each on CPU, which makes any per-100-steps cost small:
# the GPT, with its fast steps, is where the records cost the most.
CONFIGS = ("training/configs/char_gpt_shakespeare.yaml",)
EVERY = 100


def train(config: str, steps: int, threads: int, health_every: int) -> tuple[float, dict[int, float]]:
    """Tokens/s of the run, and each step's seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"training.max_steps={steps}", f"training.eval_every={steps}",
                     f"training.save_every={steps}", "training.eval_batches=1",
                     f"training.num_threads={threads}", f"training.health_every={health_every}",
                     f"output.dir={tmp}/run", f"output.experiments_dir={tmp}/exp",
                     "output.publish=null"]
        trainer = Trainer(load_config(ROOT / config, overrides), quiet=True)
        seconds: dict[int, float] = {}
        report_step = trainer.report.step

        def timed_step(loss, lr, tokens_per_s, *, step):
            seconds[step] = trainer.tokens_per_step / tokens_per_s
            report_step(loss, lr, tokens_per_s, step=step)

        trainer.report.step = timed_step
        summary = trainer.fit()
    return summary.tokens_seen / summary.training_time_s, seconds


def in_run_cost(seconds: dict[int, float]) -> float:
    """The checkups' extra seconds as a share of the training time between them."""
    checkups = [t for step, t in seconds.items() if step % EVERY == 0]
    plain = statistics.median(t for step, t in seconds.items() if step % EVERY)
    return (statistics.mean(checkups) - plain) / (EVERY * plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # what the runs use (training.num_threads), for the line below
    print(environment())
    for config in args.config:
        name, ratios, costs = Path(config).stem, [], []
        for round_ in range(args.rounds):
            order = (EVERY, 0) if round_ % 2 == 0 else (0, EVERY)
            runs = {every: train(config, args.steps, args.threads, every) for every in order}
            ratios.append(runs[EVERY][0] / runs[0][0])
            costs.append(in_run_cost(runs[EVERY][1]))
            print(f"{name} round {round_ + 1}: in-run cost {costs[-1]:.2%}; A/B on "
                  f"{runs[EVERY][0]:,.0f} tokens/s, off {runs[0][0]:,.0f} tokens/s, "
                  f"on/off {ratios[-1]:.3f}", flush=True)
        print(f"{name}: health records every {EVERY} steps cost {min(costs):.2%}-{max(costs):.2%} "
              f"of training time in-run; A/B on/off {min(ratios):.3f}-{max(ratios):.3f} "
              f"({args.rounds} rounds)", flush=True)


if __name__ == "__main__":
    main()
