"""Every JSON answer of the APIs, as the pydantic models that both build it (the routes
construct one and send ``wire(answer)`` through jsonify, or ``to_json(answer)`` as a
stream's line or event) and document it (app/apis/openapi.py). A stream's chunks that
differ only in their text are a ``Stencil`` of one built in full.

Fields are declared in the order they go on the wire (pydantic serializes in declaration
order, a base's fields first). A field with a default is left out of the answer unless
the route sets it, even to null: Ollama's ``logprobs`` comes only when asked for,
OpenAI's ``usage`` only with ``stream_options.include_usage`` (``exclude_unset``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import reduce
from json.encoder import c_make_encoder, encode_basestring
from operator import getitem
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

from app.serving.registry import ModelFacts
from app.serving.schema import MAX_PROMPTS

Count = Annotated[int, Field(ge=0)]
Reason = Literal["stop", "length"]


def wire(answer: BaseModel) -> dict[str, Any]:
    """What goes on the wire: JSON values, only the fields the route set."""
    # model_dump(mode="json", exclude_unset=True) without its wrapper (a streamed chunk's
    # every microsecond shows)
    return answer.__pydantic_serializer__.to_python(answer, mode="json", exclude_unset=True)


def _encoder() -> Callable[[Any], str]:
    """``json.dumps(value, ensure_ascii=False)``, the same text, but with its C encoder made
    once: json.dumps makes one per call, a third of a small chunk's cost."""
    plain = json.JSONEncoder(ensure_ascii=False)
    if c_make_encoder is None:  # no C speedups in this Python
        return plain.encode
    encode = c_make_encoder(None, plain.default, encode_basestring, None, plain.key_separator,
                            plain.item_separator, False, False, True)
    return lambda value: "".join(encode(value, 0))


_encode = _encoder()


def to_json(answer: BaseModel) -> str:
    """An answer as a stream's line or event carries it (what ``json.dumps`` writes: the
    spaces after ``:`` and ``,`` that clients and tests have always seen)."""
    return _encode(wire(answer))


class Stencil:
    """The JSON text of answers that differ from ``answer`` only in some strings, at a
    fraction of the cost of building and serializing each (a stream's chunks, one per
    decoded piece): ``answer``, built and validated in full, is serialized once with the
    strings at ``paths`` (keys and indexes into its JSON, in the order they are written)
    cut out; ``stencil(*strings)`` puts others in their places, encoded as ``to_json``
    encodes a string, so the text is ``to_json`` of ``answer`` with those strings."""

    def __init__(self, answer: BaseModel, *paths: tuple[str | int, ...]) -> None:
        body = wire(answer)
        markers = [f"\0{n}" for n in range(len(paths))]  # no model name or id holds a NUL
        for path, marker in zip(paths, markers):
            _cut(body, path, marker)
        rest, self._parts = _encode(body), []
        holes = [encode_basestring(marker) for marker in markers]
        if any(rest.count(hole) != 1 for hole in holes):
            raise ValueError(f"{type(answer).__name__} already holds a NUL")
        for hole in holes:
            before, found, rest = rest.partition(hole)
            if not found:
                raise ValueError(f"{paths} are not in the order {type(answer).__name__} writes them")
            self._parts.append(before)
        self._parts.append(rest)

    def __call__(self, *strings: str) -> str:
        text = [self._parts[0]]
        for string, part in zip(strings, self._parts[1:]):
            text += (encode_basestring(string), part)
        return "".join(text)


def _cut(body: dict, path: tuple[str | int, ...], marker: str) -> None:
    """Puts ``marker`` in the place of the string at ``path``."""
    *inside, last = path
    try:
        parent = reduce(getitem, inside, body)
        if isinstance(parent[last], str):
            parent[last] = marker
            return
    except (KeyError, IndexError, TypeError):
        pass
    raise ValueError(f"{path} is not a string of the answer")


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- Ollama -----------------------------------------------------------------------------

class OllamaTokenLogprob(_Shape):
    token: str
    logprob: float


class OllamaLogprob(OllamaTokenLogprob):
    """A generated token's log-probability under the model (before temperature and the
    other processors), and the likeliest tokens at its position"""
    top_logprobs: list[OllamaTokenLogprob]


OllamaLogprobs = Annotated[list[OllamaLogprob] | None,
                           Field(description="With logprobs true: the tokens of this object")]


class AssistantMessage(_Shape):
    role: Literal["assistant"]
    content: str


class _Ollama(_Shape):
    model: str
    created_at: datetime

    @field_serializer("created_at", when_used="json")
    def _created_at(self, at: datetime):  # no return type: the document keeps "date-time"
        return timestamp(at)


def timestamp(at: datetime) -> str:
    """An Ollama answer's ``created_at``: microseconds always, as they have always been
    written here (pydantic leaves out a zero fraction)."""
    return at.isoformat(timespec="microseconds").replace("+00:00", "Z")


# The text comes after model and created_at and before the rest, so each answer is a
# text base (generate's response or chat's message) and a tail mixed in before it.

class _GenerateText(_Ollama):
    response: str


class _ChatText(_Ollama):
    message: AssistantMessage


class _Chunk(_Shape):
    done: Literal[False]
    logprobs: OllamaLogprobs = None


class _Final(_Shape):
    """Durations in nanoseconds; load_duration is the wait for a generation slot"""
    done: Literal[True]
    done_reason: Reason
    total_duration: Count
    load_duration: Count
    prompt_eval_count: Count
    prompt_eval_duration: Count
    eval_count: Count
    eval_duration: Count
    logprobs: OllamaLogprobs = None


class _Housekeeping(_Shape):
    """Ollama's answer to a request with nothing to generate from: "load", or "unload" with
    keep_alive 0 (every model stays loaded here either way)"""
    done: Literal[True]
    done_reason: Literal["load", "unload"]


class GenerateChunk(_Chunk, _GenerateText):
    pass


class GenerateFinal(_Final, _GenerateText):
    response: str = Field(description="Whole text (stream false), else empty")


class ChatChunk(_Chunk, _ChatText):
    pass


class ChatFinal(_Final, _ChatText):
    message: AssistantMessage = Field(description="Whole reply (stream false), else empty")


class GenerateLoaded(_Housekeeping, _GenerateText):
    response: Literal[""]


class ChatLoaded(_Housekeeping, _ChatText):
    pass


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


# ---- the server's own -------------------------------------------------------------------

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


# ---- vLLM's tokenizer routes ------------------------------------------------------------

class Tokenized(_Shape):
    count: Count
    max_model_len: Count | None = Field(description="The model's context (null: a recurrent model)")
    tokens: list[Count]
    token_strs: list[str] | None


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


# ---- OpenAI -----------------------------------------------------------------------------

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
    """What every OpenAI answer object starts with (each narrows ``object`` to its kind,
    which keeps the place declared here: second)"""
    id: str
    object: str
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
