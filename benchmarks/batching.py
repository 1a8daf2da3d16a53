"""Continuous batching in process: what a decoding step costs with 16 rows against 1.

    python benchmarks/batching.py [--checkpoint checkpoints/char-gpt-shakespeare]
                                  [--rows 1 16] [--requests 200] [--threads 1]

The server's steady state under ``benchmarks/load.py``, without HTTP: ``rows`` sequences
decode together in one ``models_src.batching.Batch``; each is a 64-token request (the
load benchmark's prompts, temperature 0.8, its own seed), and a request that ends is
replaced by a new one before the next step, as a client sends its next request. Per row
count: the median milliseconds per step and new tokens/s; then the step-time ratio of the largest
row count to the smallest. The serving latency target (p99 at 16 clients at most 3x a
lone request) needs that ratio well under 3, since the p99 adds to the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import ROOT, environment

from models_src.batching import Batch
from models_src.checkpoint import load_checkpoint
from models_src.sampling import SamplingParams

PROMPTS = ("ROMEO:", "Once upon a time", "The king said", "First Citizen:\n")


def steady_state(model, tokenizer, rows: int, requests: int) -> tuple[float, float]:
    """(median ms per step, new tokens/s) over ``requests`` completed requests. A step is
    timed with the joins that follow it; the median leaves out the few steps that have
    joins (the rows here end together, once every 64 steps) and, on a shared machine,
    those that other work preempted. The tokens/s count everything."""

    def request(i: int):
        ids = [tokenizer.bos_id, *tokenizer.encode(PROMPTS[i % len(PROMPTS)])]
        return ids, SamplingParams(max_new_tokens=64, temperature=0.8, seed=i, ignore_eos=True)

    batch = Batch(model, tokenizer)
    batch.add([request(i) for i in range(rows)])
    sent, done, tokens, steps = rows, 0, 0, []
    start = time.perf_counter()
    while done < requests:
        began = time.perf_counter()
        events = batch.step()
        tokens += len(events)
        ended = sum(seq.completion is not None for seq, _ in events)
        if ended:
            batch.add([request(sent + j) for j in range(ended)])
            sent, done = sent + ended, done + ended
        steps.append(time.perf_counter() - began)
    seconds = time.perf_counter() - start
    return statistics.median(steps) * 1e3, tokens / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "char-gpt-shakespeare"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.model.float().eval()
    print(f"# continuous batching in process — {environment()}; {args.checkpoint}")
    steady_state(model, checkpoint.tokenizer, max(args.rows), 16)  # warm-up
    results = {}
    for rows in args.rows:
        ms, tokens_per_s = steady_state(model, checkpoint.tokenizer, rows, args.requests)
        results[rows] = ms
        print(f"rows {rows:3d}: {ms:6.3f} ms per step (median), {tokens_per_s:8,.0f} new tokens/s")
    low, high = min(results), max(results)
    print(f"step time at {high} rows / at {low}: {results[high] / results[low]:.2f}x "
          f"(throughput {high * results[low] / results[high]:.2f}x)")


if __name__ == "__main__":
    main()
