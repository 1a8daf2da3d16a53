"""RNN, GRU and LSTM language models with the AWD-LSTM regularisers.

Merity et al., "Regularizing and Optimizing LSTM Language Models" (2017): at small
sizes most of the gain over a plain LSTM comes from tied embeddings, embedding
dropout, locked (variational) dropout, and DropConnect on the hidden-to-hidden
weights. Each is a config field; all default to off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .base import LanguageModel
from .config import ModelConfig

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared across time steps (x: B, T, C)."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(embedding: nn.Embedding, ids: torch.Tensor, p: float, training: bool):
    """Drop whole rows of the embedding matrix: a dropped word is dropped everywhere."""
    weight = embedding.weight
    if training and p > 0.0:
        mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
        weight = weight * mask
    return F.embedding(ids, weight)


class RecurrentState:
    """The decoding state of a recurrent model: per layer h, or (h, c) for an LSTM, each
    (1, B, hidden), so rows are dimension 1."""

    def __init__(self, layers: list) -> None:
        self.layers = layers

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def _map(self, fn) -> RecurrentState:
        return RecurrentState([tuple(fn(t) for t in h) if isinstance(h, tuple) else fn(h)
                               for h in self.layers])

    def select(self, rows: torch.Tensor) -> RecurrentState:
        """A state holding only ``rows``, in that order."""
        return self._map(lambda t: t[:, rows])

    def append(self, other: RecurrentState) -> RecurrentState:
        """A state holding this state's rows, then ``other``'s."""
        return RecurrentState([tuple(torch.cat(ts, 1) for ts in zip(a, b)) if isinstance(a, tuple)
                               else torch.cat([a, b], 1) for a, b in zip(self.layers, other.layers)])

    def to(self, device) -> RecurrentState:
        return self._map(lambda t: t.to(device))

    def detach(self) -> RecurrentState:
        """The same values cut from the graph behind them (truncated back-propagation)."""
        return self._map(torch.Tensor.detach)


class RecurrentLM(LanguageModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        cell = CELLS[config.arch]
        E, H, V = config.n_embd, config.n_hidden, config.vocab_size
        self.embedding = nn.Embedding(V, E)
        # With tied weights the last layer must output embedding-sized vectors.
        out_last = E if config.tie_weights else H
        sizes = [(E if i == 0 else H, out_last if i == config.n_layer - 1 else H)
                 for i in range(config.n_layer)]
        self.layers = nn.ModuleList(cell(i, o, batch_first=True) for i, o in sizes)
        self.decoder = nn.Linear(out_last, V)
        self._init_weights()
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if self.config.arch == "lstm":
            for layer in self.layers:
                # forget-gate bias of 1 (gate order i, f, g, o): remember by default
                h = layer.hidden_size
                with torch.no_grad():
                    layer.bias_ih_l0[h:2 * h].fill_(1.0)
                    layer.bias_hh_l0[h:2 * h].zero_()

    def _run_layer(self, layer: nn.Module, x, h):
        if self.training and self.config.weight_drop > 0.0:
            # DropConnect on W_hh: call the cell with a dropped copy of its weight,
            # leaving the parameter itself untouched.
            dropped = F.dropout(layer.weight_hh_l0, self.config.weight_drop, training=True)
            return functional_call(layer, {"weight_hh_l0": dropped}, (x, h))
        return layer(x, h)

    def _run(self, ids, state, lengths=None):
        c = self.config
        x = embedding_dropout(self.embedding, ids, c.dropout_embedding, self.training)
        x = locked_dropout(x, c.dropout_input, self.training)
        T = ids.size(1)
        packed = lengths is not None and T > 1
        new_state = []
        for i, layer in enumerate(self.layers):
            h = None if state is None else state[i]
            if packed:
                # Packing makes each row's final state the one after its last real token.
                seq = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
                out, h = self._run_layer(layer, seq, h)
                x = pad_packed_sequence(out, batch_first=True, total_length=T)[0]
            else:
                x, h = self._run_layer(layer, x, h)
            new_state.append(h)
            if i < len(self.layers) - 1:
                x = locked_dropout(x, c.dropout_hidden, self.training)
        x = locked_dropout(x, c.dropout, self.training)
        return self.decoder(x), RecurrentState(new_state)

    def forward(self, input_ids, targets=None):
        logits, _ = self._run(input_ids, None)
        return logits, None if targets is None else self.loss(logits, targets)

    def init_state(self, batch_size: int) -> RecurrentState:
        p = self.embedding.weight
        state = []
        for layer in self.layers:
            h = p.new_zeros(1, batch_size, layer.hidden_size)
            state.append((h, torch.zeros_like(h)) if self.config.arch == "lstm" else h)
        return RecurrentState(state)

    def step(self, tokens, state, lengths=None):
        if self.training or tokens.size(1) > 1:  # windows, prompts: oneDNN's LSTM is faster
            return self._run(tokens, state, lengths)
        return self._one_token(tokens, state)

    def _one_token(self, tokens, state):
        """``_run`` in eval mode for one token per row. Each layer is ATen's own cell op,
        the one its CPU loop runs (so the same numbers), called directly: ``nn.LSTM`` would go
        to oneDNN, whose per-call set-up is most of a one-token step, and avoiding it with
        torch's process-wide kernel switch would change the kernels of every thread, a
        server's other decoding threads included."""
        x = F.embedding(tokens[:, 0], self.embedding.weight)
        new_state = []
        for i, layer in enumerate(self.layers):
            h = None if state is None else state[i]
            x, h = _CELL_STEPS[self.config.arch](layer, x, h)
            new_state.append(h)
        return self.decoder(x)[:, None], RecurrentState(new_state)


# ---- one-token cells: ATen's own cell ops, which its CPU RNN loop runs (RNN.cpp) ----
# x: (B, in); a layer's state is (1, B, hidden) like nn.RNN's; each returns (output, state).

def _lstm_step(layer: nn.LSTM, x, state):
    if state is None:
        state = (x.new_zeros(1, x.size(0), layer.hidden_size),) * 2
    hy, cy = torch.lstm_cell(x, (state[0][0], state[1][0]), layer.weight_ih_l0,
                             layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    return hy, (hy[None], cy[None])


def _gru_step(layer: nn.GRU, x, state):
    return _simple_step(torch.gru_cell, layer, x, state)


def _rnn_step(layer: nn.RNN, x, state):
    cell = torch.rnn_tanh_cell if layer.nonlinearity == "tanh" else torch.rnn_relu_cell
    return _simple_step(cell, layer, x, state)


def _simple_step(cell, layer, x, state):
    hx = x.new_zeros(x.size(0), layer.hidden_size) if state is None else state[0]
    hy = cell(x, hx, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    return hy, hy[None]


_CELL_STEPS = {"lstm": _lstm_step, "gru": _gru_step, "rnn": _rnn_step}
