"""Optional metric loggers, chosen with ``output.loggers: [jsonl, tensorboard, wandb]``.

They get what the experiment store gets: ``train/loss``, ``train/learning_rate`` and
``train/tokens_per_s`` every optimizer step, ``validation/<metric>`` every evaluation, and
whatever other code logs through ``scalars(step, values, group)``; and the text samples
of ``training.sample_every`` through ``text(step, name, text)``.

    jsonl         one JSON object a line in <run dir>/metrics.jsonl (below)
    tensorboard   event files in <run dir>/tensorboard:   tensorboard --logdir runs/
    wandb         an offline run in <run dir>/wandb:      wandb sync <run dir>/wandb/offline-run-*
                  (WANDB_MODE=online logs live; WANDB_PROJECT names the project, "fable" by default)

jsonl needs nothing. Neither TensorBoard nor W&B is a requirement: each is imported only
when listed, and a missing one is a ConfigError as the Trainer starts. Only rank 0 logs (``training.report``).

metrics.jsonl is what the app's training page tails while a run goes on, so its fields are
a stable format: add fields, never rename or drop one. Each line is a whole JSON object,
flushed as it is written (a last line without its newline is still being written):

    {"event": "start", "run_id": "...", "step": 0, "time": 1767225600.123}
    {"step": 10, "group": "train", "time": 1767225601.5, "values": {"loss": 2.31, ...}}
    {"step": 10, "group": "validation", "time": ..., "values": {"loss": ..., "perplexity": ...}}
    {"step": 10, "group": "sample", "time": ..., "text": "prompt and what the model wrote"}

``step`` is the optimizer step, ``time`` Unix seconds (three decimals). ``group`` is
``train`` (loss, learning_rate, tokens_per_s; every step), ``validation`` (loss,
perplexity, token_accuracy, bits_per_char; every evaluation), ``health`` (``<layer>/<metric>``)
or ``sample`` (a ``text``, not ``values``); other code may add groups. A value that is not a
finite number (NaN, infinity) is ``null``; the others keep 7 significant digits. A new run
(``start`` at step 0) empties the file; a resumed one appends its ``start`` at the step it
resumes from, and its records from there on replace the earlier ones at later steps
(the steps after the checkpoint ran again).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import time
from collections.abc import Iterable
from types import ModuleType

from .config import ConfigError, RunConfig

METRICS_FILE = "metrics.jsonl"  # the jsonl logger's file in the run directory
SIGNIFICANT_DIGITS = 7  # a float32's precision: more digits only make metrics.jsonl's lines longer

# Where the run stands rather than how it scores (the train loss goes with every step).
NOT_VALIDATION = ("step", "parameters", "epoch", "tokens_seen", "train_loss")


def _require(package: str, logger: str, module: str | None = None) -> ModuleType:
    """``module`` (the package itself by default), or a ConfigError saying what to install."""
    try:
        return importlib.import_module(module or package)
    except ImportError as e:
        if e.name == package:
            raise ConfigError(f"output.loggers: {logger} needs the {package} package "
                              f"(pip install {package})") from None
        # installed but broken (a dependency missing, say): what failed, not "install it"
        raise ConfigError(f"output.loggers: {logger} could not import {module or package} ({e})") from e


def json_number(value: float) -> float | None:
    """``value`` as metrics.jsonl writes it: JSON has no NaN or infinity, so those are null."""
    value = float(value)
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None


def now() -> float:
    """Unix seconds to the millisecond: metrics.jsonl's ``time``."""
    return round(time.time(), 3)


class JsonlLogger:
    """``<run dir>/metrics.jsonl`` (the format is in the module docstring): another process
    tails it, so every line is flushed as it is written."""

    def __init__(self, cfg: RunConfig) -> None:
        self.path = cfg.run_dir / METRICS_FILE
        self.file = None

    def start(self, run_id: str, step: int) -> None:
        """A new run replaces what ran in its directory before; a resumed one goes on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "w" if step == 0 else "a", encoding="utf-8")
        self.write({"event": "start", "run_id": run_id, "step": step, "time": now()})

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        self.write({"step": step, "group": group, "time": now(),
                    "values": {name: json_number(value) for name, value in values.items()}})

    def text(self, step: int, name: str, text: str) -> None:
        self.write({"step": step, "group": "sample", "time": now(), "text": text})

    def write(self, record: dict) -> None:
        """One compact line, flushed at once for the process that tails the file."""
        self.file.write(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


class TensorBoardLogger:
    def __init__(self, cfg: RunConfig) -> None:
        _require("tensorboard", "tensorboard")  # torch's writer needs it
        self.writer_class = _require("tensorboard", "tensorboard", "torch.utils.tensorboard").SummaryWriter
        self.log_dir = cfg.run_dir / "tensorboard"
        self.writer = None

    def start(self, run_id: str, step: int) -> None:
        # A resumed run redoes the steps after its checkpoint, a new one replaces whatever
        # ran in its directory before: TensorBoard hides older events from that step on.
        self.writer = self.writer_class(str(self.log_dir), purge_step=step + 1)

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{group}/{name}", value, step)

    def text(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(f"samples/{name}", text, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


class WandbLogger:
    def __init__(self, cfg: RunConfig) -> None:
        self.wandb = _require("wandb", "wandb")
        self.cfg = cfg
        self.run = None

    def start(self, run_id: str, step: int) -> None:
        """One W&B run per experiment-store run, under the same id: a resumed run goes on."""
        self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fable"), name=self.cfg.name, id=run_id,
            resume="allow", dir=str(self.cfg.run_dir), config=self.cfg.to_dict(),
            # Offline (sync later) unless the user chose a mode: nothing leaves the machine unasked.
            mode=os.environ.get("WANDB_MODE") or "offline")

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        self.run.log({f"{group}/{name}": value for name, value in values.items()}, step=step)

    def text(self, step: int, name: str, text: str) -> None:
        self.run.log({f"samples/{name}": text}, step=step)

    def close(self) -> None:
        if self.run:
            self.run.finish()


BACKENDS = {"jsonl": JsonlLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def validation_metrics(progress: dict) -> dict[str, float]:
    """The scores in a trainer's ``progress`` dict, without the ``val_`` prefix:
    loss, perplexity, token_accuracy, bits_per_char... (the ones it has)."""
    return {name.removeprefix("val_"): float(value) for name, value in progress.items()
            if name not in NOT_VALIDATION and isinstance(value, numbers.Real)}


class Loggers:
    """Every configured logger as one; with no names, all of it does nothing.

    ``start`` opens them once the run id is known (a resumed run's own), ``close`` is
    idempotent."""

    def __init__(self, cfg: RunConfig, names: Iterable[str] = ()) -> None:
        self.backends = [BACKENDS[name](cfg) for name in names]  # a missing package fails here

    def start(self, run_id: str, step: int) -> None:
        """``step``: the optimizer steps already done (a resumed run's)."""
        for backend in self.backends:
            backend.start(run_id, step)

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        """``values`` as ``<group>/<name>`` at optimizer step ``step``. Steps never go back:
        W&B drops values logged behind its latest step."""
        for backend in self.backends:
            backend.scalars(step, values, group)

    def text(self, step: int, name: str, text: str) -> None:
        """A piece of text (a sample the model wrote) as ``samples/<name>`` at step ``step``."""
        for backend in self.backends:
            backend.text(step, name, text)

    def train_step(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        self.scalars(step, {"loss": loss, "learning_rate": lr, "tokens_per_s": tokens_per_s}, "train")

    def validation(self, progress: dict) -> None:
        self.scalars(progress["step"], validation_metrics(progress), "validation")

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()
