"""The app's settings: ``FABLE_*`` environment variables, read and validated once.

A pydantic-settings model: each setting is declared once below, with its default and
what it does. ``create_app(test_config)`` takes the same names (``FABLE_CHECKPOINT_DIR``,
...), so a test sets a value exactly as a Space does. gunicorn's master
(gunicorn.conf.py) reads the same values. Importing this module imports torch (through
models_src, for the infill default): the master then holds torch's modules, which the
workers it forks share, but never runs anything on it; each worker sets torch's threads and
device itself (create_app).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from flask import current_app
from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from models_src.infill_candidates import DEFAULT_CANDIDATES

PREFIX = "FABLE_"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ORIGIN = re.compile(r"^https?://[^/\s,]+/?$", re.IGNORECASE)
#: Candidate middles one infill may ask for: each holds a row while it is written.
MAX_INFILL_CANDIDATES = 16


class SettingsError(ValueError):
    """A setting with a value the app cannot use; the message names the variable."""


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the part of the settings validation needs."""
    max_prompt_chars: int
    max_new_tokens: int
    default_new_tokens: int | None  # None: each model's own (models_src.sampling_defaults)


# ---- how a raw value (a string from the environment, anything from a test) is read ------

class _Refused(ValueError):
    """A raw value that is not the setting's type; the message ends "..., got <value>"."""


def _text(value: Any) -> str:
    return str(value).strip()


def _integer(value: Any) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        return int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _Refused(f"must be an integer, got {value!r}") from None


def _number(value: Any) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _Refused(f"must be a number, got {value!r}") from None


Integer = Annotated[int, BeforeValidator(_integer)]
Number = Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_number)]
Text = Annotated[str, BeforeValidator(_text)]
Folder = Annotated[Path, BeforeValidator(_text)]


class _Environment(EnvSettingsSource):
    """``FABLE_*`` values from a mapping (``os.environ`` unless one is given); a blank
    value counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, Any] | None = None):
        self.environ = os.environ if environ is None else environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, Any]:
        return {k.lower(): v for k, v in self.environ.items()
                if not (isinstance(v, str) and not v.strip())}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore")

    checkpoint_dir: Folder = Field(Path("checkpoints"),
                                 description="every directory directly under it is a model")
    load_timeout_s: Number = Field(60.0, ge=0.001, description="how long one checkpoint may "
                                   "take to load, at start-up or on a reload; a slower one is "
                                   "reported as failed (not tried again until its files change) "
                                   "and the other models serve")
    experiments_dir: Folder = Field(Path("experiments"),
                                  description="training records (Parquet) the admin page reads")
    default_model: Text | None = Field(
        None, description="the model the pages start on; unset (or not loaded): the one with "
                          "the fewest bits per character (on the infill page, of those that infill)")
    chat_template: str | None = Field(
        None, description="Jinja chat template (Hugging Face's variables: messages, "
                          "add_generation_prompt) for models whose tokenizer has none; unset: "
                          "a plain transcript, 'User: ...' / 'Assistant:' (models_src/chat.py)")
    device: Text = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda, "
                                             "cuda:N or mps")
    max_prompt_chars: Integer = Field(4000, ge=1,
                                      description="longest prompt (+ suffix) a request may send")
    max_new_tokens: Integer = Field(512, ge=1, description="most tokens one request may ask for")
    default_new_tokens: Integer | None = Field(
        None, ge=1, description="tokens generated when a request does not say (also Ollama's "
        "num_predict -1); unset: each model's own, its generation_config.json's "
        "max_new_tokens or else the room left in its context, so that a text ends by itself; "
        "never more than FABLE_MAX_NEW_TOKENS")
    max_body_bytes: Integer = Field(64 * 1024, ge=1024,
                                    description="largest request body; a larger one gets 413")
    api_keys: Text | None = Field(
        None, repr=False, description="comma-separated keys (each at least 16 characters); when "
        "set, the JSON APIs (/api/*, /v1/*) need 'Authorization: Bearer <key>' (the pages, "
        "/healthz and /openapi.json do not)")
    cors_origins: Text | None = Field(
        None, description="comma-separated origins (https://app.example.com) or *: browsers on "
                          "them may call the JSON APIs; unset: none may (no CORS headers)")
    admin_token: Text | None = Field(
        None, min_length=16, repr=False,  # never shown in logs or tracebacks
        description="when set, /api/models needs 'Authorization: Bearer <token>'; the /admin "
                    "page also takes it as a Basic password")
    protect_pages: bool = Field(
        False, description="with FABLE_API_KEYS set, the page routes that generate (POST / and "
        "/infill, their /start and /stream routes, /compare?run=1, /compare/start and its "
        "streams) need a key too: a Basic password (browsers ask for it) or 'Authorization: "
        "Bearer <key>'; off: the pages stay public")
    secret_key: Text | None = Field(
        None, min_length=32, repr=False, exclude=True,  # never shown in logs or tracebacks
        description="signs the pages' job tokens; unset: gunicorn.conf.py makes one per server "
                    "(its workers share it) and a lone process its own, so a restart "
                    "invalidates the links already handed out")
    workers: Integer = Field(1, ge=1, validation_alias=AliasChoices("FABLE_WORKERS",
                                                                    "WEB_CONCURRENCY"),
                             description="gunicorn workers (gunicorn.conf.py reads it too); "
                                         "gunicorn's WEB_CONCURRENCY when unset")
    max_batch: Integer = Field(16, ge=1, description="sequences decoded together in one "
                                                     "worker (continuous batching); more wait")
    max_queue: Integer = Field(48, ge=0, description="requests waiting for a row; beyond it a "
                                                     "request gets 503 + Retry-After at once")
    # The decoding threads run the model on torch's threads; one core stays with the
    # request threads (benchmarks/README.md, "Serving": why).
    torch_threads: Integer = Field(
        default_factory=lambda data: max(1, (available_cores() - 1) // data["workers"]),
        ge=1, description="torch.set_num_threads in each worker: (cores - 1) // workers, at "
                          "least 1")
    # Different models decode at once on these threads (a comparison, or two models in
    # use); one model's steps run one at a time. With torch's own threads they stay
    # within the cores (benchmarks/README.md, "The compare page's cost").
    decode_threads: Integer = Field(
        default_factory=lambda data: max(
            1, available_cores() // (data["workers"] * data["torch_threads"])),
        ge=1, description="decoding threads in each worker, each stepping a different model: "
                          "cores // (workers * torch threads), at least 1")
    queue_timeout_s: Number = Field(30.0, ge=0.0, description="how long a queued request waits "
                                                              "for a row (then 503)")
    read_timeout_s: Number = Field(10.0, gt=0.0, description="how long a client may take to "
                                   "send a whole request, head and body (then 408): waiting "
                                   "connections are held by the worker's main loop, not a thread")
    write_timeout_s: Number = Field(30.0, gt=0.0, description="how long an answer's write may "
                                    "wait for a client that stopped reading (then the "
                                    "connection is dropped and its generation cancelled)")
    max_downloads: Integer = Field(4, ge=1, description="checkpoint file downloads one worker "
                                   "sends at once; more get 503 + Retry-After")
    request_timeout_s: Number = Field(60.0, ge=0.001, description="generation deadline per "
                                      "request; reaching it ends the text like a length limit")
    infill_candidates: Integer = Field(DEFAULT_CANDIDATES, ge=1, description=(
        "candidate middles an infill writes at once (one row each, so at most "
        "FABLE_MAX_BATCH are used), keeping the one under which the given last sentence is "
        f"likeliest; 1 to {MAX_INFILL_CANDIDATES}; a request's 'candidates' wins"))
    log_prompts: bool = Field(False, description="log each generation's model and prompt "
                                                 "(first 200 characters); off: prompts never reach "
                                                 "the logs")
    rate_limit: Integer = Field(0, ge=0, description="generation requests a minute per client "
                                                     "address and worker (then 429); 0: no limit")
    train_dir: Folder = Field(Path("runs/studio"), description="the training page's runs: "
                              "each one's record, log, upload and working checkpoints")
    # A training beside serving leaves the request threads and the model a core
    # (benchmarks/README.md, "Serving beside a training").
    train_threads: Integer = Field(
        default_factory=lambda data: max(1, available_cores() - 1), ge=1,
        description="torch threads of a training started from the training page: cores - 1, "
                    "at least 1; it also runs at a lower CPU priority (nice 10)")
    train_upload_bytes: Integer = Field(
        4 * 1024 * 1024, ge=1024, description="largest text file the training page takes "
        "(the upload's request body; with FABLE_ADMIN_TOKEN set, only a request carrying the "
        "token may send more than FABLE_MAX_BODY_BYTES)")
    train_quota_bytes: Integer = Field(
        512 * 1024 * 1024, ge=1024 * 1024, description="disk the training page's models and "
        "runs may take together; at it, a new run is refused until a trained model is deleted")
    space_id: str | None = Field(None, validation_alias="SPACE_ID", exclude=True,
                                 description="set by Hugging Face on a Space")
    proxy_hops: Integer = Field(
        default_factory=lambda data: 1 if data.get("space_id") else 0, ge=0,
        description="reverse proxies in front of the app whose X-Forwarded-For, -Proto and "
                    "-Host are trusted (werkzeug's ProxyFix); 1 on a Space, else 0")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not _DEVICE.match(device.lower()):
            raise _Refused(f"must be auto, cpu, mps, cuda or cuda:N, got {device.lower()!r}")
        return device.lower()

    @field_validator("infill_candidates")
    @classmethod
    def _candidates_within_limit(cls, value: int) -> int:
        if value > MAX_INFILL_CANDIDATES:
            raise _Refused(f"must be from 1 to {MAX_INFILL_CANDIDATES}, got {value}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, value: str | None) -> str | None:
        if value is not None and any(len(key) < 16 for key in _listed(value)):
            raise _Refused("must list keys of at least 16 characters each, separated by commas")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        for origin in _listed(value or ""):
            if origin != "*" and not _ORIGIN.match(origin):
                raise _Refused(f"must be * or origins such as https://app.example.com, got {origin!r}")
        return value

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return _listed(self.api_keys or "")

    @property
    def cors_origin_list(self) -> tuple[str, ...]:
        return _listed(self.cors_origins or "")

    @model_validator(mode="after")
    def _pages_protected_by_keys(self) -> Settings:
        if self.protect_pages and not self.api_key_list:
            raise _Refused(f"{PREFIX}PROTECT_PAGES needs {PREFIX}API_KEYS: the pages would "
                           f"take no key")
        return self

    @model_validator(mode="after")
    def _default_within_maximum(self) -> Settings:
        if self.default_new_tokens is not None and self.default_new_tokens > self.max_new_tokens:
            raise _Refused(f"{PREFIX}DEFAULT_NEW_TOKENS ({self.default_new_tokens}) is above "
                           f"{PREFIX}MAX_NEW_TOKENS ({self.max_new_tokens})")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        return init_settings, _Environment(settings_cls)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """Settings from ``environ`` (default ``os.environ``), with ``overrides`` (the same
        ``FABLE_*`` names; values may already be typed) taking precedence."""
        values = {**(os.environ if environ is None else environ),
                  **{k: v for k, v in (overrides or {}).items() if k.startswith(PREFIX)}}
        try:
            return cls(_build_sources=((_Environment(cls, values),), {}))
        except ValidationError as e:
            raise SettingsError(_explain(e.errors()[0], values)) from None

    @property
    def limits(self) -> Limits:
        return Limits(self.max_prompt_chars, self.max_new_tokens, self.default_new_tokens)


def _listed(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _explain(error: Any, values: Mapping[str, Any]) -> str:
    """A pydantic error about one variable as a sentence that names it."""
    ctx = error.get("ctx", {})
    if not error["loc"]:  # the model's own check
        return str(ctx["error"])
    field, names = _variables(error["loc"][0])
    name = next((n for n in names if n in values), names[0])
    if error["type"] == "value_error":
        return f"{name} {ctx['error']}"
    if error["type"] in ("too_short", "string_too_short"):
        return f"{name} must be at least {ctx['min_length']} characters"
    if error["type"] == "bool_parsing":  # FABLE_LOG_PROMPTS, FABLE_PROTECT_PAGES
        return f"{name} must be true or false, got {values[name]!r}"
    minimum = next(m.ge for m in field.metadata if hasattr(m, "ge"))
    if isinstance(minimum, float):
        return f"{name} must be a finite number >= {minimum}, got {values[name]!r}"
    return f"{name} must be >= {minimum}, got {error['input']}"


def _variables(key: str) -> tuple[Any, list[str]]:
    """The field an error's location names, and the variables that may set it."""
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = (list(alias.choices) if isinstance(alias, AliasChoices)
                 else [alias] if alias else [PREFIX + name.upper()])
        if key == name or key in names:
            return field, names
    raise KeyError(key)


def default_of(setting: str) -> Any:
    """A setting's default, as declared here (for the classes that take settings as
    arguments and have defaults of their own)."""
    return Settings.model_fields[setting].default


def get_settings() -> Settings:
    """The current app's settings (inside a request or app context)."""
    return current_app.extensions["fable.settings"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; an explicit choice is checked.

    Call it inside a worker (after gunicorn's fork): asking CUDA anything initialises it.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"{PREFIX}DEVICE={device} but CUDA is not available")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise SettingsError(f"{PREFIX}DEVICE={device} but only "
                                f"{torch.cuda.device_count()} CUDA device(s) exist")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SettingsError(f"{PREFIX}DEVICE=mps but MPS is not available")
    return device
