"""The models a worker serves: every valid checkpoint directly under one directory.

Loaded when the app is created (inside each gunicorn worker), and again on ``refresh()``
(app/serving/reload.py): a new directory is loaded, a changed one reloaded, a removed one
unloaded. A directory that fails to load is skipped, and why is kept in
``registry.errors`` for the admin page; a model that was serving stays when its changed
files fail to load. A directory that failed is not tried again until its files change,
and no load may take longer than FABLE_LOAD_TIMEOUT_S: a folder of hostile files costs
one attempt, not one per reload. The app starts even with no model at all. Models are
looked up by exact name among the loaded ones only, so a name in a request can never
become a path.
A refresh swaps in new dictionaries at once: a request sees the models before or after,
and a generation keeps the ``LoadedModel`` it started with until it ends.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import current_app

from app.platform.settings import default_of
from models_src import safe_files
from models_src.chat import ChatTemplateError, checked
from models_src.checkpoint import (HEALTH_FILE, Checkpoint, CheckpointError, load_checkpoint, read_config,
                                   suggested_prompt)
from models_src.infill import trained_to_infill
from models_src.sampling_defaults import SamplingDefaults
from models_src.summary import count_parameters

log = logging.getLogger(__name__)

def short_count(n: int) -> str:
    """Parameter counts as people (and Ollama) say them: 7.2B, 124.4M, 85.3K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


@dataclass(frozen=True)
class ModelFacts:
    """What listings show about one loaded model (all JSON-safe; unknown facts are None)."""
    name: str
    architecture: str
    parameters: int
    tokenizer: str  # tokenizer kind: char, word, bpe, gpt2, hf
    vocab_size: int
    context: int | None  # longest context an attention model sees; None for RNNs
    n_layer: int
    n_embd: int
    # its width as its family names it: hidden units for a recurrent model, the embedding
    # (the residual stream) for an attention model
    width: int
    dtype: str  # how the weights are stored on disk (they are served as float32)
    device: str
    decode_precision: str  # the inference path's products: float32, or int8 (on a CPU)
    size_bytes: int  # the checkpoint directory's files
    modified_at: str  # ISO 8601, UTC: newest file in the directory
    digest: str  # sha256 (hex) over the directory's files, names included
    can_infill: bool  # trained on the infilling format (models_src.infill.trained_to_infill)
    # what a request leaves unset (models_src.sampling_defaults; max_new_tokens None: the
    # room left in the context)
    sampling: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None  # what its card offers to try (the prompt box's placeholder)
    # python -m training.inspect --save: {"problems": [...], "checked": ..., "measured_on": ...}
    health: dict | None = None
    val_perplexity: float | None = None
    val_loss: float | None = None
    bits_per_char: float | None = None
    token_accuracy: float | None = None
    tokens_seen: int | None = None
    training_time_s: float | None = None
    data: Any = None
    step: int | None = None
    hardware: Any = None
    trained_on: str | None = None  # the day its training run started (its run id), YYYY-MM-DD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)  # compared (and hashed) by identity: one load of one checkpoint
class LoadedModel:
    name: str
    checkpoint: Checkpoint
    facts: ModelFacts
    fingerprint: tuple = ()  # the files' names, sizes and times when it was loaded

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def tokenizer(self):
        return self.checkpoint.tokenizer

    @property
    def defaults(self) -> SamplingDefaults:
        return self.checkpoint.defaults


class ModelRegistry:
    """Loaded models by name, plus the directories that failed (``errors``: name -> why).

    ``load_timeout_s``: how long one checkpoint may take to load (create_app passes the
    setting)."""

    def __init__(self, directory: Path, device: str,
                 models: dict[str, LoadedModel] | None = None,
                 errors: dict[str, str] | None = None,
                 load_timeout_s: float = default_of("load_timeout_s")) -> None:
        self.directory = Path(directory)
        self.device = device
        self._models = dict(sorted((models or {}).items()))
        self.errors = dict(sorted((errors or {}).items()))
        self.load_timeout_s = load_timeout_s
        self._failures: dict[str, tuple] = {}  # name -> the fingerprint of the files that failed
        self._refreshing = threading.Lock()

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu",
             load_timeout_s: float = default_of("load_timeout_s")) -> ModelRegistry:
        """Load every non-hidden directory under ``directory``; never raises for a bad one."""
        registry = cls(directory, device, load_timeout_s=load_timeout_s)
        if not registry.directory.is_dir():
            log.warning("checkpoint directory %s does not exist: serving no models", directory)
            return registry
        registry.refresh()
        return registry

    def refresh(self) -> dict[str, list[str]]:
        """Match the checkpoint directory: load new models, reload changed ones, unload
        removed ones; one that fails keeps its previous version. Returns the names
        ``added``, ``reloaded``, ``removed``, ``failed`` and ``unchanged``."""
        with self._refreshing:
            report: dict[str, list[str]] = {k: [] for k in
                                            ("added", "reloaded", "removed", "failed", "unchanged")}
            found = _checkpoint_dirs(self.directory)
            models, errors, failures = dict(self._models), {}, {}
            for name in [n for n in models if n not in found]:
                del models[name]
                report["removed"].append(name)
                log.info("unloaded %s (its directory is gone)", name)
            for name, path in found.items():
                old = models.get(name)
                fingerprint = _fingerprint(path)
                if old is not None and old.fingerprint == fingerprint:
                    report["unchanged"].append(name)
                    continue
                if fingerprint and self._failures.get(name) == fingerprint:
                    # the same files failed before: the same reason, without trying again
                    failures[name], errors[name] = fingerprint, self.errors[name]
                    report["failed"].append(name)
                    continue
                try:
                    models[name] = self._load_in_time(path, fingerprint)
                except Exception as e:  # one broken checkpoint must not stop the others
                    errors[name] = reason = self._reason(e)
                    failures[name] = fingerprint
                    report["failed"].append(name)
                    log.warning("skipping checkpoint %s: %s%s", name, reason,
                                " (the loaded version stays)" if old is not None else "")
                else:
                    report["reloaded" if old is not None else "added"].append(name)
            self._models, self.errors = dict(sorted(models.items())), dict(sorted(errors.items()))
            self._failures = failures
            if report["failed"]:
                # A failed load's tensors may hang on in reference cycles (an exception's
                # traceback holds its frames): give their memory back now, to the system too.
                gc.collect()
                _return_free_memory()
            return report

    def _load_in_time(self, path: Path, fingerprint: tuple) -> LoadedModel:
        """``_load`` in a thread of its own, waited for load_timeout_s at most: a load
        stuck past it is reported and left behind (its deadline stops it at its next
        step), and the worker goes on serving the other models."""
        deadline = time.monotonic() + self.load_timeout_s
        outcome: dict[str, Any] = {}

        def load() -> None:
            try:
                outcome["loaded"] = self._load(path, fingerprint, deadline)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = e

        thread = threading.Thread(target=load, name=f"fable-load-{path.name}", daemon=True)
        thread.start()
        thread.join(self.load_timeout_s)
        if thread.is_alive():
            raise CheckpointError(f"{path}: not loaded within {self.load_timeout_s:g} s "
                                  f"(FABLE_LOAD_TIMEOUT_S); not tried again until its files "
                                  f"change")
        if "error" in outcome:
            raise outcome.pop("error")
        return outcome.pop("loaded")

    def _load(self, path: Path, fingerprint: tuple, deadline: float | None = None) -> LoadedModel:
        checkpoint = load_checkpoint(path, device=self.device, deadline=deadline)
        template = getattr(checkpoint.tokenizer, "chat_template", None)
        if template:  # rendered once under its budget now, not first at a client's request
            try:
                checked(template)
            except ChatTemplateError as e:
                raise CheckpointError(f"{path}: its chat template is refused: {e}") from None
        loaded = LoadedModel(path.name, checkpoint,
                             _facts(path, checkpoint, self.device, deadline), fingerprint)
        log.info("loaded %s (%s, %s parameters) on %s", path.name, checkpoint.config.arch,
                 f"{loaded.facts.parameters:,}", self.device)
        return loaded

    def _reason(self, e: Exception) -> str:
        reason = _relative(str(e) or type(e).__name__, self.directory)
        if not isinstance(e, ValueError):  # CheckpointError is a ValueError
            reason = f"{type(e).__name__}: {reason}"
        return reason

    def get(self, name: Any) -> LoadedModel | None:
        """The loaded model called exactly ``name``, else None (never touches the disk)."""
        return self._models.get(name) if isinstance(name, str) else None

    def __contains__(self, name: Any) -> bool:
        return self.get(name) is not None

    def __len__(self) -> int:
        return len(self._models)

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def names(self) -> list[str]:
        return list(self._models)

    def facts(self, *, infill: bool = False) -> list[ModelFacts]:
        """Every model's facts, or (``infill``) those of the models trained to infill."""
        return [m.facts for m in self._models.values() if m.facts.can_infill or not infill]

    def default(self, preferred: str | None = None, *, infill: bool = False) -> ModelFacts | None:
        """The model a page starts on: ``preferred`` when it is loaded (and infills, if the
        page needs that), else the one with the fewest bits per character, a figure that
        compares models whatever their vocabulary (models without one come last)."""
        return (self.ranked(preferred, infill=infill) or [None])[0]

    def ranked(self, preferred: str | None = None, *, infill: bool = False) -> list[ModelFacts]:
        """The loaded models (that infill, with ``infill``), ``preferred`` first when it is
        loaded, then by fewest bits per character (models without one last)."""
        models = sorted(self.facts(infill=infill),
                        key=lambda m: (m.bits_per_char is None, m.bits_per_char or 0, m.name))
        return sorted(models, key=lambda m: m.name != preferred)  # stable: the rest keep their order


def _checkpoint_dirs(directory: Path) -> dict[str, Path]:
    """The candidate checkpoints: non-hidden directories (hidden ones are
    save_checkpoint's temporary and set-aside copies)."""
    if not directory.is_dir():
        return {}
    return {p.name: p for p in sorted(directory.iterdir())
            if not p.name.startswith(".") and p.is_dir()}


def _return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim): what a failed
    load freed otherwise stays with the allocator (each load runs in a thread of its own,
    with its own arena)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its own counsel
        pass


def _fingerprint(path: Path) -> tuple:
    """What changes when a checkpoint is rewritten: each entry's name, kind, size and mtime,
    links and special files included, none followed (save_checkpoint swaps in a new
    directory, so its inode changes too). A folder that is a link, or cannot be listed,
    is its own inode and kind alone; () when it is gone."""
    try:
        status = os.lstat(path)
    except OSError:
        return ()
    try:
        found = safe_files.entries(path)
    except (OSError, safe_files.UnsafeFile):
        found = []
    return (status.st_ino, status.st_mode,
            *((name, st.st_mode, st.st_size, st.st_mtime_ns) for name, st in found))


def _relative(message: str, directory: Path) -> str:
    """Error messages name files relative to the checkpoint directory (no server paths)."""
    for prefix in {str(directory.resolve()), str(directory)}:
        message = message.replace(prefix + "/", "")
    return message


def _json_safe(value: Any) -> Any:
    """Free-form summary values as strict JSON: NaN/inf (which json.dumps would write) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _digest(path: Path, files: list[str], deadline: float | None) -> str:
    """sha256 over the files' names and contents (regular files only, read safely)."""
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        with safe_files.open_file(path, name, cap=None) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                if deadline is not None and time.monotonic() > deadline:
                    raise CheckpointError(f"{path}: loading took too long, stopped")
    return digest.hexdigest()


def _facts(path: Path, checkpoint: Checkpoint, device: str,
           deadline: float | None = None) -> ModelFacts:
    files = safe_files.regular_files(path)
    stats = list(files.values())
    newest = max((s.st_mtime for s in stats), default=os.lstat(path).st_mtime)
    config, tok = checkpoint.config, checkpoint.tokenizer
    summary = checkpoint.training
    return ModelFacts(
        name=path.name,
        architecture=config.arch,
        parameters=count_parameters(checkpoint.model),
        tokenizer=tok.kind,
        vocab_size=tok.vocab_size,
        context=checkpoint.model.max_context,
        n_layer=config.n_layer,
        n_embd=config.n_embd,
        width=config.n_hidden if checkpoint.model.max_context is None else config.n_embd,
        dtype=str(read_config(path).get("dtype", "float32")),
        device=device,
        decode_precision=getattr(checkpoint.model, "decode_precision", "float32"),
        size_bytes=sum(s.st_size for s in stats),
        modified_at=datetime.fromtimestamp(newest, timezone.utc).isoformat().replace("+00:00", "Z"),
        digest=_digest(path, list(files), deadline),
        can_infill=trained_to_infill(summary, tok),
        sampling=asdict(checkpoint.defaults),
        prompt=suggested_prompt(path),
        health=_health(path),
        data=_json_safe(summary.data),
        hardware=_json_safe(summary.hardware),
        trained_on=_run_day(summary.run_id),
        tokens_seen=summary.tokens_seen,
        training_time_s=summary.training_time_s,
        step=summary.step,
        **_figures(checkpoint),
    )


def _figures(checkpoint: Checkpoint) -> dict[str, float | None]:
    """Loss, perplexity, bits per character and accuracy as ``python -m training.evaluate``
    stored them (config.json "evaluation", which the model card shows), else as the
    trainer's last evaluation left them."""
    ev, summary = checkpoint.evaluation, checkpoint.training
    pairs = {"val_perplexity": (ev.perplexity, summary.val_perplexity),
             "val_loss": (ev.loss, summary.val_loss),
             "bits_per_char": (ev.bits_per_char, summary.bits_per_char),
             "token_accuracy": (ev.token_accuracy, summary.token_accuracy)}
    return {name: stored if stored is not None else trained for name, (stored, trained) in pairs.items()}


def _run_day(run_id: str | None) -> str | None:
    """``20261207-101323-8f93eb`` (the records' run ids start with the UTC start time) ->
    ``2026-12-07``; None for anything else."""
    match = re.match(r"^(\d{4})(\d{2})(\d{2})-\d{6}-", run_id) if isinstance(run_id, str) else None
    return "-".join(match.groups()) if match else None


def _health(path: Path) -> dict | None:
    """The checkpoint's saved health report (``health.json``): its problems, when and on
    what it was measured; None without one (or with one that is not a report)."""
    try:
        report = safe_files.read_json(path, HEALTH_FILE)
    except safe_files.UnsafeFile:
        raise  # a link, FIFO or device, or over the cap: the checkpoint is refused
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("problems"), list):
        return None
    return {"problems": [str(p) for p in report["problems"]],
            "checked": str(report.get("checked", "")), "measured_on": str(report.get("measured_on", ""))}


def get_registry() -> ModelRegistry:
    """The current app's registry (inside a request or app context)."""
    return current_app.extensions["fable.registry"]
