"""Train a model from a YAML config.

    python -m training.train --config training/configs/char_gpt_shakespeare.yaml [key=value ...]
    python -m training.train --config ... --resume          # continue from runs/<name>/last
    torchrun --nproc_per_node 2 -m training.train --config ...   # data-parallel (gloo on CPU, NCCL on GPU)

One loop, top to bottom: AdamW with gradient clipping and accumulation, a cosine (with
warm-up), plateau or constant schedule, periodic evaluation with an experiment row each
time, early stopping, fused AdamW, bf16 autocast (CUDA, and CPUs with bf16 units), optional torch.compile, and
three checkpoints under the run directory: ``last/`` (periodic, with everything needed to
resume exactly), ``best/`` (best validation loss) and ``final/``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import time
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from models_src import build_model
from models_src.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from models_src.summary import count_parameters

from .config import ConfigError, RunConfig, load_config
from .data import DataError, SequentialBatches, check_enough_tokens, load_documents, prepare, random_batch
from .evaluate import score_text
from .examples import as_stream, example_batch, in_order, prepare_examples
from .experiments import ExperimentLog, plot_curves
from .metrics import score, score_batches

TRAINER_STATE = "trainer_state.pt"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and where the last good checkpoint is."""


def detach(state):
    """Cut the graph behind a recurrent state (truncated back-propagation through time)."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach(s) for s in state)


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
    def __init__(self, cfg: RunConfig, *, quiet: bool = False) -> None:
        self.cfg, self.t = cfg, cfg.training
        self.quiet = quiet
        self.device = pick_device(self.t.device, int(os.environ.get("LOCAL_RANK", 0)))
        self.dist = Distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.t.num_threads:
            torch.set_num_threads(self.t.num_threads)
        torch.manual_seed(self.t.seed)

        data_cfg = cfg.data
        self.data = prepare(data_cfg, cfg.tokenizer)
        self.tokenizer = self.data.tokenizer
        model_cfg = cfg.model.build(self.tokenizer.vocab_size, self.tokenizer.pad_id, self.tokenizer.sep_id)
        self.model = build_model(model_cfg).to(self.device)
        self.recurrent = self.model.max_context is None
        self.seq_len = cfg.data.max_seq_len or (128 if self.recurrent else model_cfg.block_size)
        if not self.recurrent and self.seq_len > model_cfg.block_size:
            raise ConfigError(f"data.max_seq_len ({self.seq_len}) exceeds model.block_size ({model_cfg.block_size})")
        # Truncated BPTT: an RNN carries its state from window to window of a stream.
        self.tbptt = self.recurrent if self.t.tbptt is None else self.t.tbptt
        self.examples = None  # whole-example tasks (infilling): batches of examples, or their stream
        if data_cfg.task != "lm":
            if self.tbptt and data_cfg.middle_only:
                raise ConfigError("data.middle_only needs batches of whole examples: set training.tbptt=false")
            self.examples = prepare_examples(data_cfg, self.data, None if self.tbptt else self.seq_len)
            if not len(self.examples["train"]) or not len(self.examples.get("validation", ())):
                raise DataError(f"{self.data.source}: no {data_cfg.task} examples in train or validation "
                                f"({self.examples['train'].skipped} stories had no middle)")
        else:
            check_enough_tokens(self.data, self.t.batch_size, self.seq_len)

        self.optimizer = self._optimizer()
        self.plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=self.t.plateau_factor, patience=self.t.plateau_patience)
            if self.t.schedule == "plateau" else None)
        self.network = self._wrap(torch.compile(self.model) if self.t.compile else self.model)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if uses_bfloat16(self.t.precision, self.device) else contextlib.nullcontext())

        if self.examples is None:
            train = self.data.splits["train"]
        elif self.tbptt:  # whole examples, one after another, read like a stream
            train = as_stream(self.examples["train"], self.t.seed)
        else:
            train = self.examples["train"].tokens
        tokens_per_step = self.t.batch_size * self.seq_len * self.t.grad_accum * self.dist.world
        self.steps_per_epoch = max(1, len(train) // tokens_per_step)
        if self.t.max_steps or self.t.epochs:
            self.max_steps = self.t.max_steps or math.ceil(self.t.epochs * self.steps_per_epoch)
        else:  # a time budget alone: the clock ends the run
            self.max_steps = 10**12
        self.tokens_per_step = tokens_per_step
        # Each rank draws its own batches; the generator's state is saved for exact resume.
        self.generator = torch.Generator().manual_seed(self.t.seed + self.dist.rank)
        if self.tbptt:
            shard = len(train) // self.dist.world
            self.windows = SequentialBatches(train[self.dist.rank * shard:(self.dist.rank + 1) * shard],
                                             self.t.batch_size, self.seq_len)
        self.step, self.window, self.hidden = 0, 0, None
        self.elapsed_before, self.loop_started = 0.0, time.perf_counter()
        self.best_val, self.bad_evals, self.train_time = math.inf, 0, 0.0
        self.last_train_loss = None
        self.run_dir = cfg.run_dir
        self.log = ExperimentLog(cfg.output.experiments_dir, cfg.name, config=cfg.to_dict()) if self.dist.main else None

    # --- pieces -------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on biases, norms and (for RNNs) nothing 1-D: decay shrinks matrices.
        params = list({id(p): p for p in self.model.parameters()}.values())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.t.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # The fused kernel (CPU and CUDA) does the whole update in one pass: ~10 % faster steps here.
        return torch.optim.AdamW(groups, lr=self.t.learning_rate, betas=self.t.betas, fused=True)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: the model, maybe compiled, under DDP when distributed."""
        if self.dist.world == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def lr_at(self, step: int) -> float:
        if self.t.schedule != "cosine":
            return self.optimizer.param_groups[0]["lr"]  # constant, or whatever the plateau set
        if step < self.t.warmup_steps:
            return self.t.learning_rate * (step + 1) / self.t.warmup_steps
        progress = min(1.0, (step - self.t.warmup_steps) / max(1, self.max_steps - self.t.warmup_steps))
        if self.t.max_time_s:  # with a time budget the schedule follows the clock
            progress = max(progress, min(1.0, self.loop_time() / self.t.max_time_s))
        return self.t.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (self.t.learning_rate - self.t.min_lr)

    def loop_time(self) -> float:
        """Seconds of this run's loop so far, evaluations included (resumed runs add up)."""
        return self.elapsed_before + time.perf_counter() - self.loop_started

    def next_batch(self):
        if self.examples is not None and not self.tbptt:
            x, y = example_batch(self.examples["train"], self.t.batch_size, self.generator,
                                 self.tokenizer.pad_id, self.cfg.data.middle_only)
            return x.to(self.device), y.to(self.device)
        if not self.tbptt:
            x, y = random_batch(self.data.splits["train"], self.t.batch_size, self.seq_len, self.generator)
            return x.to(self.device), y.to(self.device)
        if self.window >= len(self.windows):  # a new epoch starts from a fresh state
            self.window, self.hidden = 0, None
        x, y = self.windows[self.window]
        self.window += 1
        return x.to(self.device), y.to(self.device)

    def forward(self, x, y):
        with self.autocast:
            if not self.tbptt:
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
            state = self.hidden if self.hidden is not None else self.model.init_state(x.size(0))
            logits, state = self.model.step(x, state)
            self.hidden = detach(state)
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

    # --- checkpoints --------------------------------------------------------------------

    def summary(self, metrics: dict | None = None, finished: bool = False) -> dict:
        metrics = metrics or {}
        return {
            "name": self.cfg.name, "finished": finished, "step": self.step,
            "parameters": count_parameters(self.model),
            "epoch": self.step / self.steps_per_epoch, "tokens_seen": self.step * self.tokens_per_step,
            "train_loss": self.last_train_loss, "val_loss": metrics.get("loss"),
            "val_perplexity": metrics.get("perplexity"), "token_accuracy": metrics.get("token_accuracy"),
            "bits_per_char": metrics.get("bits_per_char"), "best_val_loss": self.best_val,
            "training_time_s": round(self.train_time, 1), "data": self.data.source,
            "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.vocab_size,
            "seq_len": self.seq_len, "hardware": hardware(self.device, self.dist.world),
            "config": self.cfg.to_dict(),
        }

    def save(self, which: str, summary: dict, with_state: bool = False) -> Path:
        dtype = None if with_state else getattr(torch, self.cfg.output.checkpoint_dtype)
        extra = self._write_trainer_state if with_state else None
        return self._write_checkpoint(self.run_dir / which, summary, dtype=dtype, write_extra=extra)

    def _write_checkpoint(self, path: Path, summary: dict, **options) -> Path:
        """save_checkpoint, with a write that fails (a full disk, a lost mount) turned into
        a TrainingError naming the path and what is left there. save_checkpoint writes
        beside the path and swaps atomically, so the previous checkpoint is still whole."""
        try:
            return save_checkpoint(path, self.model, self.tokenizer, summary, **options)
        except OSError as e:
            try:
                step = read_config(path)["training"].get("step")
                at = f" (step {step})" if step is not None else ""
                previous = f"the previous checkpoint there{at} is intact"
            except (CheckpointError, KeyError, AttributeError, OSError):
                previous = "there was no previous checkpoint there"
            raise TrainingError(f"could not write the checkpoint {path} at step {self.step}: "
                                f"{e.strerror or e}; {previous}. Training stopped.") from e

    def _write_trainer_state(self, directory: Path) -> None:
        torch.save({
            "step": self.step, "window": self.window, "best_val": self.best_val,
            "bad_evals": self.bad_evals, "train_time": self.train_time, "loop_time": self.loop_time(),
            "last_train_loss": self.last_train_loss,
            "optimizer": self.optimizer.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "hidden": self.hidden, "run_id": self.log.run_id if self.log else None,
        }, directory / TRAINER_STATE)

    def resume(self) -> None:
        last = self.run_dir / "last"
        try:
            restored = load_checkpoint(last, device=self.device)
        except CheckpointError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        if restored.config != self.model.config:
            raise TrainingError(f"cannot resume: {last} was trained with another model config")
        self.model.load_state_dict(restored.model.state_dict())
        # Only tensors, numbers and containers: weights_only refuses anything else.
        state = torch.load(last / TRAINER_STATE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.plateau and state["plateau"]:
            self.plateau.load_state_dict(state["plateau"])
        self.step, self.window, self.best_val = state["step"], state["window"], state["best_val"]
        self.bad_evals, self.train_time = state["bad_evals"], state["train_time"]
        self.elapsed_before = state["loop_time"]
        self.last_train_loss = state["last_train_loss"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.hidden = state["hidden"]
        if self.log and state["run_id"]:
            self.log = ExperimentLog(self.cfg.output.experiments_dir, self.cfg.name,
                                     run_id=state["run_id"], config=self.cfg.to_dict())

    # --- the loop -----------------------------------------------------------------------

    def fit(self, resume: bool = False) -> dict:
        if resume:
            self.resume()
        main = self.dist.main
        if main and not self.quiet:
            print(f"{self.cfg.name}: {self.model.config.arch}, {count_parameters(self.model):,} parameters, "
                  f"{self.tokenizer.kind} tokenizer ({self.tokenizer.vocab_size} tokens), "
                  f"{len(self.data.splits['train']):,} training tokens, "
                  + (f"{self.max_steps} steps" if self.max_steps < 10**12 else f"{self.t.max_time_s:.0f} s")
                  + f" on {self.device}"
                  + (f" x{self.dist.world}" if self.dist.world > 1 else ""), file=sys.stderr)
        bar = tqdm(total=self.max_steps if self.max_steps < 10**12 else None, initial=self.step,
                   disable=not main or self.quiet, dynamic_ncols=True, desc=self.cfg.name)
        self.loop_started = time.perf_counter()
        metrics: dict = {}
        self.model.train()
        while self.step < self.max_steps:
            started = time.perf_counter()
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total = 0.0
            for micro in range(self.t.grad_accum):
                x, y = self.next_batch()
                sync = micro == self.t.grad_accum - 1 or self.dist.world == 1
                with contextlib.nullcontext() if sync else self.network.no_sync():
                    loss = self.forward(x, y)
                    (loss / self.t.grad_accum).backward()
                total += loss.item() / self.t.grad_accum
            if not math.isfinite(total):
                raise TrainingError(
                    f"the loss became {total} at step {self.step + 1}; stopped. The last good "
                    f"checkpoint is {self.run_dir / 'last'} (lower training.learning_rate or raise "
                    f"training.warmup_steps, then --resume)")
            if self.t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.last_train_loss = total
            elapsed = time.perf_counter() - started
            self.train_time += elapsed
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_step / elapsed:,.0f}")

            stop = False
            if self.step % self.t.eval_every == 0 or self.step == self.max_steps:
                metrics = self.evaluate(self.t.eval_batches)
                stop = self.after_eval(metrics, lr)
            if self.step % self.t.save_every == 0 and main:
                self.save("last", self.summary(metrics), with_state=True)
            if self.t.max_time_s and self.loop_time() >= self.t.max_time_s:
                stop = True  # out of time: what follows is the usual final evaluation
            if stop:
                break
        bar.close()
        final = self.evaluate(None)
        summary = self.summary(final, finished=True)
        if main:
            self.save("last", summary, with_state=True)
            self.save("final", summary)
            if self.cfg.publish_dir:  # the small copy the app serves (fp16 halves the file)
                self._write_checkpoint(self.cfg.publish_dir, summary, dtype=torch.float16)
            self.log_row(final, kind="final", lr=self.optimizer.param_groups[0]["lr"])
            plot_curves(self.cfg.output.experiments_dir, self.log.run_id, self.run_dir / "loss.png")
            if not self.quiet:
                print(f"{self.cfg.name}: step {self.step}, validation loss {final['loss']:.4f}, "
                      f"perplexity {final['perplexity']:.2f}, checkpoint {self.run_dir / 'final'}", file=sys.stderr)
        self.dist.barrier()
        self.dist.close()
        return summary

    def after_eval(self, metrics: dict, lr: float) -> bool:
        """Record, keep the best, step the plateau schedule; True when early stopping says stop."""
        if self.plateau:
            self.plateau.step(metrics["loss"])
        improved = metrics["loss"] < self.best_val - self.t.early_stopping_min_delta
        if improved:
            self.best_val, self.bad_evals = metrics["loss"], 0
        else:
            self.bad_evals += 1
        if self.dist.main:
            self.log_row(metrics, kind="train_eval", lr=lr)
            if improved:
                self.save("best", self.summary(metrics))
        patience = self.t.early_stopping_patience
        if patience is not None and self.bad_evals >= patience:
            if self.dist.main and not self.quiet:
                print(f"\nearly stopping at step {self.step}: no improvement in {patience} evaluations",
                      file=sys.stderr)
            return True
        return False

    def log_row(self, metrics: dict, kind: str, lr: float) -> None:
        self.log.log(
            model=self.run_dir.name, architecture=self.model.config.arch,
            parameters=count_parameters(self.model), step=self.step,
            epoch=self.step / self.steps_per_epoch, train_loss=self.last_train_loss,
            val_loss=metrics["loss"], val_perplexity=metrics["perplexity"],
            token_accuracy=metrics["token_accuracy"], bits_per_char=metrics.get("bits_per_char"),
            tokens_per_s=self.step * self.tokens_per_step / max(self.train_time, 1e-9),
            tokens_seen=self.step * self.tokens_per_step, learning_rate=lr,
            wall_time_s=self.train_time, split="validation", kind=kind)


def uses_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether the training step runs under bf16 autocast (evaluation on CPU stays float32)."""
    if precision != "auto":
        return precision == "bfloat16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: there bf16 products run 1.5-2x faster than float32 ones
    (benchmarks/README.md); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def hardware(device: torch.device, world: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{world} x {name}" if world > 1 else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--resume", action="store_true", help="continue from <run dir>/last")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. training.max_steps=100")
    args = parser.parse_args(argv)
    try:
        trainer = Trainer(load_config(args.config, args.overrides), quiet=args.quiet)
        trainer.fit(resume=args.resume)
    except (ConfigError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
