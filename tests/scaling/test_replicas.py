"""Serving as replicas: two gunicorn app servers behind Debian's nginx (round robin, no
sticky sessions, passive health checks), the set-up docs/scaling.md describes.

The replicas share what replicas must: the checkpoint directory (one copy), the key that
signs the pages' job tokens (FABLE_SECRET_KEY), the admin token and the reload stamp
(FABLE_RELOAD_STAMP). Checked over HTTP only: a page generation started on one replica
streams from the other; the official openai and ollama clients and a headless Chromium
work through the balancer; one reload reaches both; /metrics counts each replica's own
requests; a replica killed under load from 16 clients loses only what it was streaming,
nginx routes around it, and it rejoins once restarted.

Skips when nginx is not installed (.ci/run installs it); the browser test also needs
Debian's chromium, Playwright and the vendored htmx.
"""

from __future__ import annotations

import html
import json
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .cluster import NGINX, ROOT, Balancer, Replica, start_all

if NGINX is None:
    pytest.skip("nginx is not installed (apt-get install nginx; .ci/run installs it)", allow_module_level=True)

pytestmark = pytest.mark.server

MODEL = "endless"  # the checkpoint_dir fixture's model that writes "o" forever: every answer is known
STREAM_URL = re.compile(r'sse-connect="([^"]+)"')
CHROMIUM = os.environ.get("FABLE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: Balancer
    checkpoints: Path
    admin: dict[str, str]  # the Authorization header with the admin token

    def ensure_up(self) -> None:
        """Every replica running (a test that killed one and failed leaves it dead)."""
        dead = [r for r in self.replicas if not r.running()]
        for replica in dead:
            replica.launch()
        for replica in dead:
            replica.wait_healthy()


@pytest.fixture(scope="module")
def cluster(checkpoint_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    checkpoints = root / "checkpoints"  # one copy both serve (a test adds a model to it)
    shutil.copytree(checkpoint_dir, checkpoints)
    admin = secrets.token_urlsafe(24)
    shared = {
        "FABLE_CHECKPOINT_DIR": str(checkpoints),
        "FABLE_SECRET_KEY": secrets.token_urlsafe(32),  # a token from one replica works on all
        "FABLE_ADMIN_TOKEN": admin,
        "FABLE_RELOAD_STAMP": str(root / "reload-stamp"),  # one reload reaches every replica
        "FABLE_PROXY_HOPS": "1",  # nginx's X-Forwarded-* are trusted
        "FABLE_WORKERS": "1", "FABLE_TORCH_THREADS": "1", "FABLE_DECODE_THREADS": "1",
        "FABLE_THREADS": "40", "FABLE_DEVICE": "cpu", "FABLE_DEFAULT_NEW_TOKENS": "32",
        "FABLE_REQUEST_TIMEOUT_S": "30",
    }
    replicas = [Replica(root / "replica-a", shared), Replica(root / "replica-b", shared)]
    start_all(replicas)
    balancer = None
    try:
        balancer = Balancer(root / "nginx", [r.port for r in replicas]).start()
        yield Cluster(replicas, balancer, checkpoints, {"Authorization": f"Bearer {admin}"})
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            replica.stop()


@pytest.fixture
def up(cluster) -> Cluster:
    cluster.ensure_up()
    return cluster


# ---- the page flow: a form posted through htmx, then its event stream ---------------------

def start_page_job(base: str, tokens: int = 24, origin: str | None = None) -> str:
    """POST the generate form as htmx does; the stream URL from the fragment."""
    response = httpx.post(base + "/generate/start", timeout=30,
                          data={"model": MODEL, "prompt": "Once", "temperature": "0",
                                "max_new_tokens": str(tokens)},
                          headers={"HX-Request": "true", "Origin": origin or base})
    response.raise_for_status()
    found = STREAM_URL.search(response.text)
    assert found, response.text[:2000]
    return html.unescape(found.group(1))


def read_events(base: str, url: str) -> list[tuple[str, str]]:
    """A page's server-sent events, (event, data), to the last: what EventSource reads."""
    events, event, data = [], "message", []
    with httpx.stream("GET", base + url, timeout=30,
                      headers={"Accept": "text/event-stream", "Sec-Fetch-Site": "same-origin"}) as response:
        assert response.status_code == 200, response.read()[:500]
        for line in response.iter_lines():
            if not line:  # an event ends
                if data:
                    events.append((event, "\n".join(data)))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    return events


def streamed_text(events: list[tuple[str, str]]) -> str:
    assert events and events[-1][0] == "done", events
    assert not [e for e in events if e[0] == "failed"], events
    return html.unescape("".join(data for event, data in events if event == "message"))


def since(balancer: Balancer, mark: int, count: int = 0, paths: tuple[str, ...] = ()):
    """The balancer's log entries after the first ``mark``, once there are ``count`` of
    them and one for each of ``paths``: nginx writes a line once an answer has ended,
    which may be just after its client has read the end."""
    deadline = time.monotonic() + 10
    while True:
        entries = balancer.access_log()[mark:]
        logged = {e.path for e in entries}
        if len(entries) >= count and logged >= set(paths) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def test_a_page_started_on_one_replica_streams_from_the_other(up):
    a, b = up.replicas
    # Directly: the form on A, its stream on B. The job token A signed is all B needs.
    url = start_page_job(a.url)
    assert url.startswith("/generate/stream?job=")
    assert streamed_text(read_events(b.url, url)) == "o" * 24
    # An altered token is refused: B checks the signature, it does not trust the link.
    refused = read_events(b.url, url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"))
    assert [e for e, _ in refused] == ["failed", "done"] and "invalid" in refused[0][1]

    # Through the balancer, until the form and its stream land on different replicas
    # (round robin alternates, so at once unless other requests come between).
    balancer = up.balancer
    for _ in range(4):
        mark = len(balancer.access_log())
        url = start_page_job(balancer.url)
        assert streamed_text(read_events(balancer.url, url)) == "o" * 24
        served = {e.path: e.upstreams[-1] for e in since(balancer, mark, 2)}
        if served["/generate/start"] != served["/generate/stream"]:
            break
    else:
        pytest.fail(f"every form and its stream went to the same replica: {served}")
    # The site's own Origin passes the CSRF check behind the proxy (Host keeps its port);
    # another site's does not.
    refused = httpx.post(balancer.url + "/generate/start", data={"model": MODEL, "prompt": "x"},
                         headers={"HX-Request": "true", "Origin": "http://evil.example"}, timeout=30)
    assert refused.status_code == 403


def test_openai_and_ollama_clients_through_the_balancer(up):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    ollama = pytest.importorskip("ollama", reason="the ollama client is not installed")
    balancer = up.balancer
    mark = len(balancer.access_log())
    client = openai.OpenAI(base_url=balancer.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    asked = dict(model=MODEL, max_tokens=12, temperature=0)
    completion = client.completions.create(prompt="Once", **asked)
    assert completion.choices[0].text == "o" * 12
    chunks = client.completions.create(prompt="Once", stream=True, **asked)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "o" * 12
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = client.chat.completions.create(messages=messages, **asked)
    assert chat.choices[0].message.content == "o" * 12
    chunks = client.chat.completions.create(messages=messages, stream=True, **asked)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "o" * 12

    local = ollama.Client(host=balancer.url, timeout=30)
    options = {"num_predict": 12, "temperature": 0}
    answer = local.generate(model=MODEL, prompt="Once", options=options)
    assert answer.response == "o" * 12 and answer.done
    parts = list(local.generate(model=MODEL, prompt="Once", options=options, stream=True))
    assert "".join(p.response for p in parts) == "o" * 12 and parts[-1].done
    reply = local.chat(model=MODEL, messages=messages, options=options)
    assert reply.message.content == "o" * 12
    parts = list(local.chat(model=MODEL, messages=messages, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == "o" * 12 and parts[-1].done

    # Eight requests, round robin: both replicas answered some.
    served = {e.upstreams[-1] for e in since(balancer, mark, 8)}
    assert served == {r.address for r in up.replicas}


@pytest.mark.browser
def test_a_browser_page_through_the_balancer(up):
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    if not all((ROOT / "static" / "vendor" / name).is_file() for name in ("htmx.min.js", "sse.js")):
        pytest.skip("htmx is not installed in static/vendor/ (make assets)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    balancer = up.balancer
    mark = len(balancer.access_log())
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(f"JavaScript error: {error}"))
            page.on("response", lambda r: r.status >= 400 and errors.append(f"HTTP {r.status} for {r.url}"))
            page.goto(balancer.url + "/")
            page.evaluate("() => document.querySelectorAll('details.sampling').forEach(d => { d.open = true; })")
            page.check(f"input[name=model][value='{MODEL}']")
            page.fill("#field-prompt", "Once")
            page.fill("#field-temperature", "0")
            page.fill("#field-max_new_tokens", "30")
            page.click("#generate-submit")
            page.wait_for_selector(".status-text:not(.is-streaming)")
            assert page.locator(".output-generated").text_content() == "o" * 30
            assert not errors, errors
        finally:
            browser.close()
    paths = [e.path for e in since(balancer, mark, paths=("/generate/start", "/generate/stream"))]
    assert "/generate/start" in paths and "/generate/stream" in paths


def tags(replica: Replica) -> set[str]:
    return {m["name"] for m in httpx.get(replica.url + "/api/tags", timeout=10).json()["models"]}


def test_one_reload_through_the_balancer_reaches_every_replica(up):
    name = f"fresh-{secrets.token_hex(3)}"
    before = [tags(r) for r in up.replicas]
    staging = up.checkpoints / f".{name}.tmp"  # hidden while it is copied: never half-read
    shutil.copytree(up.checkpoints / "tiny-gpt", staging)
    staging.rename(up.checkpoints / name)
    try:
        time.sleep(1.5)  # longer than a worker takes to follow the stamp: nothing reloads unasked
        assert [tags(r) for r in up.replicas] == before and all(name not in t for t in before)
        asked = time.monotonic()
        response = httpx.post(up.balancer.url + "/api/models/reload", headers=up.admin, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["added"] == [name]  # the replica nginx picked
        deadline = time.monotonic() + 30
        while not all(name in tags(r) for r in up.replicas):  # the other follows the stamp
            assert time.monotonic() < deadline, [tags(r) for r in up.replicas]
            time.sleep(0.1)
        print(f"\nreload: both replicas serve {name} {time.monotonic() - asked:.1f} s after one request")
        for replica in up.replicas:
            answer = httpx.post(replica.url + "/api/generate", timeout=30, json={
                "model": name, "prompt": "Once", "stream": False, "options": {"num_predict": 4}})
            assert answer.status_code == 200, answer.text
        assert httpx.post(up.balancer.url + "/api/models/reload", timeout=30).status_code == 401
    finally:  # as it was: the model removed, everywhere
        shutil.rmtree(up.checkpoints / name, ignore_errors=True)
        httpx.post(up.balancer.url + "/api/models/reload", headers=up.admin, timeout=60)
        deadline = time.monotonic() + 30
        while any(name in tags(r) for r in up.replicas) and time.monotonic() < deadline:
            time.sleep(0.1)


METRIC = re.compile(r'^fable_requests_total\{([^}]*)\} (\S+)$', re.M)


def requests_counted(replica: Replica, admin: dict[str, str], route: str) -> float:
    """What the replica's /metrics counts of GET ``route`` answered 200."""
    text = httpx.get(replica.url + "/metrics", headers=admin, timeout=10).text
    want = {f'route="{route}"', 'method="GET"', 'status="200"'}
    return sum(float(value) for labels, value in METRIC.findall(text) if want <= set(labels.split(",")))


def test_metrics_stay_per_replica(up):
    a, b = up.replicas
    route = "/api/version"
    before = [requests_counted(r, up.admin, route) for r in (a, b)]
    for replica, times in ((a, 3), (b, 5)):
        for _ in range(times):
            assert httpx.get(replica.url + route, timeout=10).status_code == 200
    mark = len(up.balancer.access_log())
    for _ in range(10):
        assert httpx.get(up.balancer.url + route, timeout=10).status_code == 200
    through = [e.upstreams[-1] for e in since(up.balancer, mark, 10)]
    assert len(through) == 10 and set(through) == {a.address, b.address}  # both got some
    after = [requests_counted(r, up.admin, route) for r in (a, b)]
    # Each counts its own: what it was sent directly, and its share of the balanced ones.
    assert after[0] - before[0] == 3 + through.count(a.address)
    assert after[1] - before[1] == 5 + through.count(b.address)


# ---- a replica dies under load ------------------------------------------------------------

@dataclass
class Outcome:
    streamed: bool
    started: float  # time.monotonic()
    ended: float
    error: str | None = None
    request_id: str | None = None  # its X-Request-Id, which the balancer's log shows


def one_request(client: httpx.Client, streamed: bool, tokens: int, request_id: str = "") -> str | None:
    """One /api/generate through the balancer; None when its whole answer came, else why not."""
    body = {"model": MODEL, "prompt": "Once", "stream": streamed,
            "options": {"num_predict": tokens, "temperature": 0}}
    headers = {"X-Request-Id": request_id} if request_id else {}
    try:
        if not streamed:
            response = client.post("/api/generate", json=body, headers=headers)
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            return None if response.json()["response"] == "o" * tokens else "wrong text"
        with client.stream("POST", "/api/generate", json=body, headers=headers) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            lines = [json.loads(line) for line in response.iter_lines() if line.strip()]
        text = "".join(line.get("response", "") for line in lines)
        return None if lines and lines[-1].get("done") and text == "o" * tokens else "stream cut"
    except httpx.HTTPError as e:
        return type(e).__name__


class Load:
    """16 clients through the balancer, each sending its next request when the last one
    returns: 12 wait for whole answers, 4 read streams. Started on entry, stopped (the
    requests under way finish) on exit."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients = [threading.Thread(target=self._loop, args=(i < 4,)) for i in range(16)]

    def _loop(self, streamed: bool) -> None:
        with httpx.Client(base_url=self.balancer.url, timeout=60) as client:
            while not self._stop.is_set():
                request_id = secrets.token_hex(8)
                started = time.monotonic()
                error = one_request(client, streamed, 64 if streamed else 32, request_id)
                with self._lock:
                    self.outcomes.append(Outcome(streamed, started, time.monotonic(), error, request_id))

    def __enter__(self) -> Load:
        for c in self._clients:
            c.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for c in self._clients:
            c.join(90)


def diagnosis(cluster: Cluster) -> str:
    """What the balancer and the replicas logged of errors: for a failure's message."""
    lines = cluster.balancer.errors().splitlines()[-20:]
    for replica in cluster.replicas:
        log = replica.log.read_text(errors="replace").splitlines()
        lines += [f"{replica.address}: {line}" for line in log
                  if '" 5' in line or "Error" in line or "Traceback" in line or "[CRITICAL]" in line][-20:]
    return "\n".join(lines)


def wait_until_served_by(balancer: Balancer, replica: Replica, timeout: float = 30) -> float:
    """Requests through the balancer until one is answered by ``replica``; how long it took."""
    started = time.monotonic()
    with httpx.Client(base_url=balancer.url, timeout=30) as client:
        while True:
            mark = len(balancer.access_log())
            assert one_request(client, False, 8) is None
            if [e for e in since(balancer, mark, 1) if e.upstreams and e.upstreams[-1] == replica.address]:
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"nginx sent {replica.address} nothing"
            time.sleep(0.2)


def test_a_replica_killed_under_load_loses_only_its_streams_and_rejoins_when_restarted(up):
    a, b = up.replicas
    balancer = up.balancer
    mark = len(balancer.access_log())
    with Load(balancer) as load:
        time.sleep(2.5)
        killing, killed_wall = time.monotonic(), time.time()
        b.kill()  # SIGKILL to its master and worker: the connections it held are reset
        killed = time.monotonic()  # the kill took from `killing` to here
        time.sleep(3.0)
    outcomes = load.outcomes
    after_kill = [o for o in outcomes if o.started > killed]
    in_flight = [o for o in outcomes if o.started <= killed and o.ended >= killing]
    failed = [o for o in outcomes if o.error]
    assert [o for o in outcomes if o.ended < killing] and after_kill, "no load before or after the kill"
    logged = since(balancer, mark, len(outcomes))  # one line a request, retried or not
    line = {e.request_id: e for e in logged}
    # Nothing lost but what was under way at the kill; every request after it answered.
    assert all(o in in_flight for o in failed), ([(o.error, o.started - killing) for o in failed], diagnosis(up))
    # And of those, only answers B had begun to send when it died (its status already
    # passed on, so nginx could not run them again elsewhere: mostly streams); whatever
    # B had not begun to answer, nginx ran again on A (non_idempotent).
    cut = [(o.error, o.streamed, line[o.request_id].upstreams, line[o.request_id].status)
           for o in failed if o.request_id in line]
    assert len(cut) == len(failed) and all(upstreams == [b.address] and status == 200
                                           for _, _, upstreams, status in cut), (cut, diagnosis(up))
    assert all(line[o.request_id].status == 200 for o in outcomes if not o.error)
    # And it routes around B: after the kill, B answers nothing.
    late = [e for e in logged if e.at > killed_wall + 0.5]
    assert late and all(e.upstreams[-1] == a.address for e in late)
    retried = [e for e in logged if len(e.upstreams) > 1]
    first_after = min(o.ended for o in after_kill if not o.error) - killed
    print(f"\nreplica killed under 16 clients: {len(outcomes)} requests, {len(in_flight)} under way "
          f"during the kill ({killed - killing:.2f} s), {len(failed)} cut (streams: "
          f"{sum(o.streamed for o in failed)}), {len(retried)} run again on the other replica by nginx; "
          f"the first request sent after the kill answered {first_after:.2f} s after it; the longest "
          f"request under way took {max(o.ended - o.started for o in in_flight):.2f} s")

    # Restarted, it gets requests again (its fail_timeout, 5 s, has passed by then).
    b.launch()
    b.wait_healthy()
    print(f"restarted replica served through nginx {wait_until_served_by(balancer, b):.1f} s "
          f"after it was healthy")


def test_a_replica_restarted_gracefully_under_load_loses_nothing(up):
    """A rolling restart, one replica at a time: SIGTERM is gunicorn's graceful stop (what
    runs finishes, no new connection is taken), so nginx sends everything to the other."""
    a, b = up.replicas
    balancer = up.balancer
    mark = len(balancer.access_log())
    with Load(balancer) as load:
        time.sleep(1.5)
        stopping = time.monotonic()
        b.stop()
        stopped = time.monotonic()
        b.launch()
        b.wait_healthy()
        back = wait_until_served_by(balancer, b)
        time.sleep(0.5)
    line = {e.request_id: e for e in since(balancer, mark, len(load.outcomes))}
    failed = [(o.error, o.streamed, round(o.started - stopping, 2), line.get(o.request_id))
              for o in load.outcomes if o.error]
    assert not failed, (failed, diagnosis(up))
    assert len(load.outcomes) > 16
    print(f"\ngraceful restart under 16 clients: {len(load.outcomes)} requests, none failed; the "
          f"replica took {stopped - stopping:.1f} s to stop and served again "
          f"{time.monotonic() - stopping - 0.5:.1f} s after the SIGTERM ({back:.1f} s after it was healthy)")
