"""The OpenAPI 3.1 description of every JSON route, served at ``GET /openapi.json``.

Request bodies are the pydantic models that validate them (app.serving.schema, with the running
server's limits); responses are the models below. Precise enough for schemathesis to
test the server against it (tests/test_schema.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import GenerateJsonSchema, models_json_schema

from app.platform.settings import Limits
from app.serving.registry import ModelFacts
from app.serving.schema import MAX_PROMPTS, request_models

Count = Annotated[int, Field(ge=0)]
Reason = Literal["stop", "length"]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OllamaTokenLogprob(_Shape):
    token: str
    logprob: float


class OllamaLogprob(OllamaTokenLogprob):
    """A generated token's log-probability under the model (before temperature and the
    other processors), and the likeliest tokens at its position"""
    top_logprobs: list[OllamaTokenLogprob]


OllamaLogprobs = Annotated[list[OllamaLogprob] | None,
                           Field(description="With logprobs true: the tokens of this object")]


class _Ollama(_Shape):
    model: str
    created_at: datetime
    logprobs: OllamaLogprobs = None


class _OllamaFinal(_Ollama):
    """Durations in nanoseconds; load_duration is the wait for a generation slot"""
    done: Literal[True]
    done_reason: Reason
    total_duration: Count
    load_duration: Count
    prompt_eval_count: Count
    prompt_eval_duration: Count
    eval_count: Count
    eval_duration: Count


class AssistantMessage(_Shape):
    role: Literal["assistant"]
    content: str


class GenerateChunk(_Ollama):
    response: str
    done: Literal[False]


class GenerateFinal(_OllamaFinal):
    response: str = Field(description="Whole text (stream false), else empty")


class ChatChunk(_Ollama):
    message: AssistantMessage
    done: Literal[False]


class ChatFinal(_OllamaFinal):
    message: AssistantMessage = Field(description="Whole reply (stream false), else empty")


class _Housekeeping(_Shape):
    """Ollama's answer to a request with nothing to generate from: "load", or "unload" with
    keep_alive 0 (every model stays loaded here either way)"""
    model: str
    created_at: datetime
    done: Literal[True]
    done_reason: Literal["load", "unload"]


class GenerateLoaded(_Housekeeping):
    response: Literal[""]


class ChatLoaded(_Housekeeping):
    message: AssistantMessage


class Error(_Shape):
    error: str


class TagDetails(_Shape):
    parent_model: str = ""
    format: str
    family: str
    families: list[str] = []
    parameter_size: str
    quantization_level: str = ""


class Tag(_Shape):
    name: str
    model: str
    modified_at: datetime
    size: Count
    digest: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    details: TagDetails


class Tags(_Shape):
    models: list[Tag]


class TokenizeRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model (may be left out when the server "
                                                 "has one)")
    prompt: str
    add_special_tokens: bool | None = Field(None, description="A bos first where the model's "
                                                              "tokenizer adds one (default true)")
    return_token_strs: bool | None = None


class Tokenized(_Shape):
    count: Count
    max_model_len: Count | None = Field(description="The model's context (null: a recurrent model)")
    tokens: list[Count]
    token_strs: list[str] | None


class DetokenizeRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model (may be left out when the server "
                                                 "has one)")
    tokens: list[Annotated[int, Field(ge=0)]]


class Detokenized(_Shape):
    prompt: str


class TokenizerInfo(_Shape):
    model: str
    tokenizer_class: str
    kind: str = Field(description="char, word, bpe, gpt2 or hf")
    vocab_size: Count
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool
    model_max_length: Count | None
    chat_template: str | None


class ShowRequest(_Shape):
    model: str = Field(min_length=1, description="A loaded model's name (Ollama's older clients send 'name')")
    verbose: bool | None = None


class Show(_Shape):
    modelfile: str = Field(description="A Modelfile that would make this model in Ollama")
    parameters: str = Field(description="The model's sampling defaults, one 'name value' a line")
    template: str = Field(description="Its chat template where its tokenizer has one, else "
                                      "'{{ .Prompt }}' (the text passes unchanged)")
    details: TagDetails
    model_info: dict[str, str | int] = Field(description="Its shape: architecture, parameters, "
                                                         "width, depth, context, tokenizer")
    modified_at: datetime
    capabilities: list[Literal["completion", "insert"]] = Field(
        description="'insert': it infills (a suffix is welcome)")


class Process(_Shape):
    name: str
    model: str
    size: Count
    digest: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
    details: TagDetails
    expires_at: datetime = Field(description="Never: every model stays loaded")
    size_vram: Count
    context_length: int | None


class Processes(_Shape):
    models: list[Process]


class Version(_Shape):
    version: str


class ServiceStats(BaseModel):
    active: Count = 0
    queued: Count = 0
    max_batch: Count = 0
    max_queue: Count = 0
    queue_timeout_s: float = 0
    request_timeout_s: float = 0


class Models(_Shape):
    models: list[ModelFacts]
    errors: dict[str, str] = Field(description="Checkpoint directories that failed to load "
                                               "-> why")
    device: str
    service: ServiceStats | None = None


class Reloaded(_Shape):
    """What changed in the worker that answered; every other worker follows within a
    second"""
    added: list[str]
    reloaded: list[str]
    removed: list[str]
    failed: dict[str, str] = Field(description="Checkpoints that failed to load -> why (a "
                                               "loaded version stays)")
    unchanged: list[str]
    models: list[str] = Field(description="The models now loaded")


class Health(_Shape):
    """Liveness and load: ``full`` while every decoding row and queue place is taken (up,
    but refusing generations with 503)"""
    status: str
    models: Count
    errors: Count
    active: Count = 0
    queued: Count = 0
    full: bool = False


class CompletionLogprobs(_Shape):
    """With logprobs n: each token, its log-probability, the n likeliest tokens at its
    position (a token -> log-probability map) and where it starts in prompt + text. With
    echo the prompt's tokens come first; its first token has none (null)"""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[Count]


class CompletionChoice(_Shape):
    text: str
    index: Annotated[int, Field(ge=0, lt=MAX_PROMPTS, description="Which prompt of a list")]
    logprobs: CompletionLogprobs | None
    finish_reason: Reason | None


class Usage(_Shape):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


class _OpenAI(_Shape):
    """What every OpenAI answer object starts with"""
    id: str
    created: Count
    model: str


class Completion(_OpenAI):
    """Also the shape of each streamed chunk (usage only on the last one, with
    stream_options.include_usage)"""
    object: Literal["text_completion"]
    choices: Annotated[list[CompletionChoice], Field(max_length=MAX_PROMPTS)]
    usage: Usage | None = None


class ChatTokenLogprob(_Shape):
    token: str
    logprob: float
    bytes: list[Annotated[int, Field(ge=0, le=255)]]


class ChatLogprob(ChatTokenLogprob):
    top_logprobs: list[ChatTokenLogprob]


class ChatLogprobs(_Shape):
    """With logprobs true (and top_logprobs n): each token of the text"""
    content: list[ChatLogprob]
    refusal: None = None


class ChatCompletionChoice(_Shape):
    index: Literal[0]
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Reason


class ChatCompletion(_OpenAI):
    object: Literal["chat.completion"]
    choices: Annotated[list[ChatCompletionChoice], Field(min_length=1, max_length=1)]
    usage: Usage


class ChatDelta(_Shape):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Shape):
    index: Literal[0]
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Reason | None


class ChatCompletionChunk(_OpenAI):
    """One streamed chunk: the first delta names the role, the last one carries
    finish_reason; with stream_options.include_usage a final chunk with no choices
    carries usage"""
    object: Literal["chat.completion.chunk"]
    choices: Annotated[list[ChatChunkChoice], Field(max_length=1)]
    usage: Usage | None = None


class OpenAIErrorBody(_Shape):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(_Shape):
    error: OpenAIErrorBody


class OpenAIModel(_Shape):
    id: str
    object: Literal["model"]
    created: Count
    owned_by: str


class OpenAIModelList(_Shape):
    object: Literal["list"]
    data: list[OpenAIModel]


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
