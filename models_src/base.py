"""The contract every architecture answers.

Training and evaluation call ``forward(input_ids, targets)``. Generation calls
``init_state(batch_size)`` once and then ``step(tokens, state, lengths)`` for the
prompt and for every new token, so each new token costs the same whatever the
length of the text before it: the state is the recurrent (h, c) of an RNN or the
key/value cache of an attention model.

A server decoding many requests together (continuous batching) also needs to regroup
rows of states between steps: ``select_rows(state, rows)`` keeps some rows (finished
ones leave) and ``concat_rows(states)`` appends rows (new requests, prefilled on their
own, join the running batch). ``context_ids``/``context_length`` say what a fresh state
is fed when a sequence is longer than ``max_context`` allows (by default its last ids; an
encoder–decoder keeps its source) and how much of the context a sequence fills.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

IGNORE_INDEX = -100  # targets equal to this are not scored


class LanguageModel(nn.Module):
    """Base class: holds the config and the shared loss; subclasses build the network."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    #: The longest sequence ``step`` can hold; ``None`` means unbounded (RNNs).
    max_context: int | None = None

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(logits, loss)``: logits (B, T, V) for every position; the mean
        cross-entropy over targets that are not ``IGNORE_INDEX`` when targets are given."""
        raise NotImplementedError

    def init_state(self, batch_size: int) -> Any:
        """A fresh decoding state for ``batch_size`` sequences of length zero."""
        raise NotImplementedError

    def step(
        self, tokens: torch.Tensor, state: Any, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Feed ``tokens`` (B, T) after what ``state`` has seen; return logits (B, T, V)
        and the new state (the old one may have been updated in place).

        ``lengths`` (B,) says how many of the T tokens are real in each row (the rest
        is right padding: its logits are meaningless and it does not enter the state).
        """
        raise NotImplementedError

    def select_rows(self, state: Any, rows: torch.Tensor) -> Any:
        """A state holding only ``rows`` (B',) of ``state``, in that order. It may be
        ``state`` changed in place: use only the state returned."""
        raise NotImplementedError

    def concat_rows(self, states: list[Any]) -> Any:
        """One state holding the rows of every state in ``states``, one after another.
        It may be the first of them changed in place: use only the state returned."""
        raise NotImplementedError

    def context_ids(self, ids: list[int], keep: int) -> list[int]:
        """What a fresh state is fed so that it holds at most ``keep`` positions of the
        sequence ``ids``: a prompt longer than the context, or a generation re-primed once
        its state is full. By default the last ``keep`` ids."""
        return ids[-keep:]

    def context_length(self, ids: list[int]) -> int:
        """Positions a state holds once fed ``ids`` (what ``max_context`` limits); by
        default one per id."""
        return len(ids)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
