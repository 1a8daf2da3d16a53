"""Log-probabilities through the three APIs: Ollama's (generate and chat), OpenAI's
completions (``logprobs: n``) and chat (``logprobs`` + ``top_logprobs``), whole and
streamed. The engine's side: tests/test_batching.py."""

from __future__ import annotations

import json
import math
import re

import pytest

MESSAGES = [{"role": "user", "content": "Hi"}]


def lines(response) -> list[dict]:
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def events(response) -> list[dict]:
    return [json.loads(block[len("data: "):]) for block in response.get_data(as_text=True).split("\n\n")
            if block.startswith("data: {")]


def check_entry(entry: dict, top: int) -> None:
    assert isinstance(entry["token"], str) and entry["logprob"] <= 0
    alternatives = entry["top_logprobs"]
    assert len(alternatives) == top
    values = [a["logprob"] for a in alternatives]
    assert values == sorted(values, reverse=True)
    if top:
        assert entry["logprob"] <= values[0] + 1e-6  # the best alternative is at least as likely


def shown(tokens) -> str:
    """The text the tokens make: a special token ("<unk>", listed under its own string) shows
    as nothing in the text."""
    return "".join(t for t in tokens if not re.fullmatch(r"<[a-z]+>", t))


@pytest.mark.parametrize("path, extra", [
    ("/api/generate", {"prompt": "Once"}),
    ("/api/chat", {"messages": MESSAGES}),
])
def test_ollama_gives_each_token_s_log_probability(client, path, extra):
    body = {"model": "tiny-gpt", **extra, "stream": False, "logprobs": True, "top_logprobs": 2,
            "options": {"num_predict": 6, "seed": 1}}
    final = client.post(path, json=body).json
    assert len(final["logprobs"]) == final["eval_count"] - (final["done_reason"] == "stop")
    for entry in final["logprobs"]:
        check_entry(entry, 2)
    text = final.get("response", final.get("message", {}).get("content"))
    assert shown(e["token"] for e in final["logprobs"]).strip() == text.strip()
    streamed = lines(client.post(path, json={**body, "stream": True}))
    together = [e for line in streamed for e in line["logprobs"]]
    assert together == final["logprobs"]  # the same tokens, spread over the chunks
    without = client.post(path, json={**body, "logprobs": None, "top_logprobs": None}).json
    assert "logprobs" not in without


def test_openai_completions_logprobs(client):
    body = {"model": "tiny-gpt", "prompt": "Once", "max_tokens": 6, "seed": 1, "logprobs": 3}
    choice = client.post("/v1/completions", json=body).json["choices"][0]
    lp = choice["logprobs"]
    assert shown(lp["tokens"]) == choice["text"] or choice["finish_reason"] == "stop"
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["text_offset"][0] == len("Once")
    assert all(len(top) <= 3 and max(top.values()) >= p - 1e-6
               for top, p in zip(lp["top_logprobs"], lp["token_logprobs"]))
    chunks = events(client.post("/v1/completions", json={**body, "stream": True}))
    streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]
    offsets = [o for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
               for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == lp["text_offset"]
    assert client.post("/v1/completions", json={**body, "logprobs": None}).json["choices"][0]["logprobs"] is None


def test_openai_chat_logprobs(client):
    body = {"model": "tiny-gpt", "messages": MESSAGES, "max_tokens": 6, "seed": 1,
            "logprobs": True, "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=body).json["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and choice["logprobs"]["refusal"] is None
    for entry in content:
        check_entry(entry, 2)
        assert bytes(entry["bytes"]).decode("utf-8") == entry["token"]
    chunks = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": False, "top_logprobs": None})
    assert plain.json["choices"][0]["logprobs"] is None


def test_a_token_s_probability_is_a_probability(client):
    body = {"model": "endless", "prompt": "Once", "max_tokens": 3, "logprobs": 1, "temperature": 0}
    lp = client.post("/v1/completions", json=body).json["choices"][0]["logprobs"]
    assert all(0 < math.exp(p) <= 1 for p in lp["token_logprobs"])
    assert lp["tokens"] == ["o"] * 3 and all(top == {"o": p} for top, p in zip(lp["top_logprobs"],
                                                                                  lp["token_logprobs"]))


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, "'logprobs' must be between 0 and 20, got 21"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "'echo': echo=true is not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2},
     "'top_logprobs' needs 'logprobs': true"),
    ("/api/generate", {"prompt": "x", "logprobs": "yes"}, "'logprobs' must be true or false"),
])
def test_log_probability_requests_the_server_cannot_honour_are_400s(client, path, body, message):
    response = client.post(path, json={"model": "tiny-gpt", **body})
    assert response.status_code == 400
    error = response.json["error"]
    assert message in (error["message"] if isinstance(error, dict) else error)


def test_special_tokens_have_their_own_strings_among_the_alternatives(client):
    # a 40-token vocabulary with eight special tokens, random weights: at 20 alternatives
    # a position, specials are among them everywhere; each must keep its own entry
    body = {"model": "tiny-gpt", "prompt": "Once", "max_tokens": 12, "logprobs": 20, "seed": 3,
            "temperature": 0}
    answer = client.post("/v1/completions", json=body).json
    top = answer["choices"][0]["logprobs"]["top_logprobs"]
    assert all(len(position) == 20 for position in top)  # no two tokens share a key
    assert any("<eos>" in position for position in top)
    logprobs = answer["choices"][0]["logprobs"]
    text = answer["choices"][0]["text"]
    starts = [o - len("Once") for o in logprobs["text_offset"]]  # offsets follow the text
    assert starts == sorted(starts) and all(0 <= s <= len(text) for s in starts)
    chat = client.post("/api/generate", json={"model": "tiny-gpt", "prompt": "Once", "stream": False,
                                              "logprobs": True, "top_logprobs": 20,
                                              "options": {"num_predict": 5, "temperature": 0}}).json
    for position in chat["logprobs"]:
        assert len({t["token"] for t in position["top_logprobs"]}) == 20
