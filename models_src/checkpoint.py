"""The checkpoint format: one directory per model, no pickles.

    <dir>/config.json         format version, model config, tokenizer kind, training summary
    <dir>/model.safetensors   the weights (tied weights stored once); over MAX_SHARD_BYTES,
                              model-0000k-of-0000n.safetensors and their index
                              model.safetensors.index.json (Hugging Face's sharded layout)
    <dir>/tokenizer.json      the tokenizer, self-contained (+ tokenizer_config.json)

A GPT-2-format Hugging Face directory (config.json with ``"model_type": "gpt2"``, trained
elsewhere) loads too: ``models_src.hf_import`` translates it, or says why it cannot.

A checkpoint is written into a temporary sibling directory and renamed into place, so
a crash while saving leaves the previous checkpoint whole. Loading checks every file
and every tensor shape and says which one is wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import hf_import
from .registry import build_model
from .base import LanguageModel
from .config import ModelConfig
from .tokenization import Tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"  # the model card, in the Hugging Face layout (YAML front matter)
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
#: Weights larger than this are written in shards: the Hub takes a file over 10 MB only
#: through Git LFS, and a Space is pushed with the bundled checkpoints in it.
MAX_SHARD_BYTES = 9_000_000
LEGACY_WEIGHTS = ("model.pt", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says why."""


@dataclass
class Checkpoint:
    model: LanguageModel
    tokenizer: Tokenizer
    config: ModelConfig
    summary: dict = field(default_factory=dict)  # training facts: perplexity, tokens seen, ...
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.path.name if self.path else "model"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile or DDP wrappers (no `_orig_mod.` prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors listed once (safetensors refuses shared storage)."""
    seen, unique = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is one Parameter under two names
            seen.add(id(tensor))
            unique[name] = tensor.detach()
    return unique


def save_checkpoint(directory, model: LanguageModel, tokenizer: Tokenizer,
                    summary: dict | None = None, *, dtype: torch.dtype | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically; ``dtype`` (e.g. torch.float16) shrinks the weights.

    ``write_extra(tmp_dir)`` may add files (the trainer's resume state) before the
    directory is renamed into place, so they are part of the same atomic write."""
    model = unwrap(model)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
        "training": summary or {},
    }
    tensors = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in _unique_state(model).items()}
    restore_set_aside(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_weights(tensors, tmp)
        tokenizer.save(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        # mkdtemp's folder is private (0700): a checkpoint must be readable by a server or
        # an image that runs as another user, as a folder made by hand would be.
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """``model.safetensors``, or shards of at most MAX_SHARD_BYTES and their index."""
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD_BYTES)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, directory / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _swap_into_place(tmp: Path, target: Path) -> None:
    # os.replace cannot replace a non-empty directory: move the old one aside first.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:  # put the previous checkpoint back rather than leave it hidden
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_set_aside(target: Path) -> None:
    """A writer killed between the two renames of ``_swap_into_place`` leaves no
    ``target``, only the previous checkpoint set aside as ``.name.old-*``: put it back."""
    if target.exists():
        return
    set_aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if set_aside:
        os.rename(set_aside[-1], target)


def read_config(directory) -> dict:
    """The parsed, version-checked config.json of a checkpoint directory; a Hugging Face
    GPT-2 directory's in Fable's shape, marked ``"imported": "gpt2"``."""
    restore_set_aside(Path(directory))
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if isinstance(config, dict) and hf_import.is_foreign(config):
        try:
            return hf_import.checkpoint_config(config)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(config, dict) or "format_version" not in config:
        raise CheckpointError(f"{path}: not a Fable checkpoint (no format_version; "
                              f"a config.json written by another program?)")
    version = config["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {version!r} (expected {FORMAT_VERSION})")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path}: missing the 'model' section")
    return config


def read_card(path) -> tuple[dict, str]:
    """A model card's YAML front matter and its body (({}, text) without front matter)."""
    front, body = split_card(Path(path).read_text(encoding="utf-8"))
    meta = yaml.safe_load(front) if front is not None else {}
    return (meta if isinstance(meta, dict) else {}), body


def split_card(text: str) -> tuple[str | None, str]:
    """A card's front matter text (None without one) and its body; ValueError when the
    front matter never ends."""
    if not text.startswith("---\n"):
        return None, text
    parts = text.split("---\n", 2)
    if len(parts) != 3:
        raise ValueError("the card's front matter has no closing ---")
    return parts[1], parts[2]


def suggested_prompt(directory) -> str | None:
    """The prompt a checkpoint's card offers to try (``widget: [{text: ...}]``, as on the
    Hugging Face hub); None without a card or one."""
    try:
        meta, _ = read_card(Path(directory) / CARD_FILE)
        text = meta["widget"][0]["text"]
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError, LookupError, TypeError):
        return None
    return text if isinstance(text, str) and text.strip() else None


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if path.is_file():
        return _read_safetensors(path)
    if (directory / WEIGHTS_INDEX).is_file():
        return _read_shards(directory / WEIGHTS_INDEX)
    for name in LEGACY_WEIGHTS:
        legacy = directory / name
        if legacy.is_file():
            return _read_legacy(legacy)
    raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: weights are corrupt or truncated ({e})") from None


def _read_shards(index_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sharded checkpoint, each from the shard its index names (a plain
    file name beside the index: an index cannot point elsewhere)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a weights index ({e})") from None
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s
           or not s.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index_path}: names {bad[0]!r}, not a .safetensors file beside it")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = index_path.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index_path}: names {shard}, which is missing")
        part = _read_safetensors(path)
        tensors.update((name, part[name]) for name, file in weight_map.items()
                       if file == shard and name in part)
    return tensors


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict, read without unpickling arbitrary objects."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError for truncated zips, ...
        raise CheckpointError(f"{path}: refused; only plain tensor state dicts are read ({e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # nanoGPT-style {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_checkpoint(directory, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> Checkpoint:
    """Load, validate and return a checkpoint's model (in eval mode) and tokenizer."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config ({e})") from None
    imported = "imported" in config
    try:
        tokenizer = hf_import.load_tokenizer(directory) if imported else Tokenizer.load(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: tokenizer cannot be loaded ({e})") from None
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model only {model_config.vocab_size}")
    # The shapes to check come from the model itself: built on the "meta" device it would
    # cost no memory, but its initialisers then run through torch._refs, whose first use
    # imports torch._dynamo, a second of every process's start-up.
    model = build_model(model_config)
    expected = _unique_state(model)
    tensors = _read_weights(directory)
    if imported:
        tensors = hf_import.from_gpt2(tensors, model_config.tie_weights)
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} expected"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{directory}: weights do not match config.json: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
    model.load_state_dict(tensors, strict=False)  # tied aliases are filled by the tie itself
    model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model, tokenizer, model_config, config.get("training", {}), directory)
