"""Scoring a token stream: loss, perplexity and token accuracy over every token.

Perplexity is exp(total negative log-likelihood / tokens scored) over all tokens of the
split, never an average of per-batch perplexities. Fixed-context models are scored with
windows (a stride below the window length gives each token more context); recurrent
models read the stream in order and carry their state, so no context is ever cut.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F

from models_src.base import IGNORE_INDEX

from .data import SequentialBatches, eval_windows


@dataclass
class Scores:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0
    correct: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)
        scored = targets != IGNORE_INDEX
        self.nll += F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        self.tokens += int(scored.sum())
        self.correct += int(((logits.argmax(-1) == targets) & scored).sum())

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.tokens, 1)

    def bits_per_char(self, characters: int | None, dropped_bits: float = 0.0) -> float | None:
        """Comparable across character, word and BPE models: the bits of the whole text over
        its characters, counting what a lossy tokenizer drops (``training.lossy``)."""
        return (self.nll / math.log(2) + dropped_bits) / characters if characters else None

    def __add__(self, other: Scores) -> Scores:
        return Scores(self.nll + other.nll, self.tokens + other.tokens, self.correct + other.correct)

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity,
                "token_accuracy": self.accuracy, "tokens": self.tokens}


def score_documents(model, documents, seq_len: int, *, batch_size: int = 16, stride: int | None = None,
                    device=None, autocast=None) -> Scores:
    """Score each document (``<bos> ... <eos>`` ids) on its own, from a fresh state and
    position 0: how a model trained on whole examples (``data.task: infill`` or
    ``infill+lm``) reads a story. A document longer than the context goes on in windows."""
    if model.max_context is None:
        batch_size = 1  # a recurrent model reads a document as one row, carrying its state
    return sum((score(model, doc, seq_len, batch_size=batch_size, stride=stride, device=device,
                      autocast=autocast) for doc in documents), Scores())


def _batched(iterable, n: int):
    iterator = iter(iterable)
    while chunk := list(islice(iterator, n)):
        yield chunk


@contextlib.contextmanager
def evaluating(model, autocast=None):
    """Eval mode, no gradients (and ``autocast`` if given); the previous mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast or contextlib.nullcontext():
            yield
    finally:
        model.train(was_training)


def score_batches(model, batches, *, device=None, autocast=None) -> Scores:
    """Score (x, y) batches with ``model`` (in eval mode; its previous mode is restored).
    A GPT whose inference path is not float32 (``decode_precision``) is scored through that
    path, from a fresh cache per batch: the numbers it serves with."""
    device = device or model.device
    scores = Scores()
    served = getattr(model, "decode_precision", "float32") != "float32"
    with evaluating(model, autocast):
        for x, y in batches:
            x = x.to(device)
            logits = model.step(x, model.init_state(x.size(0)))[0] if served else model(x)[0]
            scores.add(logits, y.to(device))
    return scores


def score(model, tokens: np.ndarray, seq_len: int, *, batch_size: int = 16, stride: int | None = None,
          max_batches: int | None = None, device=None, autocast=None) -> Scores:
    """Score a token stream: every token once (in eval mode; the previous mode is restored)."""
    device = device or model.device
    if model.max_context is not None:  # fixed context: windows of equal length, several per pass
        windows = eval_windows(tokens, min(seq_len, model.max_context), stride)
        batches = ((torch.cat(x), torch.cat(y)) for x, y in
                   (zip(*chunk) for chunk in islice(_batched(windows, batch_size), max_batches)))
        return score_batches(model, batches, device=device, autocast=autocast)
    scores = Scores()  # recurrent: in order, carrying the state
    with evaluating(model, autocast):
        state = model.init_state(batch_size)
        for x, y in islice(SequentialBatches(tokens, batch_size, seq_len), max_batches):
            logits, state = model.step(x.to(device), state)
            scores.add(logits, y.to(device))
    return scores
