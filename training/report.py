"""What a training run tells as it goes: its opening and closing lines, the progress bar,
one experiment row per evaluation (``training.experiments``), the text samples of
``training.sample_every`` and, when ``output.loggers`` lists them, the same figures (and
samples) to metrics.jsonl, TensorBoard and W&B (``training.loggers``).

Only rank 0 reports. ``quiet`` leaves out the lines and the bar, never the rows.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from models_src.records import ExperimentLog, HealthLog

from .config import RunConfig
from .experiments import plot_curves
from .loggers import Loggers


class RunReport:
    def __init__(self, cfg: RunConfig, *, main: bool, quiet: bool) -> None:
        self.cfg, self.main, self.talks = cfg, main, main and not quiet
        self.log = ExperimentLog(cfg.output.experiments_dir, cfg.name, config=cfg.to_dict()) if main else None
        self.bar = None
        self.loggers = Loggers(cfg, cfg.output.loggers if main else ())
        self.health_log: HealthLog | None = None  # opened at the first health records

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
        """The bar, and the loggers: the loop starts, and a resumed run has its own id back."""
        self.bar = tqdm(total=total, initial=done, disable=not self.talks, dynamic_ncols=True,
                        desc=self.cfg.name)
        self.loggers.start(self.run_id, done)

    def step(self, loss: float, lr: float, tokens_per_s: float, *, step: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        self.loggers.train_step(step, loss, lr, tokens_per_s)

    def scalars(self, step: int, values: dict[str, float], group: str) -> None:
        """Any named figures (``<group>/<name>``) to every configured logger, at an optimizer step."""
        self.loggers.scalars(step, values, group)

    def sample(self, step: int, text: str) -> None:
        """A text the model wrote at optimizer step ``step``: to the loggers, and above the bar."""
        self.loggers.text(step, "text", text)
        if self.talks:
            tqdm.write(f"sample at step {step}:\n{text}\n", file=sys.stderr)

    def close_bar(self) -> None:
        self.bar.close()

    def row(self, progress: dict, *, kind: str, lr: float, train_time: float) -> None:
        """One experiment row: ``progress`` (the trainer's step, loss and metrics) and the rate."""
        if not self.log:
            return
        self.log.log(**progress, model=self.cfg.run_dir.name, architecture=self.cfg.model.arch,
                     tokens_per_s=progress["tokens_seen"] / max(train_time, 1e-9), learning_rate=lr,
                     wall_time_s=train_time, split="validation", kind=kind)
        self.loggers.validation(progress)

    def health(self, step: int, records: list[tuple[str, str, float]]) -> None:
        """Training-health records (models_src.health) beside the run's rows."""
        if not self.log:
            return
        if self.health_log is None or self.health_log.run_id != self.log.run_id:  # resumed
            self.health_log = HealthLog(self.cfg.output.experiments_dir, self.cfg.name,
                                        self.log.run_id)
        self.health_log.log(step, records)
        self.loggers.scalars(step, {f"{layer}/{metric}": value for layer, metric, value in records},
                             "health")

    def plot(self) -> None:
        """The run's loss curves as ``loss.png`` in its directory."""
        plot_curves(self.cfg.output.experiments_dir, self.log.run_id, self.cfg.run_dir / "loss.png")

    def close(self) -> None:
        """Flush and close the loggers (the trainer does, however its run ends); again is
        harmless."""
        self.loggers.close()
