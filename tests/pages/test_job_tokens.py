"""Signed job tokens (app/pages/jobs.py): a token that this server did not write, or
wrote and someone altered (its model, prompt, settings or timestamp), or signed with
another key (another server, or this one before a restart without FABLE_SECRET_KEY) is
an invalid link, and one older than JOB_TTL_S has expired; neither generates. The
workers of one gunicorn share the key gunicorn.conf.py makes (the last test).
"""

from __future__ import annotations

import os
import re
import signal
from contextlib import contextmanager
from html import unescape

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from itsdangerous.encoding import base64_decode, base64_encode, bytes_to_int, int_to_bytes

from app.pages.jobs import JOB_TOKEN_SALT, JOB_TTL_S, job_token_signer
from app.platform.settings import SettingsError
from tests.app_support import ENDLESS_CHAR, MODELS
from tests.gunicorn_server import GunicornServer
from tests.pages.page_helpers import FORM, INFILL, parse_sse, stream_url, texts, unsigned_token

KEY = "a-fixed-secret-key-for-these-tests-0123456789"
INVALID = "this generation link is invalid; submit the form again"
EXPIRED = "this generation link has expired; submit the form again"
COMPARE = {"models": ["endless", "tiny-gpt"], "prompt": "Once", "temperature": "0",
           "max_new_tokens": "6", "seed": "3"}


def issue(client, kind: str = "generate") -> str:
    """A stream URL, as the page's htmx form gets it."""
    if kind == "compare":
        html = client.get("/compare/start", query_string=COMPARE).get_data(as_text=True)
        return unescape(re.findall(r'sse-connect="([^"]+)"', html)[0])
    form = INFILL if kind == "infill" else FORM
    return stream_url(client.post(f"/{kind}/start", data=form).get_data(as_text=True))


def split(url: str) -> tuple[str, str]:
    path, _, token = url.partition("?job=")
    return path, token


def altered(token: str, **changes) -> str:
    """``token`` with its body changed, its timestamp and signature kept."""
    body, stamp, signature = token.rsplit(".", 2)
    reader = URLSafeTimedSerializer("any key")  # reading a body needs no key: it is not secret
    data = reader.load_payload(body.encode())
    assert set(changes) <= set(data), changes  # a change, not an addition
    return f"{reader.dump_payload({**data, **changes}).decode()}.{stamp}.{signature}"


def restamped(token: str, seconds: int) -> str:
    """``token`` with its timestamp moved by ``seconds``, its body and signature kept."""
    body, stamp, signature = token.rsplit(".", 2)
    when = bytes_to_int(base64_decode(stamp)) + seconds
    return f"{body}.{base64_encode(int_to_bytes(when)).decode()}.{signature}"


def events_of(client, url: str) -> list[dict]:
    response = client.get(url)
    assert response.status_code == 200  # an EventSource would retry any other status
    return parse_sse(response.get_data(as_text=True))


def assert_refused(client, url: str, message: str = INVALID) -> None:
    events = events_of(client, url)
    assert [e["event"] for e in events] == ["failed", "done"], url
    assert message in events[0]["data"], url


@pytest.mark.parametrize("kind", ["generate", "infill", "compare"])
def test_a_forged_or_altered_token_is_invalid_and_generates_nothing(make_app, started, kind):
    client = make_app(FABLE_SECRET_KEY=KEY).test_client()
    path, token = split(issue(client, kind))
    body = URLSafeTimedSerializer("any key").load_payload(token.rsplit(".", 2)[0].encode())
    text_field = "first" if body["kind"] == "infill" else "prompt"
    forgeries = {
        "model": altered(token, model="tiny-gpt"),
        "text": altered(token, **{text_field: "something else"}),
        "settings": altered(token, max_new_tokens=500, seed=body["seed"] + 1),
        "kind": altered(token, kind="generate" if body["kind"] == "infill" else "infill"),
        "older": restamped(token, -JOB_TTL_S),  # it would never expire
        "newer": restamped(token, JOB_TTL_S),
        "another key": URLSafeTimedSerializer("another-server-key-0123456789abcdef",
                                              salt=JOB_TOKEN_SALT).dumps(body),
        "another salt": URLSafeTimedSerializer(KEY, salt="something-else").dumps(body),
        "unsigned, as they once were": unsigned_token(body),
        "no signature": token.rsplit(".", 1)[0],
    }
    for name, forged in forgeries.items():
        assert forged != token, name
        assert_refused(client, f"{path}?job={forged}")
    assert started == []  # not one generation ran
    # the token as it was written works
    events = events_of(client, f"{path}?job={token}")
    assert "".join(texts(events)) == ENDLESS_CHAR * body["max_new_tokens"]
    assert len(started) == 1


def test_a_token_past_its_time_has_expired_and_generates_nothing(client, started, monkeypatch):
    url = issue(client)
    now = TimestampSigner.get_timestamp
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: now(self) + JOB_TTL_S + 1)
    assert_refused(client, url, EXPIRED)
    assert started == []
    monkeypatch.setattr(TimestampSigner, "get_timestamp", lambda self: now(self) + JOB_TTL_S - 5)
    assert "".join(texts(events_of(client, url))) == ENDLESS_CHAR * 6  # not yet
    assert started == ["endless"]


def test_a_restart_invalidates_links_unless_the_key_is_set(make_app, started):
    """Without FABLE_SECRET_KEY each server (each test app) makes its own key."""
    url = issue(make_app().test_client())
    assert_refused(make_app().test_client(), url)
    assert started == []
    url = issue(make_app(FABLE_SECRET_KEY=KEY).test_client())
    events = events_of(make_app(FABLE_SECRET_KEY=KEY).test_client(), url)
    assert "".join(texts(events)) == ENDLESS_CHAR * 6
    assert started == ["endless"]


def test_the_key_never_reaches_a_page_or_the_log(make_app, caplog):
    caplog.set_level("DEBUG")
    app = make_app(FABLE_SECRET_KEY=KEY)
    client = app.test_client()
    bodies = [client.get(path).get_data(as_text=True)
              for path in ("/", "/infill", "/compare", "/admin", "/healthz", "/openapi.json")]
    bodies.append(client.get("/compare", query_string={**COMPARE, "run": "1"})
                  .get_data(as_text=True))
    start = client.post("/generate/start", data=FORM).get_data(as_text=True)
    bodies += [start, client.get(stream_url(start)).get_data(as_text=True)]
    assert all(KEY not in body for body in bodies)
    assert KEY not in caplog.text
    assert KEY not in repr(app.extensions["fable.settings"])
    assert "secret_key" not in app.extensions["fable.settings"].model_dump()


def test_a_short_key_is_refused_at_start(make_app):
    with pytest.raises(SettingsError, match="FABLE_SECRET_KEY must be at least 32 characters"):
        make_app(FABLE_SECRET_KEY="too-short")


def test_the_signer_round_trips_a_job_and_its_time():
    signer = job_token_signer(KEY)
    job = {"kind": "generate", "model": "endless", "prompt": "Érase una vez", "seed": 1}
    token = signer.dumps(job)
    assert signer.loads(token, max_age=JOB_TTL_S) == job
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)  # travels in a URL as it is


# ---- a real gunicorn: the workers share the master's key ------------------------------------

@contextmanager
def paused(pid: int):
    """Stop one of the test server's workers (SIGSTOP): the other accepts every
    connection meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def generated_tokens(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "fable_generated_tokens_total":
                return sample.value
    return 0.0


@pytest.mark.server
def test_two_workers_accept_each_others_tokens_and_refuse_forged_ones(checkpoint_dir):
    env = {"FABLE_WORKERS": "2", "FABLE_TORCH_THREADS": "1", "GUNICORN_GRACEFUL_TIMEOUT": "3"}
    with GunicornServer(checkpoint_dir, env=env) as server:
        first, second = server.wait_for_workers(2, len(MODELS))

        def start() -> str:
            html = httpx.post(f"{server.url}/generate/start", data=FORM, timeout=30).text
            return stream_url(html)

        def stream(url: str) -> list[dict]:
            response = httpx.get(server.url + url, timeout=30)
            assert response.status_code == 200
            return parse_sse(response.text)

        with paused(second):
            from_first = start()
        with paused(first):
            assert "".join(texts(stream(from_first))) == ENDLESS_CHAR * 6
            from_second = start()
        with paused(second):
            assert "".join(texts(stream(from_second))) == ENDLESS_CHAR * 6

        before = generated_tokens(server.url)
        path, token = split(from_first)
        body = URLSafeTimedSerializer("any key").load_payload(token.rsplit(".", 2)[0].encode())
        forgeries = [altered(token, prompt="Twice"), altered(token, model="tiny-gpt"),
                     restamped(token, -JOB_TTL_S), restamped(token, -1),
                     URLSafeTimedSerializer("another-server-key-0123456789abcdef",
                                            salt=JOB_TOKEN_SALT).dumps(body),
                     unsigned_token(body)]
        for forged in forgeries:
            events = stream(f"{path}?job={forged}")
            assert [e["event"] for e in events] == ["failed", "done"]
            assert INVALID in events[0]["data"]
        assert generated_tokens(server.url) == before  # nothing generated
