"""The JSON APIs through Flask's test client: Ollama's and OpenAI's generation, the
listings, every error case, limits, deadlines, and the generation service itself.

Responses are also checked against the server's own OpenAPI document (with the
``jsonschema`` package), so the document stays true to the code.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import jsonschema
import pytest

from app.serving.schema import check_form, request_models, requested, sampling_values
from app.serving.service import GenerationService, ServerBusy, UnknownModel
from app.platform.settings import Limits, Settings, SettingsError
from models_src.generation import Batch
from tests.app_support import ENDLESS_CHAR, MODELS, SUMMARY, hold_row

GEN = "/api/generate"
CMPL = "/v1/completions"


# ---- helpers ----------------------------------------------------------------------------

def ndjson(response) -> list[dict]:
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines() if line]


def sse(response) -> list:
    """The ``data:`` payloads of an SSE body: parsed JSON, or the raw string ([DONE])."""
    text = response.get_data(as_text=True)
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def generate(client, **body):
    body.setdefault("stream", False)
    return client.post(GEN, json=body)


@pytest.fixture(scope="module")
def spec():
    from app.apis.openapi import build_spec
    return build_spec("test", Limits(4000, 512, 64))


def check(instance, schema, spec):
    """``instance`` matches ``schema``, whose references point into ``spec``."""
    jsonschema.validate(instance, {**schema, "components": spec["components"]},
                        cls=jsonschema.Draft202012Validator)


def documented(spec, path, method, status, mimetype="application/json"):
    """The schema the document gives for one response."""
    return spec["paths"][path][method]["responses"][str(status)]["content"][mimetype]["schema"]


# ---- listings ---------------------------------------------------------------------------

def test_tags_lists_the_loaded_models_in_ollamas_shape(client, spec):
    response = client.get("/api/tags")
    assert response.status_code == 200
    check(response.json, documented(spec, "/api/tags", "get", 200), spec)
    models = response.json["models"]
    assert [m["name"] for m in models] == list(MODELS)  # not "broken", not the hidden tmp dir
    gpt = next(m for m in models if m["name"] == "tiny-gpt")
    assert gpt["model"] == "tiny-gpt" and gpt["size"] > 0
    assert gpt["details"]["family"] == "gpt" and gpt["details"]["format"] == "safetensors"
    assert gpt["details"]["parameter_size"].endswith("K")


def test_version(client, spec):
    response = client.get("/api/version")
    assert response.status_code == 200 and response.json["version"]
    check(response.json, documented(spec, "/api/version", "get", 200), spec)


def test_models_gives_every_fact_and_reports_the_broken_checkpoint(client, spec, checkpoint_dir):
    response = client.get("/api/models")
    assert response.status_code == 200
    check(response.json, documented(spec, "/api/models", "get", 200), spec)
    facts = {m["name"]: m for m in response.json["models"]}
    assert list(facts) == list(MODELS)
    gpt, lstm = facts["tiny-gpt"], facts["tiny-lstm"]
    for key, value in SUMMARY.items():
        assert key == "infill" or gpt[key] == value
    assert gpt["architecture"] == "gpt" and lstm["architecture"] == "lstm"
    assert gpt["tokenizer"] == "char" and gpt["vocab_size"] > 6
    assert gpt["context"] == 64 and lstm["context"] is None
    assert gpt["device"] == "cpu" and gpt["can_infill"] is True and lstm["can_infill"] is False
    assert lstm["val_perplexity"] is None  # no summary: unknown, not invented
    from app.serving.registry import ModelRegistry
    from models_src.summary import count_parameters
    loaded = ModelRegistry.load(checkpoint_dir).get("tiny-lstm")
    assert lstm["parameters"] == count_parameters(loaded.model)
    files = (checkpoint_dir / "tiny-lstm").iterdir()
    assert lstm["size_bytes"] == sum(p.stat().st_size for p in files)
    errors = response.json["errors"]
    assert list(errors) == ["broken"] and "invalid JSON" in errors["broken"]
    assert str(checkpoint_dir) not in errors["broken"]  # no server paths in the message


def test_models_needs_the_admin_token_when_one_is_set(make_app):
    token = "t" * 24
    client = make_app(FABLE_ADMIN_TOKEN=token).test_client()
    denied = client.get("/api/models")
    assert denied.status_code == 401 and "admin token" in denied.json["error"]
    assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    allowed = client.get("/api/models", headers={"Authorization": f"Bearer {token}"})
    assert allowed.status_code == 200 and allowed.json["models"]
    assert client.get("/api/tags").status_code == 200  # the public listings stay public


def test_openai_model_list_and_retrieve(client, spec):
    listing = client.get("/v1/models")
    assert listing.status_code == 200
    check(listing.json, documented(spec, "/v1/models", "get", 200), spec)
    assert [m["id"] for m in listing.json["data"]] == list(MODELS)
    assert all(m["owned_by"] == "fable" and m["object"] == "model" for m in listing.json["data"])
    one = client.get("/v1/models/tiny-lstm")
    assert one.status_code == 200 and one.json["id"] == "tiny-lstm"
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    check(missing.json, documented(spec, "/v1/models/{model}", "get", 404), spec)


def test_health_is_ok_while_one_checkpoint_is_broken(client, spec):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "models": 3, "errors": 1, "active": 0,
                             "queued": 0, "full": False}
    check(response.json, documented(spec, "/healthz", "get", 200), spec)
    assert client.head("/healthz").status_code == 200


@pytest.mark.parametrize("which", ["empty", "missing"])
def test_app_starts_without_models_and_health_says_503(make_app, tmp_path, which):
    directory = tmp_path / "checkpoints"
    if which == "empty":
        directory.mkdir()
    client = make_app(FABLE_CHECKPOINT_DIR=str(directory)).test_client()
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json["models"] == 0
    assert client.get("/api/tags").json == {"models": []}
    assert generate(client, model="tiny-gpt").status_code == 404


def test_openapi_document_covers_every_json_route(client, app, spec):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json
    assert document["openapi"] == "3.1.0"
    routes = set()
    for rule in app.url_map.iter_rules():
        pages = ("ui", "admin", "compare", "models", "experiments", "train")
        if rule.endpoint == "static" or rule.endpoint.split(".")[0] in pages:
            continue  # HTML pages and assets: the OpenAPI document covers the JSON routes
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    documented_routes = {(p, m) for p, ops in document["paths"].items() for m in ops}
    assert routes == documented_routes
    # Every reference resolves, and the served limits are the app's.
    text = json.dumps(document)
    for name in re.findall(r'"#/components/schemas/(\w+)"', text):
        assert name in document["components"]["schemas"]
    options = document["components"]["schemas"]["OllamaOptions"]["properties"]
    assert options["num_predict"]["anyOf"][0]["maximum"] == 512


#: Which wings of app/ each wing may import: platform is the base, serving runs the models,
#: and the two faces (apis, pages) stand on both without touching each other.
WING_MAY_IMPORT = {"platform": {"platform"}, "serving": {"platform", "serving"},
                   "apis": {"platform", "serving", "apis"}, "pages": {"platform", "serving", "pages"}}


def _app_imports(path) -> set[str]:
    import ast
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("app."):
            found |= {f"{node.module}.{a.name}" for a in node.names}  # a module or a name in it
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("app.")}
    return found


def test_each_wing_imports_only_the_wings_below_it_and_no_blueprint_another():
    from pathlib import Path

    from flask import Blueprint

    app_dir = Path(__file__).parents[2] / "app"
    blueprints = set()
    for path in app_dir.glob("*/*.py"):
        module = f"app.{path.parent.name}.{path.stem}"
        if isinstance(getattr(__import__(module, fromlist=["bp"]), "bp", None), Blueprint):
            blueprints.add(module)
    assert len(blueprints) == 10, blueprints  # 3 APIs, 6 pages and /metrics
    for path in app_dir.glob("*/*.py"):
        wing, module = path.parent.name, f"app.{path.parent.name}.{path.stem}"
        imported = _app_imports(path)
        wings = {name.split(".")[1] for name in imported}
        assert wings <= WING_MAY_IMPORT[wing], (module, wings - WING_MAY_IMPORT[wing])
        if module in blueprints:
            others = {name for name in imported for bp in blueprints - {module}
                      if name == bp or name.startswith(bp + ".")}
            assert not others, (module, others)


# ---- Ollama generate ----------------------------------------------------------------------

def test_generate_streams_ndjson_by_default(client, spec):
    response = client.post(GEN, json={"model": "tiny-gpt", "prompt": "Once",
                                      "options": {"seed": 7, "num_predict": 30}})
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-cache"
    lines = ndjson(response)
    line_schema = documented(spec, GEN, "post", 200, "application/x-ndjson")
    for line in lines:
        check(line, line_schema, spec)
    *chunks, final = lines
    assert all(c["done"] is False and c["model"] == "tiny-gpt" and c["response"] for c in chunks)
    check(final, spec["components"]["schemas"]["GenerateFinal"], spec)
    assert final["done"] is True and final["response"] == ""
    assert final["done_reason"] in ("stop", "length")
    assert final["prompt_eval_count"] == 5  # bos + "Once"
    assert 1 <= final["eval_count"] <= 30
    assert final["total_duration"] >= final["eval_duration"] >= 0
    # The same request without streaming gives the same text, in one object.
    whole = generate(client, model="tiny-gpt", prompt="Once",
                     options={"seed": 7, "num_predict": 30})
    assert whole.mimetype == "application/json"
    check(whole.json, documented(spec, GEN, "post", 200), spec)
    assert whole.json["response"] == "".join(c["response"] for c in chunks)
    assert whole.json["eval_count"] == final["eval_count"]


def test_length_limit_and_done_reason(client):
    response = generate(client, model="endless", prompt="x", options={"num_predict": 9})
    assert response.json["response"] == ENDLESS_CHAR * 9
    assert response.json["done_reason"] == "length" and response.json["eval_count"] == 9


@pytest.mark.parametrize("body, reason", [({}, "load"), ({"prompt": ""}, "load"),
                                          ({"prompt": None, "stream": True}, "load"),
                                          ({"keep_alive": 0}, "unload"), ({"keep_alive": "0s"}, "unload"),
                                          ({"keep_alive": "5m"}, "load")])
def test_an_empty_prompt_is_ollamas_load_and_with_keep_alive_0_its_unload(client, spec, body, reason):
    response = generate(client, model="tiny-lstm", **body)
    assert response.status_code == 200 and response.mimetype == "application/json"  # one object
    assert response.json["done"] and response.json["done_reason"] == reason
    assert response.json["response"] == ""
    check(response.json, documented(spec, "/api/generate", "post", 200), spec)
    chat = client.post("/api/chat", json={"model": "tiny-lstm", "messages": [], **body})
    assert chat.json["done_reason"] == reason and chat.json["message"] == {"role": "assistant", "content": ""}
    check(chat.json, documented(spec, "/api/chat", "post", 200), spec)
    assert generate(client, model="nope", **body).status_code == 404  # as Ollama: unknown model
    assert "tiny-lstm" in [m["name"] for m in client.get("/api/ps").json["models"]]  # still loaded


def test_an_empty_prompt_starts_from_bos_on_the_openai_route(client):
    response = client.post("/v1/completions", json={"model": "tiny-lstm", "prompt": "", "max_tokens": 5})
    assert response.status_code == 200 and response.json["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize("model", ["tiny-gpt", "tiny-lstm"])
def test_same_seed_same_response(client, model):
    def run(seed):
        options = {"seed": seed, "num_predict": 40, "temperature": 1.2}
        return generate(client, model=model, prompt="Lily", options=options).json["response"]
    assert run(11) == run(11)
    assert len({run(s) for s in range(5)}) > 1  # and the seed does matter


def test_options_win_over_top_level_settings(client):
    def length(**body):
        return len(generate(client, model="endless", prompt="x", **body).json["response"])
    assert length(max_new_tokens=3) == 3
    assert length(max_new_tokens=3, options={"num_predict": 5}) == 5
    assert length(options={"num_predict": -1}) == 64  # Ollama's "server default"
    assert length(max_new_tokens=3, options={"num_predict": -1}) == 3
    assert length() == 64
    def text(**body):
        return generate(client, model="tiny-gpt", prompt="Once", max_new_tokens=20,
                        **body).json["response"]
    assert (text(temperature=0) == text(temperature=1.5, options={"temperature": 0})
            == text(temperature=0, seed=1))


def test_min_p_is_an_option_of_every_api(client):
    # min_p 1 keeps only the likeliest token: greedy decoding, whatever the temperature
    greedy = generate(client, model="tiny-gpt", prompt="Once", max_new_tokens=20, temperature=0).json
    hot = {"temperature": 1.5, "seed": 3}
    assert generate(client, model="tiny-gpt", prompt="Once", options={"num_predict": 20, "min_p": 1.0},
                    **hot).json["response"] == greedy["response"]
    openai = client.post("/v1/completions", json={"model": "tiny-gpt", "prompt": "Once", "max_tokens": 20,
                                                  "min_p": 1.0, **hot}).json
    assert openai["choices"][0]["text"] == greedy["response"]
    refused = generate(client, model="tiny-gpt", prompt="Once", options={"min_p": 1.5})
    assert refused.status_code == 400 and "'options.min_p' must be" in refused.json["error"]


def test_ollama_ignores_runtime_and_unknown_options_as_ollama_does(client):
    response = generate(client, model="endless", prompt="x", keep_alive="5m", raw=True, unknown=1,
                        options={"num_predict": 2, "mirostat": 0, "num_ctx": 2048, "num_gpu": 1})
    assert response.status_code == 200 and response.json["response"] == ENDLESS_CHAR * 2


@pytest.mark.parametrize("body, message", [
    ({"options": {"mirostat": 2}}, "'options.mirostat' is not supported by this server; send 0"),
    ({"options": {"typical_p": 0.5}}, "'options.typical_p' is not supported by this server; "
                                       "send 1"),
    ({"options": {"repeat_last_n": 64}}, "'options.repeat_last_n' is not supported by this "
                                          "server; send -1"),
    ({"system": "Be brief."}, "'system' is not supported by /api/generate"),
    ({"template": "{{ .Prompt }}"}, "'template' is not supported"),
    ({"context": [1, 2]}, "'context' is not supported"),
    ({"think": True}, "'think': these models do not think"),
])
def test_ollama_options_that_would_change_the_text_are_never_silently_ignored(client, body,
                                                                               message):
    response = generate(client, model="endless", prompt="x", **body)
    assert response.status_code == 400 and message in response.json["error"]


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"prompt": "x"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
])
def test_openai_refuses_an_argument_it_does_not_know_as_openai_does(client, path, extra):
    response = client.post(path, json={"model": "endless", **extra, "max_tokens": 1,
                                       "frobnicate": True})
    assert response.status_code == 400
    assert response.json["error"]["message"] == "Unrecognized request argument supplied: frobnicate"
    assert response.json["error"]["param"] == "frobnicate"


def _a_text(client, model="tiny-gpt", min_len=12):
    for seed in range(50):
        body = dict(model=model, prompt="Once", options={"seed": seed, "num_predict": 60})
        text = generate(client, **body).json["response"]
        if len(text) >= min_len:
            return body, text
    raise AssertionError("no seed gave a long enough text")


@pytest.mark.parametrize("as_list", [True, False])
def test_stop_strings_end_the_text_and_are_not_in_it(client, as_list):
    body, text = _a_text(client)
    stop = text[6:8]
    body["options"]["stop"] = [stop] if as_list else stop
    for streaming in (False, True):
        response = client.post(GEN, json={**body, "stream": streaming})
        if streaming:
            *chunks, final = ndjson(response)
            result = "".join(c["response"] for c in chunks)
        else:
            final = response.json
            result = final["response"]
        assert result == text[:text.index(stop)]
        assert stop not in result and final["done_reason"] == "stop"


def test_suffix_infills_the_middle(client):
    response = generate(client, model="endless", prompt="Lily saw a ball.", suffix="The end.",
                        options={"num_predict": 6})
    assert response.status_code == 200
    assert response.json["response"] == ENDLESS_CHAR * 6
    # prompt_eval_count is the infilling prompt: bos first <blank> last <sep>
    bos, blank, sep = 1, 1, 1
    assert response.json["prompt_eval_count"] == (bos + len("Lily saw a ball.") + blank
                                                   + len(" The end.") + sep)
    # streamed and whole agree; no whitespace at the ends
    body = dict(model="tiny-gpt", prompt="Lily saw a ball.", suffix="She was happy.",
                options={"seed": 3, "num_predict": 40})
    whole = generate(client, **body).json["response"]
    *chunks, final = ndjson(client.post(GEN, json={**body, "stream": True}))
    assert "".join(c["response"] for c in chunks) == whole == whole.strip()
    assert final["done"] is True


@pytest.mark.parametrize("stream", [False, True])
def test_a_suffix_to_a_model_not_trained_to_infill_is_refused_naming_those_that_are(client, stream):
    body = dict(model="tiny-lstm", prompt="Lily saw a ball.", suffix="She was happy.", stream=stream)
    for path, message in ((GEN, lambda r: r.json["error"]),
                          ("/v1/completions", lambda r: r.json["error"]["message"])):
        response = client.post(path, json=body)
        assert response.status_code == 400, path
        assert message(response) == ("model 'tiny-lstm' was not trained to infill "
                                     "(models that do: endless, tiny-gpt)")


# ---- Ollama errors ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def outside(checkpoint_dir):
    """A real checkpoint beside (not under) the checkpoint directory: ../outside/model."""
    import shutil
    target = checkpoint_dir.parent / "outside" / "model"
    if not target.exists():
        shutil.copytree(checkpoint_dir / "tiny-gpt", target)
    return target


@pytest.mark.parametrize("name", ["nope", "broken", ".tiny-gpt.tmp-0", "../tiny-gpt",
                                  "tiny-gpt/../tiny-gpt", "/etc/passwd", "../outside/model",
                                  "TINY-GPT", "tiny-gpt ", "x" * 300])
def test_unknown_model_is_404_and_never_a_path(client, monkeypatch, outside, name):
    def no_disk(*args, **kwargs):
        raise AssertionError("a request must not load anything")
    monkeypatch.setattr("app.serving.registry.load_checkpoint", no_disk)
    monkeypatch.setattr("models_src.checkpoint.load_checkpoint", no_disk)
    response = generate(client, model=name, prompt="hi")
    if len(name) > 256:
        assert response.status_code == 400 and "'model'" in response.json["error"]
        return
    assert response.status_code == 404
    assert "not found" in response.json["error"]
    openai = client.post(CMPL, json={"model": name, "prompt": "hi"})
    assert openai.status_code == 404 and openai.json["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body, field", [
    ({}, "'model'"),
    ({"model": ""}, "'model'"),
    ({"model": 3}, "'model'"),
    ({"model": "tiny-gpt", "prompt": 5}, "'prompt'"),
    ({"model": "tiny-gpt", "prompt": ["a"]}, "'prompt'"),
    ({"model": "tiny-gpt", "suffix": 3}, "'suffix'"),
    ({"model": "tiny-gpt", "stream": "yes"}, "'stream'"),
    ({"model": "tiny-gpt", "stream": 1}, "'stream'"),
    ({"model": "tiny-gpt", "options": [1]}, "'options'"),
    ({"model": "tiny-gpt", "options": {"temperature": True}}, "'options.temperature'"),
    ({"model": "tiny-gpt", "options": {"temperature": "0.5"}}, "'options.temperature'"),
    ({"model": "tiny-gpt", "options": {"temperature": -0.1}}, "'options.temperature'"),
    ({"model": "tiny-gpt", "options": {"top_p": 0}}, "'options.top_p'"),
    ({"model": "tiny-gpt", "options": {"top_p": 1.01}}, "'options.top_p'"),
    ({"model": "tiny-gpt", "options": {"top_k": 0}}, "'options.top_k'"),
    ({"model": "tiny-gpt", "options": {"top_k": 2.5}}, "'options.top_k'"),
    ({"model": "tiny-gpt", "options": {"top_k": False}}, "'options.top_k'"),
    ({"model": "tiny-gpt", "options": {"num_predict": 0}}, "'options.num_predict'"),
    ({"model": "tiny-gpt", "options": {"num_predict": -2}}, "'options.num_predict'"),
    ({"model": "tiny-gpt", "options": {"num_predict": 513}}, "'options.num_predict'"),
    ({"model": "tiny-gpt", "options": {"num_predict": True}}, "'options.num_predict'"),
    ({"model": "tiny-gpt", "options": {"repeat_penalty": 0}}, "'options.repeat_penalty'"),
    ({"model": "tiny-gpt", "options": {"repeat_penalty": 1e-300}}, "'options.repeat_penalty'"),
    ({"model": "tiny-gpt", "options": {"repeat_penalty": 101}}, "'options.repeat_penalty'"),
    ({"model": "tiny-gpt", "options": {"seed": "1"}}, "'options.seed'"),
    ({"model": "tiny-gpt", "options": {"seed": 1.5}}, "'options.seed'"),
    ({"model": "tiny-gpt", "options": {"seed": 2 ** 64}}, "'options.seed'"),
    ({"model": "tiny-gpt", "options": {"stop": 5}}, "'options.stop'"),
    ({"model": "tiny-gpt", "options": {"stop": ["a", ""]}}, "'options.stop[1]'"),
    ({"model": "tiny-gpt", "options": {"stop": ["a", 1]}}, "'options.stop[1]'"),
    ({"model": "tiny-gpt", "options": {"stop": list("abcde")}}, "'options.stop'"),
    ({"model": "tiny-gpt", "options": {"stop": "s" * 257}}, "'options.stop'"),
    ({"model": "tiny-gpt", "temperature": "hot"}, "'temperature'"),
    ({"model": "tiny-gpt", "temperature": True}, "'temperature'"),
    ({"model": "tiny-gpt", "max_new_tokens": 100000}, "'max_new_tokens'"),
    ({"model": "tiny-gpt", "max_new_tokens": -1}, "'max_new_tokens'"),
    ({"model": "tiny-gpt", "top_p": 0}, "'top_p'"),
    ({"model": "tiny-gpt", "repetition_penalty": -1}, "'repetition_penalty'"),
    ({"model": "tiny-gpt", "stop": ""}, "'stop'"),
    ({"model": "tiny-gpt", "format": "json"}, "'format'"),
    ({"model": "tiny-gpt", "prompt": "x" * 4001}, "'prompt'"),
    ({"model": "tiny-gpt", "prompt": "x" * 3000, "suffix": "y" * 1001}, "'suffix'"),
    ({"model": "tiny-gpt", "prompt": "\ud800"}, "'prompt'"),
])
def test_invalid_fields_are_400_naming_the_field(client, spec, body, field):
    response = client.post(GEN, json=body)
    assert response.status_code == 400, response.json
    assert response.mimetype == "application/json"
    check(response.json, documented(spec, GEN, "post", 400), spec)
    assert field in response.json["error"], response.json


#: Bodies and the exact message each gets (FABLE_MAX_PROMPT_CHARS 60, MAX_NEW_TOKENS 16).
EXACT_MESSAGES = [
    (GEN, {"model": None, "options": {"num_predict": ["a"]}}, "'model' is required"),
    (GEN, {"model": "m", "suffix": "a" * 61}, "'prompt' and 'suffix' together are 61 "
                                              "characters long; the limit is 60"),
    (GEN, {"model": "m", "prompt": "a" * 61}, "'prompt' is 61 characters long; the limit is 60"),
    (GEN, {"model": "m", "stop": "\ud800"}, "'stop' contains invalid Unicode (a lone surrogate)"),
    (GEN, {"model": "m", "images": 2.0, "temperature": []}, "'images' is not supported by this "
                                                            "server"),
    (GEN, {"model": "m", "options": {"top_k": -1}}, "'options.top_k' must be >= 1, got -1"),
    (GEN, {"model": "m", "top_p": {"a": 1}}, "'top_p' must be a number, got an object"),
    (GEN, {"model": "m", "top_p": 1.5}, "'top_p' must be above 0 and at most 1, got 1.5"),
    (GEN, {"model": "m", "max_new_tokens": 0.5}, "'max_new_tokens' must be an integer, got 0.5"),
    (GEN, {"model": "m", "options": 2.5, "seed": ["a"]}, "'options' must be an object, got 2.5"),
    (GEN, {"model": "m", "options": {"num_predict": 17}, "top_k": 0},
     "'top_k' must be >= 1, got 0"),  # options are read after the top-level settings
    (GEN, {"model": "m", "options": {"num_predict": 17}}, "'options.num_predict' must be "
                                                          "between 1 and 16, got 17"),
    (GEN, {"model": "m", "repetition_penalty": 0.009}, "'repetition_penalty' must be between "
                                                       "0.01 and 100, got 0.009"),
    (GEN, {"model": "m", "seed": 2 ** 64}, "'seed' must be between -9.22337e+18 and 1.84467e+19, "
                                           "got 18446744073709551616"),
    (GEN, {"model": "m", "stream": ["a"]}, "'stream' must be true or false, got an array"),
    (GEN, {"model": "m", "stop": ["a", ""]}, "'stop[1]' must not be empty"),
    (GEN, {"model": "m", "stop": "s" * 257}, "'stop' is 257 characters long; the limit is 256"),
    (GEN, {"model": "m", "temperature": 10 ** 400}, "request body has an integer of 401 digits; "
                                                     "numbers here have at most 100"),
    (GEN, {"model": "m", "temperature": 1e300}, "'temperature' must be between 0 and 100, "
                                                "got 1e+300"),
    (CMPL, {"model": "\ud800"}, "'model' contains invalid Unicode (a lone surrogate)"),
    (CMPL, {"model": "m", "logit_bias": 2}, "'logit_bias' is not supported"),
    (CMPL, {"model": "m", "frequency_penalty": 1e-300}, "'frequency_penalty' is not supported; "
                                                        "send 0 or leave it out "
                                                        "(repetition_penalty is available)"),
    (CMPL, {"model": "m", "stream_options": {"x": 1}, "best_of": 0.01},
     "'stream_options' is only allowed when 'stream' is true"),
    (CMPL, {"model": "m", "stop": ["a"] * 5}, "'stop' may hold at most 4 strings, got 5"),
    (CMPL, {"model": "m", "prompt": ["a", 2]}, "'prompt' must be a string, a list of strings, a list "
                                               "of token ids or a list of such lists; item 1 is not"),
    (CMPL, {"model": "m", "prompt": []}, "'prompt' is an empty list"),
    (CMPL, {"model": "m", "prompt": [[1, 2], []]}, "'prompt' must be a string, a list of strings, a "
                                                   "list of token ids or a list of such lists; item 1 "
                                                   "is not"),
    (CMPL, {"model": "m", "prompt": ["a"] * 17}, "'prompt' holds 17 prompts; the limit is 16 a request"),
    (CMPL, {"model": "m", "prompt": [1] * 61}, "'prompt' item 0 is 61 token ids long; the limit is 60"),
    (CMPL, {"model": "m", "prompt": [3, -1]}, "'prompt' item 0 holds the token id -1; ids are 0 or more"),
    (CMPL, {"model": "m", "max_tokens": 0}, "'max_tokens' 0 writes nothing: it needs 'echo' true, "
                                            "which scores the prompt"),
    (CMPL, {"model": "m", "max_tokens": 0, "echo": True, "stream": True},
     "'max_tokens' 0 scores the prompt and writes nothing to stream; send it without 'stream'"),
    (CMPL, {"model": "m", "prompt": ["a", "b"], "stream": True},
     "'stream' takes one prompt; send a list of prompts without it"),
    (CMPL, {"model": "m", "prompt": [5, 6], "suffix": "b"},
     "'suffix' (infilling) takes one text prompt: the first sentence"),
    (CMPL, {"model": "m", "prompt": "a", "suffix": "b", "echo": True},
     "'echo' is not for infilling: the middle is written between two texts"),
    (CMPL, {"model": "m", "stop": 2.0}, "'stop' must be a string or a list of strings, got 2.0"),
    (CMPL, {"model": "m", "suffix": {"a": None}}, "'suffix' must be a string, got an object"),
    (CMPL, {"model": "m", "top_k": False}, "'top_k' must be an integer, got false"),
    (CMPL, {"model": "m", "presence_penalty": 2 ** 64 - 1}, "'presence_penalty' must be between "
                                                            "-2 and 2, got 1.84467e+19"),
    (CMPL, {"model": "m", "temperature": -2}, "'temperature' must be between 0 and 2, got -2"),
    (CMPL, {"model": "m", "stream": "yes"}, "'stream' must be true or false, got \"yes\""),
    (CMPL, {"model": "m", "echo": ""}, "'echo' must be true or false, got \"\""),
    (CMPL, {"model": "m", "logprobs": {}}, "'logprobs' must be an integer, got an object"),
    (CMPL, {"model": "m", "n": [1, 2], "top_p": ["a"]}, "'n': only n=1 is supported"),
    (CMPL, {"model": "m", "stream": True, "stream_options": {"include_usage": "yes"}},
     "'stream_options.include_usage' must be true or false, got \"yes\""),
]


@pytest.mark.parametrize("path, body, message", EXACT_MESSAGES)
def test_error_messages_are_worded_exactly(make_app, path, body, message):
    client = make_app(FABLE_MAX_PROMPT_CHARS=60, FABLE_MAX_NEW_TOKENS=16,
                      FABLE_DEFAULT_NEW_TOKENS=4).test_client()
    response = client.post(path, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    error = response.json["error"]
    assert (error["message"] if path == CMPL else error) == message


def test_extreme_but_valid_values_do_not_break_sampling(client):
    greedy = generate(client, model="tiny-gpt", prompt="Once", options={"temperature": 0,
                                                                        "num_predict": 20})
    for options in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 100},
                    {"repeat_penalty": 0.01}, {"repeat_penalty": 100}, {"top_p": 1e-300},
                    {"top_k": 10 ** 12}, {"seed": 2 ** 64 - 1}, {"seed": -(2 ** 63)}):
        response = generate(client, model="tiny-gpt", prompt="Once",
                            options={"num_predict": 20, **options})
        assert response.status_code == 200, (options, response.json)
        if options.get("temperature", 1) < 1e-4:  # the limit of a vanishing temperature
            assert response.json["response"] == greedy.json["response"]


def test_limits_are_inclusive(client):
    assert generate(client, model="endless", prompt="x" * 4000,
                    options={"num_predict": 512}).status_code == 200
    assert generate(client, model="endless", prompt="x" * 3000, suffix="y" * 1000,
                    options={"num_predict": 1}).status_code == 200
    assert generate(client, model="endless", options={"temperature": 50, "top_p": 1,
                                                      "top_k": 1000}).status_code == 200


@pytest.mark.parametrize("data, content_type, status, words", [
    ("{not json", "application/json", 400, "not valid JSON"),
    ('["tiny-gpt"]', "application/json", 400, "must be a JSON object"),
    ('"tiny-gpt"', "application/json", 400, "must be a JSON object"),
    ("", "application/json", 400, "empty"),
    ('{"model": "tiny-gpt", "options": {"temperature": NaN}}', "application/json", 400, "NaN"),
    (b'{"model": "\xff"}', "application/json", 400, "UTF-8"),
    ('{"model": "tiny-gpt"}', "text/plain", 415, "application/json"),
    ("model=tiny-gpt", "application/x-www-form-urlencoded", 415, "application/json"),
])
def test_bodies_that_are_not_a_json_object(client, data, content_type, status, words):
    for path in (GEN, CMPL):
        response = client.post(path, data=data, content_type=content_type)
        assert response.status_code == status
        assert response.mimetype == "application/json"
        message = response.json["error"]
        message = message["message"] if path == CMPL else message
        assert words in message


def test_a_body_without_content_type_is_read_as_json(client):
    response = client.post(GEN, data=json.dumps({"model": "endless", "prompt": "x", "stream": False,
                                                 "options": {"num_predict": 2}}))
    assert response.status_code == 200 and response.json["response"] == ENDLESS_CHAR * 2


def test_a_body_too_large_is_413_json(client, spec):
    big = {"model": "tiny-gpt", "prompt": "x" * (70 * 1024)}
    response = client.post(GEN, json=big)
    assert response.status_code == 413 and "too large" in response.json["error"]
    check(response.json, documented(spec, GEN, "post", 413), spec)
    openai = client.post(CMPL, json=big)
    assert openai.status_code == 413
    check(openai.json, documented(spec, CMPL, "post", 413), spec)


def test_wrong_method_and_unknown_routes_are_json(client):
    response = client.get(GEN)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.json["error"].startswith("method GET is not allowed")
    openai = client.get(CMPL)
    assert openai.status_code == 405 and openai.json["error"]["type"] == "invalid_request_error"
    assert client.post("/api/tags").status_code == 405
    assert client.get("/api/nope").json == {"error": "not found: GET /api/nope"}
    embeddings = client.post("/v1/embeddings", json={})
    assert embeddings.status_code == 404 and "message" in embeddings.json["error"]
    assert client.get("/healthz/x").mimetype == "application/json"


def test_an_unexpected_failure_is_a_json_500_without_details(app, client, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(app.extensions["fable.service"], "stream", boom)
    response = generate(client, model="tiny-gpt", prompt="x")
    assert response.status_code == 500
    assert response.json == {"error": "internal server error"}
    openai = client.post(CMPL, json={"model": "tiny-gpt", "prompt": "x"})
    assert openai.status_code == 500 and openai.json["error"]["type"] == "server_error"
    assert "secret" not in openai.get_data(as_text=True)


def test_a_failure_mid_stream_is_an_error_line_and_frees_the_slot(app, client, monkeypatch):
    service = app.extensions["fable.service"]
    real, steps = Batch.step, []

    def failing(batch):  # every second decoding step fails
        steps.append(batch)
        if len(steps) % 2 == 0:
            raise RuntimeError("model exploded")
        return real(batch)
    monkeypatch.setattr(Batch, "step", failing)
    lines = ndjson(client.post(GEN, json={"model": "endless", "prompt": "x"}))
    assert lines[0]["response"] == ENDLESS_CHAR
    assert lines[-1] == {"error": "generation failed (RuntimeError)"}
    events = sse(client.post(CMPL, json={"model": "endless", "prompt": "x", "stream": True}))
    assert events[-1]["error"]["message"] == "generation failed (RuntimeError)"
    assert service.active == 0


# ---- slots, deadlines, disconnects ----------------------------------------------------------

def test_a_client_that_goes_away_frees_its_slot(app, client):
    service = app.extensions["fable.service"]
    response = client.post(GEN, json={"model": "endless", "prompt": "x",
                                      "options": {"num_predict": 512}})
    first = json.loads(next(iter(response.response)))
    assert first["response"] == ENDLESS_CHAR and service.active == 1
    response.close()  # what the WSGI server does when the socket breaks
    assert service.active == 0
    events = client.post(CMPL, json={"model": "endless", "prompt": "x", "stream": True,
                                     "max_tokens": 512})
    next(iter(events.response))
    assert service.active == 1
    events.close()
    assert service.active == 0


def test_busy_server_answers_503_with_retry_after(make_app):
    app = make_app(FABLE_MAX_BATCH=1, FABLE_QUEUE_TIMEOUT_S=0)
    client = app.test_client()
    holding = client.post(GEN, json={"model": "endless", "prompt": "x"})
    next(iter(holding.response))
    busy = generate(client, model="tiny-gpt", prompt="x")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert "busy" in busy.json["error"]
    openai = client.post(CMPL, json={"model": "tiny-gpt", "prompt": "x"})
    assert openai.status_code == 503 and openai.json["error"]["code"] == "server_busy"
    holding.close()
    assert generate(client, model="tiny-gpt", options={"num_predict": 2}).status_code == 200


def test_the_request_deadline_ends_the_text_as_length(make_app):
    app = make_app(FABLE_REQUEST_TIMEOUT_S=0.3, FABLE_MAX_NEW_TOKENS=1_000_000)
    client = app.test_client()
    whole = generate(client, model="endless", prompt="x", options={"num_predict": 1_000_000})
    assert whole.json["done_reason"] == "length"
    text = whole.json["response"]
    assert 0 < len(text) < 1_000_000 and set(text) == {ENDLESS_CHAR}
    assert whole.json["eval_count"] == len(text)
    *chunks, final = ndjson(client.post(GEN, json={"model": "endless", "prompt": "x",
                                                   "options": {"num_predict": 1_000_000}}))
    assert final["done_reason"] == "length" and len(chunks) == final["eval_count"]
    completion = client.post(CMPL, json={"model": "endless", "max_tokens": 1_000_000})
    assert completion.json["choices"][0]["finish_reason"] == "length"
    assert app.extensions["fable.service"].active == 0


# ---- OpenAI completions -----------------------------------------------------------------------

def test_completion_shape_and_usage(client, spec):
    response = client.post(CMPL, json={"model": "endless", "prompt": "Once", "max_tokens": 7})
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.json
    check(body, documented(spec, CMPL, "post", 200), spec)
    assert body["object"] == "text_completion" and body["model"] == "endless"
    assert body["id"].startswith("cmpl-") and abs(body["created"] - time.time()) < 60
    assert body["choices"] == [{"text": ENDLESS_CHAR * 7, "index": 0, "logprobs": None,
                                "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_is_sse_ending_with_done(client, spec, include_usage):
    body = {"model": "tiny-gpt", "prompt": "Once", "max_tokens": 25, "seed": 5, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = client.post(CMPL, json=body)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert response.headers["X-Accel-Buffering"] == "no"
    events = sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for chunk in chunks:
        check(chunk, spec["components"]["schemas"]["Completion"], spec)
        assert chunk["id"] == chunks[0]["id"] and chunk["object"] == "text_completion"
        assert ("usage" in chunk) == include_usage
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 5
        assert all(c["usage"] is None for c in chunks)
    *pieces, last = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in pieces)
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    whole = client.post(CMPL, json={**body, "stream": False, "stream_options": None})
    assert whole.json["choices"][0]["text"] == text
    if include_usage:
        assert usage_chunk["usage"] == whole.json["usage"]


def test_both_apis_give_the_same_text_for_the_same_seed(client):
    ollama = generate(client, model="tiny-lstm", prompt="Lily", options={
        "seed": 9, "num_predict": 30, "temperature": 0.9, "top_p": 0.9, "stop": ["zz"]})
    openai = client.post(CMPL, json={"model": "tiny-lstm", "prompt": ["Lily"], "seed": 9,
                                     "max_tokens": 30, "temperature": 0.9, "top_p": 0.9,
                                     "stop": "zz", "user": "someone", "n": 1, "echo": False,
                                     "presence_penalty": 0, "frequency_penalty": 0.0,
                                     "logprobs": None, "best_of": 1, "logit_bias": {}})
    assert openai.status_code == 200, openai.json
    assert openai.json["choices"][0]["text"] == ollama.json["response"]


def test_completion_suffix_infills(client):
    response = client.post(CMPL, json={"model": "endless", "prompt": "Lily saw a ball.",
                                       "suffix": "The end.", "max_tokens": 4})
    assert response.json["choices"][0]["text"] == ENDLESS_CHAR * 4


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["a", 2]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [[0, 1], [8192]]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 513}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"seed": "x"}, "seed"),
    ({"n": 2}, "n"),
    ({"n": True}, "n"),
    ({"best_of": 3}, "best_of"),
    ({"echo": "yes"}, "echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"stream": "true"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"model": None}, "model"),
])
def test_completion_refusals_are_400_in_openais_shape(client, spec, body, param):
    response = client.post(CMPL, json={"model": "tiny-gpt", "prompt": "Once", **body})
    assert response.status_code == 400, response.json
    check(response.json, documented(spec, CMPL, "post", 400), spec)
    error = response.json["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param.split("[")[0] in error["message"]


# ---- the service, settings and validation directly --------------------------------------------

def test_a_request_samples_with_the_models_own_defaults(app_config, make_app, checkpoint_dir,
                                                       tmp_path):
    for name in ("tiny-gpt", "endless"):
        shutil.copytree(checkpoint_dir / name, tmp_path / name)
    (tmp_path / "tiny-gpt" / "generation_config.json").write_text('{"do_sample": false}')
    client = make_app(FABLE_CHECKPOINT_DIR=str(tmp_path), FABLE_DEFAULT_NEW_TOKENS=None).test_client()
    def text(**body):
        return generate(client, model="tiny-gpt", prompt="Once", stream=False, max_new_tokens=30,
                        **body).json["response"]
    greedy = text(temperature=0)
    assert text() == greedy and text(seed=5) == greedy  # the model's own: greedy
    assert {text(temperature=1.5, seed=s) for s in range(4)} != {greedy}  # a request's value wins
    facts = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert facts["tiny-gpt"]["sampling"]["temperature"] == 0.0
    assert facts["endless"]["sampling"]["temperature"] == 1.0  # no file: the model's distribution
    # no length asked, none configured: to the end of the 64-token context (bos + "x" in it)
    endless = generate(client, model="endless", prompt="x", stream=False).json
    assert endless["eval_count"] == 62 and endless["done_reason"] == "length"
    chat = client.post("/v1/completions", json={"model": "endless", "prompt": "x" * 63}).json
    assert chat["usage"]["completion_tokens"] == 32  # a prompt that fills it: half a context more


def test_service_interface(app):
    service: GenerationService = app.extensions["fable.service"]
    params = requested({"max_new_tokens": 5})
    completion = service.generate("endless", "Once", params)
    assert completion.text == ENDLESS_CHAR * 5 and completion.finish_reason == "length"
    assert completion.prompt_tokens == 5 and completion.completion_tokens == 5
    stream = service.stream("tiny-gpt", "Once", requested({"seed": 1}))
    pieces = list(stream)
    assert stream.completion.text == "".join(pieces) and not stream.timed_out
    middle = service.infill("endless", "First.", "Last.", params)
    assert middle.text == ENDLESS_CHAR * 5
    with pytest.raises(UnknownModel):
        service.generate("nope", "x")
    assert service.active == 0


def test_service_deadline_with_a_fake_clock(app):
    now = [0.0]
    service = GenerationService(app.extensions["fable.registry"], request_timeout_s=10,
                                clock=lambda: now[0])
    stream = service.stream("endless", "x", requested({"max_new_tokens": 100}))
    assert [next(stream), next(stream)] == [ENDLESS_CHAR] * 2
    now[0] = 10.0
    assert list(stream) == []
    assert stream.timed_out and stream.completion.finish_reason == "length"
    assert stream.completion.text == ENDLESS_CHAR * 2 and stream.completion.completion_tokens == 2
    assert service.active == 0


def test_service_slots_are_bounded(app):
    service = GenerationService(app.extensions["fable.registry"], max_batch=2, max_queue=0,
                                queue_timeout_s=0)
    first, second = hold_row(service), hold_row(service)
    with pytest.raises(ServerBusy):
        service.stream("endless", "x")
    first.close()
    first.close()  # idempotent
    third = hold_row(service)
    assert service.active == 2
    del second, third  # garbage-collected streams give their slots back too
    assert service.active == 0


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("FABLE_MAX_NEW_TOKENS", "100")
    monkeypatch.setenv("FABLE_REQUEST_TIMEOUT_S", "2.5")
    monkeypatch.setenv("FABLE_WORKERS", "2")
    monkeypatch.setenv("FABLE_DEVICE", "CPU")
    monkeypatch.delenv("FABLE_TORCH_THREADS", raising=False)
    monkeypatch.delenv("FABLE_MAX_BATCH", raising=False)
    settings = Settings.load(overrides={"FABLE_REQUEST_TIMEOUT_S": 9})
    assert settings.max_new_tokens == 100 and settings.default_new_tokens is None  # the model's
    assert settings.request_timeout_s == 9 and settings.device == "cpu"
    assert settings.max_body_bytes == 65536 and settings.admin_token is None
    from app.platform.settings import available_cores
    assert settings.max_batch == 16 and settings.max_queue == 48
    assert settings.torch_threads == max(1, (available_cores() - 1) // 2)  # two workers share the cores but one
    for name, value, words in [("FABLE_MAX_NEW_TOKENS", "lots", "must be an integer"),
                               ("FABLE_MAX_PROMPT_CHARS", "0", ">= 1"),
                               ("FABLE_REQUEST_TIMEOUT_S", "nan", "finite"),
                               ("FABLE_DEVICE", "tpu", "FABLE_DEVICE"),
                               ("FABLE_DEFAULT_NEW_TOKENS", "101", "above"),
                               ("FABLE_ADMIN_TOKEN", "short", "16")]:
        with pytest.raises(SettingsError, match=words) as info:
            Settings.load(overrides={name: value})
        assert name in str(info.value)


def test_form_values_validate_with_the_same_rules():
    limits = Limits(100, 50, 10)
    form_model = request_models(limits).generate_form
    form, problems = check_form(form_model, {"model": "m", "temperature": "0.7",
                                             "max_new_tokens": "20", "top_k": "", "seed": "3",
                                             "stop": "."})
    values = sampling_values(form)
    assert problems == {} and values == {"temperature": 0.7, "max_new_tokens": 20, "seed": 3,
                                         "stop": ["."]}
    assert requested(values)["max_new_tokens"] == 20
    _, problems = check_form(form_model, {"model": "m", "max_new_tokens": "51", "top_p": "high"})
    assert problems == {"max_new_tokens": "'max_new_tokens' must be between 1 and 50, got 51",
                        "top_p": "'top_p' must be a number, got \"high\""}


# ---- fuzzing both generation routes against the OpenAPI document ------------------------------

def test_random_bodies_get_documented_answers_never_a_500(make_app, spec):
    """Any JSON body, valid or not, gets a documented status and body: 200, or a 4xx
    naming a field; never a 5xx (a deterministic refusal must not be retried)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    client = make_app(FABLE_MAX_NEW_TOKENS=16, FABLE_DEFAULT_NEW_TOKENS=4).test_client()
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.sampled_from(
        [0, 1, -1, 2, 2 ** 64, -(2 ** 63) - 1]), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12), st.sampled_from(["", "\ud800", "tiny-gpt", "../x"]))
    values = st.one_of(scalars, st.lists(scalars, max_size=5),
                       st.dictionaries(st.sampled_from(["include_usage", "temperature", "x"]),
                                       scalars, max_size=2))
    sampling = ["temperature", "top_k", "top_p", "seed", "stop", "repetition_penalty"]
    keys = {GEN: ["prompt", "suffix", "stream", "format", "max_new_tokens", *sampling],
            CMPL: ["prompt", "suffix", "stream", "stream_options", "max_tokens", "n", "echo",
                   "logprobs", "presence_penalty", "best_of", "logit_bias", *sampling]}

    length, penalty = st.integers(1, 16), st.floats(0.5, 2)
    valid = {"prompt": st.text(max_size=20), "suffix": st.text(max_size=10),
             "stream": st.booleans(), "format": st.just(""), "max_new_tokens": length,
             "max_tokens": length, "num_predict": length, "temperature": st.floats(0, 2),
             "top_k": st.integers(1, 50), "top_p": st.floats(0.01, 1),
             "seed": st.integers(0, 2 ** 32), "repetition_penalty": penalty,
             "repeat_penalty": penalty,
             "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
             "n": st.just(1), "echo": st.just(False), "logprobs": st.none() | st.integers(0, 3),
             "presence_penalty": st.just(0), "best_of": st.just(1), "logit_bias": st.just({}),
             "mirostat": st.just(0), "num_ctx": st.integers()}

    @st.composite
    def requests(draw):
        """Half the bodies are meant to be valid (mostly 200s); the rest mix in anything."""
        path = draw(st.sampled_from([GEN, CMPL]))
        meant_valid = draw(st.booleans())

        def fields(names):
            chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=5))
            return {k: draw(valid[k] if meant_valid else st.one_of(valid[k], values))
                    for k in chosen}
        body = fields(keys[path])
        if path == GEN and draw(st.booleans()):
            body["options"] = fields(["num_predict", "repeat_penalty", "mirostat", "num_ctx",
                                      *sampling])
        if path == CMPL and meant_valid and body.get("stream") is not True:
            body.pop("stream_options", None)
        body["model"] = draw(st.sampled_from(MODELS) if meant_valid
                             else st.one_of(st.sampled_from(MODELS), scalars))
        return path, body

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(requests())
    def run(request):
        path, body = request
        response = client.post(path, data=json.dumps(body), content_type="application/json")
        assert response.status_code in (200, 400, 404), (body, response.get_data(as_text=True))
        STATUSES.append(response.status_code)
        if response.status_code != 200:
            check(response.json, documented(spec, path, "post", response.status_code), spec)
        elif response.mimetype == "application/json":
            check(response.json, documented(spec, path, "post", 200), spec)
        elif response.mimetype == "application/x-ndjson":
            for line in ndjson(response):
                assert "error" not in line
                check(line, documented(spec, path, "post", 200, "application/x-ndjson"), spec)
        else:
            events = sse(response)
            assert events[-1] == "[DONE]"
            for event in events[:-1]:
                check(event, spec["components"]["schemas"]["Completion"], spec)

    STATUSES: list[int] = []
    run()
    assert STATUSES.count(200) > len(STATUSES) // 4  # the valid half mostly succeeds


def test_ollama_show_and_ps_are_documented_and_say_the_models_defaults(client, spec):
    shown = client.post("/api/show", json={"model": "tiny-gpt"})
    assert shown.status_code == 200
    check(shown.json, documented(spec, "/api/show", "post", 200), spec)
    assert shown.json["parameters"].splitlines()[0] == "temperature 1"  # NEUTRAL: no file
    assert shown.json["model_info"]["gpt.context_length"] == 64 and shown.json["template"] == "{{ .Prompt }}"
    assert client.post("/api/show", json={"name": "tiny-lstm"}).json["capabilities"] == ["completion"]
    missing = client.post("/api/show", json={"model": "nope"})
    assert missing.status_code == 404 and missing.json == {"error": "model 'nope' not found"}
    check(missing.json, documented(spec, "/api/show", "post", 404), spec)
    assert client.post("/api/show", json={}).status_code == 400
    running = client.get("/api/ps")
    check(running.json, documented(spec, "/api/ps", "get", 200), spec)
    assert [m["name"] for m in running.json["models"]] == list(MODELS)
    assert all(m["size_vram"] == 0 for m in running.json["models"])  # served on the CPU
