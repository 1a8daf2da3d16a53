"""Chat: templates (models_src.chat), Ollama's /api/chat and OpenAI's /v1/chat/completions.

The official clients drive the same routes against gunicorn in tests/apis/test_app_server.py.
"""

from __future__ import annotations

import json

import pytest

from tests.app_support import ENDLESS_CHAR
from models_src.chat import TRANSCRIPT_TEMPLATE, ChatTemplateError, Message, checked
from models_src.tokenization import Tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = (Message("system", "You tell short stories."), Message("user", "A cat?"))


# ---- templates ------------------------------------------------------------------------

def test_the_transcript_ends_where_the_assistant_speaks_and_stops_at_the_next_user_turn():
    template = checked(TRANSCRIPT_TEMPLATE)
    assert template.render(CONVERSATION) == "System: You tell short stories.\nUser: A cat?\nAssistant:"
    assert template.turn_marker == "\nUser:"


def test_a_model_s_own_template_gives_its_own_turn_marker():
    template = checked(CHATML)
    assert template.render(CONVERSATION[1:]) == "<|im_start|>user\nA cat?<|im_end|>\n<|im_start|>assistant\n"
    assert template.turn_marker == "<|im_end|>\n<|im_start|>user"


@pytest.mark.parametrize("source, why", [
    ("{% for m in messages %}", "does not work"),
    ("{{ messages.__class__.__mro__ }}", "does not work"),  # the sandbox refuses it
    ("Hello", "leaves out the messages' content"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "puts nothing between two turns"),
])
def test_a_template_that_cannot_chat_is_refused_with_the_reason(source, why):
    with pytest.raises(ChatTemplateError, match=why):
        checked(source)


def test_a_tokenizer_keeps_its_chat_template(tmp_path):
    tok = Tokenizer.train_char(["hello"])
    tok.chat_template = CHATML
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).chat_template == CHATML
    plain = Tokenizer.train_char(["hello"])
    plain.save(tmp_path / "plain")
    assert Tokenizer.load(tmp_path / "plain").chat_template is None
    assert "chat_template" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())


# ---- the routes -----------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
RENDERED = "System: Be brief.\nUser: Hi\nAssistant:"


def ndjson(response) -> list[dict]:
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def events(response) -> list:
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_ollama_chat_replies_as_the_assistant(client):
    body = {"model": "endless", "messages": MESSAGES, "stream": False,
            "options": {"num_predict": 4, "temperature": 0}}
    response = client.post("/api/chat", json=body)
    assert response.status_code == 200
    final = response.json
    assert final["message"] == {"role": "assistant", "content": ENDLESS_CHAR * 4}
    assert final["done"] is True and final["done_reason"] == "length" and final["eval_count"] == 4
    assert final["prompt_eval_count"] == 1 + len(RENDERED)  # bos + the transcript, one per character
    assert "response" not in final
    lines = ndjson(client.post("/api/chat", json={**body, "stream": True}))
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert "".join(line["message"]["content"] for line in lines) == ENDLESS_CHAR * 4
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]


def test_the_reply_stops_at_the_next_turn_and_has_no_whitespace_at_its_ends(client, script,
                                                                          monkeypatch):
    from app.serving.service import GenerationService

    script([" Hello", " there. "])
    scripted, asked = GenerationService._start, []

    def start(self, loaded, prompt_ids, params, **kwargs):
        asked.append(params)
        return scripted(self, loaded, prompt_ids, params, **kwargs)
    monkeypatch.setattr(GenerationService, "_start", start)
    body = {"model": "tiny-gpt", "messages": MESSAGES, "stream": False, "stop": ["The end"]}
    assert client.post("/api/chat", json=body).json["message"]["content"] == "Hello there."
    reply = client.post("/v1/chat/completions", json=body).json["choices"][0]
    assert reply["message"] == {"role": "assistant", "content": "Hello there."}
    assert [params.stop for params in asked] == [["The end", "\nUser:"]] * 2  # the engine cuts there


def test_openai_chat_whole_and_streamed_with_usage(client):
    body = {"model": "endless", "messages": MESSAGES, "max_completion_tokens": 3, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"] == [{"index": 0, "message": {"role": "assistant", "content": ENDLESS_CHAR * 3},
                                 "logprobs": None, "finish_reason": "length"}]
    assert whole["usage"] == {"prompt_tokens": 1 + len(RENDERED), "completion_tokens": 3,
                              "total_tokens": 4 + len(RENDERED)}
    response = client.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})
    assert response.mimetype == "text/event-stream"
    chunks = events(response)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == [] and chunks[-2]["usage"] == whole["usage"]
    pieces = [c["choices"][0] for c in chunks[:-2]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert pieces[0]["delta"]["role"] == "assistant"
    assert "".join(p["delta"].get("content", "") for p in pieces) == ENDLESS_CHAR * 3
    assert pieces[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_max_completion_tokens_wins_over_max_tokens(client):
    body = {"model": "endless", "messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).json["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path, body, field, message", [
    ("/v1/chat/completions", {"messages": []}, "messages", "'messages' must hold at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role",
     "'messages[0].role' must be 'system', 'user' or 'assistant', got \"robot\""),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content", "images and audio are not supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n", "'n': only n=1 is supported"),
    ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools",
     "'tools' are not supported by this server"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs",
     "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, "messages",
     "'messages' together hold 5000 characters of content; the limit is 4000"),
    ("/api/chat", {"messages": "Hi"}, None, "'messages' must be an array, got \"Hi\""),
    ("/api/chat", {"messages": MESSAGES, "tools": [{"type": "function"}]}, None,
     "'tools' are not supported by this server"),
])
def test_a_chat_request_the_server_cannot_honour_gets_a_400_naming_the_field(client, path, body,
                                                                             field, message):
    response = client.post(path, json={"model": "tiny-gpt", **body})
    assert response.status_code == 400
    error = response.json["error"]
    if path.startswith("/v1"):
        assert error["param"] == field and message in error["message"]
    else:
        assert message in error


def test_a_role_openai_calls_developer_is_the_system_prompt(client):
    body = {"model": "endless", "messages": [{"role": "developer", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}],
            "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=body).json["usage"]["prompt_tokens"] == 1 + len(RENDERED)


def test_the_server_template_is_a_setting_and_a_broken_one_stops_the_start(make_app):
    from app.platform.settings import SettingsError

    client = make_app(FABLE_CHAT_TEMPLATE=CHATML).test_client()
    body = {"model": "endless", "messages": MESSAGES[1:], "max_tokens": 1}
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert client.post("/v1/chat/completions", json=body).json["usage"]["prompt_tokens"] == 1 + len(rendered)
    with pytest.raises(SettingsError, match="FABLE_CHAT_TEMPLATE: the chat template does not work"):
        make_app(FABLE_CHAT_TEMPLATE="{% for m in messages %}")


def test_a_checkpoint_s_own_chat_template_wins(make_app, checkpoint_dir, tmp_path):
    import shutil

    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoint_dir / "endless", folder / "endless")
    config = folder / "endless" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHATML}))
    client = make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client()
    body = {"model": "endless", "messages": MESSAGES[1:], "max_tokens": 1}
    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert client.post("/v1/chat/completions", json=body).json["usage"]["prompt_tokens"] == 1 + len(rendered)
    # a template that does not work is refused when the checkpoint loads, before any request
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": "{{ oops"}))
    app = make_app(FABLE_CHECKPOINT_DIR=str(folder))
    assert "its chat template is refused: the chat template does not work" in \
        app.extensions["fable.registry"].errors["endless"]
    assert app.test_client().post("/v1/chat/completions", json=body).status_code == 404
