"""Security: response headers, CSRF, the rate limit, bad model names, hostile checkpoints,
escaping and the admin token (app/platform/security.py, app/platform/csrf.py, app/platform/ratelimit.py).

What other files already cover is not repeated here: prompt markup and generated markup
in the generate page's event stream (tests/pages/test_story_pages.py), generated markup never
running in a real browser (tests/pages/test_browser.py), the first model-name traversals
through the API (tests/apis/test_ollama_api.py) and a pickle refused by load_checkpoint itself
(tests/models/test_checkpoint.py).
"""

from __future__ import annotations

import base64
import builtins
import hmac
import io
import os
import pickle
import re
import shutil
from html import unescape
from pathlib import Path

import pytest
import torch

from app.platform import csrf

from app.platform import security
from app.platform.ratelimit import TokenBuckets
from app.platform.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "security-test-token-0123456789"
FORM = {"model": "endless", "prompt": "Once", "temperature": "0", "max_new_tokens": "3"}
INFILL = {"model": "endless", "first": "Lily ran.", "last": "The end.", "temperature": "0",
          "max_new_tokens": "3"}
GEN_BODY = {"model": "endless", "prompt": "x", "stream": False, "max_new_tokens": 2}
CMPL_BODY = {"model": "endless", "prompt": "x", "max_tokens": 2}
#: Every HTML form route that changes something, with a body it accepts.
FORM_POSTS = [("/", FORM), ("/generate/start", FORM), ("/infill", INFILL),
              ("/infill/start", INFILL)]
SAME_ORIGIN = "http://localhost"  # the Flask test client's Host is localhost


def directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy as {directive: [sources]}."""
    out = {}
    for part in policy.split(";"):
        words = part.split()
        if words:
            out[words[0].lower()] = words[1:]
    return out


def sse_events(body: str) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body, comments skipped."""
    events = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        events.append((name, data))
    return events


def stream_url(html: str) -> str:
    return unescape(re.search(r'sse-connect="([^"]+)"', html).group(1))


# ---- headers ------------------------------------------------------------------------------

def _responses(app, monkeypatch):
    """One response of every kind: pages, fragments, streams, JSON, static files, errors."""
    client = app.test_client()
    yield "page", client.get("/")
    yield "infill page", client.get("/infill")
    yield "admin page", client.get("/admin")
    yield "no-JS result page", client.post("/", data=FORM)
    start = client.post("/generate/start", data=FORM)
    yield "htmx fragment", start
    yield "event stream", client.get(stream_url(start.get_data(as_text=True)))
    yield "Ollama JSON", client.post("/api/generate", json=GEN_BODY)
    yield "NDJSON stream", client.post("/api/generate", json={**GEN_BODY, "stream": True})
    yield "OpenAI JSON", client.post("/v1/completions", json=CMPL_BODY)
    yield "listing", client.get("/api/tags")
    yield "health", client.get("/healthz")
    yield "OpenAPI", client.get("/openapi.json")
    yield "static script", client.get("/static/app.js")
    yield "static style", client.get("/static/style.css")
    yield "HTML 404", client.get("/nope")
    yield "JSON 404", client.get("/api/nope")
    yield "405", client.get("/api/generate")
    yield "400", client.post("/api/generate", json={"model": 3})
    yield "413", client.post("/api/generate", json={"model": "x", "prompt": "x" * 70_000})
    yield "form 400", client.post("/", data={**FORM, "top_k": "0"})

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(app.extensions["fable.service"], "stream", boom)
    yield "500", client.post("/api/generate", json=GEN_BODY)


def test_every_response_carries_the_security_headers(app, monkeypatch):
    seen = set()
    for kind, response in _responses(app, monkeypatch):
        seen.add(response.status_code)
        for name, value in security.SECURITY_HEADERS.items():
            assert response.headers.get(name) == value, (kind, name)
        assert "X-Frame-Options" not in response.headers, kind  # Spaces are shown in a frame
    assert {200, 400, 404, 405, 413, 500} <= seen


def test_the_csp_allows_no_inline_script_and_frames_only_on_hugging_face(client):
    policy = directives(client.get("/").headers["Content-Security-Policy"])
    for directive in ("script-src", "style-src", "default-src"):
        sources = policy[directive]
        assert "'unsafe-inline'" not in sources and "'unsafe-eval'" not in sources, directive
        assert not {"*", "data:", "http:", "https:", "blob:"} & set(sources), directive
    assert policy["script-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'self'"]
    assert set(policy["frame-ancestors"]) == {"'self'", "https://huggingface.co",
                                              "https://*.huggingface.co", "https://*.hf.space"}


def test_referrer_policy_keeps_the_origin_the_csrf_check_needs(client):
    # "no-referrer" would make browsers send "Origin: null" on same-origin form posts
    assert client.get("/").headers["Referrer-Policy"] == "same-origin"
    assert client.get("/").headers["X-Content-Type-Options"] == "nosniff"


INLINE = {
    "inline script": re.compile(r"<script\b(?![^>]*\bsrc=)[^>]*>", re.I),
    "event handler attribute": re.compile(r"<[^>]+\son[a-z]+\s*=", re.I),
    "style attribute": re.compile(r"<[^>]+\sstyle\s*=", re.I),
    "style element": re.compile(r"<style\b", re.I),
    "javascript: URL": re.compile(r"javascript:", re.I),
}


def test_pages_need_nothing_the_csp_forbids(client, script):
    """Every page and fragment the app renders works under the CSP above: no inline
    script, handler or style (htmx's own indicator <style> and eval are turned off)."""
    script(["safe text"])
    start = client.post("/generate/start", data=FORM).get_data(as_text=True)
    rendered = {
        "generate": client.get("/").get_data(as_text=True),
        "infill": client.get("/infill").get_data(as_text=True),
        "admin": client.get("/admin").get_data(as_text=True),
        "result page": client.post("/", data=FORM).get_data(as_text=True),
        "form errors": client.post("/", data={**FORM, "model": "nope"}).get_data(as_text=True),
        "fragment": start,
        "stream": client.get(stream_url(start)).get_data(as_text=True),
    }
    for name, html in rendered.items():
        for what, pattern in INLINE.items():
            assert not pattern.search(html), f"{what} in the {name}: {pattern.search(html)}"
    config = re.search(r"<meta name=\"htmx-config\" content='([^']*)'>", rendered["generate"])
    assert '"includeIndicatorStyles":false' in config.group(1)
    assert '"allowEval":false' in config.group(1)
    scripts = re.findall(r'<script src="([^"]+)"', rendered["generate"])
    assert scripts and all(src.startswith("/static/") for src in scripts)


# ---- CSRF ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, form", FORM_POSTS)
def test_a_form_posted_from_another_site_is_refused(client, path, form, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("a refused form must not generate")
    monkeypatch.setattr("app.serving.service.GenerationService._start", no_generation)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://localhost.evil.example"},
                    {"Origin": "http://localhost:8080"}, {"Origin": "https://localhost"},
                    {"Origin": "not an origin"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        response = client.post(path, data=form, headers=headers)
        assert response.status_code == 403, (path, headers)
        assert response.mimetype == "text/html"
        assert "submitted from another site" in response.get_data(as_text=True)


def test_the_refusal_is_json_for_json_clients(client):
    response = client.post("/", data=FORM, headers={"Origin": "https://evil.example",
                                                    "Accept": "application/json"})
    assert response.status_code == 403
    assert "submitted from another site" in response.json["error"]
    assert "https://evil.example" in response.json["error"]


@pytest.mark.parametrize("path, form", FORM_POSTS)
def test_a_form_from_this_site_is_accepted(client, path, form):
    for headers in ({"Origin": SAME_ORIGIN}, {"Origin": "HTTP://LOCALHOST:80"},
                    {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": SAME_ORIGIN, "Sec-Fetch-Site": "same-origin"},
                    {}):  # neither header: not a browser, nothing ambient to abuse
        response = client.post(path, data=form, headers=headers)
        assert response.status_code == 200, (path, headers, response.get_data(as_text=True))


def test_the_origin_of_a_proxy_like_hugging_faces_is_honoured(make_app):
    """Behind the Spaces proxy the app sees Host: its container address, while the browser
    sends the public origin; the proxy says which in X-Forwarded-Host/-Proto."""
    client = make_app(FABLE_PROXY_HOPS=1).test_client()
    proxied = {"X-Forwarded-Host": "someone-fable.hf.space", "X-Forwarded-Proto": "https"}
    ok = client.post("/", data=FORM, headers={**proxied,
                                              "Origin": "https://someone-fable.hf.space"})
    assert ok.status_code == 200
    for origin in ("https://other-space.hf.space", "https://huggingface.co",
                   "http://someone-fable.hf.space:8443", SAME_ORIGIN):
        refused = client.post("/", data=FORM, headers={**proxied, "Origin": origin})
        assert refused.status_code == 403, origin
    # a default port is the same origin
    response = client.post("/", data=FORM, headers={
        "X-Forwarded-Host": "someone-fable.hf.space:443", "X-Forwarded-Proto": "https",
        "Origin": "https://someone-fable.hf.space"})
    assert response.status_code == 200
    # each proxy appends what it saw: with two, the second value from the right is the public one
    two = make_app(FABLE_PROXY_HOPS=2).test_client()
    response = two.post("/", data=FORM, headers={
        "X-Forwarded-Host": "someone-fable.hf.space, 10.0.0.1",
        "X-Forwarded-Proto": "https, http", "Origin": "https://someone-fable.hf.space"})
    assert response.status_code == 200


def test_without_a_proxy_x_forwarded_host_is_ignored(make_app):
    """FABLE_PROXY_HOPS=0: nobody in front is trusted, so a forwarded host proves nothing."""
    client = make_app(FABLE_PROXY_HOPS=0).test_client()
    forged = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https",
              "Origin": "https://evil.example"}
    assert client.post("/", data=FORM, headers=forged).status_code == 403
    assert client.post("/", data=FORM, headers={**forged, "Origin": SAME_ORIGIN}).status_code == 200


def test_the_json_apis_have_their_own_origin_check(client):
    """Not the forms' (their answer is JSON in the API's shape, and clients without an
    Origin pass): app/platform/api_access.py, tests/platform/test_api_access.py."""
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    refused = client.post("/api/generate", json=GEN_BODY, headers=evil)
    assert refused.status_code == 403 and refused.json["error"].startswith("cross-site requests")
    assert client.post("/v1/completions", json=CMPL_BODY, headers=evil).status_code == 403
    assert client.post("/api/generate", json=GEN_BODY).status_code == 200
    # reading pages is never refused: only what changes something is checked
    assert client.get("/", headers=evil).status_code == 200
    assert client.get("/admin", headers=evil).status_code == 200


def test_every_form_route_is_protected(app):
    """Any POST route outside the JSON APIs (one added later too) gets the Origin check."""
    client = app.test_client()
    posts = [rule.rule for rule in app.url_map.iter_rules()
             if "POST" in rule.methods and not csrf.exempt(rule.rule)]
    assert {"/", "/infill", "/generate/start", "/infill/start"} <= set(posts)
    for path in posts:
        response = client.post(path, data={}, headers={"Origin": "https://evil.example"})
        assert response.status_code == 403, path


# ---- a GET that generates is refused cross-site, as a form is -------------------------------

CROSS_SITE = [{"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
              {"Origin": "https://evil.example"}, {"Origin": "null"},
              {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}]
SAME_SITE = [{"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},  # typed, bookmarked
             {"Origin": SAME_ORIGIN}, {}]  # no header: curl, not a browser
COMPARE_RUN = {"models": ["endless", "tiny-gpt", "tiny-lstm"], "prompt": "Once",
               "temperature": "0", "max_new_tokens": "3", "run": "1"}


def _generating_gets(client) -> list[tuple[str, dict | None]]:
    """Every GET that starts work: the no-JS comparison, its htmx start, each stream."""
    compare = {k: v for k, v in COMPARE_RUN.items() if k != "run"}
    columns = client.get("/compare/start", query_string=compare).get_data(as_text=True)
    return [("/compare", COMPARE_RUN), ("/compare/start", compare),
            (stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True)), None),
            (stream_url(client.post("/infill/start", data=INFILL).get_data(as_text=True)), None),
            *((unescape(url), None) for url in re.findall(r'sse-connect="([^"]+)"', columns))]


def test_a_get_that_generates_is_refused_from_another_site(client, started):
    gets = _generating_gets(client)
    assert {path.split("?")[0] for path, _ in gets} == {
        "/compare", "/compare/start", "/generate/stream", "/infill/stream",
        "/compare/generate/stream"}
    for path, query in gets:
        for headers in CROSS_SITE:
            assert client.head(path, query_string=query, headers=headers).status_code == 403
            response = client.get(path, query_string=query, headers=headers)
            assert response.status_code == 403, (path, headers)
            text = response.get_data(as_text=True)
            assert "this generation was asked for from another site" in text
            assert "open the page on this site and start it there" in text
    assert started == []  # not one generation ran


def test_a_get_that_generates_from_this_site_or_no_browser_works(client, started):
    for headers in SAME_SITE:
        for path, query in _generating_gets(client):
            response = client.get(path, query_string=query, headers=headers)
            assert response.status_code == 200, (path, headers)
            assert "another site" not in response.get_data(as_text=True)  # reading runs a stream
    # each header set: three no-JS columns, a generation, an infill, and the three columns
    # /compare/start handed out (it only hands them out)
    assert len(started) == len(SAME_SITE) * (3 + 1 + 1 + 3)


def test_the_comparison_refusal_is_json_for_json_clients(client):
    response = client.get("/compare", query_string=COMPARE_RUN,
                          headers={"Origin": "https://evil.example", "Accept": "application/json"})
    assert response.status_code == 403
    assert response.json["error"].startswith("this generation was asked for from another site "
                                             "(Origin https://evil.example)")


def test_pages_that_generate_nothing_load_from_anywhere(client, started):
    compare = {k: v for k, v in COMPARE_RUN.items() if k != "run"}  # a shared comparison
    for path, query in (("/", {}), ("/infill", {}), ("/compare", {}), ("/compare", compare),
                        ("/", {"model": "endless", "prompt": "Once"})):
        for headers in CROSS_SITE:
            assert client.get(path, query_string=query, headers=headers).status_code == 200
    assert started == []


def test_every_route_that_generates_is_marked(app):
    """The checks find the routes by their mark (web.generates): every page POST (but the
    admin and training pages', behind the admin token) and every start or stream GET has
    it, one added later too."""
    def marked(rule) -> bool:
        return hasattr(app.view_functions[rule.endpoint], "fable_generates")
    rules = [rule for rule in app.url_map.iter_rules() if not csrf.exempt(rule.rule)]
    posts = [r for r in rules if "POST" in r.methods and not r.rule.startswith(("/admin", "/train"))]
    gets = [r for r in rules if "GET" in r.methods and r.rule.endswith(("/start", "/stream"))]
    assert len(posts) == 4 and len(gets) == 4
    assert all(marked(rule) for rule in posts + gets), [r.rule for r in posts + gets
                                                         if not marked(r)]
    assert marked(next(r for r in rules if r.rule == "/compare"))  # with run=1 only


@pytest.mark.parametrize("scheme, netloc, expected", [
    ("https", "Example.COM:443", "https://example.com"),
    ("http", "example.com:80", "http://example.com"),
    ("http", "example.com:8080", "http://example.com:8080"),
    ("https", "[::1]:7860", "https://[::1]:7860"),
    ("http", "example.com:notaport", None),
    ("http", "user@example.com", None),
    ("http", "example.com/path", None),
    ("http", "", None),
])
def test_origins_compare_without_default_ports(scheme, netloc, expected):
    assert csrf.normalise(scheme, netloc) == expected


# ---- the rate limit -----------------------------------------------------------------------

def test_over_the_limit_the_apis_answer_429_with_retry_after(make_app):
    client = make_app(FABLE_RATE_LIMIT=3).test_client()
    assert client.post("/api/generate", json=GEN_BODY).status_code == 200
    assert client.post("/v1/completions", json=CMPL_BODY).status_code == 200
    assert client.post("/api/generate", json={"model": 3}).status_code == 400  # counts too
    ollama = client.post("/api/generate", json=GEN_BODY)
    assert ollama.status_code == 429
    assert 1 <= int(ollama.headers["Retry-After"]) <= 20  # 3 a minute: one every 20 s
    assert "3 a minute" in ollama.json["error"]
    openai = client.post("/v1/completions", json=CMPL_BODY)
    assert openai.status_code == 429 and int(openai.headers["Retry-After"]) >= 1
    assert openai.json["error"]["type"] == "rate_limit_error"
    # another client has its own allowance
    other = client.post("/api/generate", json=GEN_BODY, environ_base={"REMOTE_ADDR": "10.0.0.9"})
    assert other.status_code == 200
    # what does not generate is never limited
    for path in ("/", "/infill", "/healthz", "/api/tags", "/v1/models", "/openapi.json",
                 "/static/app.js", "/admin"):
        assert client.get(path).status_code == 200, path


def test_over_the_limit_a_form_comes_back_with_the_reason(make_app):
    client = make_app(FABLE_RATE_LIMIT=1).test_client()
    assert client.post("/", data=FORM).status_code == 200
    response = client.post("/infill", data=INFILL)  # one allowance for every route
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    html = response.get_data(as_text=True)
    assert html.startswith("<!doctype html>") and 'class="error-summary"' in html
    assert "too many generation requests" in html
    assert "Lily ran." in html  # the form as it was sent, ready to send again


def test_over_the_limit_a_page_stream_reports_it_as_an_event(make_app):
    client = make_app(FABLE_RATE_LIMIT=1).test_client()
    first = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    second = stream_url(client.post("/generate/start", data=FORM).get_data(as_text=True))
    assert [e for e, _ in sse_events(client.get(first).get_data(as_text=True))][-1] == "done"
    response = client.get(second)
    assert response.status_code == 200  # an EventSource must get 200, or it retries
    events = sse_events(response.get_data(as_text=True))
    assert [e for e, _ in events] == ["failed", "done"]
    assert "too many generation requests" in events[0][1]
    # a reconnecting EventSource is told the stream was interrupted, and is not charged
    reconnect = client.get(first, headers={"Last-Event-ID": "1"}).get_data(as_text=True)
    assert "interrupted" in reconnect


def test_a_start_that_generates_by_itself_counts(make_app):
    import random
    client = make_app(FABLE_RATE_LIMIT=1).test_client()
    rng = random.Random(0)  # an incompressible prompt: its job cannot travel in a URL
    prompt = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(4000))
    form = {**FORM, "prompt": prompt}
    assert client.post("/generate/start", data=form).status_code == 200
    assert client.post("/generate/start", data=form).status_code == 429


def test_behind_a_proxy_the_client_is_the_forwarded_address(make_app):
    client = make_app(FABLE_RATE_LIMIT=1, FABLE_PROXY_HOPS=1).test_client()
    proxy = {"REMOTE_ADDR": "10.16.3.80"}  # every request comes from the proxy

    def generate(forwarded_for):
        return client.post("/api/generate", json=GEN_BODY, environ_base=proxy,
                           headers={"X-Forwarded-For": forwarded_for}).status_code
    assert generate("203.0.113.7") == 200
    assert generate("198.51.100.1") == 200  # a different client behind the same proxy
    assert generate("203.0.113.7") == 429
    # whatever a client writes in front of the proxy's entry changes nothing
    assert generate("1.2.3.4, 203.0.113.7") == 429


def test_without_a_proxy_x_forwarded_for_is_ignored(make_app):
    client = make_app(FABLE_RATE_LIMIT=1, FABLE_PROXY_HOPS=0).test_client()
    assert client.post("/api/generate", json=GEN_BODY).status_code == 200
    spoofed = client.post("/api/generate", json=GEN_BODY,
                          headers={"X-Forwarded-For": "198.51.100.23"})
    assert spoofed.status_code == 429


def test_no_limit_by_default(client):
    for _ in range(5):
        assert client.post("/api/generate", json=GEN_BODY).status_code == 200


def test_token_buckets_refill_and_say_how_long_to_wait():
    now = [0.0]
    buckets = TokenBuckets(6, clock=lambda: now[0])  # one token every 10 s
    assert [buckets.take("a") for _ in range(6)] == [0.0] * 6  # a burst of the whole minute
    assert buckets.take("a") == pytest.approx(10.0)
    assert buckets.take("b") == 0.0  # clients are independent
    now[0] = 4.0
    assert buckets.take("a") == pytest.approx(6.0)  # a refused request spends nothing
    now[0] = 10.0
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(10.0)
    now[0] = 1000.0  # a long pause refills to the burst, never beyond
    assert [buckets.take("a") for _ in range(6)] == [0.0] * 6
    assert buckets.take("a") > 0


def test_token_buckets_forget_idle_clients_first():
    now = [0.0]
    buckets = TokenBuckets(60, clock=lambda: now[0], max_clients=3)
    for key in "abc":
        buckets.take(key)
    now[0] = 0.5
    for _ in range(60):
        buckets.take("busy")  # four clients: "a", "b", "c" have refilled and are forgotten
    assert len(buckets) <= 3
    assert buckets.take("busy") > 0  # the one that is over its limit is remembered


@pytest.mark.parametrize("value", ["-1", "many", "1.5", True])
def test_rate_limit_setting_is_validated(value):
    with pytest.raises(SettingsError, match="FABLE_RATE_LIMIT"):
        Settings.load(environ={}, overrides={"FABLE_RATE_LIMIT": value})


def test_rate_limit_and_proxy_settings_defaults():
    settings = Settings.load(environ={})
    assert settings.rate_limit == 0 and settings.proxy_hops == 0
    assert Settings.load(environ={"FABLE_RATE_LIMIT": "30"}).rate_limit == 30
    space = Settings.load(environ={"SPACE_ID": "someone/fable"})
    assert space.proxy_hops == 1  # a Hugging Face Space is behind HF's proxy
    assert Settings.load(environ={"SPACE_ID": "x", "FABLE_PROXY_HOPS": "0"}).proxy_hops == 0
    with pytest.raises(SettingsError, match="FABLE_PROXY_HOPS"):
        Settings.load(environ={"FABLE_PROXY_HOPS": "-1"})


# ---- model names are looked up, never opened ----------------------------------------------

HOSTILE_NAMES = ["../x", "/etc/passwd", "..%2F..", "..%2F..%2Fetc%2Fpasswd",
                 "checkpoints/../../x", "tiny-gpt\x00", "\x00", "tiny-gpt\x00/../../x",
                 "..\\..\\x", "~/x", "file:///etc/passwd"]


@pytest.fixture
def opened(monkeypatch):
    """Every path the code opens from now on (Python's open, os.open, torch and
    safetensors loaders)."""
    paths: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        paths.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        paths.append(str(path))
        return real_os_open(path, *args, **kwargs)

    def refuse(*args, **kwargs):
        paths.append(str(args[0]) if args else "?")
        raise AssertionError("a request must not load a checkpoint")
    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    for target in ("app.serving.registry.load_checkpoint", "models_src.checkpoint.load_checkpoint",
                   "models_src.checkpoint.load_file", "torch.load"):
        monkeypatch.setattr(target, refuse)
    return paths


def _only_templates(paths: list[str]) -> list[str]:
    """The opened paths that are not the app's own templates."""
    templates = (ROOT / "templates").resolve()
    return [p for p in paths if not Path(p).resolve().is_relative_to(templates)]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_model_names_in_the_apis_are_4xx_and_open_nothing(app, opened, name):
    client = app.test_client()
    ollama = client.post("/api/generate", json={**GEN_BODY, "model": name})
    assert ollama.status_code == 404 and "not found" in ollama.json["error"]
    openai = client.post("/v1/completions", json={**CMPL_BODY, "model": name})
    assert openai.status_code == 404 and openai.json["error"]["code"] == "model_not_found"
    assert _only_templates(opened) == []


@pytest.mark.parametrize("path", ["/v1/models/..%2F..%2Fetc%2Fpasswd", "/v1/models/../../x",
                                  "/v1/models/tiny-gpt%00", "/v1/models/%2Fetc%2Fpasswd",
                                  "/v1/models/checkpoints/..%2F..%2Fx"])
def test_hostile_model_names_in_urls_are_404(app, opened, path):
    # (werkzeug first redirects a doubled slash to the single-slash URL: 404 there too)
    response = app.test_client().get(path, follow_redirects=True)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert _only_templates(opened) == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_model_names_in_page_forms_are_400_and_open_nothing(app, opened, name):
    client = app.test_client()
    for path, form in FORM_POSTS:
        response = client.post(path, data={**form, "model": name})
        html = response.get_data(as_text=True)
        if path.endswith("/start"):  # htmx: the form again, its errors inline, status 200
            assert response.status_code == 200 and 'id="error-model"' in html, path
        else:
            assert response.status_code == 400 and 'id="error-model"' in html, path
        assert "is not loaded" in html
    assert _only_templates(opened) == []


def test_static_files_never_leave_the_static_folder(client):
    for path in ("/static/../app/platform/settings.py", "/static/..%2fapp%2fsettings.py",
                 "/static/%2e%2e/app/platform/settings.py", "/static/vendor/../../app/platform/settings.py",
                 "/static//etc/passwd", "/static/app.js%00.png"):
        response = client.get(path, follow_redirects=True)
        assert response.status_code in (400, 404), path
        assert b"get_settings" not in response.get_data() and b"root:" not in response.get_data()


def test_the_registry_is_a_name_lookup(app):
    registry = app.extensions["fable.registry"]
    assert registry.get("tiny-gpt") is not None
    for name in [*HOSTILE_NAMES, registry.directory / "tiny-gpt", Path("tiny-gpt"),
                 b"tiny-gpt", None, 3]:
        assert registry.get(name) is None, name


# ---- hostile checkpoints are never unpickled ----------------------------------------------

class Payload:
    """A pickle that creates ``marker`` (a directory) when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_malicious_pickle_in_the_checkpoint_directory_never_runs(make_app, checkpoint_dir,
                                                                    tmp_path, caplog):
    marker = tmp_path / "pwned"
    # the payload is live: unpickling it really runs code
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.is_dir()

    root = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir / "tiny-gpt", root / "good")
    for name, weights, write in (
            ("evil-pickle", "model.pt",
             lambda path: path.write_bytes(pickle.dumps(Payload(marker), protocol=2))),
            ("evil-torch-save", "model.pt", lambda path: torch.save(Payload(marker), path)),
            ("evil-nanogpt", "model.pt",
             lambda path: torch.save({"model": Payload(marker), "iter_num": 1}, path)),
            ("evil-bin", "pytorch_model.bin", lambda path: torch.save(Payload(marker), path))):
        shutil.copytree(checkpoint_dir / "tiny-gpt", root / name)
        (root / name / "model.safetensors").unlink()
        write(root / name / weights)
    (root / "stray.pt").write_bytes(pickle.dumps(Payload(marker)))  # not a directory

    caplog.set_level("WARNING")
    app = make_app(FABLE_CHECKPOINT_DIR=str(root))
    assert not marker.exists()
    registry = app.extensions["fable.registry"]
    assert registry.names() == ["good"]
    assert set(registry.errors) == {"evil-bin", "evil-nanogpt", "evil-pickle", "evil-torch-save"}
    for name, reason in registry.errors.items():
        assert "refused" in reason, (name, reason)
        assert f"skipping checkpoint {name}" in caplog.text
    client = app.test_client()
    assert set(client.get("/api/models").json["errors"]) == set(registry.errors)
    assert client.get("/healthz").status_code == 200  # the good one serves
    assert client.post("/api/generate", json={**GEN_BODY, "model": "evil-pickle"}).status_code \
        == 404
    assert not marker.exists()


# ---- escaping -----------------------------------------------------------------------------

MARKUP = ["<scr", "ipt>alert(1)</script>", '<img src=x onerror="alert(2)">', " & done"]
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=&#34;alert(2)&#34;&gt; " \
          "&amp; done"


def test_generated_markup_is_escaped_in_no_js_pages(client, script):
    script(MARKUP)
    for path, form in (("/", FORM), ("/infill", INFILL)):
        html = client.post(path, data=form).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html, path
        assert ESCAPED in html, path


def test_generated_markup_is_escaped_in_the_infill_stream_and_large_fragments(client, script):
    script(MARKUP)
    url = stream_url(client.post("/infill/start", data=INFILL).get_data(as_text=True))
    body = client.get(url).get_data(as_text=True)
    assert "<scr" not in body.split("event: done")[0]
    received = "".join(data for event, data in sse_events(body) if event == "message")
    assert unescape(received) == "".join(MARKUP)
    # a job too large for a URL is answered with the whole text in the fragment
    import random
    rng = random.Random(1)
    prompt = "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(4000))
    html = client.post("/generate/start", data={**FORM, "prompt": prompt}).get_data(as_text=True)
    assert "sse-connect" not in html
    assert "<script>alert" not in html and ESCAPED in html


def test_model_names_and_load_errors_are_escaped_on_the_admin_page(make_app, checkpoint_dir,
                                                                   tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir / "tiny-gpt", root / "<b>bold")
    (root / "<script>x").mkdir()
    (root / "<script>x" / "config.json").write_text("<script>alert(1)</script>")
    html = make_app(FABLE_CHECKPOINT_DIR=str(root)).test_client().get("/admin").get_data(
        as_text=True)
    assert "<b>bold" not in html and "&lt;b&gt;bold" in html
    assert "<script>x" not in html and "&lt;script&gt;x" in html


# ---- the admin token ----------------------------------------------------------------------

def _basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()}


def test_the_admin_token_is_compared_in_constant_time(make_app, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)
    monkeypatch.setattr(hmac, "compare_digest", spy)
    client = make_app(FABLE_ADMIN_TOKEN=ADMIN_TOKEN).test_client()
    token = ADMIN_TOKEN.encode()
    near_miss = ADMIN_TOKEN[:-1] + "X"  # same length, last character wrong
    cases = [("/api/models", {"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200),
             ("/api/models", {"Authorization": f"Bearer {near_miss}"}, 401),
             ("/admin", _basic(ADMIN_TOKEN), 200), ("/admin", _basic(near_miss), 401),
             ("/admin", {"Authorization": f"Bearer {ADMIN_TOKEN}"}, 200)]
    for path, headers, status in cases:
        calls.clear()
        assert client.get(path, headers=headers).status_code == status, (path, headers)
        assert calls and all(token in pair for pair in calls), (path, calls)


def test_the_admin_token_never_reaches_the_logs(make_app, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    app = make_app(FABLE_ADMIN_TOKEN=ADMIN_TOKEN)
    client = app.test_client()
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert client.get("/api/models", headers=bearer).status_code == 200
    assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code \
        == 401
    assert client.get("/admin", headers=_basic("wrong")).status_code == 401

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(app.extensions["fable.service"], "stream", boom)
    failed = client.post("/api/generate", json=GEN_BODY, headers=bearer)
    assert failed.status_code == 500
    assert "unhandled error" in caplog.text  # the failure was logged, with its traceback...
    assert ADMIN_TOKEN not in caplog.text  # ...but not the request's credentials
    assert ADMIN_TOKEN not in failed.get_data(as_text=True)
    # a token too short to use is refused without being repeated
    with pytest.raises(SettingsError) as refused:
        make_app(FABLE_ADMIN_TOKEN="short-secret")
    assert "short-secret" not in str(refused.value)



# ---- hostile bodies -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions", "/api/chat"])
def test_deeply_nested_json_is_a_400_not_a_crash(client, path):
    nested = '{"model": "tiny-gpt", "prompt": ' + "[" * 20_000 + "]" * 20_000 + "}"
    response = client.post(path, data=nested, content_type="application/json")
    assert response.status_code == 400
    error = response.json["error"]
    assert "nests arrays and objects more than 32 deep" in (error["message"] if isinstance(error, dict) else error)
    brackets_in_a_string = {"model": "tiny-gpt", "prompt": "[" * 3_000, "stream": False,
                            "options": {"num_predict": 1}, "max_tokens": 1}
    if path == "/api/chat":
        brackets_in_a_string = {"model": "tiny-gpt", "messages": [{"role": "user", "content": "[" * 3_000}],
                                "stream": False}
    if path == "/v1/completions":
        brackets_in_a_string.pop("options"), brackets_in_a_string.pop("stream")
    assert client.post(path, json=brackets_in_a_string).status_code == 200  # text is not nesting


def test_an_integer_of_thousands_of_digits_gets_a_plain_message(client):
    body = '{"model": "tiny-gpt", "prompt": "x", "seed": ' + "9" * 5_000 + "}"
    response = client.post("/v1/completions", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.json["error"]["message"] == ("request body has an integer of 5000 digits; "
                                                 "numbers here have at most 100")


def test_a_hostile_unsigned_token_is_refused_before_it_is_read(app, monkeypatch):
    """Deep nesting or a zip bomb would cost whoever reads them: an unsigned token is
    never even inflated (the signature is checked first)."""
    import zlib

    from app.pages.jobs import FormErrors, job_from_token

    deep = zlib.compress(b'{"kind": "generate", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", 9)
    bomb = zlib.compress(b" " * 10_000_000, 9)
    inflated = []
    monkeypatch.setattr(zlib, "decompress", lambda *a, **k: inflated.append(a))
    monkeypatch.setattr(zlib, "decompressobj", lambda *a, **k: inflated.append(a))
    for data in (deep, bomb):
        for token in (base64.urlsafe_b64encode(data).rstrip(b"=").decode(),
                      "." + base64.urlsafe_b64encode(data).rstrip(b"=").decode() + ".AAAA.AAAA"):
            with app.test_request_context(), pytest.raises(FormErrors, match="invalid"):
                job_from_token("generate", token)
    assert inflated == []


def test_prompts_reach_the_log_only_when_asked(make_app, caplog):
    caplog.set_level("INFO")
    body = {"model": "endless", "prompt": "Zanzibar", "stream": False, "options": {"num_predict": 1}}
    make_app().test_client().post("/api/generate", json=body)
    assert "Zanzibar" not in caplog.text
    make_app(FABLE_LOG_PROMPTS=True).test_client().post("/api/generate", json=body)
    assert "generate with endless: 'Zanzibar'" in caplog.text
