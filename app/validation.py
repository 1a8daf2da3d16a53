"""Request validation shared by the Ollama API, the OpenAI API and the HTML forms.

Everything a client sends goes through here before it reaches the service: each field
of the JSON object app.web read (type, range, length). A problem
raises ``ValidationError`` naming the field (``options.temperature``, ``stop[1]``, ...);
the blueprints turn it into their API's error shape. A bool is never a number, a whole
float (2.0) is an integer (as in JSON Schema), NaN and infinities are refused, and
``null`` means "not given" for every optional field.

The building blocks (``number``, ``integer``, ``stop_list``, ``sampling_values``,
``make_params``) take ``from_form=True`` for HTML form values, which arrive as strings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from models_src.sampling import SamplingParams

from .settings import Limits

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # each stop string is matched against the text's tail at every token
MIN_TEMPERATURE = 1e-4  # below it, sampling is greedy (its limit), and logits / T could overflow
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # penalised logits stay finite
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed accepts
MAX_MODEL_NAME = 256

#: SamplingParams field -> how each API spells it. Top-level Ollama fields use the
#: library's names (what people POST by hand); Ollama's ``options`` use Ollama's.
CANONICAL = {"temperature": "temperature", "max_new_tokens": "max_new_tokens", "top_k": "top_k",
             "top_p": "top_p", "repetition_penalty": "repetition_penalty", "seed": "seed",
             "stop": "stop"}
OLLAMA_OPTIONS = {**CANONICAL, "max_new_tokens": "num_predict",
                  "repetition_penalty": "repeat_penalty"}
# top_k and repetition_penalty are accepted as extras, as vLLM does
OPENAI_FIELDS = {**CANONICAL, "max_new_tokens": "max_tokens"}


class ValidationError(ValueError):
    """A request the server refuses; ``field`` names the offending field (None: the body)."""

    def __init__(self, field: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


# ---- fields ------------------------------------------------------------------------

def json_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value), "a value")


def _got(value: Any) -> str:
    shown = json.dumps(value) if not isinstance(value, (list, dict)) else json_type(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def number(value: Any, field: str, *, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool = False,
           from_form: bool = False) -> float:
    """A finite number (int or float, never a bool) within the bounds given."""
    if from_form and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValidationError(field, f"'{field}' must be a number, got {_got(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(field, f"'{field}' must be a number, got {_got(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValidationError(field, f"'{field}' must be a finite number")
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    if not low_ok or (maximum is not None and value > maximum):
        bounds = _range(minimum, maximum, exclusive_minimum)
        raise ValidationError(field, f"'{field}' must be {bounds}, got {value:g}")
    return value


def integer(value: Any, field: str, *, minimum: int | None = None, maximum: int | None = None,
            from_form: bool = False) -> int:
    """An integer (a JSON number without a fraction; never a bool) within the bounds given."""
    if from_form and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValidationError(field, f"'{field}' must be an integer, "
                                         f"got {_got(value)}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 2.0 is the integer 2 (JSON Schema agrees)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"'{field}' must be an integer, got {_got(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValidationError(field, f"'{field}' must be {_range(minimum, maximum)}, got {value}")
    return value


def _range(minimum, maximum, exclusive_minimum: bool = False) -> str:
    if minimum is not None and maximum is not None:
        if exclusive_minimum:
            return f"above {minimum:g} and at most {maximum:g}"
        return f"between {minimum:g} and {maximum:g}"
    if minimum is not None:
        return f"{'>' if exclusive_minimum else '>='} {minimum:g}"
    return f"<= {maximum:g}"


def boolean(value: Any, field: str, *, from_form: bool = False) -> bool:
    if from_form and isinstance(value, str) and value.lower() in ("true", "false", "on", "1", "0"):
        return value.lower() in ("true", "on", "1")
    if not isinstance(value, bool):
        raise ValidationError(field, f"'{field}' must be true or false, got {_got(value)}")
    return value


def string(value: Any, field: str, *, max_chars: int | None = None) -> str:
    """A string that encodes as UTF-8 (no lone surrogates), at most ``max_chars`` long."""
    if not isinstance(value, str):
        raise ValidationError(field, f"'{field}' must be a string, got {_got(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(field, f"'{field}' contains invalid Unicode "
                                     f"(a lone surrogate)") from None
    if max_chars is not None and len(value) > max_chars:
        raise ValidationError(field, f"'{field}' is {len(value)} characters long; "
                                     f"the limit is {max_chars}")
    return value


def stop_list(value: Any, field: str, *, max_items: int = MAX_STOP) -> list[str]:
    """A stop string or a list of up to ``max_items`` non-empty ones."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValidationError(field, f"'{field}' must be a string or a list of strings, "
                                     f"got {_got(value)}")
    if len(items) > max_items:
        raise ValidationError(field, f"'{field}' may hold at most {max_items} strings, "
                                     f"got {len(items)}")
    for i, item in enumerate(items):
        name = field if isinstance(value, str) else f"{field}[{i}]"
        string(item, name, max_chars=MAX_STOP_CHARS)
        if not item:
            raise ValidationError(name, f"'{name}' must not be empty")
    return list(items)


def model_name(body: Mapping[str, Any], field: str = "model") -> str:
    """The required model name (looked up later among loaded models, never as a path)."""
    value = body.get(field)
    if value is None or value == "":
        raise ValidationError(field, f"'{field}' is required")
    return string(value, field, max_chars=MAX_MODEL_NAME)


def prompt_and_suffix(prompt: Any, suffix: Any, limits: Limits, *,
                      fields: tuple[str, str] = ("prompt", "suffix")) -> tuple[str, str | None]:
    """A prompt (None -> "") and an optional suffix ("" -> None), together within the limit."""
    prompt = "" if prompt is None else string(prompt, fields[0])
    suffix = None if suffix is None or suffix == "" else string(suffix, fields[1])
    total = len(prompt) + len(suffix or "")
    if total > limits.max_prompt_chars:
        if suffix is None:
            raise ValidationError(fields[0], f"'{fields[0]}' is {total} characters long; "
                                             f"the limit is {limits.max_prompt_chars}")
        raise ValidationError(fields[1], f"'{fields[0]}' and '{fields[1]}' together are {total} "
                                         f"characters long; the limit is {limits.max_prompt_chars}")
    return prompt, suffix


# ---- sampling ----------------------------------------------------------------------

def sampling_values(values: Mapping[str, Any] | None, limits: Limits, *,
                    names: Mapping[str, str] = CANONICAL, prefix: str = "",
                    max_temperature: float | None = None, default_length: int | None = None,
                    from_form: bool = False) -> dict[str, Any]:
    """Validated ``SamplingParams`` keyword arguments from the fields of ``values``.

    ``names`` maps each SamplingParams field to its name in ``values``; ``prefix`` is
    put before it in error messages (``options.``). Absent and null fields are left out
    (and empty strings from forms). ``default_length`` is the value of the length field
    that means "the server default" (Ollama's ``num_predict: -1``).
    """
    if values is None:
        return {}
    out: dict[str, Any] = {}
    for key, name in names.items():
        value = values.get(name)
        if value is None or (from_form and isinstance(value, str) and not value.strip()):
            continue
        field = prefix + name
        if key == "temperature":
            out[key] = number(value, field, minimum=0.0, maximum=max_temperature,
                              from_form=from_form)
        elif key == "top_p":
            out[key] = number(value, field, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                              from_form=from_form)
        elif key == "repetition_penalty":
            out[key] = number(value, field, minimum=MIN_REPETITION_PENALTY,
                              maximum=MAX_REPETITION_PENALTY, from_form=from_form)
        elif key == "top_k":
            out[key] = integer(value, field, minimum=1, from_form=from_form)
        elif key == "seed":
            out[key] = integer(value, field, minimum=SEED_MIN, maximum=SEED_MAX,
                               from_form=from_form)
        elif key == "max_new_tokens":
            if value == default_length and not isinstance(value, bool):
                continue  # e.g. Ollama's num_predict -1: the server default
            out[key] = integer(value, field, minimum=1, maximum=limits.max_new_tokens,
                               from_form=from_form)
        elif key == "stop":
            out[key] = stop_list(value, field)
    return out


def make_params(values: Mapping[str, Any], limits: Limits) -> SamplingParams:
    """SamplingParams from validated values; the server default length when none is given.
    A temperature between 0 and MIN_TEMPERATURE is greedy decoding, its limit."""
    values = {"max_new_tokens": limits.default_new_tokens, **values}
    if 0 < values.get("temperature", 1.0) < MIN_TEMPERATURE:
        values["temperature"] = 0.0
    return SamplingParams(**values)


# ---- whole requests -----------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, whatever API it came through."""
    model: str
    prompt: str  # with a suffix: the story's first sentence
    suffix: str | None  # the story's last sentence: infill the middle; None: continue prompt
    stream: bool
    params: SamplingParams
    include_usage: bool = False  # OpenAI stream_options.include_usage


def _object(value: Any, field: str) -> Mapping[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise ValidationError(field, f"'{field}' must be an object, got {_got(value)}")
    return value


def parse_ollama_generate(body: Mapping[str, Any], limits: Limits) -> GenerationRequest:
    """Ollama's ``POST /api/generate`` body (plus the library's names at top level).

    ``options`` win over top-level settings; unknown options and fields this server has
    no use for (``system``, ``template``, ``raw``, ``keep_alive``, ``think``, ...) are
    ignored as Ollama ignores them; ``format`` and ``images`` are refused (a plain-text
    model cannot honour them).
    """
    model = model_name(body)
    prompt, suffix = prompt_and_suffix(body.get("prompt"), body.get("suffix"), limits)
    stream = True if body.get("stream") is None else boolean(body["stream"], "stream")
    for field in ("format", "images"):
        if body.get(field) not in (None, "", []):
            raise ValidationError(field, f"'{field}' is not supported by this server")
    options = _object(body.get("options"), "options")
    values = {**sampling_values(body, limits),
              **sampling_values(options, limits, names=OLLAMA_OPTIONS, prefix="options.",
                                default_length=-1)}
    return GenerationRequest(model, prompt, suffix, stream, make_params(values, limits))


def parse_openai_completion(body: Mapping[str, Any], limits: Limits) -> GenerationRequest:
    """OpenAI's ``POST /v1/completions`` body; parameters this server cannot honour are
    refused unless they hold their neutral value (n=1, echo=false, penalties 0, ...)."""
    model = model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ValidationError("prompt", "'prompt' must be a string or a list of exactly one "
                                            "string (token arrays and batches are not supported)")
        prompt = prompt[0]
    prompt, suffix = prompt_and_suffix(prompt, body.get("suffix"), limits)
    stream = False if body.get("stream") is None else boolean(body["stream"], "stream")
    include_usage = False
    stream_options = _object(body.get("stream_options"), "stream_options")
    if stream_options is not None:
        if not stream:
            raise ValidationError("stream_options", "'stream_options' is only allowed when "
                                                    "'stream' is true")
        if stream_options.get("include_usage") is not None:
            include_usage = boolean(stream_options["include_usage"], "stream_options.include_usage")
    _neutral(body, "n", 1, "only n=1 is supported")
    _neutral(body, "best_of", 1, "only best_of=1 is supported")
    _neutral(body, "echo", False, "echo=true is not supported")
    _neutral(body, "logprobs", None, "logprobs are not supported", also=(0,))
    for field in ("presence_penalty", "frequency_penalty"):
        if body.get(field) is not None:
            if number(body[field], field, minimum=-2.0, maximum=2.0) != 0:
                raise ValidationError(field, f"'{field}' is not supported; send 0 or leave it out "
                                             f"(repetition_penalty is available)")
    if body.get("logit_bias") not in (None, {}):
        raise ValidationError("logit_bias", "'logit_bias' is not supported")
    values = sampling_values(body, limits, names=OPENAI_FIELDS, max_temperature=2.0)
    return GenerationRequest(model, prompt, suffix, stream, make_params(values, limits),
                             include_usage)


def _neutral(body: Mapping[str, Any], field: str, neutral: Any, message: str,
             also: tuple = ()) -> None:
    value = body.get(field)
    if value is None or any(_same_json_value(value, v) for v in (neutral, *also)):
        return
    raise ValidationError(field, f"'{field}': {message}")


def _same_json_value(value: Any, expected: Any) -> bool:
    """Equal as JSON values: 1.0 is 1, but true is neither 1 nor 1.0."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and value == expected
    return value == expected
