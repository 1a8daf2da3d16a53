"""Continuous batching in process: a request's latency with 16 rows decoding against alone.

    python benchmarks/batching.py [--checkpoint checkpoints/char-gpt-shakespeare]
                                  [--rows 1 16] [--requests 200] [--threads 1] [--rounds 3]
                                  [--clock wall|cpu]

The server's steady state under ``benchmarks/load.py``, without HTTP or threads:
``rows`` sequences decode together in one ``models_src.batching.Batch``; each is a
64-token request (the load benchmark's prompts, temperature 0.8, its own seed), and a
request that ends is replaced by a new one before the next step, as a client sends its
next request. The first ``rows`` requests ask for 4, 8, ... tokens so that rows end at
different steps, as they do under load: then a request joins every 64 / rows steps, and
each request shares its steps with the joins of the others.

Per row count: the median milliseconds per step (steps with a join included), new
tokens/s, and each request's latency (from ``add`` to its last token) at p50 and p99.
Then the serving targets' ratios for the largest row count against the smallest:
tokens/s (target >= 4x at 16 against 1) and p99 latency over the lone request's median
(target <= 3x). With ``--rounds N`` the row counts alternate N times and pool their
requests, so a machine whose speed drifts does not favour one of them; ``--clock cpu``
times with the process's CPU time (one thread does all the work here), which time the
machine gives to other guests does not count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import ROOT, environment
from load import PROMPTS  # the same requests as the served benchmark

from models_src.batching import Batch
from models_src.checkpoint import load_checkpoint
from models_src.sampling import SamplingParams

NEW_TOKENS = 64
CLOCK = time.perf_counter  # --clock cpu: time.process_time


def steady_state(model, tokenizer, rows: int, requests: int) -> tuple[list[float], list[float], int, float]:
    """(seconds per step, latency of each completed request in seconds, new tokens, seconds
    in all) over ``requests`` completed full-length requests after the staggered start."""

    def request(i: int, tokens: int = NEW_TOKENS):
        ids = [tokenizer.bos_id, *tokenizer.encode(PROMPTS[i % len(PROMPTS)])]
        return ids, SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True)

    batch = Batch(model, tokenizer)
    batch.add([request(i, NEW_TOKENS * (i + 1) // rows) for i in range(rows)])  # not timed
    added_at = {}  # sequence -> when it was added
    sent, steps, latencies, tokens = rows, [], [], 0
    start = CLOCK()
    while len(latencies) < requests:
        began = CLOCK()
        events = batch.step()
        now = CLOCK()
        steps.append(now - began)
        tokens += len(events)
        ended = [seq for seq, _ in events if seq.completion is not None]
        for seq in ended:
            if seq in added_at:
                latencies.append(now - added_at.pop(seq))
        for seq in batch.add([request(sent + j) for j in range(len(ended))]):
            added_at[seq] = CLOCK()
        sent += len(ended)
    return steps, latencies, tokens, CLOCK() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest rank, as load.py."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "char-gpt-shakespeare"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    model = checkpoint.model.float().eval()
    print(f"# continuous batching in process — {environment()}, {args.clock} clock; {args.checkpoint}")
    steady_state(model, checkpoint.tokenizer, max(args.rows), 16)  # warm-up
    pooled = {rows: ([], [], 0, 0.0) for rows in args.rows}
    for _ in range(args.rounds):
        for rows in args.rows:
            steps, latencies, tokens, seconds = steady_state(
                model, checkpoint.tokenizer, rows, max(1, args.requests // args.rounds))
            s, lat, n, sec = pooled[rows]
            pooled[rows] = (s + steps, lat + latencies, n + tokens, sec + seconds)
    results = {}
    for rows, (steps, latencies, tokens, seconds) in pooled.items():
        p50, p99 = percentile(latencies, 50) * 1e3, percentile(latencies, 99) * 1e3
        results[rows] = (tokens / seconds, p50, p99)
        print(f"rows {rows:3d}: {statistics.median(steps) * 1e3:6.3f} ms per step (median), "
              f"{tokens / seconds:8,.0f} new tokens/s, latency p50 {p50:6.1f} ms, p99 {p99:6.1f} ms "
              f"({len(latencies)} requests)")
    low, high = min(results), max(results)
    print(f"{high} rows against {low}: tokens/s {results[high][0] / results[low][0]:.2f}x, "
          f"p99 / lone p50 {results[high][2] / results[low][1]:.2f}x, "
          f"p50 / lone p50 {results[high][1] / results[low][1]:.2f}x")


if __name__ == "__main__":
    main()
