"""The OpenAPI 3.1 description of every JSON route, served at ``GET /openapi.json``.

Written by hand as a Python dict, next to the code it describes, and precise enough for
a schema-driven fuzzer (schemathesis) to test the server against it: the limits
(prompt length, new tokens) are the running server's. ``null`` is accepted wherever a
field is optional, as the server treats it as "not given".
"""

from __future__ import annotations

from typing import Any

from .settings import Limits
from .validation import (MAX_MODEL_NAME, MAX_REPETITION_PENALTY, MAX_STOP, MAX_STOP_CHARS,
                         MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SEED_MAX, SEED_MIN)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    """The schema, or null ("not given")."""
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict, required: tuple[str, ...] = (), *, extra: bool = False,
         description: str | None = None) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": properties,
                              "additionalProperties": extra}
    if required:
        schema["required"] = list(required)
    if description:
        schema["description"] = description
    return schema


def _body(name: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _json(schema: dict, description: str = "") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(shape: str, *codes: int) -> dict:
    text = {400: "Invalid request (the message names the field)", 401: "Admin token missing",
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


def _sampling(limits: Limits, *, length: str, penalty: str, max_temperature: float | None) -> dict:
    temperature = {"type": "number", "minimum": 0,
                   "description": f"0 (or below {MIN_TEMPERATURE:g}) = greedy"}
    if max_temperature is not None:
        temperature["maximum"] = max_temperature
    length_schema: dict = {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens,
                           "description": f"New tokens at most; default "
                                          f"{limits.default_new_tokens}"}
    if length == "num_predict":  # Ollama's -1: the server default
        length_schema = {"anyOf": [length_schema, {"const": -1}],
                         "description": f"-1 or unset: the server default "
                                        f"({limits.default_new_tokens})"}
    return {
        "temperature": _nullable(temperature),
        length: _nullable(length_schema),
        "top_k": _nullable({"type": "integer", "minimum": 1}),
        "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
        penalty: _nullable({"type": "number", "minimum": MIN_REPETITION_PENALTY,
                            "maximum": MAX_REPETITION_PENALTY,
                            "description": "1 = off; > 1 discourages repeats"}),
        "seed": _nullable({"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}),
        "stop": _nullable(_ref("Stop")),
    }


def build_spec(version: str, limits: Limits) -> dict:
    prompt = {"type": "string", "maxLength": limits.max_prompt_chars}
    model = {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_NAME}
    ollama_sampling = _sampling(limits, length="max_new_tokens", penalty="repetition_penalty",
                                max_temperature=None)
    options = _obj(_sampling(limits, length="num_predict", penalty="repeat_penalty",
                             max_temperature=None), extra=True,
                   description="Ollama's options; unknown ones are ignored. They win over "
                               "the same settings given at the top level.")
    counts = {"type": "integer", "minimum": 0}
    schemas: dict[str, Any] = {
        "Stop": {"anyOf": [
            {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
            {"type": "array", "items": {"type": "string", "minLength": 1,
                                        "maxLength": MAX_STOP_CHARS}, "maxItems": MAX_STOP},
        ], "description": "The text ends before the first match; the match is not returned"},
        "OllamaOptions": options,
        "GenerateRequest": _obj({
            "model": model,
            "prompt": _nullable({**prompt, "description": "Empty: start from the beginning"}),
            "suffix": _nullable({**prompt, "description": "Story infilling: prompt is the first "
                                 "sentence, suffix the last; the response is the middle. The "
                                 "prompt and suffix together are limited too."}),
            "stream": _nullable({"type": "boolean", "default": True}),
            "options": _nullable(_ref("OllamaOptions")),
            **ollama_sampling,
            "format": _nullable({"const": "", "description": "Structured output is not "
                                                             "supported: only empty"}),
            "images": _nullable({"type": "array", "maxItems": 0}),
        }, ("model",), extra=True, description="Ollama's generate request; system, template, "
                                               "raw, keep_alive, think, context are ignored"),
        "GenerateChunk": _obj({
            "model": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
            "response": {"type": "string"}, "done": {"const": False},
        }, ("model", "created_at", "response", "done")),
        "GenerateFinal": _obj({
            "model": {"type": "string"}, "created_at": {"type": "string", "format": "date-time"},
            "response": {"type": "string", "description": "Whole text (stream false), else empty"},
            "done": {"const": True}, "done_reason": {"enum": ["stop", "length"]},
            "total_duration": counts, "load_duration": counts, "prompt_eval_count": counts,
            "prompt_eval_duration": counts, "eval_count": counts, "eval_duration": counts,
        }, ("model", "created_at", "response", "done", "done_reason", "total_duration",
            "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
            "eval_duration"), description="Durations in nanoseconds; load_duration is the wait "
                                          "for a generation slot"),
        "Error": _obj({"error": {"type": "string"}}, ("error",)),
        "Tags": _obj({"models": {"type": "array", "items": _obj({
            "name": {"type": "string"}, "model": {"type": "string"},
            "modified_at": {"type": "string", "format": "date-time"},
            "size": counts, "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "details": _obj({
                "parent_model": {"type": "string"}, "format": {"type": "string"},
                "family": {"type": "string"},
                "families": {"type": "array", "items": {"type": "string"}},
                "parameter_size": {"type": "string"}, "quantization_level": {"type": "string"},
            }, ("format", "family", "parameter_size")),
        }, ("name", "model", "modified_at", "size", "digest", "details"))}}, ("models",)),
        "Version": _obj({"version": {"type": "string"}}, ("version",)),
        "ModelFacts": _obj({
            "name": {"type": "string"}, "architecture": {"type": "string"},
            "parameters": counts, "tokenizer": {"type": "string"}, "vocab_size": counts,
            "context": _nullable(counts), "n_layer": counts, "n_embd": counts,
            "dtype": {"type": "string"}, "device": {"type": "string"}, "size_bytes": counts,
            "modified_at": {"type": "string", "format": "date-time"},
            "digest": {"type": "string"}, "can_infill": {"type": "boolean"},
            "val_perplexity": _nullable({"type": "number"}),
            "val_loss": _nullable({"type": "number"}),
            "bits_per_char": _nullable({"type": "number"}),
            "token_accuracy": _nullable({"type": "number"}),
            "tokens_seen": _nullable({"type": "number"}),
            "training_time_s": _nullable({"type": "number"}), "step": _nullable({"type": "number"}),
            "data": {"description": "Training data, as the trainer recorded it"},
            "hardware": {"description": "Training hardware, as the trainer recorded it"},
        }, ("name", "architecture", "parameters", "tokenizer", "vocab_size", "device",
            "size_bytes", "modified_at", "can_infill")),
        "Models": _obj({
            "models": {"type": "array", "items": _ref("ModelFacts")},
            "errors": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "Checkpoint directories that failed to load -> why"},
            "device": {"type": "string"},
            "service": _obj({"active": counts, "queued": counts, "max_batch": counts,
                             "max_queue": counts,
                             "queue_timeout_s": {"type": "number"},
                             "request_timeout_s": {"type": "number"}}, extra=True),
        }, ("models", "errors", "device")),
        "Health": _obj({"status": {"type": "string"}, "models": counts, "errors": counts,
                        "active": counts}, ("status", "models", "errors")),
        "CompletionRequest": _obj({
            "model": model,
            "prompt": _nullable({"anyOf": [prompt, {"type": "array", "items": prompt,
                                                    "minItems": 1, "maxItems": 1}]}),
            "suffix": _nullable({**prompt, "description": "Story infilling (see /api/generate)"}),
            **_sampling(limits, length="max_tokens", penalty="repetition_penalty",
                        max_temperature=2),
            "stream": _nullable({"type": "boolean", "default": False}),
            "stream_options": _nullable(_obj({"include_usage": _nullable({"type": "boolean"})},
                                             extra=True)),
            "n": _nullable({"const": 1}), "best_of": _nullable({"const": 1}),
            "echo": _nullable({"const": False}),
            "logprobs": _nullable({"const": 0}),
            "presence_penalty": _nullable({"const": 0}),
            "frequency_penalty": _nullable({"const": 0}),
            "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
            "user": {"description": "Ignored"},
        }, ("model",), extra=True, description="OpenAI's completion request; top_k and "
                                               "repetition_penalty are extras (as in vLLM). "
                                               "stream_options needs stream true."),
        "CompletionChoice": _obj({
            "text": {"type": "string"}, "index": {"const": 0}, "logprobs": {"type": "null"},
            "finish_reason": _nullable({"enum": ["stop", "length"]}),
        }, ("text", "index", "logprobs", "finish_reason")),
        "Usage": _obj({"prompt_tokens": counts, "completion_tokens": counts,
                       "total_tokens": counts}, ("prompt_tokens", "completion_tokens",
                                                 "total_tokens")),
        "Completion": _obj({
            "id": {"type": "string"}, "object": {"const": "text_completion"},
            "created": counts, "model": {"type": "string"},
            "choices": {"type": "array", "items": _ref("CompletionChoice"), "maxItems": 1},
            "usage": _nullable(_ref("Usage")),
        }, ("id", "object", "created", "model", "choices"),
            description="Also the shape of each streamed chunk (usage only on the last one, "
                        "with stream_options.include_usage)"),
        "OpenAIError": _obj({"error": _obj({
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": _nullable({"type": "string"}), "code": _nullable({"type": "string"}),
        }, ("message", "type", "param", "code"))}, ("error",)),
        "OpenAIModel": _obj({"id": {"type": "string"}, "object": {"const": "model"},
                             "created": counts, "owned_by": {"type": "string"}},
                            ("id", "object", "created", "owned_by")),
        "OpenAIModelList": _obj({"object": {"const": "list"},
                                 "data": {"type": "array", "items": _ref("OpenAIModel")}},
                                ("object", "data")),
    }
    # As OpenAI's: stream_options (when not null) is refused unless stream is true.
    schemas["CompletionRequest"].update({
        "if": {"properties": {"stream_options": {"type": "object"}},
               "required": ["stream_options"]},
        "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
    })
    ndjson = {"schema": {"anyOf": [_ref("GenerateChunk"), _ref("GenerateFinal"), _ref("Error")]},
              "description": "One JSON object per line: chunks, then the final object (or an "
                             "error object if generation fails mid-stream)"}
    sse = {"schema": {"type": "string"},
           "description": "Server-sent events: `data: <Completion chunk JSON>` per piece, the "
                          "last chunk with finish_reason, an optional usage chunk, then "
                          "`data: [DONE]`"}
    paths = {
        "/api/generate": {"post": {
            "operationId": "generate", "tags": ["ollama"],
            "summary": "Generate or infill text (Ollama's API)",
            "requestBody": _body("GenerateRequest"),
            "responses": {"200": {"description": "NDJSON stream (default) or, with "
                                                 "stream false, one JSON object",
                                  "content": {
                                      "application/x-ndjson": ndjson,
                                      "application/json": {"schema": _ref("GenerateFinal")}},
                                  "headers": {"X-Accel-Buffering": {"schema": {"type": "string"}}}},
                          **_errors("Error", 400, 404, 413, 415, 429, 500, 503)}}},
        "/api/tags": {"get": {"operationId": "tags", "tags": ["ollama"],
                              "summary": "Loaded models (Ollama's list)",
                              "responses": {"200": _json(_ref("Tags"), "Models")}}},
        "/api/version": {"get": {"operationId": "version", "tags": ["ollama"],
                                 "summary": "Server version",
                                 "responses": {"200": _json(_ref("Version"), "Version")}}},
        "/api/models": {"get": {"operationId": "models", "tags": ["admin"],
                                "summary": "Every fact about the loaded models, and load errors",
                                "security": [{}, {"adminToken": []}],
                                "responses": {"200": _json(_ref("Models"), "Models"),
                                              **_errors("Error", 401)}}},
        "/healthz": {"get": {"operationId": "health", "tags": ["admin"],
                             "summary": "200 with at least one model loaded, 503 with none",
                             "responses": {"200": _json(_ref("Health"), "Serving"),
                                           "503": _json(_ref("Health"), "No model loaded")}}},
        "/openapi.json": {"get": {"operationId": "openapi", "tags": ["admin"],
                                  "summary": "This document",
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")}}},
        "/v1/completions": {"post": {
            "operationId": "createCompletion", "tags": ["openai"],
            "summary": "Text completion or infilling (OpenAI's API)",
            "requestBody": _body("CompletionRequest"),
            "responses": {"200": {"description": "A completion, or with stream true a stream "
                                                 "of completion chunks",
                                  "content": {"application/json": {"schema": _ref("Completion")},
                                              "text/event-stream": sse}},
                          **_errors("OpenAIError", 400, 404, 413, 415, 429, 500, 503)}}},
        "/v1/models": {"get": {"operationId": "listModels", "tags": ["openai"],
                               "summary": "Loaded models (OpenAI's list)",
                               "responses": {"200": _json(_ref("OpenAIModelList"), "Models")}}},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel", "tags": ["openai"], "summary": "One model",
            "parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": _json(_ref("OpenAIModel"), "The model"),
                          **_errors("OpenAIError", 404)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Fable", "version": version,
                 "description": "Serve small language models: an Ollama-compatible and an "
                                "OpenAI-compatible generation API."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                                          "description": "FABLE_ADMIN_TOKEN, when "
                                                                         "the server sets one"}}},
    }
