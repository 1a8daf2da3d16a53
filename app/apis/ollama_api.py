"""Ollama's API (``/api/generate``, ``/api/chat``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``) and the server's own
JSON routes (``/api/models``, ``/healthz``, ``/openapi.json``). Each answer is built as
the model that documents it (app/apis/responses.py). Errors are Ollama's
``{"error": "..."}``; routes and status codes: docs/web-app.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from functools import wraps
from typing import NamedTuple

from flask import Blueprint, jsonify, request
from pydantic import BaseModel

from app.apis.responses import (ChatChunk, ChatFinal, ChatLoaded, Error, GenerateChunk, GenerateFinal,
                                GenerateLoaded, Health, Models, Process, Processes, Reloaded, Show,
                                Stencil, Tag, Tags, Version, timestamp, to_json, wire)
from app.platform.ratelimit import rate_limited
from app.platform.settings import get_settings
from app.platform.web import has_admin_token, ollama_error, retry_headers, streamed
from app.serving.bodies import read_json_object
from app.serving.registry import get_registry, short_count
from app.serving.reload import get_reloader
from app.serving.schema import GenerationRequest, RequestError, parse_ollama_chat, parse_ollama_generate
from app.serving.service import GenerationStream, ServiceError, get_service, open_stream

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__)


@bp.errorhandler(RequestError)
def _request_error(e: RequestError):
    return ollama_error(e.status, e.message)


@bp.errorhandler(ServiceError)
def _service_error(e: ServiceError):
    return ollama_error(e.status, e.message, retry_headers(e))


def admin_required(view: Callable) -> Callable:
    """When ``FABLE_ADMIN_TOKEN`` is set, the view needs ``Authorization: Bearer <token>``."""
    @wraps(view)
    def wrapper(*args, **kwargs):
        if not has_admin_token():
            return ollama_error(401, "this route needs the admin token: send "
                                     "'Authorization: Bearer <FABLE_ADMIN_TOKEN>'",
                                {"WWW-Authenticate": "Bearer"})
        return view(*args, **kwargs)
    return wrapper


# ---- Ollama ---------------------------------------------------------------------------

def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ndjson(answer: BaseModel) -> str:
    return to_json(answer) + "\n"


class _Answers(NamedTuple):
    """The models of one API's answers: a streamed chunk, the last object, a load or unload;
    and where a chunk's text is in its JSON."""
    chunk: type[GenerateChunk | ChatChunk]
    final: type[GenerateFinal | ChatFinal]
    loaded: type[GenerateLoaded | ChatLoaded]
    text: tuple[str, ...]


_GENERATE = _Answers(GenerateChunk, GenerateFinal, GenerateLoaded, ("response",))
_CHAT = _Answers(ChatChunk, ChatFinal, ChatLoaded, ("message", "content"))


def _answers(req: GenerationRequest) -> _Answers:
    return _CHAT if req.messages is not None else _GENERATE


def _text(req: GenerationRequest, text: str) -> dict:
    """A piece of text as /api/generate (``response``) or /api/chat (``message``) gives it."""
    if req.messages is not None:
        return {"message": {"role": "assistant", "content": text}}
    return {"response": text}


def _logprobs(stream: GenerationStream, entries) -> dict:
    """Ollama's ``logprobs`` for these tokens (left unset, so left out, when the request did
    not ask)."""
    if not stream.wants_logprobs:
        return {}
    token = stream.token_text
    return {"logprobs": [{"token": token(e.token_id), "logprob": e.logprob,
                          "top_logprobs": [{"token": token(i), "logprob": lp} for i, lp in e.top]}
                         for e in entries]}


def _final(req: GenerationRequest, stream: GenerationStream, received_ns: int,
           text: str, logprobs: list) -> GenerateFinal | ChatFinal:
    """Ollama's last object: the reason and the counts; durations in nanoseconds
    (load_duration is the wait for a generation slot: models are loaded at start-up)."""
    completion = stream.completion
    end = stream.finished_ns or time.perf_counter_ns()
    first = stream.first_piece_ns or end
    return _answers(req).final(
        model=req.model, created_at=_now(), **_text(req, text), done=True,
        done_reason=completion.finish_reason,
        total_duration=time.perf_counter_ns() - received_ns,
        load_duration=stream.queued_ns,
        prompt_eval_count=completion.prompt_tokens,
        prompt_eval_duration=first - stream.started_ns,
        eval_count=completion.completion_tokens,
        eval_duration=end - first,
        **_logprobs(stream, logprobs),
    )


@bp.post("/api/generate")
@rate_limited
def generate():
    received = time.perf_counter_ns()
    return _respond(parse_ollama_generate(read_json_object(request), get_settings().limits),
                    received)


@bp.post("/api/chat")
@rate_limited
def chat():
    received = time.perf_counter_ns()
    return _respond(parse_ollama_chat(read_json_object(request), get_settings().limits), received)


def _respond(req: GenerationRequest, received: int):
    """The answer to a generate or chat request: one object, or an NDJSON stream; Ollama's
    load and unload (nothing to generate from) one object at once, as Ollama answers them."""
    if req.housekeeping is not None:
        get_service().model(req.model)  # an unknown model is a 404, as Ollama's
        return jsonify(wire(_answers(req).loaded(model=req.model, created_at=_now(), **_text(req, ""),
                                                 done=True, done_reason=req.housekeeping)))
    stream = open_stream(req)
    if not req.stream:
        completion = stream.collect()
        return jsonify(wire(_final(req, stream, received, completion.text, completion.logprobs or [])))

    def lines() -> Iterator[str]:
        try:
            yield from _chunks(req, stream)
            if stream.completion is None:
                raise RuntimeError("generation ended without a completion")
            yield _ndjson(_final(req, stream, received, "", stream.new_logprobs()))
        except Exception as e:  # the status line is gone: report in the stream
            log.exception("generation with %s failed mid-stream", req.model)
            yield _ndjson(Error(error=f"generation failed ({type(e).__name__})"))
    return streamed(lines(), stream, "application/x-ndjson")


def _chunks(req: GenerationRequest, stream: GenerationStream) -> Iterator[str]:
    """A line per piece. Without log-probabilities the chunks differ only in their time and
    text, so the first, built in full, is the stencil of the rest."""
    answers = _answers(req)

    def chunk(piece: str) -> GenerateChunk | ChatChunk:
        return answers.chunk(model=req.model, created_at=_now(), **_text(req, piece), done=False,
                             **_logprobs(stream, stream.new_logprobs()))
    if stream.wants_logprobs:
        yield from (_ndjson(chunk(piece)) for piece in stream)
        return
    stencil = None
    for piece in stream:
        stencil = stencil or Stencil(chunk(piece), ("created_at",), answers.text)
        yield stencil(timestamp(_now()), piece) + "\n"


def _details(facts) -> dict:
    return {"parent_model": "", "format": "safetensors", "family": facts.architecture,
            "families": [facts.architecture], "parameter_size": short_count(facts.parameters),
            "quantization_level": facts.dtype.upper().replace("FLOAT", "F")}


@bp.get("/api/tags")
def tags():
    return jsonify(wire(Tags(models=[
        Tag(name=f.name, model=f.name, modified_at=f.modified_at, size=f.size_bytes, digest=f.digest,
            details=_details(f)) for f in get_registry().facts()])))


#: What /api/ps says a model's keep-alive ends at: never (every model stays loaded).
LOADED_UNTIL = "9999-12-31T23:59:59Z"


@bp.get("/api/ps")
def ps():
    """The loaded models, as Ollama lists those in memory: all of them, for good."""
    on_gpu = get_registry().device.startswith("cuda")
    return jsonify(wire(Processes(models=[
        Process(name=f.name, model=f.name, size=f.size_bytes, digest=f.digest, details=_details(f),
                expires_at=LOADED_UNTIL, size_vram=f.size_bytes if on_gpu else 0,
                context_length=f.context) for f in get_registry().facts()])))


@bp.post("/api/show")
def show():
    """A model as Ollama shows one: its details, its sampling defaults as Modelfile
    parameters, its template, its shape (``model_info``) and what it can do."""
    body = read_json_object(request)
    name = body.get("model", body.get("name"))
    if not isinstance(name, str) or not name:
        raise RequestError("model", "'model' is required: the name of a loaded model")
    loaded = get_registry().get(name)
    if loaded is None:
        return ollama_error(404, f"model '{name}' not found")
    facts, template = loaded.facts, getattr(loaded.tokenizer, "chat_template", None) or "{{ .Prompt }}"
    parameters = _parameters(loaded.defaults, facts.context, loaded.tokenizer)
    arch = facts.architecture
    info = {"general.architecture": arch, "general.parameter_count": facts.parameters,
            f"{arch}.embedding_length": facts.n_embd, f"{arch}.block_count": facts.n_layer,
            "tokenizer.ggml.model": facts.tokenizer, "tokenizer.vocab_size": facts.vocab_size}
    if facts.context is not None:
        info[f"{arch}.context_length"] = facts.context
    modelfile = "\n".join([f"FROM {facts.name}", f'TEMPLATE """{template}"""',
                           *(f"PARAMETER {line}" for line in parameters.splitlines())]) + "\n"
    return jsonify(wire(Show(modelfile=modelfile, parameters=parameters, template=template,
                             details=_details(facts), model_info=info, modified_at=facts.modified_at,
                             capabilities=["completion", *(["insert"] if facts.can_infill else [])])))


def _parameters(defaults, context: int | None, tokenizer) -> str:
    """The model's sampling defaults in a Modelfile's words, one ``name value`` a line;
    settings that are off are left out, as Ollama leaves out what a Modelfile does not set."""
    lines = [f"temperature {defaults.temperature:g}"]
    lines += [f"{name} {value:g}" for name, value in (
        ("top_k", defaults.top_k), ("top_p", defaults.top_p), ("min_p", defaults.min_p),
        ("num_predict", defaults.max_new_tokens)) if value]
    if defaults.repetition_penalty != 1.0:
        lines.append(f"repeat_penalty {defaults.repetition_penalty:g}")
    if context is not None:
        lines.append(f"num_ctx {context}")
    lines.append(f"stop {json.dumps(tokenizer.special_tokens['eos'])}")
    return "\n".join(lines)


@bp.get("/api/version")
def version():
    from app import __version__
    return jsonify(wire(Version(version=__version__)))


@bp.get("/api/models")
@admin_required
def models():
    registry, service = get_registry(), get_service()
    return jsonify(wire(Models(models=registry.facts(), errors=registry.errors,
                               device=registry.device, service=service.stats())))


@bp.post("/api/models/reload")
@admin_required
def reload_models():
    """Match the checkpoint directory in every worker (app/serving/reload.py): what changed here."""
    report = get_reloader().reload()
    registry = get_registry()
    return jsonify(wire(Reloaded(
        added=report["added"], reloaded=report["reloaded"], removed=report["removed"],
        failed={name: registry.errors.get(name, "") for name in report["failed"]},
        unchanged=report["unchanged"], models=registry.names())))


@bp.get("/healthz")
def healthz():
    """200 while at least one model is loaded, even if other checkpoints failed; 503 when
    none is (nothing can be served). The process answering at all is the liveness signal;
    ``full`` says this worker is up but refuses generations (every row and queue place
    taken), which a load balancer reads as "send elsewhere", not "down"."""
    registry = get_registry()
    service = get_service()
    stats = service.stats()
    full = stats["active"] >= stats["max_batch"] and stats["queued"] >= stats["max_queue"]
    body = Health(status="ok" if len(registry) else "no models loaded", models=len(registry),
                  errors=len(registry.errors), active=stats["active"], queued=stats["queued"],
                  full=full)
    return jsonify(wire(body)), 200 if len(registry) else 503


@bp.get("/openapi.json")
def openapi():
    from app import __version__
    from app.apis.openapi import build_spec
    return jsonify(build_spec(__version__, get_settings().limits))
