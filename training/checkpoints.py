"""A run's checkpoints on disk: ``last/`` (with the trainer state, for ``--resume``),
``best/`` and ``final/`` under the run directory, and the published copy for the app.

Each is written by ``models_src.checkpoint.save_checkpoint`` (beside the target, then
swapped in); a write that fails becomes a ``TrainingError`` that names the path and says
what is left there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models_src.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from models_src.records import TrainingSummary
from models_src.sampling_defaults import STARTING

from .state import TrainState

TRAINER_STATE = "trainer_state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


class RunCheckpoints:
    def __init__(self, run_dir: Path, model: torch.nn.Module, tokenizer, dtype: torch.dtype) -> None:
        self.run_dir, self.model, self.tokenizer = run_dir, model, tokenizer
        self.dtype = dtype  # of best/ and final/; last/ stays float32 for an exact resume

    def save(self, which: str, summary: TrainingSummary, state: TrainState | None = None) -> Path:
        """``which`` ("last", "best" or "final"); with ``state``, float32 and the trainer state."""
        if state is None:
            return self.write(self.run_dir / which, summary, dtype=self.dtype)
        return self.write(self.run_dir / which, summary,
                          write_extra=lambda directory: state.save(directory / TRAINER_STATE))

    def write(self, path: Path, summary: TrainingSummary, **options) -> Path:
        """save_checkpoint, with a failed write (a full disk, a lost mount) turned into a
        TrainingError. The previous checkpoint at ``path`` is still whole then. Every
        checkpoint of a run samples with the starting defaults until a sweep picks its own."""
        try:
            return save_checkpoint(path, self.model, self.tokenizer, summary,
                                   defaults=STARTING, **options)
        except OSError as e:
            try:
                step = TrainingSummary.from_dict(read_config(path).get("training")).step
                at = f" (step {step})" if step is not None else ""
                previous = f"the previous checkpoint there{at} is intact"
            except (CheckpointError, OSError):
                previous = "there was no previous checkpoint there"
            raise TrainingError(f"could not write the checkpoint {path} at step {summary.step}: "
                                f"{e.strerror or e}; {previous}. Training stopped.") from e

    def resume(self, state: TrainState, device: torch.device) -> None:
        """The weights and the whole trainer state of ``last/``."""
        last = self.run_dir / "last"
        try:
            restored = load_checkpoint(last, device=device)
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        if restored.config != self.model.config:
            raise TrainingError(f"cannot resume: {last} was trained with another model config")
        self.model.load_state_dict(restored.model.state_dict())
        try:
            state.load(last / TRAINER_STATE, device)
        except (KeyError, ValueError) as e:  # what torch raises for another optimizer's state
            raise TrainingError(f"cannot resume: {last} holds another optimizer's state "
                                f"(was training.optimizer changed?): {e}") from None
