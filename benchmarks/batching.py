"""Continuous batching in process: a request's latency with 16 rows decoding against alone.

    python benchmarks/batching.py [--checkpoint checkpoints/char-gpt-shakespeare]
                                  [--rows 1 16] [--requests 200] [--threads 1] [--rounds 3]
                                  [--clock wall|cpu]

The server's steady state under ``benchmarks/load.py``, without HTTP or threads:
``rows`` sequences decode together in one ``models_src.generation.Batch``; each is a
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
from dataclasses import dataclass, field

import torch
from _common import ROOT, environment
from load import PROMPTS, percentile  # the served benchmark's requests and percentiles

from models_src.checkpoint import load_checkpoint
from models_src.generation import Batch
from models_src.sampling import SamplingParams

NEW_TOKENS = 64
CLOCK = time.perf_counter  # --clock cpu: time.process_time


@dataclass
class Pool:
    """One row count's measurements, pooled over rounds."""
    steps: list[float] = field(default_factory=list)  # seconds per step
    latencies: list[float] = field(default_factory=list)  # seconds per completed request
    tokens: int = 0
    seconds: float = 0.0


def steady_state(model, tokenizer, rows: int, requests: int, pool: Pool) -> None:
    """Add to ``pool`` the steps, the latencies and the new tokens of ``requests``
    completed full-length requests after the staggered start, and the time they took."""

    def request(i: int, tokens: int = NEW_TOKENS):
        ids = [tokenizer.bos_id, *tokenizer.encode(PROMPTS[i % len(PROMPTS)])]
        return ids, SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=True)

    batch = Batch(model, tokenizer)
    batch.add([request(i, NEW_TOKENS * (i + 1) // rows) for i in range(rows)])  # not timed
    added_at = {}  # sequence -> when it was added
    sent, done = rows, 0
    start = CLOCK()
    while done < requests:
        began = CLOCK()
        events = batch.step()
        now = CLOCK()
        pool.steps.append(now - began)
        pool.tokens += len(events)
        ended = [seq for seq, _ in events if seq.completion is not None]
        for seq in ended:
            if seq in added_at:
                pool.latencies.append(now - added_at.pop(seq))
                done += 1
        for seq in batch.add([request(sent + j) for j in range(len(ended))]):
            added_at[seq] = CLOCK()
        sent += len(ended)
    pool.seconds += CLOCK() - start


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
    steady_state(model, checkpoint.tokenizer, max(args.rows), 16, Pool())  # warm-up
    pools = {rows: Pool() for rows in args.rows}
    for _ in range(args.rounds):
        for rows in args.rows:
            steady_state(model, checkpoint.tokenizer, rows, max(1, args.requests // args.rounds),
                         pools[rows])
    results = {}
    for rows, pool in pools.items():
        p50, p99 = percentile(pool.latencies, 50) * 1e3, percentile(pool.latencies, 99) * 1e3
        tokens_per_s = pool.tokens / pool.seconds
        results[rows] = (tokens_per_s, p50, p99)
        print(f"rows {rows:3d}: {statistics.median(pool.steps) * 1e3:6.3f} ms per step (median), "
              f"{tokens_per_s:8,.0f} new tokens/s, latency p50 {p50:6.1f} ms, p99 {p99:6.1f} ms "
              f"({len(pool.latencies)} requests)")
    low, high = min(results), max(results)
    print(f"{high} rows against {low}: tokens/s {results[high][0] / results[low][0]:.2f}x, "
          f"p99 / lone p50 {results[high][2] / results[low][1]:.2f}x, "
          f"p50 / lone p50 {results[high][1] / results[low][1]:.2f}x")


if __name__ == "__main__":
    main()
