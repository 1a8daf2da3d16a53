"""Train a model from a YAML config.

    python -m training.train --config training/configs/char_gpt_shakespeare.yaml [key=value ...]
    python -m training.train --config ... --resume          # continue from runs/<name>/last
    python -m training.train --preset char-gpt --data my_text.txt --name my-model --minutes 10
    python -m training.train --preset char-gpt --corpus tinyshakespeare/input.txt --name my-model
    python -m training.train --preset char-gpt --data my_text.txt --name my-model --check  # only check
    torchrun --nproc_per_node 2 -m training.train --config ...   # data-parallel (gloo on CPU, NCCL on GPU)

The command line, the set-up (device, DDP, data, model, optimizer) and the loop, which
reads top to bottom in ``Trainer.fit``. Where a run stands is ``training.state``, its
checkpoints ``training.checkpoints``, what it prints and records ``training.report``.
The one command (``--preset``) makes a config of a recipe (``training.config.RECIPES``)
and a text file (``--data``, or ``--corpus``: a file of a corpus ``fable data fetch`` got),
checks both before anything is written, and publishes the checkpoint with its model card
where the app finds it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import re
import shlex
import signal
import sys
import threading
import time
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist

from models_src import ModelConfig, build_model, health
from models_src.checkpoint import CheckpointError
from models_src.generation import generate
from models_src.records import TrainingSummary
from models_src.sampling import SamplingParams
from models_src.summary import count_parameters

from .batches import batch_source, describe_reads
from .checkpoints import RunCheckpoints, TrainingError
from .config import DEFAULT_MINUTES, RECIPES, ConfigError, RunConfig, load_config, recipe_config
from .corpora import CORPORA, CorpusError, locate
from .data import DataError, load_documents, prepare
from .evaluate import score_text
from .examples import in_order
from .metrics import score, score_batches
from .optimizers import build_optimizer
from .model_card import write_card
from .report import RunReport
from .state import TrainState

__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "main"]


# Tokens per truncated back-propagation window of a recurrent model without data.max_seq_len.
RECURRENT_WINDOW = 128
# training.sample_every's samples: the first tokens of the validation text, continued at a
# temperature that reads better than 1.0 and still shows what the model has not learned
SAMPLE_PROMPT_TOKENS = 8
SAMPLE_PROMPT_LOOKAHEAD = 64  # tokens searched for the start of a line
SAMPLE_TEMPERATURE = 0.8


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after it saved last/ and final/; the message says where."""


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj):
        """Every rank's ``obj`` in rank order, on rank 0 (None on the others, and in a single
        process); a collective: every rank calls it."""
        if self.world == 1:
            return None
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (``value`` itself in a single process); a
        collective: every rank calls it. Each rank's clock is its own, and decisions taken
        from a clock (a time budget's end, its learning rate) must be the same on every
        rank: a rank that stopped alone would leave the others waiting in DDP's all-reduce,
        and ranks with different learning rates would train different models."""
        if self.world == 1:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        agreed = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(agreed, src=0)
        return float(agreed.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class Trainer:
    def __init__(self, cfg: RunConfig, *, quiet: bool = False, command: str | None = None) -> None:
        self.cfg, self.t = cfg, cfg.training
        self.command = command or cfg.command  # what trains it again, as checkpoints record it
        self.device = pick_device(self.t.device, int(os.environ.get("LOCAL_RANK", 0)))
        self.dist = Distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.t.num_threads:
            torch.set_num_threads(self.t.num_threads)
        torch.manual_seed(self.t.seed)

        self.data = prepare(cfg.data, cfg.tokenizer)
        self.tokenizer = self.data.tokenizer
        model_cfg = cfg.model.build(self.tokenizer.vocab_size, self.tokenizer.pad_id, self.tokenizer.sep_id)
        self.model = build_model(model_cfg).to(self.device)
        self.recurrent = self.model.max_context is None
        self.seq_len = cfg.data.max_seq_len or (RECURRENT_WINDOW if self.recurrent
                                                 else model_cfg.block_size)
        if not self.recurrent and self.seq_len > model_cfg.block_size:
            raise ConfigError(f"data.max_seq_len ({self.seq_len}) exceeds model.block_size ({model_cfg.block_size})")
        # Truncated BPTT: an RNN carries its state from window to window of a stream.
        tbptt = self.recurrent if self.t.tbptt is None else self.t.tbptt
        self.batches, self.examples = batch_source(cfg, self.data, self.seq_len, tbptt,
                                                   rank=self.dist.rank, world=self.dist.world)

        self.optimizer = self._optimizer()
        self.network = self._wrap(torch.compile(self.model) if self.t.compile else self.model)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if uses_bfloat16(self.t.precision, self.device) else contextlib.nullcontext())

        self.tokens_per_step, self.steps_per_epoch = self.batches.tokens_per_step, self.batches.steps_per_epoch
        if self.t.max_steps or self.t.epochs:
            self.max_steps = self.t.max_steps or math.ceil(self.t.epochs * self.steps_per_epoch)
        else:  # a time budget alone: the clock ends the run
            self.max_steps = 10**12

        self.run_dir = cfg.run_dir
        self.report = RunReport(cfg, main=self.dist.main, quiet=quiet)
        self.checkpoints = RunCheckpoints(self.run_dir, self.model, self.tokenizer,
                                          getattr(torch, cfg.output.checkpoint_dtype))
        plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=self.t.plateau_factor, patience=self.t.plateau_patience)
            if self.t.schedule == "plateau" else None)
        # Each rank draws its own batches from its own generator.
        generator = torch.Generator().manual_seed(self.t.seed + self.dist.rank)
        self.state = TrainState(self.optimizer, generator, plateau, run_id=self.report.run_id)
        if self.dist.world > 1:  # one line from every rank, even --quiet: who reads what, where
            print(f"rank {self.dist.rank} of {self.dist.world} (node {os.environ.get('GROUP_RANK', 0)}, "
                  f"local rank {self.dist.local_rank}): "
                  f"{describe_reads(self.batches, self.t.seed + self.dist.rank)}", file=sys.stderr, flush=True)

    # --- pieces -------------------------------------------------------------------------

    def _optimizer(self):
        return build_optimizer(self.model, self.t.optimizer, lr=self.t.learning_rate,
                               weight_decay=self.t.weight_decay, betas=self.t.betas)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: the model, maybe compiled, under DDP when distributed."""
        if self.dist.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def clock(self) -> float:
        """Seconds of training so far, as every rank agrees (rank 0's clock)."""
        return self.dist.agree(self.state.elapsed())

    def lr_at(self, step: int, elapsed: float = 0.0) -> float:
        """The learning rate of ``step``; with a time budget, also of ``elapsed`` seconds."""
        if self.t.schedule != "cosine":
            return self.optimizer.param_groups[0]["lr"]  # constant, or whatever the plateau set
        if step < self.t.warmup_steps:
            return self.t.learning_rate * (step + 1) / self.t.warmup_steps
        progress = min(1.0, (step - self.t.warmup_steps) / max(1, self.max_steps - self.t.warmup_steps))
        if self.t.max_time_s:  # with a time budget the schedule follows the clock
            progress = max(progress, min(1.0, elapsed / self.t.max_time_s))
        return self.t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.t.learning_rate - self.t.min_lr)

    def next_batch(self):
        x, y = self.batches.next(self.state)
        return x.to(self.device), y.to(self.device)

    def forward(self, x, y):
        with self.autocast:
            if not self.batches.carries_state:
                try:
                    return self.network(x, y)[1]
                except torch._dynamo.exc.BackendCompilerFailed as e:
                    if not self.t.compile:
                        raise
                    # No working compiler here (torch.compile needs a C++ toolchain on CPU):
                    # the same model runs eagerly, only slower.
                    print(f"warning: torch.compile failed ({str(e).splitlines()[0]}); training eagerly",
                          file=sys.stderr)
                    self.t.compile, self.network = False, self._wrap(self.model)
                    return self.network(x, y)[1]
            s = self.state
            state = s.hidden if s.hidden is not None else self.model.init_state(x.size(0))
            logits, state = self.model.step(x, state)
            s.hidden = state.detach()  # truncated back-propagation through time
            return self.model.loss(logits, y)

    def evaluate(self, max_batches: int | None) -> dict:
        autocast = self.autocast if self.device.type == "cuda" else None
        if self.examples is not None:
            batches = islice(in_order(self.examples["validation"], self.t.batch_size,
                                      self.tokenizer.pad_id), max_batches)
            result = score_batches(self.model, batches, device=self.device, autocast=autocast).as_dict()
            if max_batches is None:  # bits per character: each document read as evaluate reads it
                docs = load_documents(self.cfg.data)
                text = score_text(self.model, self.tokenizer, docs["validation"], docs["train"],
                                  self.seq_len, by_document=True, batch_size=self.t.batch_size)
                result["bits_per_char"] = text["bits_per_char"]
            return result
        scores = score(self.model, self.data.splits["validation"], self.seq_len,
                       batch_size=self.t.batch_size, max_batches=max_batches, device=self.device,
                       autocast=autocast)
        result = scores.as_dict()
        chars = self.data.characters.get("validation") if max_batches is None else None
        result["bits_per_char"] = scores.bits_per_char(chars, self.data.dropped_bits.get("validation", 0.0))
        return result

    def progress(self, metrics: dict) -> dict:
        """How far the run is and how it scores: what checkpoints and experiment rows share."""
        s = self.state
        return {"step": s.step, "parameters": count_parameters(self.model),
                "epoch": s.step / self.steps_per_epoch, "tokens_seen": s.step * self.tokens_per_step,
                "train_loss": s.last_train_loss, "val_loss": metrics.get("loss"),
                "val_perplexity": metrics.get("perplexity"), "token_accuracy": metrics.get("token_accuracy"),
                "bits_per_char": metrics.get("bits_per_char")}

    def summary(self, metrics: dict | None = None, finished: bool = False) -> TrainingSummary:
        """What a checkpoint records about the run."""
        return TrainingSummary(
            name=self.cfg.name, finished=finished, **self.progress(metrics or {}),
            best_val_loss=self.state.best_val, training_time_s=round(self.state.train_time, 1),
            data=self.data.source, tokenizer=self.tokenizer.kind,
            vocab_size=self.tokenizer.vocab_size, seq_len=self.seq_len,
            hardware=hardware(self.device, self.dist.world), config=self.cfg.to_dict(),
            command=self.command, run_id=self.report.run_id,
        )

    # --- the loop -----------------------------------------------------------------------

    def fit(self, resume: bool = False) -> TrainingSummary:
        """Train (from ``<run dir>/last`` with ``resume``); the final checkpoint's summary.
        However the run ends, its loggers are flushed and closed."""
        try:
            return self._fit(resume)
        finally:
            self.report.close()

    def _fit(self, resume: bool) -> TrainingSummary:
        s, t = self.state, self.t
        self._start(resume)
        metrics: dict = {}
        interrupted, before = False, s.mark()
        self.model.train()
        # with a time budget, one reading of the agreed clock a step: the next step's
        # learning rate and whether there is a next step
        elapsed = self.clock() if t.max_time_s else 0.0
        try:
            while s.step < self.max_steps:
                before = s.mark()  # what Ctrl-C puts back if it cuts this step short
                self._step(elapsed)
                stop = False
                if s.step % t.eval_every == 0 or s.step == self.max_steps:
                    metrics = self.evaluate(t.eval_batches)
                    stop = self.after_eval(metrics, self.optimizer.param_groups[0]["lr"])
                if s.step % t.save_every == 0:
                    self.save_last(self.summary(metrics))
                if t.max_time_s:
                    elapsed = self.clock()
                    stop = stop or elapsed >= t.max_time_s  # out of time: the usual final evaluation follows
                if stop:
                    break
        except KeyboardInterrupt:  # Ctrl-C: evaluate and save, as at the end of a run
            interrupted = True
            s.rewind(before)
            self.optimizer.zero_grad(set_to_none=True)
            # at once, so that a second Ctrl-C during the evaluation loses nothing
            self.save_last(self.summary(metrics), every_rank=False)
        return self._finish(interrupted)

    def _start(self, resume: bool) -> None:
        """Back to where ``last/`` left off (when resuming), then the run's one-line header."""
        s, t = self.state, self.t
        if resume:
            self.checkpoints.resume(s, self.device)
            self.report.reopen(s.run_id)
            if self.dist.world > 1 and not s.restore_place(self.dist.rank, t.seed + self.dist.rank, self.device):
                print(f"warning: {self.run_dir / 'last'} holds no place in the data for rank {self.dist.rank} "
                      "(saved at Ctrl-C, or by fewer ranks): it draws new batches", file=sys.stderr)
        self.report.say(
            f"{self.cfg.name}: {self.model.config.arch}, {count_parameters(self.model):,} parameters, "
            f"{self.tokenizer.kind} tokenizer ({self.tokenizer.vocab_size} tokens), "
            f"{len(self.data.splits['train']):,} training tokens, "
            + (f"{self.max_steps} steps" if self.max_steps < 10**12 else f"{t.max_time_s:.0f} s")
            + f" on {self.device}" + (f" x{self.dist.world}" if self.dist.world > 1 else ""))
        self.report.start_bar(self.max_steps if self.max_steps < 10**12 else None, s.step)
        s.start_clock()

    def _step(self, elapsed: float = 0.0) -> None:
        """One optimizer step over ``grad_accum`` micro-batches (``elapsed``: the agreed
        clock, for a time budget's learning rate), its health checkup when one is due, and
        its line in the report."""
        s, t = self.state, self.t
        started = time.perf_counter()
        lr = self.lr_at(s.step, elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        checkup = self.dist.main and t.health_every and (s.step + 1) % t.health_every == 0
        for micro in range(t.grad_accum):
            x, y = self.next_batch()
            sync = micro == t.grad_accum - 1 or self.dist.world == 1
            with contextlib.nullcontext() if sync else self.network.no_sync():
                loss = self.forward(x, y)
                (loss / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        if not math.isfinite(total):
            raise TrainingError(
                f"the loss became {total} at step {s.step + 1}; stopped. The last good "
                f"checkpoint is {self.run_dir / 'last'} (lower training.learning_rate or raise "
                f"training.warmup_steps, then --resume)")
        if checkup:  # gradients before clipping, and the weights before the step
            records, weights = health.gradient_stats(self.model), health.snapshot(self.model)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        s.step += 1
        if checkup:
            records += health.update_ratios(weights, self.model)
            records += health.weight_stats(self.model) + health.probe(self.model, x)
            self.report.health(s.step, records)
        self.optimizer.zero_grad(set_to_none=True)
        s.last_train_loss = total
        elapsed = time.perf_counter() - started
        s.train_time += elapsed
        self.report.step(total, lr, self.tokens_per_step / elapsed, step=s.step)

    def _finish(self, interrupted: bool) -> TrainingSummary:
        """The final evaluation, ``last/`` and ``final/`` (and the published copy), the
        report's last row and plot; an interrupted run then says how to resume."""
        s = self.state
        self.report.close_bar()
        final = self.evaluate(None)
        summary = self.summary(final, finished=not interrupted)
        self.save_last(summary, every_rank=not interrupted)
        if self.dist.main:
            self.checkpoints.save("final", summary)
            if self.cfg.publish_dir:  # the small copy the app serves (fp16 halves the file)
                self.checkpoints.write(self.cfg.publish_dir, summary, dtype=torch.float16)
            self.report.row(self.progress(final), kind="final", lr=self.optimizer.param_groups[0]["lr"],
                            train_time=s.train_time)
            self.report.plot()
            self.report.say(f"{self.cfg.name}: step {s.step}, validation loss {final['loss']:.4f}, "
                            f"perplexity {final['perplexity']:.2f}, checkpoint {self.run_dir / 'final'}")
        self.dist.barrier()
        self.dist.close()
        if interrupted:
            raise TrainingInterrupted(f"interrupted at step {s.step}: saved {self.run_dir / 'last'} and "
                                      f"{self.run_dir / 'final'} (--resume continues the run)")
        return summary

    def save_last(self, summary: TrainingSummary, *, every_rank: bool = True) -> None:
        """``last/`` with the trainer state, written by rank 0 alone. Under DDP it also holds
        every rank's own place in the data, gathered here (so every rank calls this), so that
        --resume puts each rank back where it was, not where rank 0 was. After Ctrl-C
        (``every_rank=False``) the ranks may not all get here: rank 0 saves its own alone."""
        s = self.state
        s.places = self.dist.gather(s.place()) if every_rank else None
        if self.dist.main:
            self.checkpoints.save("last", summary, s)

    def after_eval(self, metrics: dict, lr: float) -> bool:
        """Record, keep the best, step the plateau schedule; True when early stopping says stop."""
        s = self.state
        if s.plateau:
            s.plateau.step(metrics["loss"])
        improved = metrics["loss"] < s.best_val - self.t.early_stopping_min_delta
        if improved:
            s.best_val, s.bad_evals = metrics["loss"], 0
        else:
            s.bad_evals += 1
        self.report.row(self.progress(metrics), kind="train_eval", lr=lr, train_time=s.train_time)
        if improved and self.dist.main:
            self.checkpoints.save("best", self.summary(metrics))
        if self.sample_due():
            self.report.sample(s.step, self.sample_text())
        patience = self.t.early_stopping_patience
        if patience is not None and s.bad_evals >= patience:
            self.report.say(f"\nearly stopping at step {s.step}: no improvement in {patience} evaluations")
            return True
        return False

    def sample_due(self) -> bool:
        """After every ``sample_every``-th periodic evaluation, on rank 0 alone. Counted from
        the step (evaluations fall on multiples of eval_every), so a resumed run keeps the rhythm."""
        every = self.t.sample_every * self.t.eval_every
        return bool(every) and self.state.step % every == 0 and self.dist.main

    def sample_prompt(self) -> str:
        """The first few tokens of the validation split's first document, as text: from the
        start of its second line when the first is cut (a split of one long text starts
        mid-line, and a prompt that starts mid-word reads as noise)."""
        ids = self.data.splits["validation"][:SAMPLE_PROMPT_LOOKAHEAD].tolist()
        if self.tokenizer.eos_id in ids:  # the first document ends within it
            ids = ids[:ids.index(self.tokenizer.eos_id)]
        text = self.tokenizer.decode(ids)
        line = text.find("\n") + 1
        if 0 < line and text[line:].strip():
            ids = self.tokenizer.encode(text[line:])
        return self.tokenizer.decode(ids[:SAMPLE_PROMPT_TOKENS])

    def sample_text(self) -> str:
        """The prompt and the model's continuation of it, ``training.sample_tokens`` long.
        Its draws come from a generator of its own, seeded the same every time (so samples
        differ only as the model does), never from torch's global one, which dropout draws
        from: a run trains the same with samples as without."""
        prompt = self.sample_prompt()
        params = SamplingParams(max_new_tokens=self.t.sample_tokens, temperature=SAMPLE_TEMPERATURE,
                                seed=self.t.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                [completion] = generate(self.model, self.tokenizer, prompt, params)
        finally:
            self.model.train(was_training)
        return prompt + completion.text


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether the training step runs under bf16 autocast (evaluation on CPU stays float32)."""
    if precision != "auto":
        return precision == "bfloat16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: there bf16 matrix products beat float32 ones (benchmarks/README.md);
    elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it ("AMD EPYC"), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{cpu_name()} CPU, {threads} thread{'' if threads == 1 else 's'}"
    return f"{world} x {name}" if world > 1 else name


# ---- the one command: a text file in, a checkpoint the app serves out --------------------

# A checkpoint's folder name, which the app shows as the model's name (no hidden folders).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Where the app looks for models unless FABLE_CHECKPOINT_DIR says otherwise (app/platform/settings.py).
SERVED_CHECKPOINTS = "checkpoints"


def context_length(cfg: RunConfig) -> int:
    """The training window in tokens, as the Trainer sets it, read from the config alone."""
    if cfg.data.max_seq_len:
        return cfg.data.max_seq_len
    if cfg.model.arch in ("rnn", "gru", "lstm"):
        return RECURRENT_WINDOW
    default = ModelConfig.__dataclass_fields__["block_size"].default
    return cfg.model.options.get("block_size", default)


def check_name(name: str, checkpoint: Path, run_dir: Path) -> None:
    """A usable folder name that no checkpoint or earlier run holds yet."""
    if not MODEL_NAME.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use up to 64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    for path, what in ((checkpoint, "a checkpoint"), (run_dir, "an earlier run")):
        if os.path.lexists(path):
            raise ConfigError(f"the name {name!r} is taken: {path} holds {what} of that name; "
                              "choose another --name, or add --overwrite to replace it")


def check_text(path: Path, cfg: RunConfig, recipe: str) -> None:
    """A UTF-8 text file long enough for one window in each split; otherwise a DataError that
    says what is wrong, before anything is written."""
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    raw = path.read_bytes()
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} is a binary file (a NUL byte at offset {nul:,}), not text: "
                        "give a plain UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start:,}): save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path} is empty: there is no text to train on" if not raw
                        else f"{path} holds only white space: there is no text to train on")
    context = context_length(cfg)
    fractions = dict(zip(("train", "validation"), cfg.data.split))
    for split, docs in load_documents(cfg.data).items():
        # A character per token at most (a document ends in one more, eos); words and BPE
        # merges give fewer. The Trainer counts the tokens themselves once it has them.
        tokens = sum(map(len, docs)) + len(docs)
        if split in fractions and tokens < context + 1:
            need = math.ceil(round(context / min(fractions.values()), 6))
            raise DataError(
                f"{path} is too short for {recipe}'s {context}-token context: its {split} part "
                f"({fractions[split]:.0%} of it) has {tokens - len(docs):,} characters and needs "
                f"{context}; give at least {need:,} characters of text")


def corpus_text(reference: str) -> Path:
    """``--corpus tinyshakespeare/input.txt``: the file, found where configs find their corpus
    (``training.corpora.locate``); a DataError says how to fetch a corpus that is not here."""
    corpus = next(iter(Path(reference).parts), "")
    if corpus not in CORPORA:
        raise DataError(f"--corpus {reference}: unknown corpus {corpus!r}; Fable fetches "
                        f"{', '.join(CORPORA)} (for a file of your own, use --data)")
    try:
        path = locate(reference)
    except CorpusError as e:
        raise DataError(str(e)) from None
    if path.is_dir():
        files = ", ".join(f"{corpus}/{name}" for name in CORPORA[corpus].files())
        raise DataError(f"--corpus {reference} is a folder: name a text file in it ({files})")
    return path


def own_text_config(args: argparse.Namespace) -> RunConfig:
    """The recipe's config for the text file (--data, or --corpus's); refuses a taken name
    or unusable text."""
    data = str(corpus_text(args.corpus)) if args.corpus else args.data
    served = args.checkpoint_dir or os.environ.get("FABLE_CHECKPOINT_DIR") or SERVED_CHECKPOINTS
    checkpoint = Path(served) / args.name
    publish = str(checkpoint).replace("{", "{{").replace("}", "}}")  # output.publish is formatted
    raw = recipe_config(args.preset, data=data, name=args.name, publish_dir=publish,
                        minutes=args.minutes, steps=args.steps)
    cfg = load_config(raw=raw, overrides=args.overrides)
    if not (args.overwrite or args.resume):
        check_name(args.name, checkpoint, cfg.run_dir)
    check_text(Path(data), cfg, args.preset)
    return cfg


def finish_own_model(cfg: RunConfig) -> None:
    """The model card beside the published weights, and how to see the model served."""
    try:
        write_card(cfg.publish_dir)
    except (CheckpointError, DataError, OSError) as e:  # the model itself is saved: say so
        raise TrainingError(f"{cfg.publish_dir} is saved, but its model card could not be "
                            f"written ({e}); `python -m training.model_card --checkpoint "
                            f"{cfg.publish_dir}` writes it") from e
    print(f"\n{cfg.name} is ready in {cfg.publish_dir}: weights, tokenizer, config.json and its "
          f"model card (README.md).\n"
          f"A server reading {cfg.publish_dir.parent} shows it after a reload: the Reload button "
          f"on /admin, or\n"
          f"    curl -X POST -H \"Authorization: Bearer $FABLE_ADMIN_TOKEN\" "
          f"http://127.0.0.1:7860/api/models/reload\n"
          f"(the header only with FABLE_ADMIN_TOKEN set), or SIGHUP to gunicorn's master; "
          f"a server started now loads it with the others.")


def ctrl_c_finishes() -> None:
    """Ctrl-C (SIGINT) finishes the run early, as the training page's "Finish now" asks,
    even when the command started with SIGINT ignored: a background job of a script, or of
    a server started with ``nohup ... &``, inherits that, and Python then leaves it so. (Only
    the main thread may set a handler: a caller running ``main`` in another keeps its own.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m training.train", description=__doc__.split("\n\n")[0],
        epilog="presets: " + "; ".join(f"{name}: {r['about']}" for name, r in RECIPES.items()))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config file")
    source.add_argument("--preset", choices=RECIPES, help="a whole recipe, trained on --data or --corpus")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--data", help="with --preset: a UTF-8 text file to train on")
    text.add_argument("--corpus", metavar="CORPUS/FILE",
                      help="with --preset, instead of --data: a file of a corpus `fable data fetch` "
                           "got, e.g. tinyshakespeare/input.txt (`fable data list` shows them)")
    parser.add_argument("--name", help="with --preset: the model's name, its folder's name")
    parser.add_argument("--checkpoint-dir", help="with --preset: where the app's models are "
                        f"(default $FABLE_CHECKPOINT_DIR, else {SERVED_CHECKPOINTS})")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --preset: replace a model (and run) of that name")
    parser.add_argument("--minutes", type=float,
                        help="a time budget (with --steps: whichever ends first; a preset "
                             f"without either trains {DEFAULT_MINUTES:g} minutes)")
    parser.add_argument("--steps", type=int, help="a budget of optimizer steps")
    parser.add_argument("--resume", action="store_true", help="continue from <run dir>/last")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true",
                        help="check the config (with --preset: the text and the name too), "
                             "write nothing and exit: 0 when the run would start")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. training.max_steps=100")
    args = parser.parse_args(argv)
    ctrl_c_finishes()
    if args.preset and not ((args.data or args.corpus) and args.name):
        parser.error("--preset needs --data FILE (or --corpus CORPUS/FILE) and --name NAME")
    if args.config and (args.data or args.corpus or args.name or args.checkpoint_dir or args.overwrite):
        parser.error("--data, --corpus, --name, --checkpoint-dir and --overwrite go with --preset "
                     "(a config sets data.path or data.corpus, name and output.publish)")
    if args.minutes is not None and args.minutes <= 0 or args.steps is not None and args.steps < 1:
        parser.error("--minutes and --steps must be positive")
    try:
        if args.preset:
            cfg = own_text_config(args)
        else:
            budget = [f"training.max_time_s={args.minutes * 60:g}"] if args.minutes else []
            budget += [f"training.max_steps={args.steps}"] if args.steps else []
            cfg = load_config(args.config, [*args.overrides, *budget])
        if args.check:
            print(f"{cfg.name}: the config{' and the text' if args.preset else ''} are usable")
            return 0
        command = shlex.join(["python", "-m", "training.train", *argv]) if args.preset else None
        trainer = Trainer(cfg, quiet=args.quiet, command=command)
        interrupted = None
        try:
            trainer.fit(resume=args.resume)
        except TrainingInterrupted as e:  # Ctrl-C: the model as it is was published too
            interrupted = e
            print(e, file=sys.stderr)
        if args.preset and trainer.dist.main:
            finish_own_model(cfg)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    return 130 if interrupted else 0  # 130: what a shell reports for Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
