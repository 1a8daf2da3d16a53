"""Soak: 32 clients for five minutes against a real gunicorn, every answer checked.

    FABLE_SOAK_SECONDS=300 python -m pytest tests/test_soak.py -m slow -o addopts="" -s

(``-s`` shows the summary; FABLE_SOAK_SECONDS=30 for a quick run while developing.)
Each of 32 client threads, with its own keep-alive connection, sends request after
request for the whole duration, drawn from this mix over the test checkpoints:

    valid (about 85 %)  Ollama /api/generate whole and streamed (NDJSON), OpenAI
                        /v1/completions whole and streamed (SSE), each also as story
                        infilling (``suffix``, on the two that infill), on all three
                        test models
    malformed           bad JSON, wrong types, an unknown model, a body over the limit,
                        the wrong Content-Type

and asserts:

- valid requests: zero 5xx and zero 503 "busy" (the server's queue is sized for 32
  clients below, so a refusal would be a bug, not load shedding), zero transport
  errors, and every answer complete and well-formed: whole answers parse and say why
  they ended; a stream is well-formed NDJSON ending with exactly one ``done: true``
  (SSE: a finish_reason, then ``[DONE]``); the endless model's text is exactly the
  tokens asked for; token counts match the text;
- malformed requests: the documented 4xx, with an error message, never a 5xx;
- no generation is left running afterwards, and the server logged no traceback;
- the worker's memory (PSS, from /proc) grows less than 10 % from the end of the
  warm-up (the first fifth of the run: at least 10 s, at most 60 s) to the end.

The summary printed at the end (requests, rates, statuses, latency percentiles, memory)
is what the README's "Load and soak" paragraph quotes.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx
import pytest

from tests.app_support import ENDLESS_CHAR, INFILL_MODELS, MODELS
from tests.gunicorn_server import GunicornServer

pytestmark = [pytest.mark.slow, pytest.mark.server]

SECONDS = float(os.environ.get("FABLE_SOAK_SECONDS", "300"))
CLIENTS = 32
WARM_UP_S = min(60.0, max(10.0, SECONDS / 5), SECONDS / 2)  # allocator pools fill first
MAX_GROWTH = 0.10
MAX_BODY_BYTES = 64 * 1024
#: Sized so that no valid request is refused: every client's request fits in a decoding
#: row or the queue (max batch + queue >= 32), a queued one waits as long as it takes
#: (the tiny models answer in well under a second each), and gunicorn has a thread for
#: every connection. A 503 is then a fault, not load shedding.
SERVER_SETTINGS = {
    "FABLE_THREADS": str(CLIENTS + 16),
    "FABLE_MAX_QUEUE": str(2 * CLIENTS),
    "FABLE_QUEUE_TIMEOUT_S": "120",
    "FABLE_REQUEST_TIMEOUT_S": "60",
    "FABLE_MAX_NEW_TOKENS": "64",
    "FABLE_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "FABLE_DEVICE": "cpu",
    "FABLE_TORCH_THREADS": "1",
    "FABLE_WORKERS": "1",
    "FABLE_RATE_LIMIT": "0",
}
FIRST, LAST = "Lily saw a big red ball.", "She was happy again."


class Malformed(AssertionError):
    """An answer that breaks the contract; the message says how."""


@dataclass
class Request:
    kind: str
    path: str
    body: dict | None = None
    content: bytes | None = None
    headers: dict = field(default_factory=dict)
    expect: int = 200  # the status a correct server gives
    stream: bool = False
    model: str = ""
    tokens: int = 0  # tokens asked for


@dataclass
class Outcome:
    kind: str
    valid: bool
    status: int | None  # None: no HTTP answer (a transport error)
    seconds: float
    tokens: int = 0
    problem: str | None = None  # why the answer is wrong; None when it is right


# ---- the traffic ------------------------------------------------------------------------

def valid_request(rng: random.Random) -> Request:
    model = rng.choice(MODELS)
    tokens = rng.randint(1, 48)
    infill = model in INFILL_MODELS and rng.random() < 0.3
    stream = rng.random() < 0.5
    sampling = {"temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
    if rng.random() < 0.6:
        body = {"model": model, "prompt": FIRST if infill else rng.choice(["Once", "A", "The"]),
                "stream": stream, "options": {"num_predict": tokens, **sampling}}
        if infill:
            body["suffix"] = LAST
        return Request(f"ollama {'stream' if stream else 'whole'}{' infill' if infill else ''}",
                       "/api/generate", body, stream=stream, model=model, tokens=tokens)
    body = {"model": model, "prompt": FIRST if infill else "Once", "max_tokens": tokens,
            "stream": stream, **sampling}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if infill:
        body["suffix"] = LAST
    return Request(f"openai {'stream' if stream else 'whole'}{' infill' if infill else ''}",
                   "/v1/completions", body, stream=stream, model=model, tokens=tokens)


def malformed_request(rng: random.Random) -> Request:
    json_type = {"Content-Type": "application/json"}
    choices = [
        Request("bad json", "/api/generate", content=b'{"model": "tiny-gpt", "prompt": ',
                headers=json_type, expect=400),
        Request("wrong type", "/api/generate", {"model": "tiny-gpt", "prompt": 5}, expect=400),
        Request("wrong type", "/api/generate",
                {"model": "tiny-gpt", "options": {"temperature": "hot"}}, expect=400),
        Request("wrong type", "/v1/completions",
                {"model": "tiny-lstm", "prompt": "x", "max_tokens": "ten"}, expect=400),
        Request("unknown model", rng.choice(["/api/generate", "/v1/completions"]),
                {"model": "no-such-model", "prompt": "x", "stream": False}, expect=404),
        Request("oversize body", "/api/generate",
                {"model": "tiny-gpt", "prompt": "x" * (MAX_BODY_BYTES + 1000)}, expect=413),
        Request("wrong content type", "/api/generate", content=b'{"model": "tiny-gpt"}',
                headers={"Content-Type": "text/plain"}, expect=415),
    ]
    return rng.choice(choices)


# ---- checking one answer ------------------------------------------------------------------

def check(request: Request, response: httpx.Response, text: str) -> int:
    """Raise Malformed unless the answer is complete and right; returns its new tokens."""
    if request.expect != 200:
        return check_refusal(request, response, text)
    if response.status_code != 200:
        raise Malformed(f"status {response.status_code}: {text[:200]}")
    if request.path == "/api/generate":
        return check_ollama_stream(request, text) if request.stream else check_ollama(request, text)
    return check_openai_stream(request, text) if request.stream else check_openai(request, text)


def check_refusal(request: Request, response: httpx.Response, text: str) -> int:
    if response.status_code != request.expect:
        raise Malformed(f"expected {request.expect}, got {response.status_code}: {text[:200]}")
    error = parse(text)["error"]
    message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape or Ollama's
    if not isinstance(message, str) or not message.strip():
        raise Malformed(f"a {response.status_code} without a message: {text[:200]}")
    return 0


def parse(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Malformed(f"not JSON ({e}): {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise Malformed(f"not a JSON object: {text[:200]!r}")
    return value


def check_text(request: Request, text: str, tokens: int, reason: str) -> int:
    if reason not in ("stop", "length"):
        raise Malformed(f"finish reason {reason!r}")
    if not isinstance(tokens, int) or not 0 <= tokens <= request.tokens:
        raise Malformed(f"{tokens!r} tokens for {request.tokens} asked")
    # The endless model never stops on its own: exactly the tokens asked for, each ENDLESS_CHAR
    # (an infilled middle too; its ends are stripped, and it has none to strip).
    if request.model == "endless" and (text != ENDLESS_CHAR * request.tokens
                                       or tokens != request.tokens or reason != "length"):
        raise Malformed(f"endless model: {text!r}, {tokens} tokens, {reason} "
                        f"for {request.tokens} asked")
    return tokens


def check_ollama(request: Request, text: str) -> int:
    body = parse(text)
    if body.get("done") is not True or not isinstance(body.get("response"), str):
        raise Malformed(f"not a finished generation: {text[:200]}")
    return check_text(request, body["response"], body.get("eval_count"), body.get("done_reason"))


def check_ollama_stream(request: Request, text: str) -> int:
    if not text.endswith("\n"):
        raise Malformed(f"the stream does not end with a newline: {text[-200:]!r}")
    lines = [parse(line) for line in text.splitlines()]
    *pieces, final = lines
    if any("error" in line for line in lines):
        raise Malformed(f"an error in the stream: {text[-300:]}")
    if final.get("done") is not True or any(p.get("done") is not False for p in pieces):
        raise Malformed(f"the stream does not end with exactly one done: true: {text[-300:]}")
    streamed = "".join(p["response"] for p in pieces) + final.get("response", "")
    return check_text(request, streamed, final.get("eval_count"), final.get("done_reason"))


def check_openai(request: Request, text: str) -> int:
    body = parse(text)
    try:
        choice, usage = body["choices"][0], body["usage"]
        tokens = usage["completion_tokens"]
        if usage["total_tokens"] != usage["prompt_tokens"] + tokens:
            raise Malformed(f"usage does not add up: {usage}")
        return check_text(request, choice["text"], tokens, choice["finish_reason"])
    except (KeyError, IndexError, TypeError) as e:
        raise Malformed(f"missing {e}: {text[:200]}") from None


def check_openai_stream(request: Request, text: str) -> int:
    """SSE with include_usage: text chunks (one choice each, the last with the
    finish_reason), a usage chunk (no choices), then ``[DONE]``."""
    events = [block for block in text.split("\n\n") if block.strip()]
    if not text.endswith("\n\n") or not events or events[-1] != "data: [DONE]":
        raise Malformed(f"the stream does not end with data: [DONE]: {text[-200:]!r}")
    chunks = []
    for event in events[:-1]:
        if not event.startswith("data: "):
            raise Malformed(f"not an SSE data event: {event[:200]!r}")
        chunks.append(parse(event.removeprefix("data: ")))
    if len(chunks) < 2 or any("error" in c for c in chunks):
        raise Malformed(f"an error, or no text and usage chunks: {text[-300:]}")
    *pieces, last = chunks
    if last.get("choices") != [] or not isinstance(last.get("usage"), dict):
        raise Malformed(f"the last chunk is not the usage: {last}")
    if any(len(c.get("choices") or ()) != 1 for c in pieces):
        raise Malformed(f"a text chunk without exactly one choice: {text[-300:]}")
    reasons = [c["choices"][0]["finish_reason"] for c in pieces]
    if any(r is not None for r in reasons[:-1]):
        raise Malformed(f"a finish_reason before the last text chunk: {reasons}")
    streamed = "".join(c["choices"][0]["text"] for c in pieces)
    return check_text(request, streamed, last["usage"].get("completion_tokens"), reasons[-1])


# ---- the clients ------------------------------------------------------------------------

def send(client: httpx.Client, request: Request) -> Outcome:
    valid = request.expect == 200
    started = time.perf_counter()
    try:
        response = client.post(request.path, json=request.body if request.content is None else None,
                               content=request.content, headers=request.headers)
        text = response.text
    except httpx.HTTPError as e:
        return Outcome(request.kind, valid, None, time.perf_counter() - started,
                       problem=f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - started
    if response.status_code == 503 and valid:  # "busy": counted on its own
        return Outcome(request.kind, valid, 503, seconds, problem="busy (503, Retry-After: "
                       f"{response.headers.get('Retry-After')})")
    try:
        tokens = check(request, response, text)
    except Malformed as e:
        return Outcome(request.kind, valid, response.status_code, seconds, problem=str(e))
    return Outcome(request.kind, valid, response.status_code, seconds, tokens)


def client_loop(url: str, seed: int, until: float, outcomes: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    mine = []
    with httpx.Client(base_url=url, timeout=180) as client:
        while time.monotonic() < until:
            request = malformed_request(rng) if rng.random() < 0.15 else valid_request(rng)
            mine.append(send(client, request))
            if len(mine) >= 50:
                with lock:
                    outcomes.extend(mine)
                mine = []
    with lock:
        outcomes.extend(mine)


def sample_memory(server: GunicornServer, stop: threading.Event, samples: list) -> None:
    """(seconds since the start, total PSS of the workers in KiB), once a second."""
    started = time.monotonic()
    while not stop.wait(1.0):
        memory = server.worker_memory()
        if memory:
            samples.append((time.monotonic() - started, sum(m.pss_kib for m in memory.values())))


# ---- the summary ------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(outcomes: list[Outcome], seconds: float, memory_before: int, memory_after: int,
            memory_peak: int) -> str:
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_kind[o.kind].append(o)
    valid = [o for o in outcomes if o.valid]
    statuses = Counter(str(o.status or "no answer") for o in outcomes)
    tokens = sum(o.tokens for o in valid)
    busy = sum(o.status == 503 for o in valid)
    lines = [
        f"soak: {CLIENTS} clients, {seconds:.0f} s, {len(outcomes):,} requests "
        f"({len(outcomes) / seconds:.1f}/s), {len(valid):,} valid, {tokens:,} new tokens "
        f"({tokens / seconds:.0f}/s)",
        "statuses: " + ", ".join(f"{s}: {n:,}" for s, n in sorted(statuses.items()))
        + f"; busy (503) answers to valid requests: {busy}",
        f"{'kind':24} {'requests':>8} {'wrong':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}",
    ]
    for kind, items in sorted(by_kind.items()):
        ms = [o.seconds * 1e3 for o in items]
        lines.append(f"{kind:24} {len(items):8,} {sum(o.problem is not None for o in items):6} "
                     f"{percentile(ms, 50):8.0f} {percentile(ms, 99):8.0f} {max(ms):8.0f}")
    lines.append(f"worker PSS: {memory_before / 1024:.1f} MiB after the {WARM_UP_S:.0f} s warm-up, "
                 f"{memory_after / 1024:.1f} MiB at the end "
                 f"({(memory_after / memory_before - 1) * 100:+.1f} %), peak "
                 f"{memory_peak / 1024:.1f} MiB")
    return "\n".join(lines)


# ---- the test ---------------------------------------------------------------------------

def test_soak(checkpoint_dir, tmp_path):
    server = GunicornServer(checkpoint_dir, env=SERVER_SETTINGS,
                            log_path=tmp_path / "server.log").start()
    try:
        outcomes: list[Outcome] = []
        lock, stop, samples = threading.Lock(), threading.Event(), []
        sampler = threading.Thread(target=sample_memory, args=(server, stop, samples))
        started = time.monotonic()
        clients = [threading.Thread(target=client_loop,
                                    args=(server.url, seed, started + SECONDS, outcomes, lock))
                   for seed in range(CLIENTS)]
        sampler.start()
        for c in clients:
            c.start()
        for c in clients:
            c.join(SECONDS + 300)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        assert not any(c.is_alive() for c in clients), "a client is stuck"

        after_warm_up = [pss for t, pss in samples if t >= WARM_UP_S]
        assert len(after_warm_up) >= 2, f"too few memory samples: {samples}"
        before, after, peak = after_warm_up[0], after_warm_up[-1], max(after_warm_up)
        report = summary(outcomes, elapsed, before, after, peak)
        print("\n" + report)

        problems = Counter(f"{o.kind}: {o.problem[:160]}" for o in outcomes if o.problem)
        listed = "\n".join(f"{n} x {p}" for p, n in problems.most_common(20))
        assert not problems, report + "\n" + listed
        assert sum(o.valid for o in outcomes) >= CLIENTS, report
        assert {o.kind for o in outcomes if not o.valid} >= {"bad json", "wrong type",
                                                              "unknown model"}, report
        assert after < before * (1 + MAX_GROWTH), report

        health = httpx.get(f"{server.url}/healthz").json()
        assert health.get("active", 0) == 0, health  # no generation left running
        log = server.log_text()
        assert "Traceback" not in log, log[-5000:]
    finally:
        server.stop()
