"""API keys and CORS for the JSON APIs (app/api_access.py)."""

from __future__ import annotations

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


def test_weak_keys_are_refused_at_start(make_app):
    from app.settings import SettingsError

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
    from app.settings import SettingsError

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
