"""API keys and CORS for the JSON APIs, and keys for the pages that generate when
FABLE_PROTECT_PAGES asks (app/platform/api_access.py)."""

from __future__ import annotations

import base64
import re
from html import unescape

import pytest


KEY, OTHER = "k" * 16 + "-first", "second-key-0123456789"
BODIES = {"/api/generate": {"model": "endless", "prompt": "Once", "stream": False,
                             "options": {"num_predict": 2}},
          "/v1/completions": {"model": "endless", "prompt": "Once", "max_tokens": 2}}
BODY = BODIES["/api/generate"]


@pytest.fixture
def keyed(make_app):
    return make_app(FABLE_API_KEYS=f"{KEY}, {OTHER}").test_client()


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
def test_with_keys_set_the_apis_need_one_of_them(keyed, path):
    BODY = BODIES[path]
    refused = keyed.post(path, json=BODY)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    error = refused.json["error"]
    message = error["message"] if path.startswith("/v1") else error
    assert message == "this API needs a key: send 'Authorization: Bearer <key>'"
    if path.startswith("/v1"):
        assert error["type"] == "authentication_error"
    wrong = keyed.post(path, json=BODY, headers={"Authorization": f"Bearer {KEY}x"})
    assert wrong.status_code == 401
    basic = keyed.post(path, json=BODY, headers={"Authorization": f"Basic {KEY}"})
    assert basic.status_code == 401
    for key in (KEY, OTHER):
        assert keyed.post(path, json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_the_pages_health_and_spec_need_no_key(keyed):
    for path in ("/", "/infill", "/healthz", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path
    for path in ("/api/tags", "/v1/models", "/api/chat"):
        assert keyed.get(path).status_code in (401,), path


# ---- the pages under FABLE_API_KEYS --------------------------------------------------------

FORM = {"model": "endless", "prompt": "Once", "temperature": "0", "max_new_tokens": "3"}
INFILL = {"model": "endless", "first": "Lily ran.", "last": "The end.", "temperature": "0",
          "max_new_tokens": "3"}
COMPARE = {"models": ["endless", "tiny-gpt"], "prompt": "Once", "temperature": "0",
           "max_new_tokens": "3"}


def basic(password: str, user: str = "me") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _streams(html: str) -> list[str]:
    return [unescape(url) for url in re.findall(r'sse-connect="([^"]+)"', html)]


def _generating_requests(client, headers: dict) -> list[tuple[str, str, dict]]:
    """(method, path, arguments) of every page request that generates; the stream links
    are asked for with ``headers``."""
    ask = {"headers": headers}
    links = [*_streams(client.post("/generate/start", data=FORM, **ask).get_data(as_text=True)),
             *_streams(client.post("/infill/start", data=INFILL, **ask).get_data(as_text=True)),
             *_streams(client.get("/compare/start", query_string=COMPARE, **ask)
                       .get_data(as_text=True))]
    assert len(links) == 4, "the stream links must be handed out"
    return [("POST", "/", {"data": FORM}), ("POST", "/infill", {"data": INFILL}),
            ("POST", "/generate/start", {"data": FORM}),
            ("POST", "/infill/start", {"data": INFILL}),
            ("GET", "/compare", {"query_string": {**COMPARE, "run": "1"}}),
            ("GET", "/compare/start", {"query_string": COMPARE}),
            *(("GET", link, {}) for link in links)]


def test_with_keys_set_the_pages_stay_public_by_default(keyed, started):
    for method, path, kwargs in _generating_requests(keyed, {}):
        response = keyed.open(path, method=method, **kwargs)
        assert response.status_code == 200, path
        assert "another site" not in response.get_data(as_text=True)  # reading runs a stream
    # POST / and /infill: a text each; /compare?run=1: two columns; the four streams
    assert len(started) == 1 + 1 + 2 + 4
    assert keyed.post("/api/generate", json=BODY).status_code == 401  # the APIs still need one


@pytest.fixture
def protected(make_app):
    return make_app(FABLE_API_KEYS=f"{KEY}, {OTHER}", FABLE_PROTECT_PAGES=True).test_client()


def test_protected_pages_refuse_every_generation_without_a_key(protected, started):
    for method, path, kwargs in _generating_requests(protected, basic(KEY)):
        for headers in ({}, basic(KEY + "x"), basic("wrong-key-0123456789"),
                        {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Token {KEY}"}):
            response = protected.open(path, method=method, headers=headers, **kwargs)
            assert response.status_code == 401, (path, headers)
            assert response.headers["WWW-Authenticate"] == 'Basic realm="Fable", charset="UTF-8"'
            assert response.headers["Cache-Control"] == "no-store"
            assert "Sign in with any user name and your key" in response.get_data(as_text=True)
    assert started == []


def test_protected_pages_generate_with_a_key_as_password_or_bearer(protected, started):
    for headers in (basic(KEY), basic(OTHER, user=""), {"Authorization": f"Bearer {OTHER}"}):
        for method, path, kwargs in _generating_requests(protected, headers):
            response = protected.open(path, method=method, headers=headers, **kwargs)
            assert response.status_code == 200, (path, headers)
            body = response.get_data(as_text=True)
            assert "Cut at the token limit · 3 tokens" in body or "sse-connect" in body, path
    assert len(started) == 3 * (1 + 1 + 2 + 4)


def test_protected_pages_still_load_without_a_key(protected, started):
    for path in ("/", "/infill", "/compare", "/models", "/healthz"):
        assert protected.get(path).status_code == 200, path
    assert protected.get("/compare", query_string=COMPARE).status_code == 200  # a shared link
    assert started == []


def test_a_protected_page_refusal_is_json_for_json_clients(protected):
    response = protected.post("/", data=FORM, headers={"Accept": "application/json"})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Basic")
    assert response.json["error"].startswith("generating here needs a key")


def test_protecting_the_pages_needs_keys(make_app):
    from app.platform.settings import SettingsError

    with pytest.raises(SettingsError, match="FABLE_PROTECT_PAGES needs FABLE_API_KEYS"):
        make_app(FABLE_PROTECT_PAGES=True)
    with pytest.raises(SettingsError, match="FABLE_PROTECT_PAGES must be true or false"):
        make_app(FABLE_API_KEYS=KEY, FABLE_PROTECT_PAGES="maybe")


def test_weak_keys_are_refused_at_start(make_app):
    from app.platform.settings import SettingsError

    with pytest.raises(SettingsError, match="FABLE_API_KEYS must list keys of at least 16 characters"):
        make_app(FABLE_API_KEYS=f"{KEY},short")


def test_without_cors_origins_no_cors_header_is_sent(client):
    response = client.post("/api/generate", json=BODY, headers={"Origin": "https://a.example"})
    assert response.status_code == 403 and "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options("/v1/completions", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_listed_origins_may_call_the_apis_from_a_browser(make_app):
    client = make_app(FABLE_CORS_ORIGINS="https://a.example, http://localhost:5173",
                      FABLE_API_KEYS=KEY).test_client()
    preflight = client.options("/v1/chat/completions", headers={
        "Origin": "https://a.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204  # a preflight carries no key, and needs none
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://a.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    BODY = BODIES["/v1/completions"]
    answer = client.post("/v1/completions", json=BODY, headers={
        "Origin": "http://localhost:5173", "Authorization": f"Bearer {KEY}"})
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "Origin" in answer.headers["Vary"]
    refused = client.post("/v1/completions", json=BODY, headers={"Origin": "http://localhost:5173"})
    assert refused.status_code == 401  # readable by the page: it can say why
    assert refused.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    other = client.post("/v1/completions", json=BODY, headers={
        "Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
    assert "Access-Control-Allow-Origin" not in other.headers
    page = client.get("/", headers={"Origin": "https://a.example"})
    assert "Access-Control-Allow-Origin" not in page.headers  # the pages are not shared


def test_a_star_allows_every_origin(make_app):
    client = make_app(FABLE_CORS_ORIGINS="*").test_client()
    answer = client.post("/api/generate", json=BODY, headers={"Origin": "https://b.example"})
    assert answer.headers["Access-Control-Allow-Origin"] == "*"


def test_a_malformed_origin_is_refused_at_start(make_app):
    from app.platform.settings import SettingsError

    with pytest.raises(SettingsError, match="FABLE_CORS_ORIGINS must be \\* or origins"):
        make_app(FABLE_CORS_ORIGINS="a.example/path")


def test_metrics_are_served_and_need_the_admin_token_when_one_is_set(client, make_app):
    client.post("/api/generate", json=BODY)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'fable_requests_total{method="POST",route="/api/generate",status="200"}' in text
    assert "fable_generated_tokens_total" in text
    guarded = make_app(FABLE_ADMIN_TOKEN="a" * 20).test_client()
    refused = guarded.get("/metrics")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
    assert guarded.get("/metrics", headers={"Authorization": "Bearer " + "a" * 20}).status_code == 200


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions", "/api/chat"])
def test_a_browser_post_from_another_site_is_refused_before_anything_runs(client, path):
    body = BODIES.get(path, {"model": "endless", "messages": [{"role": "user", "content": "x"}]})
    for origin in ("https://evil.example", "null"):
        refused = client.post(path, json=body, headers={"Origin": origin})
        assert refused.status_code == 403, origin
        error = refused.json["error"]
        message = error["message"] if path.startswith("/v1") else error
        assert message.startswith(f"cross-site requests to this API are refused (Origin {origin})")
    assert client.post(path, json=body).status_code == 200  # no Origin: not a browser
    same = client.post(path, json=body, headers={"Origin": "http://localhost"})
    assert same.status_code == 200  # a page of this site


def test_an_allowed_origin_may_post(make_app):
    client = make_app(FABLE_CORS_ORIGINS="https://a.example").test_client()
    ok = client.post("/api/generate", json=BODY, headers={"Origin": "https://a.example:443"})
    assert ok.status_code == 200
    assert client.post("/api/generate", json=BODY, headers={"Origin": "https://b.example"}).status_code == 403
