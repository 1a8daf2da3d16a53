"""Where a run's training batches come from, decided once from its config.

Four data modes, three sources:

    plain stream, a model with a context   RandomWindows     windows at random offsets (nanoGPT)
    whole examples (infilling), a context  WholeExamples     random batches of similar-length examples
    any stream, read by a recurrent model  SequentialWindows  contiguous windows in order (TBPTT);
    (examples: every one once, in turn)                      the model's state carries across

Each knows what one optimizer step reads (``tokens_per_step``), how many steps make an
epoch, and draws its next batch from the run's ``TrainState``: the random sources from its
generator, the sequential one from its window (and a new epoch clears the carried state),
so that resuming the state resumes the exact batches. Under DDP each rank draws from its own
generator, or reads its own shard of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .data import DataError, PreparedData, SequentialBatches, check_enough_tokens, random_batch
from .examples import Examples, as_stream, example_batch, prepare_examples
from .state import TrainState


class BatchSource(Protocol):
    tokens_per_step: int  # read by one optimizer step, all ranks and accumulation steps together
    steps_per_epoch: int
    carries_state: bool  # a recurrent model's state flows from each batch into the next

    def next(self, state: TrainState) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class RandomWindows:
    tokens: np.ndarray
    batch_size: int
    seq_len: int
    rows_per_step: int
    carries_state = False

    def __post_init__(self) -> None:
        self.tokens_per_step = self.rows_per_step * self.seq_len
        self.steps_per_epoch = max(1, len(self.tokens) // self.tokens_per_step)

    def next(self, state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batch(self.tokens, self.batch_size, self.seq_len, state.generator)


@dataclass
class WholeExamples:
    examples: Examples
    batch_size: int
    rows_per_step: int
    pad_id: int
    middle_only: bool
    carries_state = False

    def __post_init__(self) -> None:
        self.steps_per_epoch = max(1, len(self.examples) // self.rows_per_step)
        # rows are as long as their examples: a step reads that many tokens on average
        self.tokens_per_step = round(len(self.examples.tokens) / len(self.examples) * self.rows_per_step)

    def next(self, state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
        return example_batch(self.examples, self.batch_size, state.generator, self.pad_id, self.middle_only)


class SequentialWindows:
    carries_state = True

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rows_per_step: int,
                 rank: int = 0, world: int = 1) -> None:
        shard = len(tokens) // world
        self.shard = (rank * shard, (rank + 1) * shard)  # this rank's tokens: [start, end)
        self.windows = SequentialBatches(tokens[slice(*self.shard)], batch_size, seq_len)
        self.tokens_per_step = rows_per_step * seq_len
        self.steps_per_epoch = max(1, len(tokens) // self.tokens_per_step)

    def next(self, state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
        if state.window >= len(self.windows):  # a new epoch starts from a fresh state
            state.window, state.hidden = 0, None
        x, y = self.windows[state.window]
        state.window += 1
        return x, y


def describe_reads(source: BatchSource, seed: int) -> str:
    """What one rank reads, for the line each rank prints at start-up under DDP."""
    if isinstance(source, SequentialWindows):
        return f"training tokens [{source.shard[0]}, {source.shard[1]}) in order"
    return f"random batches, generator seed {seed}"


def batch_source(cfg: RunConfig, data: PreparedData, seq_len: int, sequential: bool, *,
                 rank: int = 0, world: int = 1) -> tuple[BatchSource, dict[str, Examples] | None]:
    """The run's batch source, and its examples of every split for a whole-example task
    (None for a plain stream). ``sequential``: a recurrent model reading by TBPTT."""
    t = cfg.training
    rows_per_step = t.batch_size * t.grad_accum * world
    if cfg.data.task == "lm":
        check_enough_tokens(data, t.batch_size, seq_len)
        train = data.splits["train"]
        if sequential:
            return SequentialWindows(train, t.batch_size, seq_len, rows_per_step, rank, world), None
        return RandomWindows(train, t.batch_size, seq_len, rows_per_step), None
    if sequential and cfg.data.middle_only:
        raise ConfigError("data.middle_only needs batches of whole examples: set training.tbptt=false")
    examples = prepare_examples(cfg.data, data, None if sequential else seq_len)
    if not len(examples["train"]) or not len(examples.get("validation", ())):
        raise DataError(f"{data.source}: no {cfg.data.task} examples in train or validation "
                        f"({examples['train'].skipped} stories had no middle)")
    if sequential:  # whole examples, one after another, read like a stream
        stream = as_stream(examples["train"], t.seed)
        return SequentialWindows(stream, t.batch_size, seq_len, rows_per_step, rank, world), examples
    return WholeExamples(examples["train"], t.batch_size, rows_per_step, data.tokenizer.pad_id,
                         cfg.data.middle_only), examples
