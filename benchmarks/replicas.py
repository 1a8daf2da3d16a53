"""Aggregate tokens/s at 16 concurrent clients through nginx, in front of one replica and
in front of two, on this machine.

    python benchmarks/replicas.py [--checkpoints checkpoints] [--model char-gpt-shakespeare]
                                  [--clients 16] [--rounds 4] [--seconds 20]
                                  [--num-predict 64] [--env FABLE_X=value ...] [--json]

Two app servers (``gunicorn -c gunicorn.conf.py 'app:create_app()'``, one worker each,
the model copied into one checkpoint directory both read) and two nginx instances with
docs/scaling.md's site config (tests/scaling/cluster.py writes it): one balancing over
replica A alone, one over A and B. Both replicas run throughout; the rounds alternate,
1, 2, 1, 2, ..., so that a shared machine's drift from minute to minute falls on both
alike (as ``benchmarks/load.py --rounds`` does). Each round, ``--clients`` threads each
send ``POST /api/generate`` (``stream: false``, ``--num-predict`` tokens, the request's
own seed) through that balancer, the next when the last one returns, for ``--seconds``;
requests under way then finish. A round's figure is the new tokens answered over its
wall-clock (load.py's ``run_round``). Printed: each round, the range and the pooled
figure of each set-up, and the ratio two / one (pooled, and the lowest and highest of
the rounds' pairs). The CPU (``lscpu``'s model name) and the cores are printed with them.

On a machine whose cores one replica already keeps busy, a second cannot add throughput:
it adds a second process to fail over to and to restart one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT  # puts the repository on sys.path

from load import connect, request_body, run_round, send, summarize  # the served benchmark's
from tests.scaling.cluster import NGINX, Balancer, Replica, start_all


def cpu() -> str:
    """lscpu's model name and the cores this process may use."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        name = "unknown CPU"
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def settings(folder: Path, args: argparse.Namespace) -> dict[str, str]:
    env = {"FABLE_CHECKPOINT_DIR": str(folder / "checkpoints"), "FABLE_WORKERS": "1",
           "FABLE_THREADS": str(args.clients + 16), "FABLE_SECRET_KEY": secrets.token_urlsafe(32),
           "FABLE_RELOAD_STAMP": str(folder / "reload-stamp"), "FABLE_PROXY_HOPS": "1"}
    for pair in args.env:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env wants NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def measure(args: argparse.Namespace, folder: Path) -> dict:
    source = args.checkpoints / args.model
    if not (source / "config.json").is_file():
        raise SystemExit(f"no checkpoint {source}")
    shutil.copytree(source, folder / "checkpoints" / args.model)
    env = settings(folder, args)
    replicas = [Replica(folder / "a", env), Replica(folder / "b", env)]
    start_all(replicas)
    balancers = {}
    try:
        balancers = {1: Balancer(folder / "nginx-1", [replicas[0].port]).start(),
                     2: Balancer(folder / "nginx-2", [r.port for r in replicas]).start()}
        for n, balancer in balancers.items():  # warm-up: every replica has decoded
            connection = connect(balancer.url, args.timeout)
            for i in range(4):
                result = send(connection, request_body(args.model, -1 - i, args.num_predict,
                                                       args.temperature))
                if result.status != 200:
                    raise SystemExit(f"warm-up through {n} replica(s) failed: {result}")
            connection.close()
        mark = len(balancers[2].access_log())
        rounds: dict[int, list] = {1: [], 2: []}
        for r in range(args.rounds):
            for n in (1, 2):
                first = (r * 2 + n) * 10**6  # time ends a round, never its requests
                results, wall = run_round(balancers[n].url, args.model, args.clients,
                                          range(first, first + 10**6), args.seconds, args)
                level = summarize(args.clients, results, wall)
                rounds[n].append(level)
                if not args.json:
                    errors = ", ".join(f"{k}: {v}" for k, v in sorted(level.errors.items())) or "-"
                    print(f"round {r + 1}, {n} replica{'s' if n > 1 else ''}: "
                          f"{level.tokens_per_s:8.1f} tokens/s, {level.ok} requests, "
                          f"p50 {level.latency_ms['p50']:.0f} ms, p99 {level.latency_ms['p99']:.0f} ms, "
                          f"errors {errors}", flush=True)
        served = {b: sum(1 for e in balancers[2].access_log()[mark:] if e.upstreams[-1:] == [r.address])
                  for b, r in zip("AB", replicas)}
    finally:
        for balancer in balancers.values():
            balancer.stop()
        for replica in replicas:
            replica.stop()
    pooled = {n: round(sum(lv.tokens for lv in levels) / sum(lv.wall_s for lv in levels), 1)
              for n, levels in rounds.items()}
    pairs = [two.tokens_per_s / one.tokens_per_s for one, two in zip(rounds[1], rounds[2])]
    return {
        "cpu": cpu(), "model": args.model, "clients": args.clients, "num_predict": args.num_predict,
        "rounds": args.rounds, "seconds": args.seconds,  # the settings, less secrets and paths
        "server_env": {k: v for k, v in env.items()
                       if k not in ("FABLE_SECRET_KEY", "FABLE_CHECKPOINT_DIR", "FABLE_RELOAD_STAMP")},
        "tokens_per_s": {str(n): [lv.tokens_per_s for lv in levels] for n, levels in rounds.items()},
        "errors": {str(n): sum(sum(lv.errors.values()) for lv in levels) for n, levels in rounds.items()},
        "pooled_tokens_per_s": {str(n): v for n, v in pooled.items()},
        "ratio_two_over_one": round(pooled[2] / pooled[1], 2) if pooled[1] else None,
        "ratio_range": [round(min(pairs), 2), round(max(pairs), 2)] if pairs else None,
        "requests_by_replica_through_two": served,
    }


def print_report(report: dict) -> None:
    for n in ("1", "2"):
        values = report["tokens_per_s"][n]
        print(f"{n} replica{'s' if n == '2' else ''}: {min(values):,.0f}–{max(values):,.0f} tokens/s "
              f"over {len(values)} rounds (pooled {report['pooled_tokens_per_s'][n]:,.0f}), "
              f"{report['errors'][n]} errors")
    low, high = report["ratio_range"]
    print(f"two / one: {report['ratio_two_over_one']:.2f}x pooled, {low:.2f}–{high:.2f}x round by round; "
          f"through two, requests per replica: {report['requests_by_replica_through_two']}")
    print(f"# {report['model']}, {report['clients']} clients, {report['num_predict']} tokens a request, "
          f"{report['rounds']} rounds of {report['seconds']:g} s each; {report['cpu']}; "
          f"server env {report['server_env']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "checkpoints",
                        help="where the model is (default: checkpoints/)")
    parser.add_argument("--model", default="char-gpt-shakespeare", help="the model served")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each set-up, alternating")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of sending per round")
    parser.add_argument("--num-predict", type=int, default=64, help="new tokens a request")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--timeout", type=float, default=300, help="client timeout per request")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="another setting for both replicas, e.g. FABLE_TORCH_THREADS=1")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.num_predict) < 1 or args.seconds <= 0:
        parser.error("--clients, --rounds, --num-predict and --seconds must be positive")
    if NGINX is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="fable-replicas-") as folder:
        report = measure(args, Path(folder))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
