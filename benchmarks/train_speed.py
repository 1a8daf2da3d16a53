"""Training speed: our trainer against Hugging Face GPT2LMHeadModel and karpathy/nanoGPT.

    python benchmarks/train_speed.py                       # ours vs HF, two shapes
    python benchmarks/train_speed.py --nanogpt ../peers/nanoGPT   # + nanoGPT's CPU "baby" run

1. Tokens/s of the training step (forward, backward, clipping, AdamW) for the character
   GPT config and for nanoGPT's CPU "baby" shape, against ``transformers.GPT2LMHeadModel``
   with the same sizes, data, batches and optimizer, measured in the same run (best of
   ``--repeats`` alternating rounds). HF is run with its default activation (``gelu_new``)
   and, for a like-for-like model, with exact GELU as ours uses; ``--compile`` adds ours
   with ``training.compile: true`` (start-up excluded).
2. With ``--nanogpt DIR`` (a checkout of karpathy/nanoGPT beside the project; never
   committed), nanoGPT trains its baby config for 2,000 iterations on Tiny Shakespeare;
   then our trainer gets the same wall-clock (``training.max_time_s``) with the same shape
   and hyper-parameters, and both speeds and final validation losses are printed.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, environment
from models_src.records import TrainingSummary
from training.config import load_config
from training.data import random_batch
from training.train import Trainer

SHAKESPEARE = Path(os.environ.get("FABLE_DATA_DIR", ROOT.parent / "shared" / "data")) / "tinyshakespeare/input.txt"
SHAPES = {  # name: (model sizes, batch size)
    "char GPT config": (dict(n_layer=4, n_head=4, n_embd=128, block_size=128), 32),
    "nanoGPT baby": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64), 12),
}
BABY = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3,
            warmup=100, iters=2000, weight_decay=0.1, beta2=0.99)


def corpus_text() -> str:
    if SHAKESPEARE.exists():
        return SHAKESPEARE.read_text()
    import random
    rng = random.Random(0)
    words = "the king queen sword crown night day love death speak hear thou art my lord".split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(20000))


def char_tokens(text: str):
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], dtype=np.uint16), len(chars)


def adamw(model, lr: float, weight_decay: float = 0.1):
    params = list({id(p): p for p in model.parameters()}.values())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))


def hf_tokens_per_s(model, tokens, batch, seq_len, steps: int) -> float:
    """HF's model in a minimal loop: the same batches, optimizer and clipping as ours."""
    generator = torch.Generator().manual_seed(0)
    optimizer = adamw(model, 1e-3)
    model.train()
    elapsed = 0.0
    for i in range(steps + 3):
        started = time.perf_counter()
        x, y = random_batch(tokens, batch, seq_len, generator)
        loss = _hf_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if i >= 3:  # the first steps warm the allocator up
            elapsed += time.perf_counter() - started
    return steps * batch * seq_len / elapsed


def _hf_loss(model, x, y):
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def ours_tokens_per_s(corpus: Path, tmp: Path, sizes: dict, batch: int, steps: int,
                      compile: bool = False) -> float:
    """Our whole trainer (data, loop, optimizer), timed by its own step clock. Two runs of
    different lengths: their difference leaves out warm-up and torch.compile's start-up."""
    def run(n: int) -> tuple[int, float]:
        raw = {"name": "speed", "model": {"arch": "gpt", "dropout": 0.0, **sizes},
               "data": {"path": str(corpus), "cache_dir": str(tmp / "cache")},
               "tokenizer": {"kind": "char"},
               "training": {"batch_size": batch, "learning_rate": 1e-3, "max_steps": n, "compile": compile,
                            "eval_every": 10**9, "save_every": 10**9, "warmup_steps": 10},
               "output": {"dir": str(tmp / "runs/{name}"), "experiments_dir": str(tmp / "exp")}}
        trainer = Trainer(load_config(raw=raw), quiet=True)
        trainer.evaluate = lambda max_batches: {"loss": 0.0, "perplexity": 1.0, "token_accuracy": 0.0}
        summary = trainer.fit()
        return summary.tokens_seen, summary.training_time_s
    short_tokens, short_time = run(5)
    long_tokens, long_time = run(5 + steps)
    return (long_tokens - short_tokens) / (long_time - short_time)


def compare_with_hf(args, corpus: Path, tmp: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    tokens, vocab = char_tokens(corpus.read_text())
    print(f"{'shape':16} {'ours':>8} {'compiled':>9} {'HF':>8} {'HF exact GELU':>14}   "
          f"ours/HF  compiled/HF  ours/HF-exact")
    for name, (sizes, batch) in SHAPES.items():
        best = {"ours": 0.0, "compiled": 0.0, "hf": 0.0, "hf_gelu": 0.0}
        for _ in range(args.repeats):  # alternating rounds, best of each: the least disturbed
            best["ours"] = max(best["ours"], ours_tokens_per_s(corpus, tmp, sizes, batch, args.steps))
            if args.compile:
                best["compiled"] = max(best["compiled"], ours_tokens_per_s(
                    corpus, tmp, sizes, batch, args.steps, compile=True))
            for key, act in (("hf", "gelu_new"), ("hf_gelu", "gelu")):
                torch.manual_seed(0)
                hf = GPT2LMHeadModel(GPT2Config(
                    vocab_size=vocab + 6, n_positions=sizes["block_size"], n_embd=sizes["n_embd"],
                    n_layer=sizes["n_layer"], n_head=sizes["n_head"], activation_function=act,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
                best[key] = max(best[key], hf_tokens_per_s(hf, tokens, batch, sizes["block_size"], args.steps))
        compiled = f"{best['compiled'] / best['hf']:10.2f}x" if args.compile else f"{'-':>11}"
        print(f"{name:16} {best['ours']:8,.0f} {best['compiled']:9,.0f} {best['hf']:8,.0f} "
              f"{best['hf_gelu']:14,.0f}   {best['ours'] / best['hf']:6.2f}x {compiled} "
              f"{best['ours'] / best['hf_gelu']:13.2f}x")


def prepare_nanogpt_data(nanogpt: Path, text: str) -> None:
    """nanoGPT's shakespeare_char layout (train.bin, val.bin, meta.pkl), written here because
    its prepare.py would download the text; the 90/10 split is the same."""
    data = nanogpt / "data" / "shakespeare_char"
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    ids[:n].tofile(data / "train.bin")
    ids[n:].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def run_nanogpt(nanogpt: Path, text: str, threads: int) -> tuple[float, float, float]:
    """(wall seconds, training tokens/s, final val loss) of nanoGPT's CPU baby run."""
    prepare_nanogpt_data(nanogpt, text)
    b = BABY
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
           "--compile=False", "--eval_iters=20", "--log_interval=50", f"--block_size={b['block_size']}",
           f"--batch_size={b['batch_size']}", f"--n_layer={b['n_layer']}", f"--n_head={b['n_head']}",
           f"--n_embd={b['n_embd']}", f"--max_iters={b['iters']}", f"--lr_decay_iters={b['iters']}",
           "--dropout=0.0", f"--out_dir={tempfile.mkdtemp()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    out = subprocess.run(cmd, cwd=nanogpt, env=env, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - started
    val = float(re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", out)[-1])
    iter_ms = [float(t) for i, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out) if int(i) > 0]
    return wall, b["batch_size"] * b["block_size"] / (np.median(iter_ms) / 1000), val


def run_ours_same_wallclock(corpus: Path, tmp: Path, wall: float, threads: int,
                            lr: float) -> tuple[TrainingSummary, float]:
    """Our trainer, nanoGPT's shape and hyper-parameters (no biases, as its baby config), with
    nanoGPT's wall-clock as its budget: ``training.max_time_s`` ends the loop and the cosine
    schedule follows the clock, start-up and the final evaluation counted against it. Its
    summary, and the seconds it took in all."""
    b = BABY
    raw = {"name": "baby", "model": {"arch": "gpt", "dropout": 0.0, "bias": False, "n_layer": b["n_layer"],
                                     "n_head": b["n_head"], "n_embd": b["n_embd"], "block_size": b["block_size"]},
           "data": {"path": str(corpus), "cache_dir": str(tmp / "cache")}, "tokenizer": {"kind": "char"},
           "training": {"batch_size": b["batch_size"], "learning_rate": lr, "min_lr": lr / 10,
                        "warmup_steps": b["warmup"], "weight_decay": b["weight_decay"],
                        "betas": [0.9, b["beta2"]], "grad_clip": 1.0, "eval_every": 250, "eval_batches": 20,
                        "save_every": 10**9, "num_threads": threads, "max_time_s": wall},
           "output": {"dir": str(tmp / "runs/{name}"), "experiments_dir": str(tmp / "exp")}}
    started = time.perf_counter()
    trainer = Trainer(load_config(raw=raw), quiet=True)
    final_eval = 5.0  # seconds kept for the final evaluation and checkpoints
    trainer.t.max_time_s = wall - (time.perf_counter() - started) - final_eval
    return trainer.fit(), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout to run as the peer")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    parser.add_argument("--lr", type=float, default=BABY["learning_rate"],
                        help="our peak learning rate against nanoGPT (its own: 1e-3; min_lr is a tenth)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# training-speed benchmark — {environment()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "input.txt"
        corpus.write_text(corpus_text())
        print(f"data: {'Tiny Shakespeare' if SHAKESPEARE.exists() else 'generated text'}, "
              f"{len(corpus.read_text()):,} characters")
        if not args.skip_hf:
            compare_with_hf(args, corpus, tmp)
        if args.nanogpt:
            wall, nano_tps, nano_val = run_nanogpt(args.nanogpt.resolve(), corpus.read_text(), args.threads)
            ours, ours_wall = run_ours_same_wallclock(corpus, tmp, wall, args.threads, args.lr)
            ours_tps = ours.tokens_seen / ours.training_time_s
            print(f"\nnanoGPT baby, {BABY['iters']} iterations: {wall:.0f} s wall, {nano_tps:,.0f} tokens/s, "
                  f"val loss {nano_val:.4f} (20 random batches)")
            print(f"ours, same shape and wall-clock, learning rate {args.lr:g}: {ours.step} steps in "
                  f"{ours_wall:.0f} s, "
                  f"{ours_tps:,.0f} tokens/s ({ours_tps / nano_tps:.2f}x), val loss {ours.val_loss:.4f} "
                  f"(whole validation split)")


if __name__ == "__main__":
    main()
