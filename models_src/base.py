"""The contract every architecture answers.

Training and evaluation call ``forward(input_ids, targets)``. Generation feeds a state
(``init_state``) with ``step``, so each new token costs the same whatever came before:
the recurrent (h, c) of an RNN or the key/value cache of an attention model. The state
object regroups its own rows (``select(rows)``, ``append(other)``), which is all a
batch engine needs to let sequences join and leave. ``prefill`` and ``join_step`` are
the first step of new prompts, alone or together with a running batch's step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .losses import cross_entropy

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

    def prefill(self, rows: list[list[int]]) -> tuple[torch.Tensor, Any]:
        """A fresh state fed every row of ids (at least one each; rows may differ in
        length) and the logits after each row's last id (B, V)."""
        padded, lengths = right_pad(rows, self.device)
        logits, state = self.step(padded, self.init_state(len(rows)), lengths)
        if lengths is None:
            return logits[:, -1], state
        return logits[torch.arange(len(rows), device=logits.device), lengths - 1], state

    def join_step(self, tokens: torch.Tensor | None, state: Any,
                  prompts: list[list[int]]) -> tuple[torch.Tensor, Any]:
        """One step of a running batch that new rows join: running row b is fed
        ``tokens[b]`` (B,) after what ``state`` holds (both None when no row runs), and a
        new row starts for each of ``prompts``. Returns the logits after each row's newest
        id ((B + len(prompts), V), running rows first) and the state holding every row in
        that order (``state`` may have been changed in place)."""
        logits, states = [], []
        if tokens is not None:
            step_logits, state = self.step(tokens[:, None], state)
            logits.append(step_logits[:, -1])
            states.append(state)
        if prompts:
            new_logits, new_state = self.prefill(prompts)
            logits.append(new_logits)
            states.append(new_state)
        if not states:
            raise ValueError("a step needs a running row or a prompt")
        state = states[0] if len(states) == 1 else states[0].append(states[1])
        return torch.cat(logits) if len(logits) > 1 else logits[0], state

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
        return cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), IGNORE_INDEX)


def right_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of ids as one (B, T) tensor, right-padded with 0, and each row's length (B,);
    the lengths are None when every row is whole (a model may then keep a faster path)."""
    lengths = [len(r) for r in rows]
    longest = max(lengths)
    padded = torch.tensor([r + [0] * (longest - len(r)) for r in rows], device=device)
    if min(lengths) == longest:
        return padded, None
    return padded, torch.tensor(lengths, device=device)
