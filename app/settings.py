"""The app's settings: read once from ``FABLE_*`` environment variables, validated.

Every setting has the same name in the environment and in ``create_app(test_config)``,
so a test writes ``{"FABLE_CHECKPOINT_DIR": tmp}`` exactly as a Space sets a variable.

    FABLE_CHECKPOINT_DIR      checkpoints   every directory directly under it is a model
    FABLE_EXPERIMENTS_DIR     experiments   training records (Parquet) the admin page reads
    FABLE_DEVICE              auto          auto (cuda when available, else cpu), cpu, cuda,
                                            cuda:N, mps
    FABLE_MAX_PROMPT_CHARS    4000          longest prompt (+ suffix) a request may send
    FABLE_MAX_NEW_TOKENS      512           most tokens one request may ask for
    FABLE_DEFAULT_NEW_TOKENS  128           tokens generated when a request does not say
                                            (also Ollama's num_predict -1)
    FABLE_MAX_BODY_BYTES      65536         largest request body (Flask's MAX_CONTENT_LENGTH;
                                            a larger one gets 413)
    FABLE_ADMIN_TOKEN         unset         when set, admin routes (/api/models) need
                                            "Authorization: Bearer <token>"; the /admin
                                            page also takes it as a Basic password
    FABLE_WORKERS             $WEB_CONCURRENCY or 1   gunicorn workers (gunicorn.conf.py
                                            reads it too)
    FABLE_MAX_BATCH           16            sequences decoded together in one worker
                                            (continuous batching); more wait in the queue
    FABLE_MAX_QUEUE           48            requests waiting for a row; beyond it a request
                                            gets 503 + Retry-After at once
    FABLE_TORCH_THREADS       (cores - 1) // workers, at least 1: torch.set_num_threads
                                            in each worker (its scheduler is the one thread
                                            that runs the model; one core is left to the
                                            request threads)
    FABLE_QUEUE_TIMEOUT_S     30            how long a queued request waits for a row (then 503)
    FABLE_REQUEST_TIMEOUT_S   60            generation deadline per request; reaching it
                                            ends the text like a length limit
    FABLE_RATE_LIMIT          0 (off)       generation requests a minute per client address,
                                            counted in each worker (app/ratelimit.py); more
                                            get 429 with Retry-After
    FABLE_PROXY_HOPS          1 on a Space (SPACE_ID set), else 0   reverse proxies in
                                            front of the app: the client address (for the
                                            rate limit) is the Nth X-Forwarded-For entry
                                            from the right; 0: the connection's address

Reading settings never touches torch, so it is safe in gunicorn's master process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import current_app

PREFIX = "FABLE_"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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
    max_prompt_chars: int = 4000
    max_new_tokens: int = 512
    default_new_tokens: int = 128


@dataclass(frozen=True)
class Settings:
    checkpoint_dir: Path = Path("checkpoints")
    experiments_dir: Path = Path("experiments")
    device: str = "auto"
    max_prompt_chars: int = 4000
    max_new_tokens: int = 512
    default_new_tokens: int = 128
    max_body_bytes: int = 64 * 1024
    admin_token: str | None = field(default=None, repr=False)  # never shown in logs or tracebacks
    workers: int = 1
    torch_threads: int = 1
    max_batch: int = 16
    max_queue: int = 48
    queue_timeout_s: float = 30.0
    request_timeout_s: float = 60.0
    rate_limit: int = 0  # generation requests a minute per client; 0 = no limit
    proxy_hops: int = 0  # trusted reverse proxies: where the client address is read

    @property
    def limits(self) -> Limits:
        return Limits(self.max_prompt_chars, self.max_new_tokens, self.default_new_tokens)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """Settings from ``FABLE_*`` variables in ``environ`` (default ``os.environ``),
        with ``overrides`` (same names; values may already be typed) taking precedence."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {k: v for k, v in environ.items() if k.startswith(PREFIX)}
        values.update({k: v for k, v in (overrides or {}).items() if k.startswith(PREFIX)})
        read = _Reader(values)
        # gunicorn's own variable for the worker count, when FABLE_WORKERS is not set
        web_concurrency = _Reader({PREFIX + "WEB_CONCURRENCY": environ.get("WEB_CONCURRENCY")})
        workers = read.integer("WORKERS", web_concurrency.integer("WEB_CONCURRENCY", 1, minimum=1),
                               minimum=1)
        max_new = read.integer("MAX_NEW_TOKENS", 512, minimum=1)
        # Each worker's scheduler runs the model on torch's threads: more threads in all
        # than cores makes OpenMP threads spin against each other (many times slower,
        # measured). One core stays with the request threads (HTTP, JSON, streaming): on 2
        # cores, 2 torch threads made a lone 64-token request 2.5x slower than 1 did
        # (benchmarks/load.py, p50 173 ms against 68 ms).
        threads = max(1, (available_cores() - 1) // workers)
        settings = cls(
            checkpoint_dir=Path(read.string("CHECKPOINT_DIR", "checkpoints")),
            experiments_dir=Path(read.string("EXPERIMENTS_DIR", "experiments")),
            device=read.string("DEVICE", "auto").lower(),
            max_prompt_chars=read.integer("MAX_PROMPT_CHARS", 4000, minimum=1),
            max_new_tokens=max_new,
            default_new_tokens=read.integer("DEFAULT_NEW_TOKENS", min(128, max_new), minimum=1),
            max_body_bytes=read.integer("MAX_BODY_BYTES", 64 * 1024, minimum=1024),
            admin_token=read.string("ADMIN_TOKEN", "") or None,
            workers=workers,
            torch_threads=read.integer("TORCH_THREADS", threads, minimum=1),
            max_batch=read.integer("MAX_BATCH", 16, minimum=1),
            max_queue=read.integer("MAX_QUEUE", 48, minimum=0),
            queue_timeout_s=read.number("QUEUE_TIMEOUT_S", 30.0, minimum=0.0),
            request_timeout_s=read.number("REQUEST_TIMEOUT_S", 60.0, minimum=0.001),
            rate_limit=read.integer("RATE_LIMIT", 0, minimum=0),
            # a Hugging Face Space (which sets SPACE_ID) sits behind HF's proxy
            proxy_hops=read.integer("PROXY_HOPS", 1 if environ.get("SPACE_ID") else 0,
                                    minimum=0),
        )
        if not _DEVICE.match(settings.device):
            raise SettingsError(f"{PREFIX}DEVICE must be auto, cpu, mps, cuda or cuda:N, "
                                f"got {settings.device!r}")
        if settings.default_new_tokens > settings.max_new_tokens:
            raise SettingsError(f"{PREFIX}DEFAULT_NEW_TOKENS ({settings.default_new_tokens}) is "
                                f"above {PREFIX}MAX_NEW_TOKENS ({settings.max_new_tokens})")
        if settings.admin_token is not None and len(settings.admin_token) < 16:
            raise SettingsError(f"{PREFIX}ADMIN_TOKEN must be at least 16 characters")
        return settings


class _Reader:
    """Typed access to raw values (strings from the environment, anything from a test)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values

    def _raw(self, name: str) -> Any:
        value = self.values.get(PREFIX + name)
        return None if value is None or (isinstance(value, str) and not value.strip()) else value

    def string(self, name: str, default: str) -> str:
        value = self._raw(name)
        return default if value is None else str(value).strip()

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            number = int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{PREFIX}{name} must be an integer, got {value!r}") from None
        if number < minimum:
            raise SettingsError(f"{PREFIX}{name} must be >= {minimum}, got {number}")
        return number

    def number(self, name: str, default: float, *, minimum: float) -> float:
        value = self._raw(name)
        if value is None:
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{PREFIX}{name} must be a number, got {value!r}") from None
        if not number >= minimum or number == float("inf"):  # NaN fails the comparison
            raise SettingsError(f"{PREFIX}{name} must be a finite number >= {minimum}, "
                                f"got {value!r}")
        return number


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
