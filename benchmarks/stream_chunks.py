"""What one streamed chunk costs the server: ``/api/generate`` and ``/api/chat`` (NDJSON),
``/v1/completions`` and ``/v1/chat/completions`` (server-sent events), stream on.

    python benchmarks/stream_chunks.py [--pieces 2000] [--rounds 6] [--repeats 5]
                                       [--clock cpu|wall] [--against /tmp/before-schema]

In process, through the app's own test client, with generation replaced by a scripted
stream (as tests/conftest.py's ``script`` fixture does, without its sleeps): every request
yields ``--pieces`` one-character pieces at once, so what is left is the route's own work
per piece: build the chunk, serialize it, hand it through the WSGI response. The clock
starts after the first chunk (the request's own cost comes before it) and stops at the
last; a run's figure is the best of ``--repeats`` requests, in µs per chunk. Each round is
a fresh process. ``--clock cpu`` (the default) counts the process's CPU time, which other
jobs' time slices on a shared machine do not inflate; ``wall``, elapsed time.

``--against DIR``: another checkout of this repository (``git worktree add DIR <commit>``)
whose copy of this script runs in turns with this one (this, that, that, this, ...);
prints each side's median and range per route and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from _common import ROOT  # puts the repository on sys.path

MODEL = "char-gpt-shakespeare"  # bundled; only its tokenizer is used (the pieces are scripted)
MESSAGES = [{"role": "user", "content": "Hi"}]
ROUTES = {  # route -> body
    "/api/generate": {"model": MODEL, "prompt": "Once"},
    "/api/chat": {"model": MODEL, "messages": MESSAGES},
    "/v1/completions": {"model": MODEL, "prompt": "Once", "stream": True},
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "stream": True},
}
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # no whitespace: chat holds that back, merging pieces


class _Ticket:
    """Stands in for an engine ticket: hands out the pieces, then the completion."""

    first_piece_ns = None
    logprobs = None
    prompt_ids = ()

    def __init__(self, pieces: list[str]) -> None:
        from app.serving.engine_loop import Finished
        from models_src.sampling import Completion

        self._items = deque(pieces)
        self._items.append(Finished(Completion("".join(pieces), [], "stop", 1, len(pieces))))

    def next_event(self, timeout):
        return self._items.popleft()

    def collect_only(self):
        pass

    def held_text(self):
        return ""

    def cancel(self):
        pass


def _script(pieces: list[str]) -> None:
    """Every generation from now on yields ``pieces``."""
    from app.serving.service import GenerationService, GenerationStream

    def start(self, loaded, prompt_ids, params, *, strip=False):
        return GenerationStream(loaded.name, _Ticket(pieces), deadline=float("inf"),
                                clock=lambda: 0.0, prompt_tokens=len(prompt_ids),
                                encode=loaded.tokenizer.encode, decode=loaded.tokenizer.decode,
                                strip=strip)
    GenerationService._start = start


CLOCKS = {"cpu": time.process_time_ns, "wall": time.perf_counter_ns}


def _per_chunk(client, path: str, body: dict, clock) -> float:
    """µs per chunk of one streamed request, after its first chunk."""
    response = client.post(path, json=body, buffered=False)
    if response.status_code != 200:
        raise SystemExit(f"{path}: {response.status_code} {response.get_data(as_text=True)}")
    chunks = iter(response.response)
    next(chunks)
    start = clock()
    count = sum(1 for _ in chunks)
    elapsed = clock() - start
    response.close()
    return elapsed / count / 1000


def measure(pieces: int, repeats: int, clock) -> dict[str, float]:
    """Each route's best µs per chunk over ``repeats`` requests (after one to warm up)."""
    from app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "checkpoints" / MODEL, Path(tmp) / MODEL)  # a link is refused
        app = create_app({"FABLE_CHECKPOINT_DIR": tmp, "FABLE_DEVICE": "cpu",
                          "FABLE_TORCH_THREADS": 1, "FABLE_RATE_LIMIT": 0,
                          "FABLE_LOG_PROMPTS": False, "FABLE_DEFAULT_MODEL": "",
                          "FABLE_API_KEYS": "", "FABLE_ADMIN_TOKEN": ""})
        _script([LETTERS[i % len(LETTERS)] for i in range(pieces)])
        client = app.test_client()
        return {path: min(_per_chunk(client, path, body, clock) for _ in range(repeats + 1))
                for path, body in ROUTES.items()}


def _run(tree: Path, args) -> dict[str, float]:
    """One round in a fresh process, with ``tree``'s copy of this script."""
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "stream_chunks.py"),
                          "--pieces", str(args.pieces), "--repeats", str(args.repeats),
                          "--clock", args.clock, "--json"],
                         check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(out.stdout.splitlines()[-1])


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} µs ({min(values):.2f}–{max(values):.2f})"


def compare(args) -> None:
    trees = {"this": ROOT, "that": Path(args.against).resolve()}
    runs: dict[str, list[dict[str, float]]] = {"this": [], "that": []}
    for round_ in range(args.rounds):
        for side in ("this", "that") if round_ % 2 == 0 else ("that", "this"):
            runs[side].append(_run(trees[side], args))
        print(f"round {round_ + 1}: " + "; ".join(
            f"{path} {runs['this'][-1][path]:.2f} vs {runs['that'][-1][path]:.2f}" for path in ROUTES),
            flush=True)
    print(f"# µs per chunk ({args.clock}), median (range) of {args.rounds} rounds, {args.pieces} pieces; "
          f"this = {trees['this']}, that = {trees['that']}")
    for path in ROUTES:
        this, that = ([run[path] for run in runs[side]] for side in ("this", "that"))
        print(f"{path:22} this {_summary(this)}   that {_summary(that)}   "
              f"this/that {statistics.median(this) / statistics.median(that):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5, help="requests per route and round")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--against", help="another checkout, run in turns with this one")
    parser.add_argument("--json", action="store_true", help="one round here, as one JSON line")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.pieces, args.repeats, CLOCKS[args.clock])))
    elif args.against:
        compare(args)
    else:
        rounds = [_run(ROOT, args) for _ in range(args.rounds)]
        print(f"# µs per chunk ({args.clock}), median (range) of {args.rounds} rounds, "
              f"{args.pieces} pieces")
        for path in ROUTES:
            print(f"{path:22} {_summary([r[path] for r in rounds])}")


if __name__ == "__main__":
    main()
