"""The checkpoint format: one directory per model, no pickles.

    <dir>/config.json         format version, model config, tokenizer kind, training summary
                              and evaluation (models_src.records.TrainingSummary, Evaluation)
    <dir>/model.safetensors   the weights (tied weights stored once); over MAX_SHARD_BYTES,
                              model-0000k-of-0000n.safetensors and their index
                              model.safetensors.index.json (Hugging Face's sharded layout)
    <dir>/tokenizer.json      the tokenizer, self-contained (+ tokenizer_config.json)
    <dir>/generation_config.json  the model's sampling defaults (models_src.sampling_defaults)

A GPT-2-format Hugging Face directory (config.json with ``"model_type": "gpt2"``, trained
elsewhere) loads too: ``models_src.hf_import`` translates it, or says why it cannot.

A checkpoint is written into a temporary sibling directory and renamed into place, so
a crash while saving leaves the previous checkpoint whole. Loading checks every file
and every tensor shape and says which one is wrong.

A checkpoint folder is untrusted input (whoever can put a folder into the checkpoint
directory chooses its files): every file is read through ``models_src.safe_files``
(regular files inside the folder only, each under a cap), and the shapes config.json
claims are checked against the weight files' headers before a model is built, so that
claimed sizes are never allocated on trust.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from . import hf_import, safe_files
from .fast_decode import PRECISIONS
from .registry import build_model
from .base import LanguageModel
from .config import ModelConfig
from .records import Evaluation, TrainingSummary
from .safe_files import MAX_CARD_BYTES, UnsafeFile
from .sampling_defaults import GENERATION_CONFIG, NEUTRAL, SamplingDefaults
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
HEALTH_FILE = "health.json"  # python -m training.inspect --save
#: What a tokenizer is read from: Fable's two files, or a Hugging Face tokenizer's.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
#: Every name the app reads in a checkpoint folder (and any *.safetensors shard).
READ_FILES = frozenset((CONFIG_FILE, CARD_FILE, HEALTH_FILE, WEIGHTS_FILE, WEIGHTS_INDEX,
                        GENERATION_CONFIG, *LEGACY_WEIGHTS, *TOKENIZER_FILES))


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message says why."""


@dataclass
class Checkpoint:
    model: LanguageModel
    tokenizer: Tokenizer
    config: ModelConfig
    training: TrainingSummary = field(default_factory=TrainingSummary)  # perplexity, tokens seen, ...
    evaluation: Evaluation = field(default_factory=Evaluation)  # the model card's figures
    path: Path | None = None
    defaults: SamplingDefaults = NEUTRAL  # what a request leaves unset (generation_config.json)

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
                    summary: TrainingSummary | dict | None = None, *, dtype: torch.dtype | None = None,
                    defaults: SamplingDefaults | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically; ``summary``: its ``training`` section (a dict is
    written as it is); ``dtype`` (e.g. torch.float16) shrinks the weights;
    ``defaults``: the model's sampling settings (none: generation_config.json is not written).

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
        "training": summary.to_dict() if isinstance(summary, TrainingSummary) else summary or {},
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
        if defaults is not None:
            defaults.write(tmp, tokenizer)
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


def check_files(directory) -> None:
    """Refuse a folder in which a name the app reads (README.md, a shard, ...) is a link,
    a FIFO, a device or a folder: such a checkpoint is not loaded at all, rather than
    served with a part of it quietly left out."""
    directory = Path(directory)
    try:
        found = safe_files.entries(directory, recursive=False)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a checkpoint (no {CONFIG_FILE})") from None
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot be read ({e.strerror})") from None
    for name, status in found:
        read = name in READ_FILES or name.endswith(".safetensors")
        if read and not stat.S_ISREG(status.st_mode):
            raise CheckpointError(str(safe_files.not_regular(directory / name, status.st_mode)))


def read_config(directory) -> dict:
    """The parsed, version-checked config.json of a checkpoint directory; a Hugging Face
    GPT-2 directory's in Fable's shape, marked ``"imported": "gpt2"``."""
    restore_set_aside(Path(directory))
    path = Path(directory) / CONFIG_FILE
    try:
        config = safe_files.read_json(directory, CONFIG_FILE)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: not a checkpoint (no {CONFIG_FILE})") from None
    except UnsafeFile as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
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
    """A model card's YAML front matter and its body (({}, text) without front matter);
    UnsafeFile for a card over MAX_CARD_BYTES or not a regular file."""
    path = Path(path)
    front, body = split_card(safe_files.read_text(path.parent, path.name, MAX_CARD_BYTES))
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


# ---- reading the weights: headers first, tensors once the shapes are right ---------------

Reader = Callable[[], dict[str, torch.Tensor]]


def _weights(directory: Path) -> tuple[dict[str, torch.Tensor], Reader]:
    """What the weight files hold, and how to read them. For safetensors the first comes
    from the headers, as meta tensors (shapes only: nothing allocated); a legacy file has
    no header, so its tensors (at most MAX_LEGACY_WEIGHTS_BYTES) are read at once."""
    if safe_files.present(directory, WEIGHTS_FILE):
        files, weight_map = [WEIGHTS_FILE], None
    elif safe_files.present(directory, WEIGHTS_INDEX):
        files, weight_map = _shards(directory)
    else:
        legacy = next((n for n in LEGACY_WEIGHTS if safe_files.present(directory, n)), None)
        if legacy is None:
            raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
        tensors = _read_legacy(directory, legacy)
        return tensors, lambda: tensors
    declared: dict[str, torch.Tensor] = {}
    for name in files:
        declared.update(_declared(directory, name, weight_map))
    return declared, lambda: _read_safetensors(directory, files, weight_map)


def _shards(directory: Path) -> tuple[list[str], dict[str, str]]:
    """The shards a weights index names, and which shard holds each tensor (a plain file
    name beside the index: an index cannot point elsewhere)."""
    index_path = directory / WEIGHTS_INDEX
    try:
        weight_map = safe_files.read_json(directory, WEIGHTS_INDEX)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except UnsafeFile:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a weights index ({e})") from None
    bad = [s for s in shards if not isinstance(s, str) or Path(s).name != s
           or not s.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index_path}: names {bad[0]!r}, not a .safetensors file beside it")
    missing = [s for s in shards if not safe_files.present(directory, s)]
    if missing:
        raise CheckpointError(f"{index_path}: names {missing[0]}, which is missing")
    return shards, weight_map


def _wanted(name: str, file: str, weight_map: dict[str, str] | None) -> bool:
    """Whether tensor ``name`` is read from ``file`` (a shard: the one its index names)."""
    return name != "__metadata__" and (weight_map is None or weight_map.get(name) == file)


def _declared(directory: Path, file: str,
              weight_map: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file's header declares, as meta tensors of their shapes.
    The header is an 8-byte length and that much JSON, read within MAX_JSON_BYTES."""
    path = directory / file
    with safe_files.open_file(directory, file, cap=None) as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if length > os.fstat(f.fileno()).st_size - 8:
            raise CheckpointError(f"{path}: weights are corrupt or truncated (the header "
                                  f"claims more bytes than the file holds)")
        if length > safe_files.MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: a header of {safe_files.size_text(length)}, over "
                                  f"the limit of {safe_files.size_text(safe_files.MAX_JSON_BYTES)}")
        try:
            header = json.loads(f.read(length)) if length else None
            return {name: torch.empty(entry["shape"], device="meta")
                    for name, entry in header.items() if _wanted(name, file, weight_map)}
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{path}: weights are corrupt or truncated (header: "
                                  f"{e or type(e).__name__})") from None


def _read_safetensors(directory: Path, files: list[str],
                      weight_map: dict[str, str] | None) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_files.open_file(directory, file, cap=None) as f:
            try:  # safetensors opens by path: the path of the file opened here, not its name
                part = load_file(safe_files.fd_path(f))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{directory / file}: weights are corrupt or truncated "
                                      f"({e})") from None
        tensors.update((name, t) for name, t in part.items() if _wanted(name, file, weight_map))
    return tensors


def _read_legacy(directory: Path, name: str) -> dict[str, torch.Tensor]:
    """A PyTorch state dict, read without unpickling arbitrary objects."""
    path = directory / name
    with safe_files.open_file(directory, name, safe_files.MAX_LEGACY_WEIGHTS_BYTES) as f:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError for truncated zips, ...
            raise CheckpointError(f"{path}: refused; only plain tensor state dicts are read "
                                  f"({_load_refusal(e)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # nanoGPT-style {"model": state_dict, ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


# ---- the shapes config.json claims, checked before anything of that size exists -----------

class _WithoutInitialisers(TorchFunctionMode):
    """Skips the weight initialisers while a model is built on the meta device: there
    they do nothing (a meta tensor holds no values), but the first random one imports
    torch._dynamo, a second of every process's start-up. Matched by name, so that
    ``Tensor.normal_`` goes as well as ``nn.init.normal_``. (Modes are per thread.)"""

    SKIPPED = frozenset(name for name in dir(torch.nn.init)
                        if name.endswith("_") and not name.startswith("_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _expected_state(config: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors a model of ``config`` has, as meta tensors: its shapes, nothing allocated."""
    with torch.device("meta"), _WithoutInitialisers():
        return _unique_state(build_model(config))


def _check_depth(directory: Path, config: ModelConfig, declared: dict) -> None:
    """Every layer holds at least one tensor: more layers than the weights hold tensors is
    refused before a model that deep is built (even on the meta device, 20,000 layers
    take seconds to build)."""
    for field_name in ("n_layer", "n_decoder_layer"):
        layers = getattr(config, field_name) or 0
        if layers > len(declared):
            raise CheckpointError(f"{directory / CONFIG_FILE}: {field_name} = {layers:,}, but "
                                  f"the weights hold only {len(declared)} tensors (each layer "
                                  f"has at least one)")


def _check_shapes(directory: Path, expected: dict[str, torch.Tensor],
                  tensors: dict[str, torch.Tensor]) -> None:
    problems = [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [f"{k}: shape {tuple(tensors[k].shape)} in the file, {tuple(v.shape)} expected"
                 for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{directory}: weights do not match config.json: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


def _load_tokenizer(directory: Path, imported: bool) -> Tokenizer:
    """The tokenizer, read from copies of its files in a private folder: the tokenizer
    libraries open files by name, so they get files checked here, not the checkpoint's
    names (which could be swapped for a link after a check)."""
    names = TOKENIZER_FILES + ((CONFIG_FILE,) if imported else ())  # transformers reads it
    with tempfile.TemporaryDirectory(prefix="fable-tokenizer-") as staged:
        for name in names:
            try:
                data = safe_files.read_bytes(directory, name, safe_files.MAX_TOKENIZER_BYTES)
            except FileNotFoundError:
                continue
            (Path(staged) / name).write_bytes(data)
        try:
            return hf_import.load_tokenizer(staged) if imported else Tokenizer.load(staged)
        except (OSError, ValueError) as e:
            reason = str(e).replace(staged, str(directory))
            raise CheckpointError(f"{directory}: tokenizer cannot be loaded ({reason})") from None


def _in_time(directory: Path, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise CheckpointError(f"{directory}: loading took too long, stopped")


def _load_refusal(error: Exception) -> str:
    """Why torch.load refused a file, without PyTorch's advice to load it with
    ``weights_only=False`` (which would run whatever code the file holds)."""
    text = str(error)
    _, found, detail = text.partition("WeightsUnpickler error: ")
    reason = (detail if found else text).split("\n", 1)[0].split(". Please", 1)[0].strip()
    return f"{type(error).__name__}: {reason[:200]}"


def load_checkpoint(directory, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, *,
                    deadline: float | None = None,
                    decode_precision: str | None = None) -> Checkpoint:
    """Load, validate and return a checkpoint's model (in eval mode) and tokenizer.

    ``deadline`` (a ``time.monotonic()`` value): past it, loading stops at its next step
    with a CheckpointError. ``decode_precision`` ("float32" or "int8": the inference path's
    products, GPTs only) overrides the checkpoint's own ``decode_precision``."""
    directory = Path(directory)
    try:
        return _load(directory, device, dtype, deadline, decode_precision)
    except UnsafeFile as e:
        raise CheckpointError(str(e)) from None


def _decode_precision(directory: Path, config: dict, model: LanguageModel, asked: str | None) -> str:
    """The checkpoint's decode_precision (config.json), or the one ``asked``, checked."""
    precision = asked or config.get("decode_precision", "float32")
    if precision not in PRECISIONS:
        raise CheckpointError(f"{directory / CONFIG_FILE}: decode_precision must be one of "
                              f"{', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "float32" and not hasattr(model, "decode_precision"):
        raise CheckpointError(f"{directory}: decode_precision {precision!r} is for GPT models; "
                              f"this one is a {model.config.arch}")
    return precision


def _load(directory: Path, device, dtype: torch.dtype, deadline: float | None,
          decode_precision: str | None) -> Checkpoint:
    restore_set_aside(directory)  # before the folder is looked at: it may be the set-aside one
    check_files(directory)
    config = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid model config ({e})") from None
    imported = "imported" in config
    tokenizer = _load_tokenizer(directory, imported)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model only {model_config.vocab_size}")
    _in_time(directory, deadline)
    declared, read = _weights(directory)
    if imported:
        declared = hf_import.from_gpt2(declared, model_config.tie_weights)
    _check_depth(directory, model_config, declared)
    expected = _expected_state(model_config)
    _check_shapes(directory, expected, declared)
    _in_time(directory, deadline)
    tensors = read()
    if imported:
        tensors = hf_import.from_gpt2(tensors, model_config.tie_weights)
    _check_shapes(directory, expected, tensors)  # the files may have changed since
    _in_time(directory, deadline)
    # Only now, with every shape matching tensors that were really read, is a model of
    # that size built.
    model = build_model(model_config)
    model.load_state_dict(tensors, strict=False)  # tied aliases are filled by the tie itself
    model.to(device=device, dtype=dtype).eval()
    precision = _decode_precision(directory, config, model, decode_precision)
    if precision != "float32":
        model.decode_precision = precision
    return Checkpoint(model, tokenizer, model_config, path=directory, defaults=read_defaults(directory),
                      training=TrainingSummary.from_dict(config.get("training")),
                      evaluation=Evaluation.from_dict(config.get("evaluation")))


def read_defaults(directory: Path) -> SamplingDefaults:
    """The sampling defaults of ``directory/generation_config.json``; NEUTRAL without one."""
    try:
        return SamplingDefaults.from_hf(safe_files.read_json(directory, GENERATION_CONFIG))
    except FileNotFoundError:
        return NEUTRAL
    except UnsafeFile as e:
        raise CheckpointError(str(e)) from None
    except ValueError as e:  # invalid JSON, or a setting SamplingParams refuses
        raise CheckpointError(f"{directory / GENERATION_CONFIG}: {e}") from None
