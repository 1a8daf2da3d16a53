"""OpenAI's API for the official ``openai`` client: ``/v1/completions``,
``/v1/chat/completions`` and ``/v1/models``, each answer built as the model that documents
it (app/apis/responses.py). Errors are OpenAI's shape; every deterministic refusal is a 4xx
(the client retries 5xx): docs/web-app.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from datetime import datetime
from typing import NamedTuple, get_args

from flask import Blueprint, jsonify, request
from pydantic import BaseModel

from app.apis.responses import (ChatCompletion, ChatCompletionChunk, Completion, OpenAIError, OpenAIModel,
                                OpenAIModelList, Stencil, Usage, to_json, wire)
from app.platform.ratelimit import rate_limited
from app.platform.settings import get_settings
from app.platform.web import openai_error, retry_headers, streamed
from app.serving.bodies import read_json_object
from app.serving.registry import get_registry
from app.serving.schema import GenerationRequest, RequestError, parse_openai_chat, parse_openai_completion
from app.serving.service import GenerationStream, ServiceError, get_service, open_stream

log = logging.getLogger(__name__)

bp = Blueprint("openai", __name__, url_prefix="/v1")

@bp.errorhandler(RequestError)
def _request_error(e: RequestError):
    code = "unsupported_media_type" if e.status == 415 else "invalid_value" if e.field else None
    return openai_error(e.status, e.message, param=e.field, code=code)


@bp.errorhandler(ServiceError)
def _service_error(e: ServiceError):
    code = {404: "model_not_found", 503: "server_busy"}.get(e.status)
    return openai_error(e.status, e.message, param=e.param, code=code, headers=retry_headers(e))


def _sse(event: BaseModel | str) -> str:
    return f"data: {event if isinstance(event, str) else to_json(event)}\n\n"


def _object(answer: type[BaseModel]) -> str:
    """The ``object`` an answer's model allows (its one value)."""
    return get_args(answer.model_fields["object"].annotation)[0]


class _Kind(NamedTuple):
    """One API's answers: their ids' prefix, the whole answer's model, a streamed chunk's,
    and where a chunk's text is in its JSON."""
    prefix: str
    whole: type[Completion | ChatCompletion]
    chunk: type[Completion | ChatCompletionChunk]
    text: tuple[str | int, ...]


_COMPLETION = _Kind("cmpl", Completion, Completion, ("choices", 0, "text"))
_CHAT = _Kind("chatcmpl", ChatCompletion, ChatCompletionChunk, ("choices", 0, "delta", "content"))


class _TextLogprobs:
    """OpenAI's completion log-probabilities for a run of tokens: their strings (a special
    token as its own), log-probabilities, alternatives and where each starts in the text
    (which shows no special token), counting on from ``offset``. An echoed prompt's first
    token has none: null there."""

    def __init__(self, tokenizer, offset: int) -> None:
        self.tokenizer, self.offset = tokenizer, offset

    def text(self, token_id: int, special: bool = True) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=not special)

    def __call__(self, ids: list[int], entries: list) -> dict:
        offsets = []
        for token_id in ids:
            offsets.append(self.offset)
            self.offset += len(self.text(token_id, special=False))
        return {"tokens": [self.text(i) for i in ids],
                "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [{self.text(i): lp for i, lp in e.top} if e else None for e in entries],
                "text_offset": offsets}


def _joined(first: dict | None, then: dict | None) -> dict | None:
    """Two runs of completion log-probabilities as one (the echoed prompt, then the text)."""
    if first is None or then is None:
        return first or then
    return {key: first[key] + then[key] for key in first}


@bp.post("/completions")
@rate_limited
def completions():
    requests = parse_openai_completion(read_json_object(request), get_settings().limits)
    if len(requests) > 1:
        return _completions(requests)
    req = requests[0]
    echo = _echo(req) if req.echo else None
    if req.score_only:
        return _completions(requests, [echo])
    tokenizer = get_service().model(req.model).tokenizer
    prompt = _prompt_text(req, tokenizer)
    formatted = _TextLogprobs(tokenizer, len(prompt))  # text_offset counts from the prompt's start, as OpenAI's

    def logprobs(stream: GenerationStream, entries: list) -> dict:
        return formatted([e.token_id for e in entries], entries)

    def choice(text: str, finish_reason: str | None, logprobs: dict | None,
               first: bool = False) -> dict:
        if first and echo:  # the echoed prompt leads the text (and its log-probabilities)
            text, logprobs = prompt + text, _joined(echo["logprobs"], logprobs)
        return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish_reason}
    return _respond(req, _COMPLETION, choice, logprobs)


def _prompt_text(req: GenerationRequest, tokenizer) -> str:
    return req.prompt if isinstance(req.prompt, str) else tokenizer.decode(list(req.prompt))


def _echo(req: GenerationRequest) -> dict:
    """The prompt as it comes back with ``echo``: when asked, each token's log-probability
    given those before it (one forward pass, in a row of its own), and its token count."""
    service = get_service()
    top = req.sampling.get("logprobs")
    ids, entries = service.score(req.model, req.prompt, top or 0)
    tokenizer = service.model(req.model).tokenizer
    logprobs = _TextLogprobs(tokenizer, 0)(ids, entries) if top is not None else None
    return {"logprobs": logprobs, "tokens": len(ids)}


def _completions(requests: tuple[GenerationRequest, ...], echoes: list | None = None):
    """Several prompts (or one scored only), each its own choice: the generations start
    together, one row each, so that the engine decodes them side by side."""
    echoes = echoes or [_echo(r) if r.echo else None for r in requests]
    streams: list[GenerationStream | None] = []
    try:
        for req in requests:
            streams.append(None if req.score_only else open_stream(req))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, (req, stream, echo) in enumerate(zip(requests, streams, echoes)):
            tokenizer = get_service().model(req.model).tokenizer
            prompt = _prompt_text(req, tokenizer)
            text, logprobs, finish = "", None, "length"
            if stream is not None:
                completion = stream.collect()
                text, finish = completion.text, completion.finish_reason
                prompt_tokens += completion.prompt_tokens
                completion_tokens += completion.completion_tokens
                if stream.wants_logprobs:
                    entries = completion.logprobs or []
                    logprobs = _TextLogprobs(tokenizer, len(prompt))([e.token_id for e in entries], entries)
            else:
                prompt_tokens += echo["tokens"]
            if echo:
                text, logprobs = prompt + text, _joined(echo["logprobs"], logprobs)
            choices.append({"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish})
    finally:
        for stream in streams:
            if stream is not None:
                stream.close()
    return jsonify(wire(Completion(
        id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()),
        model=requests[0].model, choices=choices,
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens))))


@bp.post("/chat/completions")
@rate_limited
def chat_completions():
    req = parse_openai_chat(read_json_object(request), get_settings().limits)
    whole = not req.stream

    def entry(stream: GenerationStream, token_id: int, logprob: float) -> dict:
        token = stream.token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def logprobs(stream: GenerationStream, entries: list) -> dict:
        return {"content": [{**entry(stream, e.token_id, e.logprob),
                             "top_logprobs": [entry(stream, i, lp) for i, lp in e.top]}
                            for e in entries], "refusal": None}

    def choice(text: str, finish_reason: str | None, logprobs: dict | None,
               first: bool = False) -> dict:
        if whole:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": logprobs, "finish_reason": finish_reason}
        # a stream's first delta names the role; the last one (finish_reason set) is empty
        delta = {"role": "assistant", "content": text} if first else {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _respond(req, _CHAT, choice, logprobs)


def _respond(req: GenerationRequest, kind: _Kind, choice: Callable[..., dict],
             logprobs: Callable[[GenerationStream, list], dict]):
    """A completion, or its stream of chunks (server-sent events), in OpenAI's shape;
    ``logprobs`` formats token log-probabilities (null when the request did not ask);
    ``choice(..., first=True)`` makes the first (or only) one."""
    stream = open_stream(req)

    def asked(entries: list | None) -> dict | None:
        return logprobs(stream, entries or []) if stream.wants_logprobs else None
    head = {"id": f"{kind.prefix}-{uuid.uuid4().hex}", "object": _object(kind.whole),
            "created": int(time.time()), "model": req.model}

    def usage() -> Usage:
        c = stream.completion
        return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                     total_tokens=c.prompt_tokens + c.completion_tokens)

    if not req.stream:
        completion = stream.collect()
        return jsonify(wire(kind.whole(**head, choices=[choice(completion.text, completion.finish_reason,
                                                               asked(completion.logprobs), True)],
                                       usage=usage())))

    head["object"] = _object(kind.chunk)
    # With include_usage every chunk carries "usage": null and one last chunk, with no
    # choices, carries the totals (OpenAI's documented behaviour).
    extra = {"usage": None} if req.include_usage else {}

    def chunk(text: str, finish_reason: str | None = None,
              first: bool = False) -> Completion | ChatCompletionChunk:
        return kind.chunk(**head, choices=[choice(text, finish_reason, asked(stream.new_logprobs()),
                                                  first)], **extra)

    def events() -> Iterator[str]:
        try:
            sent = yield from _pieces(stream, chunk, kind.text)
            if stream.completion is None:
                raise RuntimeError("generation ended without a completion")
            yield _sse(chunk("", stream.completion.finish_reason, not sent))
            if req.include_usage:
                yield _sse(kind.chunk(**head, choices=[], usage=usage()))
            yield _sse("[DONE]")
        except Exception as e:  # headers are sent: the client raises on an "error" event
            log.exception("completion with %s failed mid-stream", req.model)
            yield _sse(OpenAIError(error={"message": f"generation failed ({type(e).__name__})",
                                          "type": "server_error", "param": None, "code": None}))
    return streamed(events(), stream, "text/event-stream")


def _pieces(stream: GenerationStream, chunk: Callable[..., BaseModel],
            text: tuple[str | int, ...]) -> Generator[str, None, bool]:
    """An event per piece; returns whether there was one. After the first, a chunk without
    log-probabilities differs from the one before only in its text (when it has one: chat's
    empty delta has none), so the first such, built in full, is the stencil of the rest."""
    stencil, sent = None, False
    for piece in stream:
        if sent and piece and not stream.wants_logprobs:
            stencil = stencil or Stencil(chunk(piece), text)
            yield f"data: {stencil(piece)}\n\n"
        else:
            yield _sse(chunk(piece, first=not sent))
        sent = True
    return sent


def _model(facts) -> OpenAIModel:
    created = int(datetime.fromisoformat(facts.modified_at.replace("Z", "+00:00")).timestamp())
    return OpenAIModel(id=facts.name, object="model", created=created, owned_by="fable")


@bp.get("/models")
def list_models():
    return jsonify(wire(OpenAIModelList(object="list", data=[_model(f) for f in get_registry().facts()])))


@bp.get("/models/<path:model>")
def retrieve_model(model: str):
    loaded = get_registry().get(model)
    if loaded is None:
        return openai_error(404, f"The model {model[:100]!r} does not exist", param="model",
                            code="model_not_found")
    return jsonify(wire(_model(loaded.facts)))
