"""The answers the routes build from app/apis/responses.py, against what went on the wire
before they did (dict literals): every route and stream kind keeps its keys in the same
order, its explicit nulls and its left-out keys, and its bytes are what ``json.dumps``
(streams) or Flask's ``jsonify`` (whole answers) write for them. Also the stencil that
makes a stream's like chunks, against building each in full.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone

import pytest

from app.apis.responses import (ChatCompletionChunk, Completion, CompletionLogprobs, GenerateChunk,
                                Stencil, to_json, wire)
from app.serving.registry import ModelFacts

ANY = ...  # any value but null
NULLABLE = object()  # null or any value
MESSAGES = [{"role": "user", "content": "Hi"}]
# No whitespace at either end (chat strips the reply's), quotes, a backslash, a control
# character, non-ASCII and a line separator JSON leaves unescaped
PIECES = ["Once", " upon", ' a "time"', "\\ \x01", " é \u2028 ☃", "!"]


def check(actual, expected, where: str = "$") -> None:
    """``actual`` has ``expected``'s keys in its order, at every depth: a dict is an object
    with exactly those keys, ``[x]`` a list whose every item is like ``x``, ``[]`` an empty
    list, None null, ``ANY`` any value but null, ``NULLABLE`` anything, else that value."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), (where, actual)
        for key, value in expected.items():
            check(actual[key], value, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and (expected or not actual), (where, actual)
        for i, item in enumerate(actual):
            check(item, expected[0], f"{where}[{i}]")
    elif expected is ANY:
        assert actual is not None, where
    elif expected is not NULLABLE:
        assert actual == expected and type(actual) is type(expected), (where, actual, expected)


def whole(response, expected, status: int = 200) -> dict:
    """One JSON answer, in jsonify's bytes (compact, ASCII), shaped as ``expected``."""
    assert response.status_code == status and response.mimetype == "application/json"
    text = response.get_data(as_text=True)
    assert text == json.dumps(response.json, separators=(",", ":")) + "\n"
    check(response.json, expected)
    return response.json


def lines(response) -> list[dict]:
    """An NDJSON stream's objects; each line as json.dumps writes its object."""
    assert response.mimetype == "application/x-ndjson"
    text = response.get_data(as_text=True)
    assert text.endswith("\n")
    objects = [json.loads(line) for line in text[:-1].split("\n")]
    assert text == "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects)
    return objects


def events(response) -> list[dict]:
    """A server-sent event stream's objects (it ends with [DONE]); each as json.dumps
    writes it."""
    assert response.mimetype == "text/event-stream"
    *blocks, done, rest = response.get_data(as_text=True).split("\n\n")
    assert (done, rest) == ("data: [DONE]", "")
    assert all(block.startswith("data: ") for block in blocks)
    objects = [json.loads(block[len("data: "):]) for block in blocks]
    assert blocks == [f"data: {json.dumps(o, ensure_ascii=False)}" for o in objects]
    return objects


def error_events(response) -> list[dict]:
    """A stream that failed: its objects, the last the error (no [DONE])."""
    text = response.get_data(as_text=True)
    if response.mimetype == "application/x-ndjson":
        return [json.loads(line) for line in text.splitlines()]
    return [json.loads(block[len("data: "):]) for block in text.split("\n\n") if block]


# ---- Ollama -----------------------------------------------------------------------------

def ollama(text: dict, **rest) -> dict:
    return {"model": "tiny-gpt", "created_at": ANY, **text, **rest}


GENERATED = {"response": ANY}
REPLY = {"message": {"role": "assistant", "content": ANY}}
DURATIONS = {"done": True, "done_reason": ANY, "total_duration": ANY, "load_duration": ANY,
             "prompt_eval_count": ANY, "prompt_eval_duration": ANY, "eval_count": ANY,
             "eval_duration": ANY}
OLLAMA_LOGPROBS = {"logprobs": [{"token": ANY, "logprob": ANY,
                                 "top_logprobs": [{"token": ANY, "logprob": ANY}]}]}
OLLAMA = [("/api/generate", {"prompt": "Once"}, GENERATED, lambda o: o["response"]),
          ("/api/chat", {"messages": MESSAGES}, REPLY, lambda o: o["message"]["content"])]


@pytest.mark.parametrize("path, body, text, text_of", OLLAMA)
def test_ollama_streams_and_answers_keep_their_keys(client, script, path, body, text, text_of):
    script(PIECES)
    *chunks, final = lines(client.post(path, json={"model": "tiny-gpt", **body}))
    for chunk in chunks:
        check(chunk, ollama(text, done=False))
    check(final, ollama(text, **DURATIONS))
    assert [text_of(c) for c in chunks] == PIECES and text_of(final) == ""
    assert all(len(c["created_at"]) == len("2026-01-01T00:00:00.000000Z") and c["created_at"][-1] == "Z"
               for c in [*chunks, final])
    answer = whole(client.post(path, json={"model": "tiny-gpt", **body, "stream": False}),
                   ollama(text, **DURATIONS))
    assert text_of(answer) == "".join(PIECES)


@pytest.mark.parametrize("path, body, text, text_of", OLLAMA)
def test_ollama_log_probabilities_come_last_and_only_when_asked(client, path, body, text, text_of):
    asked = {"model": "tiny-gpt", **body, "logprobs": True, "top_logprobs": 2,
             "options": {"num_predict": 4, "seed": 1}}
    *chunks, final = lines(client.post(path, json=asked))
    for chunk in chunks:
        check(chunk, ollama(text, done=False, **OLLAMA_LOGPROBS))
    check(final, ollama(text, **DURATIONS, **OLLAMA_LOGPROBS))
    whole(client.post(path, json={**asked, "stream": False}), ollama(text, **DURATIONS, **OLLAMA_LOGPROBS))


@pytest.mark.parametrize("path, body, text", [
    ("/api/generate", {}, {"response": ""}),
    ("/api/generate", {"keep_alive": 0}, {"response": ""}),
    ("/api/chat", {"messages": []}, {"message": {"role": "assistant", "content": ""}}),
])
def test_ollama_load_and_unload_keep_their_keys(client, path, body, text):
    answer = whole(client.post(path, json={"model": "tiny-gpt", **body}),
                   ollama(text, done=True, done_reason=ANY))
    assert answer["done_reason"] == ("unload" if body.get("keep_alive") == 0 else "load")


@pytest.mark.parametrize("path, body, error", [
    ("/api/generate", {"prompt": "Hi"}, {"error": ANY}),
    ("/api/chat", {"messages": MESSAGES}, {"error": ANY}),
    ("/v1/completions", {"prompt": "Hi", "stream": True},
     {"error": {"message": ANY, "type": "server_error", "param": None, "code": None}}),
    ("/v1/chat/completions", {"messages": MESSAGES, "stream": True},
     {"error": {"message": ANY, "type": "server_error", "param": None, "code": None}}),
])
def test_a_stream_that_fails_ends_with_its_api_s_error(client, script, path, body, error):
    script(["a", "b"], error=RuntimeError("boom"))
    *_, last = error_events(client.post(path, json={"model": "tiny-gpt", **body}))
    check(last, error)


def test_ollama_listings_keep_their_keys(client):
    details = {"parent_model": "", "format": "safetensors", "family": ANY, "families": [ANY],
               "parameter_size": ANY, "quantization_level": ANY}
    whole(client.get("/api/tags"), {"models": [
        {"name": ANY, "model": ANY, "modified_at": ANY, "size": ANY, "digest": ANY, "details": details}]})
    whole(client.get("/api/ps"), {"models": [
        {"name": ANY, "model": ANY, "size": ANY, "digest": ANY, "details": details,
         "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0, "context_length": NULLABLE}]})
    for name in ("tiny-gpt", "tiny-lstm"):
        whole(client.post("/api/show", json={"model": name}), {
            "modelfile": ANY, "parameters": ANY, "template": "{{ .Prompt }}", "details": details,
            "model_info": ANY, "modified_at": ANY, "capabilities": [ANY]})
    whole(client.get("/api/version"), {"version": ANY})


def test_the_server_s_own_routes_keep_their_keys(client, make_app, tmp_path):
    # a model's facts in ModelFacts' own order (app/serving/registry.py), as to_dict() gave them
    facts = {field.name: NULLABLE for field in dataclasses.fields(ModelFacts)}
    whole(client.get("/api/models"), {"models": [facts], "errors": ANY, "device": "cpu", "service": {
        "active": 0, "queued": 0, "max_batch": ANY, "max_queue": ANY, "queue_timeout_s": ANY,
        "request_timeout_s": ANY}})
    whole(client.post("/api/models/reload"), {"added": [], "reloaded": [], "removed": [],
                                              "failed": {"broken": ANY}, "unchanged": [ANY],
                                              "models": [ANY]})
    health = {"status": ANY, "models": ANY, "errors": ANY, "active": 0, "queued": 0, "full": False}
    whole(client.get("/healthz"), health)
    empty = make_app(FABLE_CHECKPOINT_DIR=str(tmp_path)).test_client()
    whole(empty.get("/healthz"), {**health, "status": "no models loaded"}, 503)


# ---- OpenAI -----------------------------------------------------------------------------

def openai(kind: str, choice: dict | None, **rest) -> dict:
    return {"id": ANY, "object": kind, "created": ANY, "model": "tiny-gpt",
            "choices": [choice] if choice else [], **rest}


USAGE = {"prompt_tokens": ANY, "completion_tokens": ANY, "total_tokens": ANY}
TEXT_LOGPROBS = {"tokens": [ANY], "token_logprobs": [NULLABLE], "top_logprobs": [NULLABLE],
                 "text_offset": [ANY]}
TOKEN = {"token": ANY, "logprob": ANY, "bytes": [ANY]}
CHAT_LOGPROBS = {"content": [{**TOKEN, "top_logprobs": [TOKEN]}], "refusal": None}


def text_choice(finish_reason=ANY, logprobs=None, index: int = 0) -> dict:
    return {"text": ANY, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


@pytest.mark.parametrize("usage", [False, True])
def test_completion_streams_keep_their_keys_and_nulls(client, script, usage):
    script(PIECES)
    body = {"model": "tiny-gpt", "prompt": "Hi", "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(client.post("/v1/completions", json=body))
    extra = {"usage": None} if usage else {}
    for chunk in chunks[:len(PIECES)]:
        check(chunk, openai("text_completion", text_choice(None), **extra))
    check(chunks[len(PIECES)], openai("text_completion", text_choice("stop"), **extra))
    assert [c["choices"][0]["text"] for c in chunks[:len(PIECES) + 1]] == [*PIECES, ""]
    if usage:
        check(chunks[-1], openai("text_completion", None, usage=USAGE))
    assert len(chunks) == len(PIECES) + 1 + usage


@pytest.mark.parametrize("usage", [False, True])
def test_chat_completion_streams_keep_their_keys_and_nulls(client, script, usage):
    script(PIECES)
    body = {"model": "tiny-gpt", "messages": MESSAGES, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(client.post("/v1/chat/completions", json=body))
    extra = {"usage": None} if usage else {}
    first, *middle = chunks[:len(PIECES)]
    check(first, openai("chat.completion.chunk", chat_choice({"role": "assistant", "content": ANY}), **extra))
    for chunk in middle:
        check(chunk, openai("chat.completion.chunk", chat_choice({"content": ANY}), **extra))
    check(chunks[len(PIECES)], openai("chat.completion.chunk", chat_choice({}, "stop"), **extra))
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:len(PIECES)]] == PIECES
    if usage:
        check(chunks[-1], openai("chat.completion.chunk", None, usage=USAGE))
    assert len(chunks) == len(PIECES) + 1 + usage


def test_an_empty_chat_stream_names_the_role_in_its_only_chunk(client, script):
    script([])
    chunks = events(client.post("/v1/chat/completions",
                                json={"model": "tiny-gpt", "messages": MESSAGES, "stream": True}))
    assert len(chunks) == 1
    check(chunks[0], openai("chat.completion.chunk", chat_choice({"role": "assistant", "content": ""},
                                                                  "stop")))


def test_whole_openai_answers_keep_their_keys_and_nulls(client, script):
    script(PIECES)
    answer = whole(client.post("/v1/completions", json={"model": "tiny-gpt", "prompt": "Hi"}),
                   openai("text_completion", text_choice(), usage=USAGE))
    assert answer["choices"][0]["text"] == "".join(PIECES)
    whole(client.post("/v1/chat/completions", json={"model": "tiny-gpt", "messages": MESSAGES}),
          openai("chat.completion", {"index": 0, "message": {"role": "assistant", "content": ANY},
                                     "logprobs": None, "finish_reason": ANY}, usage=USAGE))


def test_openai_log_probabilities_keep_their_keys(client):
    body = {"model": "tiny-gpt", "prompt": "Once", "max_tokens": 3, "seed": 1, "logprobs": 2}
    whole(client.post("/v1/completions", json=body),
          openai("text_completion", text_choice(logprobs=TEXT_LOGPROBS), usage=USAGE))
    echoed = whole(client.post("/v1/completions", json={**body, "echo": True}),
                   openai("text_completion", text_choice(logprobs=TEXT_LOGPROBS), usage=USAGE))
    lp = echoed["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the prompt's first
    for chunk in events(client.post("/v1/completions", json={**body, "echo": True, "stream": True})):
        check(chunk, openai("text_completion", text_choice(NULLABLE, TEXT_LOGPROBS)))
    whole(client.post("/v1/completions", json={**body, "prompt": ["Once", "Lily"]}), openai(
        "text_completion", None, usage=USAGE) | {"choices": [text_choice(logprobs=TEXT_LOGPROBS, index=NULLABLE)]})
    chat = {"model": "tiny-gpt", "messages": MESSAGES, "max_tokens": 3, "seed": 1, "logprobs": True,
            "top_logprobs": 2}
    whole(client.post("/v1/chat/completions", json=chat), openai(
        "chat.completion", {"index": 0, "message": {"role": "assistant", "content": ANY},
                            "logprobs": CHAT_LOGPROBS, "finish_reason": ANY}, usage=USAGE))
    first, *rest = events(client.post("/v1/chat/completions", json={**chat, "stream": True}))
    check(first, openai("chat.completion.chunk", chat_choice({"role": "assistant", "content": ANY},
                                                              logprobs=CHAT_LOGPROBS)))
    for chunk in rest:
        check(chunk, openai("chat.completion.chunk", chat_choice(NULLABLE, NULLABLE, CHAT_LOGPROBS)))


def test_openai_and_vllm_listings_keep_their_keys(client):
    model = {"id": ANY, "object": "model", "created": ANY, "owned_by": "fable"}
    whole(client.get("/v1/models"), {"object": "list", "data": [model]})
    whole(client.get("/v1/models/tiny-gpt"), model)
    whole(client.post("/tokenize", json={"model": "tiny-gpt", "prompt": "Hi é"}),
          {"count": ANY, "max_model_len": 64, "tokens": [ANY], "token_strs": None})
    whole(client.post("/tokenize", json={"model": "tiny-lstm", "prompt": "Hi", "return_token_strs": True}),
          {"count": ANY, "max_model_len": None, "tokens": [ANY], "token_strs": [ANY]})
    whole(client.post("/detokenize", json={"model": "tiny-gpt", "tokens": [5, 6]}), {"prompt": ANY})
    whole(client.get("/tokenizer_info?model=tiny-lstm"), {
        "model": "tiny-lstm", "tokenizer_class": ANY, "kind": "char", "vocab_size": ANY,
        "bos_token": ANY, "eos_token": ANY, "pad_token": ANY, "unk_token": ANY, "add_bos_token": True,
        "model_max_length": None, "chat_template": None})


# ---- the serializers ----------------------------------------------------------------------

TRICKY = ["", "plain", 'a "quote"', "back\\slash", "\x00\x01\x1f\x7f", "tab\tnew\nline", "é ☃ 😀",
          "\u2028\u2029", "\ud800 alone", "</script>", "\\u0000"]


def test_to_json_writes_what_json_dumps_writes():
    logprobs = CompletionLogprobs(tokens=TRICKY, token_logprobs=[None, -1e-05, -9999.0, -0.0, -3.75],
                                  top_logprobs=[None, {"é": -1e-300}], text_offset=[0, 12])
    assert to_json(logprobs) == json.dumps(logprobs.model_dump(mode="json"), ensure_ascii=False)


@pytest.mark.parametrize("text", TRICKY)
def test_a_stencil_writes_what_building_each_answer_in_full_writes(text):
    at = datetime(2026, 12, 7, 10, 0, 0, 0, timezone.utc)  # a zero fraction: still six digits

    def chunk(piece: str, when: datetime = at) -> GenerateChunk:
        return GenerateChunk(model="m", created_at=when, response=piece, done=False)
    stencil = Stencil(chunk("first"), ("created_at",), ("response",))
    assert stencil("2026-12-07T10:00:00.000000Z", text) == to_json(chunk(text))
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chat(piece: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(**head, choices=[{"index": 0, "delta": {"content": piece},
                                                     "logprobs": None, "finish_reason": None}], usage=None)
    assert Stencil(chat("x"), ("choices", 0, "delta", "content"))(text) == to_json(chat(text))
    assert "usage" in wire(chat(text)) and "role" not in wire(chat(text))["choices"][0]["delta"]


def test_a_stencil_refuses_what_is_not_a_string_of_its_answer_in_order():
    completion = Completion(id="cmpl-1", object="text_completion", created=1, model="m",
                            choices=[{"text": "a", "index": 0, "logprobs": None, "finish_reason": None}])
    with pytest.raises(ValueError, match="not in the order"):
        Stencil(completion, ("choices", 0, "text"), ("id",))  # id comes first
    for path in [("usage",), ("created",), ("choices", 1, "text"), ("choices", 0, "logprobs", "tokens")]:
        with pytest.raises(ValueError, match="not a string"):  # unset (left out), a number, absent, null
            Stencil(completion, path)
    with pytest.raises(ValueError, match="already holds a NUL"):
        Stencil(completion.model_copy(update={"model": "\0" + "0"}), ("choices", 0, "text"))
