"""Whole-example batches: 16 uniform draws padded to the longest, against draws grouped by
length (``training.examples.example_batch``), on the bundled TinyStories run's examples.

    python benchmarks/example_batches.py [--config training/configs/tinystories_gpt.yaml]
                                         [--steps 4] [--rounds 3] [--threads 2]

Prints the share of each batch that is padding (over 500 batches), then times training
steps (forward, backward, AdamW) of the config's model on batches of each kind, the kinds
alternating round by round, and gives scored (non-padding) tokens per second and the
median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import environment

from models_src.base import IGNORE_INDEX
from training.config import load_config
from training.examples import collate, example_batch
from training.train import Trainer


def uniform_batch(examples, batch_size, generator, pad_id):
    """The draw before grouping: ``batch_size`` uniform examples, padded to the longest."""
    indices = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    return collate(examples, indices, pad_id)


DRAWS = {"uniform": uniform_batch, "grouped by length": example_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="training/configs/tinystories_gpt.yaml")
    parser.add_argument("--steps", type=int, default=4, help="training steps per draw and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(environment())

    trainer = Trainer(load_config(args.config, overrides=[f"training.num_threads={args.threads}"]),
                      quiet=True)
    examples, pad, rows = trainer.examples["train"], trainer.tokenizer.pad_id, trainer.t.batch_size
    print(f"{args.config}: {len(examples):,} training examples, batch {rows}")
    for name, draw in DRAWS.items():
        gen = torch.Generator().manual_seed(0)
        scored = padded = 0
        for _ in range(500):
            _, y = draw(examples, rows, gen, pad)
            scored, padded = scored + int((y != IGNORE_INDEX).sum()), padded + y.numel()
        print(f"  {name:18s} padding {1 - scored / padded:6.1%} of each batch")

    model, optimizer = trainer.model, trainer.optimizer
    model.train()
    rates: dict[str, list[float]] = {name: [] for name in DRAWS}
    gens = {name: torch.Generator().manual_seed(1) for name in DRAWS}
    for _ in range(args.rounds):
        for name, draw in DRAWS.items():
            tokens, seconds = 0, 0.0
            for _ in range(args.steps):
                x, y = draw(examples, rows, gens[name], pad)
                started = time.perf_counter()
                loss = trainer.forward(x, y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                seconds += time.perf_counter() - started
                tokens += int((y != IGNORE_INDEX).sum())
            rates[name].append(tokens / seconds)
    for name, values in rates.items():
        print(f"  {name:18s} {min(values):8,.0f} - {max(values):8,.0f} scored tokens/s")
    uniform, grouped = rates.values()
    ratios = [g / u for u, g in zip(uniform, grouped)]
    print(f"grouped / uniform: median {statistics.median(ratios):.2f}x "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
