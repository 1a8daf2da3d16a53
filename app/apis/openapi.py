"""The OpenAPI 3.1 description of every JSON route, served at ``GET /openapi.json``.

Request bodies are the pydantic models that validate them (app.serving.schema, with the running
server's limits; the tokenizer routes' and /api/show's, which are read by hand, below);
responses are the models the routes build them from (app.apis.responses). Precise enough
for schemathesis to test the server against it (tests/apis/test_schema.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from app.apis.responses import (ChatChunk, ChatCompletion, ChatCompletionChunk, ChatFinal, ChatLoaded,
                                Completion, Detokenized, Error, GenerateChunk, GenerateFinal,
                                GenerateLoaded, Health, Models, OpenAIError, OpenAIModel,
                                OpenAIModelList, Processes, Reloaded, Show, Tags, Tokenized,
                                TokenizerInfo, Version)
from app.platform.settings import Limits
from app.serving.schema import request_models


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The bodies of the routes that read theirs by hand (documented only)

class TokenizeRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model (may be left out when the server "
                                                 "has one)")
    prompt: str
    add_special_tokens: bool | None = Field(None, description="A bos first where the model's "
                                                              "tokenizer adds one (default true)")
    return_token_strs: bool | None = None


class DetokenizeRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model (may be left out when the server "
                                                 "has one)")
    tokens: list[Annotated[int, Field(ge=0)]]


class ShowRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model's name (Ollama's older clients send 'name')")
    verbose: bool | None = None


RESPONSES = (GenerateChunk, GenerateFinal, ChatChunk, ChatFinal, GenerateLoaded, ChatLoaded, Error,
             Tags, ShowRequest, Show, Processes, Version, Models, Reloaded,
             TokenizeRequest, Tokenized, DetokenizeRequest, Detokenized, TokenizerInfo,
             Health, Completion, ChatCompletion, ChatCompletionChunk, OpenAIError,
             OpenAIModelList, OpenAIModel)


class _Generator(GenerateJsonSchema):
    """pydantic's JSON Schema, without a title on every property."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def schemas(limits: Limits) -> dict[str, Any]:
    """Every request and response schema, by name."""
    models = request_models(limits)
    _, document = models_json_schema(
        [(models.generate, "validation"), (models.completion, "validation"),
         (models.chat, "validation"), (models.chat_completion, "validation"),
         *((model, "serialization") for model in RESPONSES)],
        ref_template="#/components/schemas/{model}", schema_generator=_Generator)
    defs = document["$defs"]
    # the tokenizer routes take what a prompt may hold (their models are not built per limits)
    defs["TokenizeRequest"]["properties"]["prompt"]["maxLength"] = limits.max_prompt_chars
    defs["DetokenizeRequest"]["properties"]["tokens"]["maxItems"] = limits.max_prompt_chars
    return defs


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str = "") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(shape: str, *codes: int) -> dict:
    text = {400: "Invalid request (the message names the field)",
            401: "Key missing or wrong (the admin token for /api/models, else FABLE_API_KEYS)",
            404: "Unknown model or route", 405: "Method not allowed",
            413: "Request body too large", 415: "Content-Type is not application/json",
            429: "Over the client's rate limit (FABLE_RATE_LIMIT); retry later",
            500: "Server fault", 503: "Server busy or no model loaded; retry later"}
    out = {}
    for code in codes:
        response = _json(_ref(shape), text[code])
        if code in (429, 503):
            response["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                                   "description": "Seconds to wait"}}
        out[str(code)] = response
    return out


def _get(operation: str, tag: str, summary: str, responses: dict, **extra: Any) -> dict:
    return {"get": {"operationId": operation, "tags": [tag], "summary": summary,
                    "responses": responses, **extra}}


def _post(operation: str, tag: str, summary: str, body: str, responses: dict) -> dict:
    return {"post": {"operationId": operation, "tags": [tag], "summary": summary,
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": _ref(body)}}},
                     "responses": responses, "security": API_KEY}}


#: The generation APIs: open, or with FABLE_API_KEYS set, a key
API_KEY = [{}, {"apiKey": []}]


def _ollama_generation(operation: str, summary: str, body: str, chunk: str, final: str,
                       loaded: str) -> dict:
    ndjson = {"schema": {"anyOf": [_ref(chunk), _ref(final), _ref("Error")]},
              "description": "One JSON object per line: chunks, then the final object (or an "
                             "error object if generation fails mid-stream)"}
    return _post(operation, "ollama", summary, body, {
        "200": {"description": "NDJSON stream (default) or, with stream false, one JSON object",
                "content": {"application/x-ndjson": ndjson,
                            "application/json": {"schema": {"anyOf": [_ref(final), _ref(loaded)]}}},
                "headers": {"X-Accel-Buffering": {"schema": {"type": "string"}}}},
        **_errors("Error", 400, 401, 404, 413, 415, 429, 500, 503)})


def _sse_events(chunk: str, error: str) -> dict:
    """One server-sent event (OpenAPI before 3.2 describes each event with ``schema``): its
    data is a JSON chunk, an error object, or the closing ``[DONE]``."""
    return {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "if": {"const": "[DONE]"},
        "else": {"contentMediaType": "application/json",
                 "contentSchema": {"anyOf": [_ref(chunk), _ref(error)]}}}}}


def _openai_generation(operation: str, summary: str, body: str, whole: str, chunk: str) -> dict:
    sse = {"schema": _sse_events(chunk, "OpenAIError"),
           "description": f"Server-sent events: `data: <{chunk} JSON>` per piece, the last "
                          f"chunk with finish_reason, an optional usage chunk, then "
                          f"`data: [DONE]` (an error object instead, if generation fails "
                          f"mid-stream)"}
    return _post(operation, "openai", summary, body, {
        "200": {"description": "One answer, or with stream true a stream of chunks",
                "content": {"application/json": {"schema": _ref(whole)}, "text/event-stream": sse}},
        **_errors("OpenAIError", 400, 401, 404, 413, 415, 429, 500, 503)})


def build_spec(version: str, limits: Limits) -> dict:
    paths = {
        "/api/generate": _ollama_generation("generate", "Generate or infill text (Ollama's API)",
                                            "GenerateRequest", "GenerateChunk", "GenerateFinal",
                                            "GenerateLoaded"),
        "/api/chat": _ollama_generation("chat", "Reply to a conversation (Ollama's API)",
                                        "ChatRequest", "ChatChunk", "ChatFinal", "ChatLoaded"),
        "/api/tags": _get("tags", "ollama", "Loaded models (Ollama's list)",
                          {"200": _json(_ref("Tags"), "Models"), **_errors("Error", 401)},
                          security=API_KEY),
        "/api/show": _post("show", "ollama", "A model's details, parameters, template and shape "
                           "(Ollama's show)", "ShowRequest",
                           {"200": _json(_ref("Show"), "The model"),
                            **_errors("Error", 400, 401, 404, 413, 415)}),
        "/api/ps": _get("ps", "ollama", "Models in memory (Ollama's list of running models)",
                        {"200": _json(_ref("Processes"), "Models"), **_errors("Error", 401)},
                        security=API_KEY),
        "/api/version": _get("version", "ollama", "Server version",
                             {"200": _json(_ref("Version"), "Version"), **_errors("Error", 401)},
                             security=API_KEY),
        "/api/models": _get("models", "admin", "Every fact about the loaded models, and load "
                            "errors", {"200": _json(_ref("Models"), "Models"),
                                       **_errors("Error", 401)},
                            security=[{}, {"adminToken": []}]),
        "/api/models/reload": {"post": {
            "operationId": "reloadModels", "tags": ["admin"],
            "summary": "Load new, reload changed and unload removed checkpoints, in every worker",
            "responses": {"200": _json(_ref("Reloaded"), "What changed"),
                          **_errors("Error", 401)},
            "security": [{}, {"adminToken": []}]}},
        "/healthz": _get("health", "admin", "200 with at least one model loaded, 503 with none",
                         {"200": _json(_ref("Health"), "Serving"),
                          "503": _json(_ref("Health"), "No model loaded")}),
        "/metrics": _get("metrics", "admin", "Prometheus metrics, every worker's together",
                         {"200": {"description": "Prometheus's text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors("Error", 401)},
                         security=[{}, {"adminToken": []}]),
        "/openapi.json": _get("openapi", "admin", "This document",
                              {"200": _json({"type": "object"}, "OpenAPI 3.1")}),
        "/v1/completions": _openai_generation(
            "createCompletion", "Text completion or infilling (OpenAI's API)",
            "CompletionRequest", "Completion", "Completion"),
        "/v1/chat/completions": _openai_generation(
            "createChatCompletion", "Reply to a conversation (OpenAI's API)",
            "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
        "/tokenize": _post("tokenize", "vllm", "A prompt's token ids (vLLM's route)", "TokenizeRequest",
                           {"200": _json(_ref("Tokenized"), "The ids"),
                            **_errors("OpenAIError", 400, 401, 404, 413, 415, 429)}),
        "/detokenize": _post("detokenize", "vllm", "The text of token ids (vLLM's route)",
                             "DetokenizeRequest", {"200": _json(_ref("Detokenized"), "The text"),
                                                   **_errors("OpenAIError", 400, 401, 404, 413, 415, 429)}),
        "/tokenizer_info": _get(
            "tokenizerInfo", "vllm", "A model's tokenizer: special tokens, context, chat template "
            "(vLLM's route)", {"200": _json(_ref("TokenizerInfo"), "The tokenizer"),
                              **_errors("OpenAIError", 400, 401, 404)},
            security=API_KEY, parameters=[{"name": "model", "in": "query", "required": True,
                                           "schema": {"type": "string", "minLength": 1},
                                           "description": "A loaded model (may be left out when the "
                                                          "server has one)"}]),
        "/v1/models": _get("listModels", "openai", "Loaded models (OpenAI's list)",
                           {"200": _json(_ref("OpenAIModelList"), "Models"),
                            **_errors("OpenAIError", 401)}, security=API_KEY),
        "/v1/models/{model}": _get(
            "retrieveModel", "openai", "One model",
            {"200": _json(_ref("OpenAIModel"), "The model"), **_errors("OpenAIError", 401, 404)},
            security=API_KEY, parameters=[{"name": "model", "in": "path", "required": True,
                         "schema": {"type": "string"}}]),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Fable", "version": version,
                 "description": "Serve small language models: an Ollama-compatible and an "
                                "OpenAI-compatible generation API."},
        "paths": paths,
        "components": {"schemas": schemas(limits),
                       "securitySchemes": {
                           "adminToken": {"type": "http", "scheme": "bearer",
                                          "description": "FABLE_ADMIN_TOKEN, when the server "
                                                         "sets one"},
                           "apiKey": {"type": "http", "scheme": "bearer",
                                      "description": "One of FABLE_API_KEYS, when the server "
                                                     "sets them"}}},
    }
