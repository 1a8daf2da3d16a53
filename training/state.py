"""Where a training run stands: one ``TrainState``, saved and restored whole.

Everything a step changes other than the weights lives here (the counters, the recurrent
state, the batch generator, the optimizer and the plateau schedule), so that
``last/trainer_state.pt`` resumes a run exactly where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from models_src.rnn import RecurrentState

OBJECTS = ("optimizer", "generator", "plateau")  # saved as their own state, restored into them


def _global_rng() -> dict:
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_global_rng(saved: dict) -> None:
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"]:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # draws the training batches
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
    step: int = 0  # optimizer steps done
    window: int = 0  # the next truncated-BPTT window
    hidden: RecurrentState | None = None  # the recurrent state carried into that window
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations in a row without improvement (early stopping)
    train_time: float = 0.0  # seconds in training steps, evaluations left out
    loop_time: float = 0.0  # seconds of the loop before `loop_started`, evaluations included
    last_train_loss: float | None = None
    run_id: str | None = None  # the experiment run its rows go to

    def __post_init__(self) -> None:
        self.start_clock()
        # Under DDP, every rank's place() as gathered for the last save (rank 0 saves them
        # all); None in a single process, or when rank 0 saved alone (Ctrl-C).
        self.places: list[dict] | None = None

    def start_clock(self) -> None:
        self.loop_started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of this run's loop so far (a resumed run adds up)."""
        return self.loop_time + time.perf_counter() - self.loop_started

    def state_dict(self) -> dict:
        """Every field, plus the global random generators (dropout draws from them)."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in OBJECTS}
        return {**saved, **_global_rng(), "loop_time": self.elapsed(),
                "hidden": None if self.hidden is None else self.hidden.layers,
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "plateau": self.plateau.state_dict() if self.plateau else None,
                **({"places": self.places} if self.places else {})}

    def load_state_dict(self, saved: dict) -> None:
        for f in fields(self):
            if f.name not in OBJECTS:
                setattr(self, f.name, saved[f.name])
        if self.hidden is not None and not isinstance(self.hidden, RecurrentState):
            self.hidden = RecurrentState(self.hidden)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.generator.set_state(saved["generator"])
        if self.plateau and saved["plateau"]:
            self.plateau.load_state_dict(saved["plateau"])
        _set_global_rng(saved)
        self.places = saved.get("places")  # absent from single-process runs and older files
        self.start_clock()

    def place(self) -> dict:
        """Where this rank is in its own data, which differs from rank to rank under DDP:
        its batch generator, window and recurrent state (on the CPU, to travel)."""
        hidden = None if self.hidden is None else self.hidden.to(torch.device("cpu")).layers
        return {"generator": self.generator.get_state(), "window": self.window, "hidden": hidden}

    def restore_place(self, rank: int, seed: int, device: torch.device) -> bool:
        """Put this rank back where it was at the save (False when ``places`` holds no place
        for it). Without one, it must not read rank 0's batches again, which the state loaded
        holds: it draws from a generator of its own (seeded from ``seed`` and the step) and
        starts its recurrent state afresh."""
        place = self.places[rank] if self.places and rank < len(self.places) else None
        if place is None and rank == 0:
            return True  # the state loaded is rank 0's own
        if place is None:
            self.generator.manual_seed(seed + 1_000_003 * self.step)
            self.hidden = None
            return False
        self.generator.set_state(place["generator"])
        self.window = place["window"]
        self.hidden = None if place["hidden"] is None else RecurrentState(place["hidden"]).to(device)
        return True

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path)

    def load(self, path: Path, device: torch.device) -> None:
        # Only tensors, numbers and containers: weights_only refuses anything else. On the CPU,
        # as random generator states must be; the optimizer moves its own to its parameters.
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(saved)
        if self.hidden is not None:
            self.hidden = self.hidden.to(device)

    def mark(self) -> dict:
        """What a step changes besides the weights and the optimizer, for `rewind`."""
        return {"step": self.step, "generator": self.generator.get_state(), "window": self.window,
                "hidden": self.hidden, **_global_rng()}

    def rewind(self, mark: dict) -> None:
        """Undo a step cut short before its update, so that the state is the one before it;
        nothing to undo once the step has counted."""
        if self.step != mark["step"]:
            return
        self.generator.set_state(mark["generator"])
        self.window, self.hidden = mark["window"], mark["hidden"]
        _set_global_rng(mark)
