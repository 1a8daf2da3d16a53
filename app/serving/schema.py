"""The request bodies of both generation APIs and the pages' forms, as pydantic models.

Every field and every limit is declared once, here: validation and ``/openapi.json``
(app/apis/openapi.py) both come from these models. A refused request raises ``RequestError``
with the first problem in the API's own words ("'options.top_p' must be above 0 and at
most 1, got 0"). A bool is never a number, a whole float (2.0) is an integer, NaN and
infinities are refused, and ``null`` means "not given" for every optional field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, get_args

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                       WithJsonSchema, create_model)
from pydantic_core import PydanticCustomError, core_schema
from typing_extensions import TypedDict  # pydantic reads its fields on Python < 3.12 only from this one

from app.platform.settings import MAX_INFILL_CANDIDATES, Limits
from models_src.chat import ROLES, Message
from models_src.sampling import GREEDY_BELOW, MAX_LOGPROBS

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # each stop string is matched against the text's tail at every token
MAX_TEMPERATURE = 100.0  # far past uniform already; OpenAI's routes keep OpenAI's 2
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # penalised logits stay finite
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts
MAX_MODEL_NAME = 256
MAX_MESSAGES = 256  # messages in one chat request
MAX_PROMPTS = 16  # prompts in one /v1/completions request (each its own choice)

#: SamplingParams field -> how each API spells it. Top-level Ollama fields and the forms
#: use the library's names; Ollama's ``options`` use Ollama's.
CANONICAL = {"temperature": "temperature", "max_new_tokens": "max_new_tokens", "top_k": "top_k",
             "top_p": "top_p", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
             "seed": "seed", "stop": "stop"}
OLLAMA_OPTIONS = {**CANONICAL, "max_new_tokens": "num_predict",
                  "repetition_penalty": "repeat_penalty"}
# top_k, min_p and repetition_penalty are accepted as extras, as vLLM does
OPENAI_FIELDS = {**CANONICAL, "max_new_tokens": "max_tokens"}


class RequestError(ValueError):
    """A request the server refuses; ``field`` names the offending field (None: the body)."""

    def __init__(self, field: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


# ---- how one value is read ----------------------------------------------------------------
# Checks pydantic's constraints cannot word as the API does raise a "fable" error.

def _refuse(text: str | None = None, *, message: str | None = None,
            field: str | None = None) -> PydanticCustomError:
    """``text`` follows the field's name; or ``message`` is the whole sentence (about
    ``field`` when that is not the field being checked)."""
    context = {"text": text} if message is None else {"message": message, "field": field}
    return PydanticCustomError("fable", "{text}" if message is None else "{message}", context)


def json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")


def _got(value: Any) -> str:
    shown = json.dumps(value) if not isinstance(value, (list, dict)) else json_type(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _form(info: ValidationInfo, value: Any) -> bool:
    """The value is a string typed into one of the pages' forms."""
    return bool(info.context and info.context.get("form")) and isinstance(value, str)


def _from_form(value: Any, info: ValidationInfo, parse: Callable[[str], Any], kind: str) -> Any:
    """A form's string read by ``parse`` (None when blank); any other value as it is."""
    if not _form(info, value):
        return value
    if not value.strip():
        return None
    try:
        return parse(value.strip())
    except ValueError:
        raise _refuse(f"must be {kind}, got {_got(value)}") from None


def _as_number(value: Any, info: ValidationInfo) -> Any:
    value = _from_form(value, info, float, "a number")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(f"must be a number, got {_got(value)}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value):
        raise _refuse("must be a finite number")
    return value


def _as_integer(value: Any, info: ValidationInfo) -> Any:
    value = _from_form(value, info, int, "an integer")
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 2.0 is the integer 2 (JSON Schema agrees)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refuse(f"must be an integer, got {_got(value)}")
    return value


def _valid_unicode(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _refuse("contains invalid Unicode (a lone surrogate)") from None
    return value


def _required(value: Any) -> Any:
    if value is None or value == "":
        raise _refuse("is required")
    return value


def _stop_list(value: Any, info: ValidationInfo) -> Any:
    if value is None or _form(info, value) and not value.strip():
        return None
    if not isinstance(value, (str, list)):
        raise _refuse(f"must be a string or a list of strings, got {_got(value)}")
    return [value] if isinstance(value, str) else value


def number(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           description: str | None = None) -> Any:
    """An optional finite number within the bounds given."""
    return Annotated[float | None, Field(ge=ge, gt=gt, le=le, description=description),
                     BeforeValidator(_as_number)]


def integer(*, ge: int | None = None, le: int | None = None,
            description: str | None = None) -> Any:
    """An optional integer within the bounds given."""
    return Annotated[int | None, Field(ge=ge, le=le, description=description),
                     BeforeValidator(_as_integer)]


@dataclass(frozen=True)
class Neutral:
    """A parameter this server cannot honour: only its neutral values (and null) pass;
    anything else is refused with ``message``. Its schema lists exactly those values."""
    values: tuple[Any, ...]
    message: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return core_schema.no_info_plain_validator_function(self._check)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        return {"anyOf": [{"const": v} for v in self.values] + [{"type": "null"}]}

    def _check(self, value: Any) -> Any:
        if value is None or any(_same_json_value(value, v) for v in self.values):
            return value
        raise _refuse(message=self.message)


def _same_json_value(value: Any, expected: Any) -> bool:
    """Equal as JSON values: 1.0 is 1, but true is neither 1 nor 1.0."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and value == expected
    return value == expected


@dataclass(frozen=True)
class ServerDefault:
    """``value`` (Ollama's num_predict -1) asks for the server's default: read as null."""
    value: int

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        return core_schema.no_info_before_validator_function(
            lambda v: None if v == self.value and not isinstance(v, bool) else v, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict:
        schema = handler(schema)
        return {**schema, "anyOf": [*schema["anyOf"][:-1], {"const": self.value},
                                    schema["anyOf"][-1]]}


ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME),
                      BeforeValidator(_valid_unicode), BeforeValidator(_required)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS),
                     BeforeValidator(_valid_unicode)]
StopList = Annotated[list[StopText], Field(max_length=MAX_STOP)]
Stop = Annotated[StopList | None, BeforeValidator(
    _stop_list, json_schema_input_type=StopText | StopList | None), Field(
    description="The text ends before the first match; the match is not returned")]


def _sampling(limits: Limits, names: Mapping[str, str], *, max_temperature: float = MAX_TEMPERATURE,
              server_default: int | None = None) -> dict[str, Any]:
    """The SamplingParams fields, as ``names`` spells them, for ``create_model``."""
    length = integer(ge=1, le=limits.max_new_tokens, description=(
        f"New tokens at most; default {limits.default_new_tokens}" if limits.default_new_tokens
        else "New tokens at most; default: the model's own, or to the end of its context"))
    if server_default is not None:
        length = Annotated[length, ServerDefault(server_default)]
    types = {
        "temperature": number(ge=0, le=max_temperature,
                              description=f"0 (or below {GREEDY_BELOW:g}) = greedy"),
        "max_new_tokens": length,
        "top_k": integer(ge=1),
        "top_p": number(gt=0, le=1),
        "min_p": number(ge=0, le=1, description="keep tokens at least this many times as likely "
                                                "as the likeliest; 0 = off"),
        "repetition_penalty": number(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY,
                                     description="1 = off; > 1 discourages repeats"),
        "seed": integer(ge=SEED_MIN, le=SEED_MAX),
        "stop": Stop,
    }
    return {names[key]: (kind, None) for key, kind in types.items()}


# ---- the prompt and the suffix ------------------------------------------------------------

def _texts_within(limit: int, first: str, second: str | None = None) -> AfterValidator:
    """Checks the last text field (``second``, or ``first`` alone): the texts together hold
    at most ``limit`` characters. A missing or empty second text counts as none."""
    def check(value: str | None, info: ValidationInfo) -> str | None:
        if second is not None and first not in info.data:
            return value  # the first text was refused already
        texts = [info.data[first], value] if second is not None else [value]
        total = sum(len(t or "") for t in texts)
        if total > limit:
            if second is None or not value:
                raise _refuse(message=f"'{first}' is {total} characters long; the limit is "
                                      f"{limit}", field=first)
            raise _refuse(message=f"'{first}' and '{second}' together are {total} characters "
                                  f"long; the limit is {limit}", field=second)
        return value
    return AfterValidator(check)


def _token_id(value: Any) -> Any:
    """2.0 is the token id 2 (JSON has one number type); anything else stays as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _token_ids(values: list) -> list:
    return [_token_id(v) for v in values]


def _prompts(limit: int) -> BeforeValidator:
    """OpenAI's ``prompt``: a text, token ids, or a list of either (each its own choice).
    One text (alone or the only one in a list) stays a string; anything else becomes a
    tuple of prompts, each a string or a tuple of token ids. Each is limited as one prompt
    is (``limit`` characters, or as many token ids)."""
    def check(value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _refuse(message=f"'prompt' must be a string, token ids or a list of them, got "
                                  f"{json_type(value)}", field="prompt")
        if not value:
            raise _refuse(message="'prompt' is an empty list", field="prompt")
        value = [_token_ids(v) if isinstance(v, list) else _token_id(v) for v in value]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            value = [value]  # one prompt given as token ids
        if len(value) > MAX_PROMPTS:
            raise _refuse(message=f"'prompt' holds {len(value)} prompts; the limit is {MAX_PROMPTS} "
                                  "a request", field="prompt")
        prompts = []
        for number, item in enumerate(value):
            ids = isinstance(item, list) and item and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in item)
            if not isinstance(item, str) and not ids:
                raise _refuse(message="'prompt' must be a string, a list of strings, a list of token "
                                      f"ids or a list of such lists; item {number} is not", field="prompt")
            if ids and min(item) < 0:
                raise _refuse(message=f"'prompt' item {number} holds the token id {min(item)}; ids "
                                      "are 0 or more", field="prompt")
            if len(item) > limit:
                what = "characters" if isinstance(item, str) else "token ids"
                raise _refuse(message=f"'prompt' item {number} is {len(item)} {what} long; the limit "
                                      f"is {limit}", field="prompt")
            prompts.append(item if isinstance(item, str) else tuple(item))
        return prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else tuple(prompts)
    return BeforeValidator(check)


def _stream_options_need_stream(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, dict) and info.data.get("stream") is not True and "stream" in info.data:
        raise _refuse(message="'stream_options' is only allowed when 'stream' is true")
    return value


class TextPart(TypedDict):
    """One part of an OpenAI message's content: only text parts are read here."""
    type: Literal["text"]
    text: str


def _text_parts(value: Any) -> Any:
    """OpenAI's content as a list of parts: the text parts joined (no images here)."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _refuse("must be a string or a list of text parts ({\"type\": \"text\", "
                          "\"text\": ...}); images and audio are not supported")
        texts.append(part["text"])
    return "".join(texts)


def _messages_within(limit: int) -> AfterValidator:
    def check(messages: list) -> list:
        total = sum(len(m.content or "") for m in messages)
        if total > limit:
            raise _refuse(f"together hold {total} characters of content; the limit is {limit}")
        return messages
    return AfterValidator(check)


# ---- the models ---------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class _OpenAIMessage(_Body):
    # OpenAI refuses a key it does not know inside a message too
    model_config = ConfigDict(extra="forbid")


_STREAM_OPTIONS_NEED_STREAM = {
    "if": {"properties": {"stream_options": {"type": "object"}}, "required": ["stream_options"]},
    "then": {"properties": {"stream": {"const": True}}, "required": ["stream"]}}


class _CompletionBody(_Body):
    # As OpenAI's: an argument it does not know is refused, and stream_options (when not
    # null) is refused unless stream is true. max_tokens 0 scores an echoed prompt (not
    # streamed); a stream takes one prompt; a suffix (infilling) one text prompt, not echoed.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {"if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
         "then": {"properties": {"echo": {"const": True}, "stream": {"not": {"const": True}}},
                  "required": ["echo"]}},
        {"if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
         "then": {"properties": {"prompt": {"not": {"type": "array", "minItems": 2,
                                                    "items": {"type": ["string", "array"]}}}}}},
        {"if": {"properties": {"suffix": {"type": "string", "minLength": 1}}, "required": ["suffix"]},
         "then": {"properties": {"prompt": {"anyOf": [
             {"type": ["string", "null"]},
             {"type": "array", "maxItems": 1, "items": {"type": "string"}}]},
             "echo": {"not": {"const": True}}}}}]})


class _ChatCompletionBody(_Body):
    # As OpenAI's: unknown arguments are refused, stream_options needs stream true, and
    # top_logprobs (above 0) logprobs true.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"allOf": [
        _STREAM_OPTIONS_NEED_STREAM,
        {"if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                "required": ["top_logprobs"]},
         "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}}]})


@dataclass(frozen=True)
class RequestModels:
    """The request models for one set of limits (the running server's)."""
    generate: type[BaseModel]  # POST /api/generate
    completion: type[BaseModel]  # POST /v1/completions
    chat: type[BaseModel]  # POST /api/chat
    chat_completion: type[BaseModel]  # POST /v1/chat/completions
    generate_form: type[BaseModel]  # the generate page
    infill_form: type[BaseModel]  # the infill page


@cache
def request_models(limits: Limits) -> RequestModels:
    chars = limits.max_prompt_chars
    text = Annotated[str, Field(json_schema_extra={"maxLength": chars}),
                     BeforeValidator(_valid_unicode)]
    suffix = Annotated[text | None, _texts_within(chars, "prompt", "suffix")]
    top_logprobs = integer(ge=0, le=MAX_LOGPROBS, description=(
        "Alternatives given at each position when logprobs is true (ignored otherwise, as "
        "Ollama does)"))
    ollama_options = create_model(
        "OllamaOptions", __base__=_Body,
        __doc__="Ollama's options. They win over the same settings given at the top level. "
                "Sampling options this server cannot honour pass only at their neutral "
                "values; llama.cpp's runtime options (num_ctx, num_batch, num_gpu, num_thread, "
                "use_mmap, ...) are ignored, and so are unknown ones, as Ollama ignores them.",
        **_sampling(limits, OLLAMA_OPTIONS, server_default=-1),
        **_unsupported_options())
    candidates = (integer(ge=1, le=MAX_INFILL_CANDIDATES, description=(
        "With a suffix: candidate middles written at once, the one the last sentence fits "
        "best kept (and waited for, one row each). Unset: the server's "
        "FABLE_INFILL_CANDIDATES, as many as there are free rows. Without a suffix: "
        "ignored")), None)
    generate = create_model(
        "GenerateRequest", __base__=_Body,
        __doc__="Ollama's generate request. The prompt is always given to the model as it is "
                "(raw); every model stays loaded (keep_alive changes nothing; an empty prompt is "
                "answered as Ollama's load, with keep_alive 0 as its unload); unknown fields are "
                "ignored, as Ollama ignores them.",
        model=(ModelName, ...),
        prompt=(text | None, Field(None, description="Empty: start from the beginning")),
        suffix=(suffix, Field(None, validate_default=True, description=(
            "Story infilling: prompt is the first sentence, suffix the last; the response "
            "is the middle. The prompt and suffix together are limited too."))),
        candidates=candidates,
        stream=(bool | None, True),
        format=(Neutral(("", []), "'format' is not supported by this server"), None),
        images=(Neutral(("", []), "'images' is not supported by this server"), None),
        system=(Neutral(("",), "'system' is not supported by /api/generate (the prompt is "
                               "used as it is); send a system message to /api/chat"), None),
        template=(Neutral(("",), "'template' is not supported: the prompt is used as it is"),
                  None),
        context=(Neutral(([],), "'context' is not supported (Ollama deprecated it); send "
                                "the text as the prompt"), None),
        raw=(bool | None, Field(None, description="Always raw here: the prompt is not templated")),
        think=(Neutral((False,), "'think': these models do not think"), None),
        keep_alive=(Any, Field(None, description="Every model stays loaded; 0 with nothing to "
                                                 "generate from answers as Ollama's unload")),
        logprobs=(bool | None, Field(None, description="Each token's log-probability")),
        top_logprobs=(top_logprobs, None),
        options=(ollama_options | None, None),
        **_sampling(limits, CANONICAL))
    stream_options = create_model("StreamOptions", __base__=_Body,
                                  include_usage=(bool | None, None))
    zero_only = WithJsonSchema({"anyOf": [{"const": 0}, {"type": "null"}]})
    token_id = {"type": "integer", "minimum": 0}
    completion = create_model(
        "CompletionRequest", __base__=_CompletionBody,
        __doc__="OpenAI's completion request; top_k and repetition_penalty are extras (as in "
                "vLLM). stream_options needs stream true.",
        model=(ModelName, ...),
        prompt=(Annotated[text | tuple[text | tuple[Annotated[int, Field(ge=0)], ...], ...] | None,
                          _prompts(chars), WithJsonSchema({"anyOf": [
                              {"type": "string", "maxLength": chars},
                              {"type": "array", "minItems": 1, "maxItems": chars, "items": token_id},
                              {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS, "items": {
                                  "anyOf": [{"type": "string", "maxLength": chars},
                                            {"type": "array", "minItems": 1, "maxItems": chars,
                                             "items": token_id}]}},
                              {"type": "null"}], "description": (
                              "A text, token ids, or a list of either (up to "
                              f"{MAX_PROMPTS}): each its own choice, decoded together")})], None),
        suffix=(suffix, Field(None, validate_default=True,
                              description="Story infilling (see /api/generate)")),
        candidates=candidates,
        stream=(bool | None, False),
        stream_options=(Annotated[stream_options | None,
                                  BeforeValidator(_stream_options_need_stream)], None),
        n=(Neutral((1,), "'n': only n=1 is supported"), None),
        best_of=(Neutral((1,), "'best_of': only best_of=1 is supported"), None),
        echo=(bool | None, Field(None, description=(
            "The prompt comes back before the text, with its tokens' log-probabilities when "
            "logprobs is set (the first token's: null); with max_tokens 0, scoring only"))),
        logprobs=(integer(ge=0, le=MAX_LOGPROBS, description=(
            "Each token's log-probability and this many alternatives")), None),
        presence_penalty=(Annotated[number(ge=-2, le=2), _zero_only("presence_penalty"),
                                    zero_only], None),
        frequency_penalty=(Annotated[number(ge=-2, le=2), _zero_only("frequency_penalty"),
                                     zero_only], None),
        logit_bias=(Neutral(({},), "'logit_bias' is not supported"), None),
        **{**_sampling(limits, OPENAI_FIELDS, max_temperature=2.0),
           "max_tokens": (integer(ge=0, le=limits.max_new_tokens, description=(
               "New tokens at most; 0 (with echo) scores the prompt only. Default: "
               + (str(limits.default_new_tokens) if limits.default_new_tokens else
                  "the model's own, or to the end of its context"))), None)},
        user=(Any, Field(None, description="Ignored")))
    role = Literal[ROLES]  # type: ignore[valid-type]
    ollama_message = create_model(
        "ChatMessage", __base__=_Body, __doc__="One message; thinking is ignored",
        role=(role, ...), content=(text | None, None),
        images=(Neutral(([],), "'images' is not supported by this server"), None),
        tool_calls=(Neutral(([],), "'tool_calls' is not supported by this server"), None))
    openai_message = create_model(
        "ChatCompletionMessage", __base__=_OpenAIMessage,
        __doc__="One message (developer is read as system); name, refusal and annotations "
                "(which a client sends back with an earlier reply) are ignored",
        role=(Annotated[role, BeforeValidator(lambda v: "system" if v == "developer" else v,
                                              json_schema_input_type=Literal[(*ROLES, "developer")])], ...),
        content=(Annotated[text | None, BeforeValidator(_text_parts, json_schema_input_type=(
            text | list[TextPart] | None))], None),
        name=(Any, Field(None, description="Ignored")),
        refusal=(Any, Field(None, description="Ignored")),
        annotations=(Any, Field(None, description="Ignored")),
        audio=(Neutral((), "'audio' is not supported by this server"), None),
        tool_calls=(Neutral(([],), "'tool_calls' are not supported by this server"), None),
        function_call=(Neutral((), "'function_call' is not supported by this server"), None))
    # none: Ollama's way to load a model (or, with keep_alive 0, unload it)
    messages = Annotated[list[ollama_message], Field(max_length=MAX_MESSAGES),
                         _messages_within(chars)]
    chat = create_model(
        "ChatRequest", __base__=_Body,
        __doc__="Ollama's chat request; every model stays loaded (no messages: answered as "
                "Ollama's load, with keep_alive 0 as its unload); unknown fields are ignored, "
                "as Ollama ignores them",
        model=(ModelName, ...), messages=(messages, ...), stream=(bool | None, True),
        think=(Neutral((False,), "'think': these models do not think"), None),
        keep_alive=(Any, Field(None, description="Every model stays loaded; 0 with nothing to "
                                                 "generate from answers as Ollama's unload")),
        format=(Neutral(("", []), "'format' is not supported by this server"), None),
        tools=(Neutral(([],), "'tools' are not supported by this server"), None),
        logprobs=(bool | None, Field(None, description="Each token's log-probability")),
        top_logprobs=(top_logprobs, None),
        options=(ollama_options | None, None),
        **_sampling(limits, CANONICAL))
    chat_completion = create_model(
        "ChatCompletionRequest", __base__=_ChatCompletionBody,
        __doc__="OpenAI's chat completion request; top_k and repetition_penalty are extras "
                "(as in vLLM). max_completion_tokens wins over max_tokens.",
        model=(ModelName, ...),
        messages=(Annotated[list[openai_message], Field(min_length=1, max_length=MAX_MESSAGES),
                            _messages_within(chars)], ...),
        stream=(bool | None, False),
        stream_options=(Annotated[stream_options | None,
                                  BeforeValidator(_stream_options_need_stream)], None),
        max_completion_tokens=(integer(ge=1, le=limits.max_new_tokens), None),
        n=(Neutral((1,), "'n': only n=1 is supported"), None),
        logprobs=(bool | None, Field(None, description="Each token's log-probability")),
        top_logprobs=(Annotated[integer(ge=0, le=MAX_LOGPROBS, description=(
            "Alternatives given at each position; needs logprobs true")), _needs_logprobs], None),
        presence_penalty=(Annotated[number(ge=-2, le=2), _zero_only("presence_penalty"),
                                    zero_only], None),
        frequency_penalty=(Annotated[number(ge=-2, le=2), _zero_only("frequency_penalty"),
                                     zero_only], None),
        logit_bias=(Neutral(({},), "'logit_bias' is not supported"), None),
        response_format=(Neutral(({"type": "text"},), "'response_format': only text is supported"),
                         None),
        tools=(Neutral(([],), "'tools' are not supported by this server"), None),
        tool_choice=(Neutral(("none",), "'tool_choice': tools are not supported"), None),
        parallel_tool_calls=(bool | None, Field(None, description="Ignored: there are no tools")),
        modalities=(Neutral((["text"],), "'modalities': only text is supported"), None),
        audio=(Neutral(({},), "'audio' is not supported by this server"), None),
        prediction=(Neutral(({},), "'prediction' is not supported by this server"), None),
        reasoning_effort=(Neutral((), "'reasoning_effort': these models do not reason"), None),
        web_search_options=(Neutral(({},), "'web_search_options' is not supported"), None),
        store=(Neutral((False,), "'store': completions are not stored here"), None),
        metadata=(Any, Field(None, description="Ignored (OpenAI keeps it with stored "
                                               "completions; nothing is stored here)")),
        service_tier=(Any, Field(None, description="Ignored: there is one tier")),
        **_sampling(limits, OPENAI_FIELDS, max_temperature=2.0),
        user=(Any, Field(None, description="Ignored")))
    generate_form = create_model(
        "GenerateForm", __base__=_Body, model=(ModelName, ...),
        prompt=(Annotated[text | None, _texts_within(chars, "prompt")], None),
        **_sampling(limits, CANONICAL))
    infill_form = create_model(
        "InfillForm", __base__=_Body, model=(ModelName, ...), first=(text | None, None),
        last=(Annotated[text | None, _texts_within(chars, "first", "last")],
              Field(None, validate_default=True)),
        candidates=(integer(ge=1, le=MAX_INFILL_CANDIDATES, description=(
            "Candidate middles written at once; the one the last sentence fits best is kept. "
            "Empty: the server's FABLE_INFILL_CANDIDATES")), None),
        **_sampling(limits, CANONICAL))
    return RequestModels(generate, completion, chat, chat_completion, generate_form, infill_form)


def _top_logprobs_need_logprobs(value: Any, info: ValidationInfo) -> Any:
    if value not in (None, 0) and info.data.get("logprobs") is not True:
        raise _refuse(message="'top_logprobs' needs 'logprobs': true")
    return value


_needs_logprobs = AfterValidator(_top_logprobs_need_logprobs)


def _unsupported_options() -> dict[str, Any]:
    """Ollama's sampling options this server does not have: each passes only at the value
    that turns it off (Ollama's default for all but repeat_last_n, whose -1, the whole
    text, is what the repetition penalty here covers)."""
    neutral = {"typical_p": (1,), "tfs_z": (1,), "mirostat": (0,),
               "presence_penalty": (0,), "frequency_penalty": (0,), "repeat_last_n": (-1,)}
    return {name: (Neutral(values, f"'options.{name}' is not supported by this server; send "
                                   f"{values[0]} or leave it out"), None)
            for name, values in neutral.items()}


def _zero_only(field: str) -> AfterValidator:
    def check(value: float | None) -> float | None:
        if value not in (None, 0):
            raise _refuse(message=f"'{field}' is not supported; send 0 or leave it out "
                                  f"(repetition_penalty is available)")
        return value
    return AfterValidator(check)


# ---- reading a request --------------------------------------------------------------------

def validate(model: type[BaseModel], values: Mapping[str, Any], *,
             nested_last: str | None = None) -> Any:
    """``values`` as ``model``, or ``RequestError`` naming the first problem (those inside
    the field ``nested_last`` come after every other one)."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        errors = sorted(e.errors(), key=lambda error: len(error["loc"]) > 1
                        and error["loc"][0] == nested_last)
        raise RequestError(*_explain(model, errors[0], values)) from None


def check_form(model: type[BaseModel], values: Mapping[str, Any]) -> tuple[Any, dict[str, str]]:
    """A page's form (strings read as numbers, blanks as not given) as ``model``: (the
    model, {}), or (None, every problem: field name -> the first message about it)."""
    try:
        return model.model_validate(values, context={"form": True}), {}
    except ValidationError as e:
        problems: dict[str, str] = {}
        for error in e.errors():
            field, message = _explain(model, error, values)
            problems.setdefault(field, message)
        return None, problems


def _explain(model: type[BaseModel], error: Any, values: Mapping[str, Any]) -> tuple[str, str]:
    """(field name, message) for one pydantic error, in the API's words."""
    name = _field_name(error["loc"], values)
    kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
    if kind == "fable" and "message" in ctx:
        return ctx["field"] or name, ctx["message"]
    if kind == "fable":
        text = ctx["text"]
    elif kind == "missing":
        text = "is required"
    elif kind in ("greater_than", "greater_than_equal", "less_than_equal"):
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        text = f"must be {_range(**_bounds(model, error['loc']))}, got {shown}"
    elif kind == "string_too_long":
        text = f"is {len(value)} characters long; the limit is {ctx['max_length']}"
    elif kind == "string_too_short":
        text = "must not be empty"
    elif kind == "too_long":
        text = (f"may hold at most {ctx['max_length']} "
                f"{'messages' if name.startswith('messages') else 'strings'}, got {ctx['actual_length']}")
    elif kind == "string_type":
        text = f"must be a string, got {_got(value)}"
    elif kind == "bool_type":
        text = f"must be true or false, got {_got(value)}"
    elif kind == "extra_forbidden":  # OpenAI's own words
        return name, f"Unrecognized request argument supplied: {name}"
    elif kind == "literal_error":
        text = f"must be {ctx['expected']}, got {_got(value)}"
    elif kind == "too_short":
        text = f"must hold at least {ctx['min_length']} item{'s' if ctx['min_length'] != 1 else ''}"
    elif kind == "list_type":
        text = f"must be an array, got {_got(value)}"
    elif kind == "model_type":
        text = f"must be an object, got {_got(value)}"
    else:  # no field of these models fails any other way
        text = f"is not valid ({error['msg']})"
    return name, f"'{name}' {text}"


def _field_name(loc: tuple, values: Any) -> str:
    """``options.temperature``, ``stop[1]``; a stop string given alone is ``stop``."""
    name, node = "", values
    for part in loc:
        if isinstance(part, int):
            if isinstance(node, list):
                name += f"[{part}]"
                node = node[part]
        else:
            name += f".{part}" if name else part
            node = node.get(part) if isinstance(node, Mapping) else None
    return name


def _bounds(model: type[BaseModel], loc: tuple) -> dict[str, Any]:
    """The ge / gt / le declared on the field at ``loc``."""
    field = None
    for part in (p for p in loc if isinstance(p, str)):
        field = model.model_fields[part]
        model = next((t for t in get_args(field.annotation)
                      if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return {key: getattr(m, key) for m in field.metadata for key in ("ge", "gt", "le")
            if getattr(m, key, None) is not None}


def _range(ge: float | None = None, gt: float | None = None, le: float | None = None) -> str:
    low = gt if gt is not None else ge
    if low is not None and le is not None:
        return f"above {low:g} and at most {le:g}" if gt is not None else \
            f"between {low:g} and {le:g}"
    if low is not None:
        return f"{'>' if gt is not None else '>='} {low:g}"
    return f"<= {le:g}"


# ---- what a valid request asks for --------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, whatever API it came through."""
    model: str
    prompt: str | tuple[int, ...]  # text, or token ids (/v1/completions); with a suffix: the first sentence
    suffix: str | None  # the story's last sentence: infill the middle; None: continue prompt
    stream: bool
    sampling: Mapping[str, Any]  # the SamplingParams values it set; the model's fill the rest
    include_usage: bool = False  # OpenAI stream_options.include_usage
    messages: tuple[Message, ...] | None = None  # a chat: the reply to these (prompt unused)
    candidates: int | None = None  # infill: candidate middles asked for (None: the server's)
    # Ollama's "load" (nothing to generate from) or "unload" (the same with keep_alive 0):
    # answered at once, generating nothing; every model stays loaded either way
    housekeeping: str | None = None
    # /v1/completions: the prompt comes back before the text (with its log-probabilities
    # when asked); score_only: nothing is generated (max_tokens 0)
    echo: bool = False
    score_only: bool = False


def sampling_values(fields: BaseModel | None, names: Mapping[str, str] = CANONICAL) -> dict:
    """The SamplingParams keyword arguments that ``fields`` (spelt as ``names``) sets."""
    values = {key: getattr(fields, name, None) for key, name in names.items()}
    return {key: value for key, value in values.items() if value is not None}


def requested(values: Mapping[str, Any]) -> dict[str, Any]:
    """The SamplingParams values a request set (the model's defaults fill the rest, in
    the service). A temperature between 0 and GREEDY_BELOW is greedy decoding, its limit."""
    values = dict(values)
    if 0 < values.get("temperature", 1.0) < GREEDY_BELOW:
        values["temperature"] = 0.0
    return values


def parse_ollama_generate(body: Mapping[str, Any], limits: Limits) -> GenerationRequest:
    """Ollama's ``POST /api/generate`` body (plus the library's names at top level);
    ``options`` win over top-level settings, and are checked after them."""
    req = validate(request_models(limits).generate, body, nested_last="options")
    values = {**sampling_values(req), **sampling_values(req.options, OLLAMA_OPTIONS),
              **_logprobs(req)}
    return GenerationRequest(req.model, req.prompt or "", req.suffix or None,
                             req.stream is not False, requested(values),
                             candidates=_candidates(req),
                             housekeeping=_housekeeping(req, empty=not req.prompt and not req.suffix))


def parse_openai_completion(body: Mapping[str, Any], limits: Limits) -> tuple[GenerationRequest, ...]:
    """OpenAI's ``POST /v1/completions`` body: one request per prompt, with the same settings."""
    req = validate(request_models(limits).completion, body)
    values = sampling_values(req, OPENAI_FIELDS)
    if req.logprobs is not None:
        values["logprobs"] = req.logprobs
    score_only = values.get("max_new_tokens") == 0
    if score_only:
        if req.echo is not True:
            raise RequestError("max_tokens", "'max_tokens' 0 writes nothing: it needs 'echo' true, "
                                             "which scores the prompt")
        if req.stream is True:
            raise RequestError("stream", "'max_tokens' 0 scores the prompt and writes nothing to "
                                         "stream; send it without 'stream'")
        del values["max_new_tokens"]
    prompts = req.prompt if isinstance(req.prompt, tuple) else (req.prompt or "",)
    if len(prompts) > 1 and req.stream is True:
        raise RequestError("stream", "'stream' takes one prompt; send a list of prompts without it")
    if req.suffix and not isinstance(prompts[0], str) or req.suffix and len(prompts) > 1:
        raise RequestError("suffix", "'suffix' (infilling) takes one text prompt: the first sentence")
    if req.echo is True and req.suffix:
        raise RequestError("echo", "'echo' is not for infilling: the middle is written between two texts")
    return tuple(GenerationRequest(req.model, prompt, req.suffix or None, req.stream is True,
                                   requested(values), _include_usage(req),
                                   candidates=_candidates(req), echo=req.echo is True,
                                   score_only=score_only) for prompt in prompts)


def _candidates(req: BaseModel) -> int | None:
    return req.candidates if req.suffix else None  # without a suffix there is no middle


def _include_usage(req: BaseModel) -> bool:
    """OpenAI's ``stream_options.include_usage``."""
    return req.stream_options is not None and req.stream_options.include_usage is True


def _logprobs(req: BaseModel) -> dict[str, int]:
    """``logprobs: true`` (+ ``top_logprobs``) as SamplingParams' ``logprobs``."""
    return {"logprobs": req.top_logprobs or 0} if req.logprobs is True else {}


def _housekeeping(req: BaseModel, *, empty: bool) -> str | None:
    """Ollama's load (an empty request) or unload (the same with keep_alive 0, "0", "0s")."""
    if not empty:
        return None
    zero = req.keep_alive in (0, "0") or (isinstance(req.keep_alive, str)
                                          and re.fullmatch(r"0+(\.0*)?[smh]?", req.keep_alive))
    return "unload" if zero and not isinstance(req.keep_alive, bool) else "load"


def _messages(req: BaseModel) -> tuple[Message, ...]:
    return tuple(Message(m.role, m.content or "") for m in req.messages)


def parse_ollama_chat(body: Mapping[str, Any], limits: Limits) -> GenerationRequest:
    """Ollama's ``POST /api/chat`` body; settings as in ``parse_ollama_generate``."""
    req = validate(request_models(limits).chat, body, nested_last="options")
    values = {**sampling_values(req), **sampling_values(req.options, OLLAMA_OPTIONS),
              **_logprobs(req)}
    return GenerationRequest(req.model, "", None, req.stream is not False,
                             requested(values), messages=_messages(req),
                             housekeeping=_housekeeping(req, empty=not req.messages))


def parse_openai_chat(body: Mapping[str, Any], limits: Limits) -> GenerationRequest:
    """OpenAI's ``POST /v1/chat/completions`` body."""
    req = validate(request_models(limits).chat_completion, body)
    values = {**sampling_values(req, OPENAI_FIELDS), **_logprobs(req)}
    if req.max_completion_tokens is not None:
        values["max_new_tokens"] = req.max_completion_tokens
    return GenerationRequest(req.model, "", None, req.stream is True, requested(values),
                             _include_usage(req), _messages(req))
