"""Log-probabilities through the three APIs: Ollama's (generate and chat), OpenAI's
completions (``logprobs: n``) and chat (``logprobs`` + ``top_logprobs``), whole and
streamed. The engine's side: tests/models/test_batching.py."""

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
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "'max_tokens' 0 writes nothing"),
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


# ---- echo, token ids and lists of prompts (what evaluation harnesses send) ----------------------


def model_logprobs(checkpoint_dir, ids: list[int]) -> list[float]:
    """Each token's log-probability after those before it, from the model itself."""
    import torch

    from models_src.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint_dir / "tiny-gpt").model.eval()
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def tiny_ids(checkpoint_dir, text: str) -> list[int]:
    from models_src.sampling import encode_prompt
    from models_src.tokenization import Tokenizer

    return encode_prompt(Tokenizer.load(checkpoint_dir / "tiny-gpt"), text)


def test_echo_scores_the_prompt_as_the_model_does(client, checkpoint_dir):
    ids = tiny_ids(checkpoint_dir, "Once upon")
    body = {"model": "tiny-gpt", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1}
    answer = client.post("/v1/completions", json=body).json
    [choice] = answer["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "Once upon" and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(model_logprobs(checkpoint_dir, ids), abs=1e-5)
    assert lp["text_offset"] == [0, 0, *range(1, len("Once upon"))]  # <bos> shows as nothing
    assert all(len(top) == 1 and max(top.values()) >= p - 1e-6
               for top, p in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    # the text prompt is the same ids (bos where the tokenizer adds one)
    text = client.post("/v1/completions", json={**body, "prompt": "Once upon"}).json
    assert text["choices"][0]["logprobs"] == lp


def test_echo_then_the_text_with_one_run_of_log_probabilities(client, checkpoint_dir):
    body = {"model": "tiny-gpt", "prompt": "Once", "echo": True, "max_tokens": 3, "logprobs": 2,
            "temperature": 0}
    echoed = client.post("/v1/completions", json=body).json["choices"][0]
    plain = client.post("/v1/completions", json={**body, "echo": False}).json["choices"][0]
    assert echoed["text"] == "Once" + plain["text"]
    prompt_tokens = len(tiny_ids(checkpoint_dir, "Once"))
    lp, generated = echoed["logprobs"], plain["logprobs"]
    assert lp["tokens"][prompt_tokens:] == generated["tokens"]
    assert lp["token_logprobs"][prompt_tokens:] == pytest.approx(generated["token_logprobs"], abs=1e-5)
    assert lp["text_offset"][prompt_tokens:] == generated["text_offset"]  # both count from the prompt's start
    streamed = events(client.post("/v1/completions", json={**body, "stream": True}))
    assert streamed[0]["choices"][0]["text"].startswith("Once")
    assert "".join(e["choices"][0]["text"] for e in streamed) == echoed["text"]


def test_token_ids_and_lists_of_prompts_are_each_their_own_choice(client, checkpoint_dir):
    body = {"model": "tiny-gpt", "max_tokens": 4, "temperature": 0}
    prompts = ["Once", "The cat", "A"]
    alone = [client.post("/v1/completions", json={**body, "prompt": p}).json["choices"][0]["text"]
             for p in prompts]
    together = client.post("/v1/completions", json={**body, "prompt": prompts}).json
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [c["text"] for c in together["choices"]] == alone
    as_ids = client.post("/v1/completions", json={
        **body, "prompt": [tiny_ids(checkpoint_dir, p) for p in prompts]}).json
    assert [c["text"] for c in as_ids["choices"]] == alone
    assert as_ids["usage"]["prompt_tokens"] == sum(len(tiny_ids(checkpoint_dir, p)) for p in prompts)


def test_a_token_id_outside_the_vocabulary_and_an_echo_past_the_context_are_400s(client, checkpoint_dir):
    from models_src.checkpoint import read_config

    context = read_config(checkpoint_dir / "tiny-gpt")["model"]["block_size"]
    for body, message in (({"prompt": [1, 10 ** 6]}, "'prompt' holds the token id 1000000, which is not in "
                                                        "model 'tiny-gpt''s vocabulary"),
                          ({"prompt": [1] * (context + 1), "echo": True},
                           f"the prompt is {context + 1} tokens; model 'tiny-gpt' scores at most its context")):
        answer = client.post("/v1/completions", json={"model": "tiny-gpt", "max_tokens": 1, **body})
        assert answer.status_code == 400 and answer.json["error"]["param"] == "prompt"
        assert answer.json["error"]["message"].startswith(message)


def test_vllms_tokenizer_routes_round_trip_a_prompt(client, checkpoint_dir):
    ids = tiny_ids(checkpoint_dir, "Once upon")
    answer = client.post("/tokenize", json={"model": "tiny-gpt", "prompt": "Once upon"}).json
    assert answer["tokens"] == ids and answer["count"] == len(ids) and answer["token_strs"] is None
    plain = client.post("/tokenize", json={"model": "tiny-gpt", "prompt": "Once upon",
                                           "add_special_tokens": False, "return_token_strs": True}).json
    assert plain["tokens"] == ids[1:] and "".join(plain["token_strs"]) == "Once upon"
    assert client.post("/detokenize", json={"model": "tiny-gpt", "tokens": ids}).json == {"prompt": "Once upon"}
    info = client.get("/tokenizer_info?model=tiny-gpt").json
    assert info["eos_token"] == "<eos>" and info["add_bos_token"] is True
    assert info["model_max_length"] == answer["max_model_len"]


def test_the_tokenizer_routes_name_what_is_wrong(client):
    for method, path, body, status, message in (
            ("post", "/tokenize", {"prompt": "x"}, 400, "'model' is required: this server has"),
            ("post", "/tokenize", {"model": "nope", "prompt": "x"}, 404, "The model 'nope' does not exist"),
            ("post", "/tokenize", {"model": "tiny-gpt", "prompt": 3}, 400, "'prompt' must be a string"),
            ("post", "/detokenize", {"model": "tiny-gpt", "tokens": [10 ** 6]}, 400,
             "'tokens' holds the id 1000000, which is not in model 'tiny-gpt''s vocabulary"),
            ("get", "/tokenizer_info", None, 400, "'model' is required")):
        answer = getattr(client, method)(path, json=body)
        assert answer.status_code == status and answer.json["error"]["message"].startswith(message)


def test_a_server_with_one_model_tokenizes_without_its_name(make_app, checkpoint_dir, tmp_path):
    import shutil

    shutil.copytree(checkpoint_dir / "tiny-gpt", tmp_path / "only" / "tiny-gpt")
    client = make_app(FABLE_CHECKPOINT_DIR=str(tmp_path / "only")).test_client()
    assert client.post("/tokenize", json={"prompt": "Once"}).json["count"] == 5
    assert client.get("/tokenizer_info").json["model"] == "tiny-gpt"
