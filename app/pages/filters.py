"""Jinja filters the templates share: counts, parameter sizes, metrics, durations, names.

``register(app)`` installs them; an unknown value (None, NaN) shows as an en dash.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flask import Flask

from app.serving.registry import short_count
from models_src.sampling_defaults import SamplingDefaults

DASH = "–"
ARCHITECTURES = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM", "gpt": "GPT",
                 "seq2seq": "Encoder–decoder"}
TOKENIZERS = {"char": "characters", "word": "words", "bpe": "BPE", "gpt2": "GPT-2 BPE",
              "hf": "Hugging Face"}


def count(value: Any) -> str:
    """12345 -> 12,345."""
    if value is None:
        return DASH
    return f"{value:,}" if isinstance(value, int) else f"{value:,.0f}"


def params(value: int | None) -> str:
    return DASH if value is None else short_count(value)


def metric(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return DASH
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(round(seconds / 60), 60)  # to the nearest minute, as model cards say
    return f"{hours} h {minutes} min"


def shown_path(path: Any) -> str:
    """A server folder as a page may show it: relative to the working directory when it
    is inside, else only its name (a page never reveals the server's layout)."""
    path = Path(path)
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return path.name or "."


def describe(value: Any) -> str:
    """A training summary's free-form value (text, a list or a mapping) as one line."""
    if value is None or value == "" or value == {} or value == []:
        return DASH
    if isinstance(value, dict):
        return ", ".join(f"{k}: {describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(describe(v) for v in value)
    return str(value)


GENERIC_FILES = {"input.txt", "train.txt", "valid.txt", "validation.txt", "test.txt", "data.txt"}


def dataset(value: Any) -> str:
    """A training summary's data source as a dataset's name: the corpus folder (not a
    server path, nor the file inside it that every corpus calls the same); a hub name or a
    file of one's own as it is."""
    if not isinstance(value, str) or not value:
        return describe(value)
    parts = [part for part in value.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if len(parts) >= 2 and parts[-1].lower() in GENERIC_FILES:
        parts.pop()
    return parts[-1] if parts else value


def arch(value: str | None) -> str:
    return ARCHITECTURES.get(value or "", value or DASH)


def tokenizer_kind(value: str | None) -> str:
    return TOKENIZERS.get(value or "", value or DASH)


def filesize(size: int | None) -> str:
    if size is None:
        return DASH
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def sampling(values: dict | None) -> str:
    """A model's sampling defaults (ModelFacts.sampling) in words: "temperature 0.8, top-p 0.9"."""
    try:
        return SamplingDefaults(**(values or {})).described()
    except (TypeError, ValueError):
        return DASH


def said_of(message: str, name: str, label: str | None) -> str:
    """A field's error in a page's words: the API's "'top_p' must be ..." as "Top-p must
    be ...", the field named once, by its label; a message that does not begin with the
    field's name gets the label before it ("Models: choose 2 to 4 ..."); without a label,
    the message as it is."""
    prefix = f"'{name}' "
    if not label:
        return message
    return f"{label} {message[len(prefix):]}" if message.startswith(prefix) else f"{label}: {message}"


def register(app: Flask) -> None:
    for name, function in (("count", count), ("params", params), ("metric", metric),
                           ("duration", duration), ("describe", describe), ("arch", arch),
                           ("tokenizer_kind", tokenizer_kind), ("filesize", filesize),
                           ("shown_path", shown_path), ("sampling", sampling), ("said_of", said_of),
                           ("dataset", dataset)):
        app.add_template_filter(function, name)
