"""Fable's server against llama.cpp's ``llama-server`` over HTTP: new tokens/s with 1 and
16 clients, on the same weights and threads.

    python benchmarks/llama_server.py --llama-server /path/to/llama-server
        [--checkpoint checkpoints/tinystories-gpt] [--precision f32] [--threads 2]
        [--levels 1 16] [--seconds 20] [--rounds 2] [--max-tokens 128]

The checkpoint is exported to GGUF (``--precision f32``: float32; ``int8``: ``q8_0``)
for llama-server (``-t`` threads, ``-np`` as many slots as the highest level, a context of
``-np`` times the model's), and copied for Fable (``--format fable``, so that ``int8``
decodes with int8 products), served by ``make serve``'s gunicorn (tests/gunicorn_server.py)
with ``FABLE_TORCH_THREADS`` threads; both stay up, and each level is measured on one and
then the other, alternating which goes first, ``--rounds`` times. Each client sends the
same OpenAI request to both (``POST /v1/completions``, greedy, ``max_tokens``, one of eight
prompts by turn, not streamed) as soon as its last one is answered, for ``--seconds`` a
level; tokens/s is the answers' ``usage.completion_tokens`` over the level's wall-clock.
Greedy decoding on the same weights writes nearly the same stories on both, so the two
count about the same tokens per request. llama-server is built from llama.cpp's source
(``cmake --build build --target llama-server``): see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
from _common import GGUF_OF, ROOT, STORY_PROMPTS as PROMPTS, environment  # puts the repository on sys.path

from models_src.checkpoint import read_config  # noqa: E402
from models_src.gguf_export import export_checkpoint as export_gguf  # noqa: E402
from tests.gunicorn_server import GunicornServer, free_port  # noqa: E402
from training.export import export_fable  # noqa: E402


class LlamaServer:
    """llama-server on a free port of 127.0.0.1, up until the ``with`` block ends."""

    def __init__(self, binary: str, gguf: Path, threads: int, slots: int, context: int) -> None:
        self.port = free_port()
        self.command = [binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                        "-np", str(slots), "-c", str(slots * context), "--host", "127.0.0.1",
                        "--port", str(self.port), "--no-webui"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LlamaServer:
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"llama-server exited ({self.process.returncode}):\n"
                                 f"{self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("llama-server did not answer /health within 60 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def closed_loop(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> tuple[int, float, int]:
    """``clients`` keep-alive connections, each sending its next request when the last is
    answered, for ``seconds``. Returns (new tokens, wall seconds, failed requests)."""
    host, port = url.removeprefix("http://").split(":")
    totals = {"tokens": 0, "failed": 0}
    lock = threading.Lock()
    started = time.perf_counter()
    stop = started + seconds

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        sent = number
        while time.perf_counter() < stop:
            body = {"model": model, "prompt": PROMPTS[sent % len(PROMPTS)],
                    "max_tokens": max_tokens, "temperature": 0.0}
            sent += clients
            try:
                connection.request("POST", "/v1/completions", json.dumps(body),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                tokens = int(json.loads(answer)["usage"]["completion_tokens"])
                ok = response.status == 200
            except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
                connection.close()
                ok, tokens = False, 0
            with lock:
                totals["tokens"] += tokens if ok else 0
                totals["failed"] += not ok
        connection.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return totals["tokens"], time.perf_counter() - started, totals["failed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", required=True, help="the llama-server binary")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "tinystories-gpt")
    parser.add_argument("--precision", choices=sorted(GGUF_OF), default="f32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"# Fable against llama-server over HTTP: {args.checkpoint.name}, Fable "
          f"{args.precision} / llama.cpp {GGUF_OF[args.precision]}, {args.threads} thread(s), "
          f"greedy, max_tokens {args.max_tokens}, {args.seconds:g} s a level and round "
          f"-- {environment()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gguf = export_gguf(args.checkpoint, tmp / "model.gguf", GGUF_OF[args.precision])
        model = args.checkpoint.name
        export_fable(args.checkpoint, tmp / "checkpoints" / model, args.precision)
        context = read_config(args.checkpoint)["model"]["block_size"]
        env = {"FABLE_TORCH_THREADS": str(args.threads), "FABLE_THREADS": str(4 * max(args.levels))}
        with GunicornServer(tmp / "checkpoints", env=env) as fable, \
                LlamaServer(args.llama_server, gguf, args.threads, max(args.levels), context) as llama:
            servers = {"Fable": (fable.url, model), "llama-server": (llama.url, model)}
            for name, (url, served) in servers.items():  # warm-up: load, first requests
                closed_loop(url, served, max(args.levels), 3, args.max_tokens)
            rates: dict[tuple[str, int], list[float]] = {}
            for round_ in range(args.rounds):
                for level in args.levels:
                    order = list(servers) if (round_ + level) % 2 == 0 else list(servers)[::-1]
                    for name in order:
                        tokens, wall, failed = closed_loop(*servers[name], level, args.seconds,
                                                           args.max_tokens)
                        rates.setdefault((name, level), []).append(tokens / wall)
                        print(f"round {round_ + 1}, {level:2d} client(s): {name:12s} "
                              f"{tokens / wall:7,.0f} tokens/s ({tokens} tokens, {failed} failed)",
                              flush=True)
    for level in args.levels:
        ratios = [f / c for f, c in zip(rates[("Fable", level)], rates[("llama-server", level)])]
        print(f"{level:2d} client(s): Fable {statistics.median(rates[('Fable', level)]):,.0f} tokens/s, "
              f"llama-server {statistics.median(rates[('llama-server', level)]):,.0f} (medians); "
              f"Fable/llama-server {min(ratios):.2f}-{max(ratios):.2f} round by round")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
