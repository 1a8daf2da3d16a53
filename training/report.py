"""What a training run tells as it goes: its opening and closing lines, the progress bar,
and one experiment row per evaluation (``training.experiments``).

Only rank 0 reports. ``quiet`` leaves out the lines and the bar, never the rows.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from .config import RunConfig
from .experiments import ExperimentLog, plot_curves


class RunReport:
    def __init__(self, cfg: RunConfig, *, main: bool, quiet: bool) -> None:
        self.cfg, self.main, self.talks = cfg, main, main and not quiet
        self.log = ExperimentLog(cfg.output.experiments_dir, cfg.name, config=cfg.to_dict()) if main else None
        self.bar = None

    @property
    def run_id(self) -> str | None:
        return self.log.run_id if self.log else None

    def reopen(self, run_id: str | None) -> None:
        """A resumed run's rows go on in its own file."""
        if self.log and run_id:
            self.log = ExperimentLog(self.cfg.output.experiments_dir, self.cfg.name, run_id=run_id,
                                     config=self.cfg.to_dict())

    def say(self, text: str) -> None:
        if self.talks:
            print(text, file=sys.stderr)

    def start_bar(self, total: int | None, done: int) -> None:
        self.bar = tqdm(total=total, initial=done, disable=not self.talks, dynamic_ncols=True,
                        desc=self.cfg.name)

    def step(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")

    def close_bar(self) -> None:
        self.bar.close()

    def row(self, progress: dict, *, kind: str, lr: float, train_time: float) -> None:
        """One experiment row: ``progress`` (the trainer's step, loss and metrics) and the rate."""
        if not self.log:
            return
        self.log.log(**progress, model=self.cfg.run_dir.name, architecture=self.cfg.model.arch,
                     tokens_per_s=progress["tokens_seen"] / max(train_time, 1e-9), learning_rate=lr,
                     wall_time_s=train_time, split="validation", kind=kind)

    def plot(self) -> None:
        """The run's loss curves as ``loss.png`` in its directory."""
        plot_curves(self.cfg.output.experiments_dir, self.log.run_id, self.cfg.run_dir / "loss.png")
