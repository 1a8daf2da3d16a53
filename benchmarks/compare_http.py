"""The compare page's cost over HTTP: four column streams at once against the slowest alone.

    python benchmarks/compare_http.py [--checkpoints checkpoints] [--workers 1 2]
                                      [--new-tokens 128] [--rounds 6]

What a browser does on /compare: each column opens its own event stream
(``GET /compare/generate/stream?job=<token>``, on its own connection) at once. For each
``--workers`` value a real gunicorn (``make serve``'s command, through
tests/gunicorn_server.py) serves the bundled models with its defaults otherwise; then,
``--rounds`` times after a warm-up, each model's column alone, one after another, and the
four columns at once, each read to its end. Prints the ratio of the four at once to the
slowest alone (the issue's target: at most 1.5) per round and its median and range.

With several workers the kernel hands each connection to whichever worker accepts it
first, so a comparison's columns split between them at random: the rounds where they
split evenly run in separate processes (no shared GIL), the others do not.
``benchmarks/compare.py`` measures the same in process, with the arithmetic beside it.
"""

from __future__ import annotations

import argparse
import html
import http.client
import re
import threading
import time

import httpx
from _common import ROOT, environment  # puts the repository on sys.path

from tests.gunicorn_server import GunicornServer  # noqa: E402  (the repository is on sys.path)

from compare import PROMPT, SEED, TEMPERATURE, span  # noqa: E402  (the in-process one's)


def column_tokens(url: str, names: list[str], new_tokens: int) -> list[str]:
    """The comparison's signed job tokens, from ``/compare/start`` as the page gets them
    (only the server holds the key that signs them)."""
    query = {"models": names, "prompt": PROMPT, "max_new_tokens": new_tokens,
             "temperature": TEMPERATURE, "seed": SEED}
    answer = httpx.get(f"{url}/compare/start", params=query, timeout=30)
    answer.raise_for_status()
    links = [html.unescape(link) for link in re.findall(r'sse-connect="([^"]+)"', answer.text)]
    if len(links) != len(names):
        raise SystemExit(f"/compare/start gave {len(links)} columns for {len(names)} models")
    return [link.split("job=", 1)[1] for link in links]


def read_column(port: int, token: str) -> float:
    """Open one column's stream, read it to the end; the time it ended."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("GET", f"/compare/generate/stream?job={token}")
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    if response.status != 200 or "event: done" not in body or "event: failed" in body:
        raise SystemExit(f"column failed: HTTP {response.status}\n{body[-500:]}")
    return time.perf_counter()


def together(port: int, tokens: list[str]) -> float:
    ends: list[float] = []
    threads = [threading.Thread(target=lambda t=t: ends.append(read_column(port, t)))
               for t in tokens]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(ends) != len(tokens):
        raise SystemExit("a column did not finish")
    return max(ends) - start


def measure(args, workers: int) -> list[float]:
    env = {"FABLE_WORKERS": str(workers), "FABLE_RATE_LIMIT": "0"}
    with GunicornServer(args.checkpoints, env=env) as server:
        names = sorted(m["name"] for m in
                       httpx.get(f"{server.url}/api/tags", timeout=30).json()["models"])[:4]
        if len(names) < 2:
            raise SystemExit(f"a comparison needs two models; loaded: {names}")
        server.wait_for_workers(workers, models=len(names))
        tokens = column_tokens(server.url, names, args.new_tokens)
        if workers == args.workers[0]:
            print(f"# {', '.join(names)}")
        port = server.port
        for token in tokens:  # warm-up
            read_column(port, token)
        ratios = []
        for _ in range(args.rounds):
            alone = []
            for token in tokens:
                start = time.perf_counter()
                alone.append(read_column(port, token) - start)
            wall = together(port, tokens)
            ratios.append(wall / max(alone))
            print(f"  {workers} worker{'s' if workers > 1 else ''}: slowest alone "
                  f"{max(alone):.2f} s, all at once {wall:.2f} s, ratio {ratios[-1]:.2f}")
        return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", default=ROOT / "checkpoints")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    print(f"# compare over HTTP — {environment()}; up to {args.new_tokens} new tokens "
          f"each, seed {SEED}; {args.rounds} rounds after a warm-up")
    summary = {}
    for workers in args.workers:
        ratios = measure(args, workers)
        summary[workers] = "median " + span(ratios, "x")
    print("all at once / slowest alone (target <= 1.5):")
    for workers, line in summary.items():
        print(f"  {workers} worker{'s' if workers > 1 else ''}: {line}")


if __name__ == "__main__":
    main()
