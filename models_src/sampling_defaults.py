"""A model's own sampling settings: what a request leaves unset.

A checkpoint keeps them in ``generation_config.json``, the Hugging Face file (its
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
``max_new_tokens`` and ``do_sample``), so an export carries them to transformers and a
GPT-2 directory brought in brings its own. Each key is read only when present: a file
without ``top_k`` means no top-k here (transformers would assume 50), and one with
``do_sample: false`` means greedy decoding. A checkpoint without the file samples from the
model's own distribution (``NEUTRAL``).

The length a request leaves unset is the model's ``max_new_tokens`` when it has one, else
the room left in its context, so that a text runs until it ends by itself or fills the
context; a model without a context limit (an RNN) writes up to the server's cap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    max_new_tokens: int | None = None  # None: to the end of the model's context

    def __post_init__(self) -> None:
        self.params({}, prompt_tokens=0, context=None, cap=1)  # SamplingParams' checks

    def params(self, given: Mapping[str, Any], *, prompt_tokens: int, context: int | None,
               cap: int, length: int | None = None) -> SamplingParams:
        """SamplingParams with ``given`` (what a request set) over these defaults. Unless
        given, the length is ``length`` (a server-wide default), else this model's
        ``max_new_tokens``, else the room the prompt leaves in a ``context`` of that many
        tokens (a prompt that fills it: half a context more, as generation keeps the last
        half and goes on; no context, as an RNN: ``cap``), and never more than ``cap``."""
        if "max_new_tokens" not in given:
            room = None if context is None else (
                context - prompt_tokens if prompt_tokens < context else context // 2)
            wanted = length or self.max_new_tokens or room or cap
            given = {**given, "max_new_tokens": max(1, min(wanted, cap))}
        own = {k: v for k, v in asdict(self).items() if k != "max_new_tokens"}
        return SamplingParams(**{**own, **given})

    def described(self) -> str:
        """How the model samples, in a few words: "temperature 0.8, top-p 0.9"."""
        parts = ["greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"]
        if self.temperature:
            parts += [f"{name} {value:g}" for name, value in
                      (("top-k", self.top_k), ("top-p", self.top_p), ("min-p", self.min_p))
                      if value]
        if self.repetition_penalty != 1.0:
            parts.append(f"repetition penalty {self.repetition_penalty:g}")
        return ", ".join(parts)

    # ---- generation_config.json ------------------------------------------------------

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> SamplingDefaults:
        """The settings a parsed ``generation_config.json`` holds (ValueError naming a bad one)."""
        if not isinstance(config, Mapping):
            raise ValueError("not a JSON object")
        values = {k: config[k] for k in SAMPLING_KEYS if config.get(k) is not None}
        if values.get("top_k") == 0:  # transformers' "no top-k"
            values["top_k"] = None
        if values.get("top_p") == 1.0:
            values["top_p"] = None
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        for f in fields(cls):
            value = values.get(f.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{f.name} must be a number, not {value!r}")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The ``generation_config.json`` keys for these settings (transformers' spelling:
        0 is "no top-k", and greedy is ``do_sample: false``)."""
        config = {"do_sample": self.temperature > 0, "temperature": self.temperature or 1.0,
                  "top_k": self.top_k or 0, "top_p": self.top_p or 1.0,
                  "repetition_penalty": self.repetition_penalty}
        if self.min_p:
            config["min_p"] = self.min_p
        if self.max_new_tokens:
            config["max_new_tokens"] = self.max_new_tokens
        return config

    def write(self, directory: str | Path, tokenizer) -> None:
        """``directory/generation_config.json`` with these settings and ``tokenizer``'s
        ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``."""
        ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_id") for name in ("bos", "eos", "pad")
               if getattr(tokenizer, f"{name}_id") is not None}
        (Path(directory) / GENERATION_CONFIG).write_text(
            json.dumps({**ids, **self.to_hf()}, indent=2) + "\n")


#: A checkpoint without the file: the model's own distribution, nothing cut.
NEUTRAL = SamplingDefaults()

#: What a newly trained model is published with, until a sweep chooses its own
#: (``benchmarks/sampling_defaults.py --write``): the sweep's choice for the first bundled
#: TinyStories GPT, which keeps most models' text together (benchmarks/README.md,
#: "Sampling defaults"; the Muon model that replaced it chose min-p 0.05).
STARTING = SamplingDefaults(temperature=1.0, min_p=0.1)
