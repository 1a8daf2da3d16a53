"""Aggregate tokens/s and latency of the served API under concurrent load, and the
workers' memory before and after it.

    python benchmarks/load.py [--checkpoints checkpoints] [--model NAME] [--levels 1 4 16 64]
                              [--requests 200] [--seconds 60] [--rounds 1] [--workers 1]
                              [--threads 64]
                              [--num-predict 64] [--env FABLE_X=value ...] [--json]

It starts a real gunicorn on a free port of 127.0.0.1 (the command ``make serve`` runs,
``gunicorn -c gunicorn.conf.py 'app:create_app()'``, through tests/gunicorn_server.py)
and talks to it over HTTP only, so it measures whatever the app's concurrency model is.
At each concurrency level, that many client threads (each its own keep-alive
connection) send ``POST /api/generate`` with ``stream: false`` and ``num_predict`` tokens
(default 64; each request its own seed, the same seeds at every level) until
``--requests`` have been sent or ``--seconds`` have passed; requests already sent then
finish. With ``--rounds N`` the levels run N times in turn (1, 16, 1, 16, ...), each
round with 1/N of the requests and seconds, and each level's figures pool its rounds: on
a shared machine whose speed drifts from minute to minute, that compares the levels on
the same mix of good and bad moments. Per level it reports:

- aggregate new tokens/s: the sum of the responses' ``eval_count`` over the level's
  wall-clock time (first request sent to last answer received);
- latency p50 / p99 (nearest rank) of the successful requests, client-side;
- errors by HTTP status (503 "busy" included), and transport errors by exception.

Then the two ratios the serving work targets: tokens/s at concurrency 16 over tokens/s
at 1 (target >= 4x), and p99 latency at 16 over the latency of a lone request, the
median at concurrency 1 (target <= 3x). Memory: each worker's PSS and RSS from
/proc/<pid>/smaps_rollup once the models are loaded (before any request), after the
warm-up requests and after the last level, and the PSS growth from the first to the last
(the first requests allocate buffers once; tests/test_soak.py checks that memory then
stays flat). ``--json`` prints all of it as one JSON object instead.

The clients use the standard library's ``http.client``: on a 2-core machine they share
the cores with the server, and httpx's Python cost ~1.2 ms of CPU a request (measured
under 16 clients), about what the server's own request handling costs.

A server needs a gunicorn thread per request in flight (``--threads``, which sets
FABLE_THREADS, defaults to the highest level, at least 4); settings of the app itself (batch size,
queue) are the app's defaults unless given with ``--env``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gunicorn_server import GunicornServer, Memory  # noqa: E402  (the path above)

PROMPTS = ("ROMEO:", "Once upon a time", "The king said", "First Citizen:\n")
TARGET_SPEEDUP, TARGET_LATENCY = 4.0, 3.0  # tokens/s 16 / 1 at least; p99 16 / lone at most


@dataclass
class Result:
    status: int | None  # None: no HTTP answer
    seconds: float
    tokens: int = 0
    error: str | None = None


@dataclass
class Level:
    concurrency: int
    requests: int
    ok: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    requests_per_s: float
    latency_ms: dict[str, float]
    mean_tokens: float
    errors: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    # the smallest value with at least q % of them at or below it; q * n first, so that a
    # whole rank stays whole (round(x + 0.5) rounded 99.5 to the even 100)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) / 100) - 1))]


def request_body(model: str, index: int, num_predict: int, temperature: float) -> dict:
    return {"model": model, "prompt": PROMPTS[index % len(PROMPTS)], "stream": False,
            "options": {"num_predict": num_predict, "temperature": temperature, "seed": index}}


def connect(url: str, timeout: float) -> http.client.HTTPConnection:
    """A keep-alive connection to the server (it reconnects by itself once closed)."""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def send(connection: http.client.HTTPConnection, body: dict) -> Result:
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    try:
        connection.request("POST", "/api/generate", payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as e:
        connection.close()  # a broken connection is not reused
        return Result(None, time.perf_counter() - started, error=type(e).__name__)
    seconds = time.perf_counter() - started
    if response.status != 200:
        return Result(response.status, seconds)
    try:
        return Result(200, seconds, int(json.loads(data)["eval_count"]))
    except (ValueError, KeyError, TypeError):
        return Result(200, seconds, error="malformed answer")


def run_round(url: str, model: str, concurrency: int, indices: range, seconds: float,
              args: argparse.Namespace) -> tuple[list[Result], float]:
    """``concurrency`` clients, each sending its next request when the last one returns,
    the requests numbered ``indices`` (their seeds), for at most ``seconds`` of sending.
    Returns the results and the wall-clock from the first request to the last answer."""
    results: list[Result] = []
    lock = threading.Lock()
    next_index = iter(indices)
    started = time.perf_counter()
    stop_sending = started + seconds

    def client_loop() -> None:
        connection = connect(url, args.timeout)
        try:
            while time.perf_counter() < stop_sending:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                result = send(connection, request_body(model, index, args.num_predict,
                                                       args.temperature))
                with lock:
                    results.append(result)
        finally:
            connection.close()

    clients = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return results, time.perf_counter() - started


def summarize(concurrency: int, results: list[Result], wall: float) -> Level:
    """One level's figures from the results of all its rounds and their summed wall-clock."""
    ok = [r for r in results if r.status == 200 and r.error is None]
    tokens = sum(r.tokens for r in ok)
    latencies = [r.seconds * 1e3 for r in ok]
    errors = Counter(r.error if r.error else str(r.status) for r in results
                     if r.status != 200 or r.error)
    return Level(
        concurrency=concurrency, requests=len(results), ok=len(ok), wall_s=round(wall, 3),
        tokens=tokens, tokens_per_s=round(tokens / wall, 1),
        requests_per_s=round(len(ok) / wall, 2),
        latency_ms={"p50": round(percentile(latencies, 50), 1),
                    "p99": round(percentile(latencies, 99), 1),
                    "mean": round(sum(latencies) / len(latencies), 1) if latencies else None,
                    "max": round(max(latencies), 1) if latencies else None},
        mean_tokens=round(tokens / len(ok), 1) if ok else 0.0, errors=dict(errors))


def run_levels(url: str, model: str, args: argparse.Namespace) -> list[Level]:
    """Every level, ``args.rounds`` times in turn (1, 16, 1, 16, ...), each round with its
    share of the requests and seconds. On a shared machine whose speed drifts from one
    minute to the next, levels measured one after the other would compare two different
    machines; alternating rounds give each level the same mix."""
    per_round = -(-args.requests // args.rounds)
    pooled = {c: ([], 0.0) for c in args.levels}
    for r in range(args.rounds):
        for concurrency in args.levels:
            first = r * max(per_round, concurrency)  # the same seeds at every level
            results, wall = run_round(url, model, concurrency,
                                      range(first, first + max(per_round, concurrency)),
                                      args.seconds / args.rounds, args)
            done, seconds = pooled[concurrency]
            pooled[concurrency] = (done + results, seconds + wall)
    return [summarize(c, *pooled[c]) for c in args.levels]


def ratios(levels: list[Level]) -> dict:
    by = {level.concurrency: level for level in levels}
    out = {"tokens_per_s_16_over_1": None, "p99_16_over_lone": None, "p99_16_over_p99_1": None,
           "requests_per_s_16_over_1": None, "requests_per_s_16_over_1_for_target": None}
    if 1 in by and 16 in by and by[1].tokens_per_s and by[16].ok:
        one, many = by[1], by[16]
        out["tokens_per_s_16_over_1"] = round(many.tokens_per_s / one.tokens_per_s, 2)
        # the target's ratio: a lone request's latency is its median; the p99 over p99
        # (both tails) is printed beside it, not held to the target
        out["p99_16_over_lone"] = round(many.latency_ms["p99"] / one.latency_ms["p50"], 2)
        out["p99_16_over_p99_1"] = round(many.latency_ms["p99"] / one.latency_ms["p99"], 2)
        # The clients form a closed loop (each sends its next request when the last one
        # returns), so by Little's law a level's mean latency is its clients over its
        # requests/s: the latency target is a throughput target. With this run's tails
        # (p99 / mean at 16, mean / median at 1), p99 <= TARGET_LATENCY x a lone request
        # needs the requests/s at 16 to be this many times those at 1.
        out["requests_per_s_16_over_1"] = round(many.requests_per_s / one.requests_per_s, 2)
        tail_16 = many.latency_ms["p99"] / many.latency_ms["mean"]
        tail_1 = one.latency_ms["mean"] / one.latency_ms["p50"]
        out["requests_per_s_16_over_1_for_target"] = round(16 * tail_16 * tail_1 / TARGET_LATENCY, 2)
    return out


def memory_table(memory: dict[int, Memory]) -> dict[str, dict[str, int]]:
    return {str(pid): asdict(m) for pid, m in sorted(memory.items())}


def growth_pct(before: dict[int, Memory], after: dict[int, Memory]) -> float | None:
    pss_before = sum(m.pss_kib for m in before.values())
    pss_after = sum(m.pss_kib for m in after.values())
    return round((pss_after / pss_before - 1) * 100, 1) if pss_before else None


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    env = {"FABLE_WORKERS": str(args.workers),
           "FABLE_THREADS": str(args.threads or max(4, *args.levels))}
    if args.num_predict > 512:  # the app's default limit on tokens per request
        env["FABLE_MAX_NEW_TOKENS"] = str(args.num_predict)
    for pair in args.env:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def measure(args: argparse.Namespace) -> dict:
    env = server_settings(args)
    with GunicornServer(args.checkpoints, env=env) as server:
        tags = httpx.get(f"{server.url}/api/tags", timeout=30).json()["models"]
        if not tags:
            raise SystemExit(f"no model loaded from {args.checkpoints}:\n{server.log_text()}")
        server.wait_for_workers(args.workers, models=len(tags))
        model = args.model or tags[0]["name"]
        if model not in {t["name"] for t in tags}:
            raise SystemExit(f"no model {model!r}; loaded: {', '.join(t['name'] for t in tags)}")
        memory_before = server.worker_memory()
        connection = connect(server.url, args.timeout)  # warm-up
        for i in range(args.warmup):
            send(connection, request_body(model, -1 - i, args.num_predict, args.temperature))
        connection.close()
        memory_warm = server.worker_memory()
        levels = run_levels(server.url, model, args)
        if not args.json:
            for i, level in enumerate(levels):
                print_level(level, header=i == 0)
        memory_after = server.worker_memory()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
                   f"{platform.python_version()}",
        "checkpoints": str(args.checkpoints), "model": model, "num_predict": args.num_predict,
        "temperature": args.temperature, "server_env": env,
        "levels": [asdict(level) for level in levels],
        "ratios": ratios(levels),
        "targets": {"tokens_per_s_16_over_1": f">= {TARGET_SPEEDUP:g}",
                    "p99_16_over_lone": f"<= {TARGET_LATENCY:g}"},
        "memory_kib": {"after_start": memory_table(memory_before),
                       "after_warmup": memory_table(memory_warm),
                       "after_load": memory_table(memory_after),
                       "pss_growth_pct": growth_pct(memory_before, memory_after)},
    }


def print_level(level: Level, header: bool) -> None:
    if header:
        print(f"{'clients':>7} {'requests':>8} {'ok':>6} {'wall s':>7} {'tokens/s':>9} "
              f"{'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'tok/req':>7}  errors")
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(level.errors.items())) or "-"
    print(f"{level.concurrency:7} {level.requests:8} {level.ok:6} {level.wall_s:7.1f} "
          f"{level.tokens_per_s:9.1f} {level.requests_per_s:7.2f} {level.latency_ms['p50']:8.0f} "
          f"{level.latency_ms['p99']:8.0f} {level.mean_tokens:7.1f}  {errors}", flush=True)


def print_report(report: dict) -> None:
    r = report["ratios"]
    if r["tokens_per_s_16_over_1"] is not None:
        speedup, latency = r["tokens_per_s_16_over_1"], r["p99_16_over_lone"]
        print(f"tokens/s at 16 / at 1: {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x: "
              f"{'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})")
        verdict = "met" if latency <= TARGET_LATENCY else "NOT met"
        print(f"p99 latency at 16 / lone request (p50 at 1): {latency:.2f}x "
              f"(target <= {TARGET_LATENCY:g}x: {verdict}); p99 at 16 / p99 at 1: "
              f"{r['p99_16_over_p99_1']:.2f}x")
        print(f"closed loop (Little's law): requests/s at 16 / at 1: "
              f"{r['requests_per_s_16_over_1']:.2f}x; the p99 target needs "
              f"{r['requests_per_s_16_over_1_for_target']:.2f}x at this run's tails")
    memory = report["memory_kib"]
    for when in ("after_start", "after_warmup", "after_load"):
        workers = ", ".join(f"{pid}: PSS {m['pss_kib'] / 1024:.1f} MiB "
                            f"(RSS {m['rss_kib'] / 1024:.1f})" for pid, m in memory[when].items())
        print(f"worker memory {when.replace('_', ' ')}: {workers}")
    print(f"PSS growth from start-up to after the load: {memory['pss_growth_pct']:+.1f} %")
    print(f"# {report['model']} from {report['checkpoints']}, {report['num_predict']} tokens a "
          f"request, {report['machine']}, server env {report['server_env']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                        help="FABLE_CHECKPOINT_DIR of the server (default: checkpoints/)")
    parser.add_argument("--model", help="model to load (default: the first of GET /api/tags)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="concurrency levels (default: 1 4 16 64)")
    parser.add_argument("--requests", type=int, default=200,
                        help="requests per level (at least the level's concurrency)")
    parser.add_argument("--seconds", type=float, default=60,
                        help="stop sending new requests at a level after this long")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the levels this many times in turn, each round with its "
                             "share of --requests and --seconds, and pool the results")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (FABLE_WORKERS)")
    parser.add_argument("--threads", type=int, default=None,
                        help="gunicorn threads per worker (FABLE_THREADS; default: the highest "
                             "level, at least 4)")
    parser.add_argument("--num-predict", type=int, default=64, help="new tokens a request")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--warmup", type=int, default=4, help="requests before the first level")
    parser.add_argument("--timeout", type=float, default=300, help="client timeout per request")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="another server setting, e.g. FABLE_MAX_BATCH=32 (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    args = parser.parse_args(argv)
    if min(args.levels) < 1 or min(args.requests, args.num_predict, args.rounds) < 1:
        parser.error("levels, --requests, --num-predict and --rounds must be positive")
    report = measure(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
