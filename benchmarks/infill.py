"""Does the infilling model use the ending? Perplexity of the true middle of each
validation story given its first AND last sentence, against the same architecture,
data and budget given only the first sentence.

    python benchmarks/infill.py [--steps 600] [--data ../shared/data/tinystories]
    python benchmarks/infill.py --stories 800 2000 7505 --epochs 3 --workers 2 --threads 1   # the curve

With ``--stories`` each size trains on the first N training stories for ``--epochs``
epochs (the same budget per story), and the drop is printed per size. ``--workers 2
--threads 1`` trains two models at once, one per core.

Two GPTs are trained on the same TinyStories stories with the same budget and batching
(whole stories, one per row): A on ``first <blank> last <sep> middle <eos>``
(``data.task: infill``, loss on the middle only), B on plain ``<bos> story <eos>`` (``task: infill+lm`` with
``infill_fraction: 0``). A scores the middle given first and last sentence, B given the
first sentence. The issue's target: A's perplexity at least 10 % lower.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from _common import ROOT, environment
from models_src.checkpoint import load_checkpoint
from training.config import load_config
from training.data import DataConfig, load_documents, prepare
from training.infill_eval import middle_scores, story_parts
from training.train import Trainer

DATA = Path(os.environ.get("FABLE_DATA_DIR", ROOT.parent / "shared" / "data")) / "tinystories"


def run_config(name: str, task: str, fraction: float, args, tmp: Path, stories: int | None):
    budget = {"epochs": args.epochs} if stories else {"max_steps": args.steps}
    subset = {"use_subset": True, "subset_size": stories} if stories else {}
    raw = {"name": name,
           "model": {"arch": "gpt", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 320, "dropout": 0.1},
           "data": {"path": str(args.data), "cache_dir": str(tmp / "cache"), "task": task,
                    "infill_fraction": fraction, "middle_only": task == "infill", **subset},
           "tokenizer": {"kind": "bpe", "vocab_size": 1024},
           "training": {"batch_size": 16, "learning_rate": 2e-3, "min_lr": 2e-4, "warmup_steps": 50,
                        **budget, "eval_every": 10**9, "eval_batches": 10,
                        "save_every": 10**9, "seed": 0, "num_threads": args.threads},
           "output": {"dir": str(tmp / "runs/{name}"), "experiments_dir": str(tmp / "exp")}}
    return load_config(raw=raw)


# A is the infilling model (loss on the middle only), B the plain one (whole stories)
MODELS = {"infill": ("infill", 1.0), "plain": ("infill+lm", 0.0)}


def train(job: tuple) -> Path:
    """One training; module-level so that ``--workers`` can run it in another process."""
    name, args, tmp, stories = job
    torch.set_num_threads(args.threads)
    config = run_config(name, *MODELS[name], args, tmp, stories)
    summary = Trainer(config, quiet=True).fit()
    print(f"  trained {name} ({stories or 'all'} stories): {summary.step} steps "
          f"in {summary.training_time_s:.0f} s", flush=True)
    return config.run_dir / "final"


def drop(trained: dict[str, Path], args) -> tuple[float, float]:
    """Score both trained models on the validation stories and print the drop."""
    infiller, plain = load_checkpoint(trained["infill"]), load_checkpoint(trained["plain"])
    docs = load_documents(DataConfig(path=str(args.data)))["validation"]
    parts, skipped = story_parts(docs)
    both = middle_scores(infiller, parts, "first+last", max_len=320)
    first = middle_scores(plain, parts, "first", max_len=320)
    print(f"validation: {len(parts)} stories with a middle ({skipped} without), "
          f"{both.tokens:,} middle tokens scored")
    print(f"middle perplexity given first and last sentence (infilling model): {both.perplexity:.3f}")
    print(f"middle perplexity given the first sentence only (plain model):    {first.perplexity:.3f}")
    lower = 1 - both.perplexity / first.perplexity
    print(f"the ending lowers perplexity by {lower:.1%} (target: at least 10 %)", flush=True)
    return both.perplexity, first.perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--stories", type=int, nargs="+", help="training-set sizes for the curve")
    parser.add_argument("--epochs", type=float, default=3.0, help="budget per size, with --stories")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per training")
    parser.add_argument("--workers", type=int, default=1,
                        help="trainings run at once, each in its own process (e.g. 2 with --threads 1)")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    torch.set_num_threads(args.threads * args.workers)
    print(f"# infilling benchmark — {environment()}")
    sizes = sorted(args.stories or [None], key=lambda n: -(n or 10**9))  # largest first: balanced workers
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        jobs = []
        for stories in sizes:
            folder = tmp / str(stories or "all")
            # tokenize once per size, so both models of a pair share one tokenizer
            config = run_config("infill", *MODELS["infill"], args, folder, stories)
            prepare(config.data, config.tokenizer)
            jobs += [(name, args, folder, stories) for name in MODELS]
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                finals = list(pool.map(train, jobs))
        else:
            finals = [train(job) for job in jobs]
        curve = {}
        for stories in sorted(sizes, key=lambda n: n or 0):
            print(f"== {stories or 'all'} training stories"
                  + (f", {args.epochs:g} epochs" if stories else f", {args.steps} steps"))
            trained = {job[0]: final for job, final in zip(jobs, finals) if job[3] == stories}
            curve[stories] = drop(trained, args)
    if args.stories:
        print("| training stories | given first + last (infilling) | given first only (plain) | lower by |")
        print("| ---: | ---: | ---: | ---: |")
        for stories, (both, first) in curve.items():
            print(f"| {stories:,} | {both:.2f} | {first:.2f} | {1 - both / first:.1%} |")


if __name__ == "__main__":
    main()
