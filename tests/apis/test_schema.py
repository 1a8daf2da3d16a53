"""The JSON API against its own OpenAPI document, fuzzed by schemathesis.

schemathesis generates requests for every operation of the document the app serves at
``/openapi.json``, valid and invalid ones, sends them to the app (through WSGI, no
server) and checks every answer: never a 5xx, a documented status, content type and
headers, a body that matches the documented schema, invalid requests refused and valid
ones accepted. The test checkpoints (tests/conftest.py) serve; generation stays cheap
through the app's own limits (a few new tokens, short prompts), which the document
states, so schemathesis never asks for more.

The document is built here with the same limits as the app under test (schemathesis'
lazy ``from_fixture`` loader does not work with pytest 9), and the first test checks it
is exactly what that app serves.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.core.transport import Response  # noqa: E402

from app import __version__  # noqa: E402
from app.apis.openapi import build_spec  # noqa: E402
from app.platform.settings import Limits  # noqa: E402

MAX_EXAMPLES = 25  # per operation: the whole file runs in well under a minute
LIMITS = Limits(max_prompt_chars=64, max_new_tokens=4, default_new_tokens=2)
SETTINGS = {"FABLE_MAX_PROMPT_CHARS": LIMITS.max_prompt_chars,
            "FABLE_MAX_NEW_TOKENS": LIMITS.max_new_tokens,
            "FABLE_DEFAULT_NEW_TOKENS": LIMITS.default_new_tokens}

pytestmark = pytest.mark.fuzz  # schemathesis: generated requests for every operation
schema = schemathesis.openapi.from_dict(build_spec(__version__, LIMITS))


@pytest.fixture
def app(make_app):
    return make_app(**SETTINGS)


def test_the_fuzzed_document_is_the_one_the_app_serves(app):
    served = app.test_client().get("/openapi.json")
    assert served.status_code == 200
    assert served.json == build_spec(__version__, LIMITS)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_every_operation_conforms_to_the_openapi_document(case, app):
    response = case.call(app=app)
    # A chat's messages are limited together (the document says so in words: no JSON Schema
    # keyword bounds a sum), so a schema-valid chat can be refused for that, and only that.
    summed = response.status_code == 400 and "together hold" in response.text
    case.validate_response(response, excluded_checks=[positive_data_acceptance] if summed else [])


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "Once", "stream": True, "max_tokens": 3,
                         "logprobs": 1, "stream_options": {"include_usage": True}}),
    ("/v1/completions", {"model": "tiny-gpt", "prompt": "Once", "stream": True, "max_tokens": 2,
                         "echo": True, "logprobs": 1}),
    ("/v1/chat/completions", {"model": "tiny-gpt", "messages": [{"role": "user", "content": "Hi"}],
                              "stream": True, "max_tokens": 3, "logprobs": True, "top_logprobs": 1}),
])
def test_each_streamed_event_conforms_to_the_document(app, path, body):
    """schemathesis' SSE check: every event's data is a documented chunk, or [DONE]."""
    case = schema[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call(app=app)
    assert {k.lower(): v for k, v in response.headers.items()}["content-type"][0].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")
    case.validate_response(response)
    # and a chunk the document does not allow is caught
    wrong = response.content.replace(b'"object": "', b'"object": "not-', 1)
    assert wrong != response.content
    broken = Response(response.status_code, response.headers, wrong, response.request, response.elapsed,
                      response.verify)
    with pytest.raises(FailureGroup, match="SSE event violates schema"):
        case.validate_response(broken)
