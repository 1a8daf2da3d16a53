"""Run configuration: a YAML file with `model`, `data`, `tokenizer`, `training` and
`output` sections, plus `section.key=value` overrides from the command line. Each section
becomes a dataclass (`data` and `tokenizer` are training.data's), checked as it is read.

Size presets fill the model sizes a config leaves out, so a config can say
`preset: small` and override only what it cares about.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from models_src import ModelConfig

from .data import DataConfig, DataError, TokenizerConfig
from .optimizers import OPTIMIZERS


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; configs mean the float, as YAML 1.2 does."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader)


# Sizes per family; anything a config sets itself wins over its preset.
PRESETS = {
    "attention": {
        "nano": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
        "micro": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
        "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
        "medium": dict(n_layer=8, n_head=8, n_embd=512, block_size=512),
        "large": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    },
    "recurrent": {
        "nano": dict(n_layer=1, n_embd=64, n_hidden=128),
        "micro": dict(n_layer=2, n_embd=128, n_hidden=256),
        "small": dict(n_layer=2, n_embd=256, n_hidden=512),
        "medium": dict(n_layer=3, n_embd=400, n_hidden=1150),  # AWD-LSTM's sizes
        "large": dict(n_layer=3, n_embd=512, n_hidden=1536),
    },
}


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _char_rnn_recipe(cell: str) -> dict:
    """The character recipe of a recurrent cell (lstm, gru): the same settings for both."""
    return {
        "about": f"{cell.upper()} on characters (2 layers, 128-wide embeddings, 256 hidden units)",
        "model": dict(arch=cell, preset="micro", tie_weights=False, dropout=0.1,
                      dropout_hidden=0.1),
        "data": dict(max_seq_len=128),  # the truncated back-propagation window
        "tokenizer": dict(kind="char"),
        "training": dict(batch_size=32, learning_rate=3e-3, min_lr=3e-4, warmup_steps=50,
                         weight_decay=0.01, grad_clip=0.5, eval_every=200, eval_batches=20,
                         save_every=200),
    }


# Whole recipes for the one command, `python -m training.train --preset char-gpt --data FILE
# --name NAME`: architecture, tokenizer, a size preset and training settings, each a config
# without its name, data and budget (recipe_config adds them). Settings from the shipped
# configs of the same kind (training/configs/), contexts kept short so a few KB of text do.
RECIPES = {
    "char-gpt": {
        "about": "GPT-style decoder on characters (4 layers x 128, 128-character context)",
        "model": dict(arch="gpt", preset="micro", block_size=128, dropout=0.0),
        "tokenizer": dict(kind="char"),
        "training": dict(batch_size=32, learning_rate=1e-3, min_lr=1e-4, warmup_steps=100,
                         weight_decay=0.1, betas=[0.9, 0.99], eval_every=250, eval_batches=20,
                         save_every=500),
    },
    "bpe-gpt": {
        "about": "GPT-style decoder on a byte-level BPE of 2,048 tokens trained on your text",
        "model": dict(arch="gpt", preset="micro", block_size=128, dropout=0.1),
        "tokenizer": dict(kind="bpe", vocab_size=2048),
        "training": dict(batch_size=16, learning_rate=1e-3, min_lr=1e-4, warmup_steps=100,
                         eval_every=250, eval_batches=20, save_every=500),
    },
    "char-lstm": _char_rnn_recipe("lstm"),
    "char-gru": _char_rnn_recipe("gru"),
    "word-lstm": {
        "about": "AWD-LSTM-style model on words seen at least twice (2 layers, 256 wide)",
        "model": dict(arch="lstm", n_layer=2, n_embd=256, n_hidden=384, tie_weights=True,
                      dropout=0.4, dropout_input=0.3, dropout_hidden=0.25, dropout_embedding=0.1,
                      weight_drop=0.3),
        "data": dict(max_seq_len=70),
        "tokenizer": dict(kind="word", min_freq=2),
        "training": dict(batch_size=32, learning_rate=3e-3, min_lr=3e-4, warmup_steps=50,
                         weight_decay=1.2e-6, grad_clip=0.25, eval_every=200, eval_batches=20,
                         save_every=200),
    },
}
DEFAULT_MINUTES = 10.0  # the one command's budget when it gives neither --minutes nor --steps


def recipe_config(recipe: str, *, data: str, name: str, publish_dir: str,
                  minutes: float | None = None, steps: int | None = None) -> dict:
    """The raw config (what load_config takes) of ``recipe`` trained on the text file
    ``data``, published to ``publish_dir``. The budget: ``steps``, ``minutes`` or both
    (whichever ends first); neither gives DEFAULT_MINUTES."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown preset {recipe!r} (known: {', '.join(RECIPES)})")
    parts = RECIPES[recipe]
    if steps is None and minutes is None:
        minutes = DEFAULT_MINUTES
    budget = {"max_steps": steps, "max_time_s": None if minutes is None else minutes * 60}
    return {
        "name": name,
        "model": dict(parts["model"]),
        # `format: text`: the file is read as plain text whatever its extension
        "data": {"path": data, "format": "text", "split": [0.9, 0.1], **parts.get("data", {})},
        "tokenizer": dict(parts["tokenizer"]),
        "training": {**parts["training"], **budget},
        "output": {"publish": publish_dir},
    }


@dataclass
class TrainingConfig:
    batch_size: int = 32
    learning_rate: float = 1e-3
    min_lr: float = 1e-4  # cosine schedule floor
    weight_decay: float = 0.1
    optimizer: str = "adamw"  # adamw | muon (Muon for the hidden matrices; training.optimizers)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; or give `epochs`, or `max_time_s`
    epochs: float | None = None
    max_time_s: float | None = None  # wall-clock budget of the loop; the cosine schedule follows it
    schedule: str = "cosine"  # cosine (with warm-up) | plateau | constant
    warmup_steps: int = 100
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    eval_every: int = 200
    eval_batches: int | None = 50  # validation windows per periodic eval; None = whole split
    save_every: int = 500  # periodic checkpoint for --resume
    early_stopping_patience: int | None = None  # evals without improvement before stopping
    early_stopping_min_delta: float = 0.0
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False
    # auto: bf16 autocast on CUDA and on CPUs with bf16 matrix units (AMX, AVX512-BF16)
    precision: str = "auto"  # auto | float32 | bfloat16
    num_threads: int | None = None  # torch intra-op threads on CPU
    tbptt: bool | None = None  # carry RNN state across windows; None: on for RNNs
    # per-layer gradient, update, weight, activation and attention figures every N steps
    # (models_src.health; benchmarks/README.md has their cost); 0 turns them off
    health_every: int = 100
    # a text the model writes (to the loggers, and to the terminal unless --quiet) after every
    # sample_every-th evaluation: how the model is doing, in words; 0 turns it off
    sample_every: int = 0
    sample_tokens: int = 200  # tokens each sample runs to (fewer if the model ends it)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = f.type.split(" | ")[0] in ("int", "float")
            if numeric and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"training.{f.name} must be a number, not {value!r}")
        self.betas = tuple(self.betas)
        if self.max_steps is None and self.epochs is None and self.max_time_s is None:
            raise ConfigError("training: give max_steps, epochs or max_time_s")
        if self.precision not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"training.precision must be auto, float32 or bfloat16, not {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"training.optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.optimizer != "adamw" and self.schedule == "plateau":
            raise ConfigError("training.schedule plateau needs training.optimizer adamw")
        if self.schedule not in ("cosine", "plateau", "constant"):
            raise ConfigError(f"training.schedule must be cosine, plateau or constant, not {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be at least 1")
        if self.health_every < 0:
            raise ConfigError("training.health_every must be 0 (off) or a number of steps")
        if self.sample_every < 0:
            raise ConfigError("training.sample_every must be 0 (off) or a number of evaluations")
        if self.sample_tokens < 1:
            raise ConfigError("training.sample_tokens must be at least 1")
        if self.learning_rate <= 0:
            raise ConfigError("training.learning_rate must be positive")


# output.loggers (training.loggers): jsonl needs nothing; the others are optional packages,
# imported only when listed
LOGGERS = ("jsonl", "tensorboard", "wandb")


@dataclass
class OutputConfig:
    dir: str = "runs/{name}"  # holds last/, best/ and final/ checkpoints
    experiments_dir: str = "experiments"
    checkpoint_dtype: str = "float32"  # final/best weights; last/ is always float32 for exact resume
    publish: str | None = None  # also write the final model here (e.g. checkpoints/{name}), in float16
    loggers: list[str] = field(default_factory=list)  # any of LOGGERS (training.loggers)

    def __post_init__(self) -> None:
        if not isinstance(self.loggers, (list, tuple)):
            raise ConfigError(f"output.loggers must be a list such as [tensorboard], not {self.loggers!r}")
        for name in self.loggers:
            if name not in LOGGERS:
                raise ConfigError(f"output.loggers: unknown logger {name!r} (known: {', '.join(LOGGERS)})")
        self.loggers = list(dict.fromkeys(self.loggers))


# ModelConfig's keys that the tokenizer decides, never the config.
FROM_TOKENIZER = ("vocab_size", "pad_id", "sep_id")


@dataclass
class ModelSection:
    """The YAML ``model:`` section, its preset resolved: ``arch`` plus the ModelConfig keys
    it sets. Keys left out take ModelConfig's defaults, and only the keys given are
    recorded with a run."""

    arch: str = "gpt"
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> ModelSection:
        options = resolve_model_sizes(values)
        _only_known("model", options, {f.name for f in fields(ModelConfig)} - set(FROM_TOKENIZER))
        return cls(arch=options.pop("arch", "gpt"), options=options)

    def to_dict(self) -> dict:
        return {"arch": self.arch, **self.options}

    def build(self, vocab_size: int, pad_id: int | None, sep_id: int | None) -> ModelConfig:
        try:
            return ModelConfig(arch=self.arch, vocab_size=vocab_size, pad_id=pad_id, sep_id=sep_id,
                               **self.options)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class RunConfig:
    name: str
    model: ModelSection
    data: DataConfig
    tokenizer: TokenizerConfig
    training: TrainingConfig
    output: OutputConfig = field(default_factory=OutputConfig)
    source: str | None = None  # the YAML file it came from
    overrides: list[str] = field(default_factory=list)  # the section.key=value given with it

    @property
    def command(self) -> str | None:
        """The command that trains this config (None for a config built from a dict)."""
        if self.source is None:
            return None
        return shlex.join(["python", "-m", "training.train", "--config", self.source, *self.overrides])

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))

    @property
    def publish_dir(self) -> Path | None:
        return Path(self.output.publish.format(name=self.name)) if self.output.publish else None

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model.to_dict(), "data": asdict(self.data),
                "tokenizer": self.tokenizer.to_dict(), "training": asdict(self.training),
                "output": asdict(self.output)}


def parse_override(text: str) -> tuple[list[str], object]:
    """`training.learning_rate=3e-4` -> (["training", "learning_rate"], 0.0003)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip().split("."), _yaml(value) if value.strip() else None


DATA_SOURCES = ("path", "corpus", "hub_name")  # the data section names its corpus by one of these


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
        if path[:-1] == ["data"] and path[-1] in DATA_SOURCES:  # data.path=my.txt replaces the corpus
            for other in set(DATA_SOURCES) - {path[-1]}:
                node.pop(other, None)
    return raw


def _only_known(section: str, values: dict, known: set[str]) -> None:
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{section}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _dataclass_from(cls, section: str, values: dict):
    _only_known(section, values, {f.name for f in fields(cls)})
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from None


def resolve_model_sizes(model: dict) -> dict:
    """Fill sizes from the preset; the config's own keys win."""
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is not None:
        family = "recurrent" if model.get("arch") in ("rnn", "gru", "lstm") else "attention"
        if preset not in PRESETS[family]:
            raise ConfigError(f"model.preset must be one of {', '.join(PRESETS[family])}, not {preset!r}")
        model = {**PRESETS[family][preset], **model}
    return model


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> RunConfig:
    """Read a YAML config (or a dict), apply overrides, validate every section."""
    if raw is None:
        try:
            raw = _yaml(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({e})") from None
    raw = apply_overrides(raw, list(overrides))
    unknown = sorted(set(raw) - {"name", "model", "data", "tokenizer", "training", "output"})
    if unknown:
        raise ConfigError(f"unknown config sections: {', '.join(unknown)}")
    for section in ("model", "data", "training"):
        if not isinstance(raw.get(section), dict):
            raise ConfigError(f"the config needs a '{section}' section")
    name = raw.get("name") or (Path(path).stem if path else None)
    if not name:
        raise ConfigError("the config needs a name")
    try:  # the data sections check themselves (training.data); a bad one is a config error here
        data = DataConfig.from_dict(raw["data"])
        tokenizer = TokenizerConfig.from_dict(raw.get("tokenizer") or {})
    except DataError as e:
        raise ConfigError(str(e)) from None
    return RunConfig(
        name=str(name),
        model=ModelSection.from_dict(raw["model"]),
        data=data,
        tokenizer=tokenizer,
        training=_dataclass_from(TrainingConfig, "training", raw["training"]),
        output=_dataclass_from(OutputConfig, "output", raw.get("output") or {}),
        source=str(path) if path else None,
        overrides=list(overrides),
    )
