"""Training health: per-layer numbers that show a layer that has stopped learning before the
loss does, and the plain-words diagnosis built on them.

- ``weight_stats`` / ``gradient_stats``: each parameter's norm and spread, and its gradient's
  norm (after ``backward``);
- ``update_ratios``: how far one optimizer step moved each parameter, relative to its size
  (take ``snapshot`` before the step);
- ``probe``: one forward pass with hooks: every layer's activation mean and spread, the
  share of an LSTM's gate values that are saturated (near 0 or 1) and of its units that are
  dead (silent everywhere), the share of dead GELU units in a GPT's MLPs, and the entropy of
  each attention head;
- ``diagnose``: the problems these numbers show, as sentences with the numbers in them.

A record is ``(layer, metric, value)``; the trainer stores them every
``training.health_every`` steps beside the loss, and ``python -m training.inspect`` reports
on a checkpoint. The thresholds are rules of thumb (Karpathy's "A Recipe for Training
Neural Networks", and "Visualizing and Understanding Recurrent Networks" for LSTM gates);
the bundled models stay clear of every one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import MLP, SelfAttention

Record = tuple[str, str, float]  # layer, metric, value

#: A gate value below LOW or above HIGH is saturated: its gradient has all but vanished.
GATE_LOW, GATE_HIGH = 0.05, 0.95
#: A unit whose output stays within DEAD_LEVEL of zero at every position is dead.
DEAD_LEVEL = 1e-3

# What diagnose() calls a problem.
VANISHING_GRADIENT = 1e-7  # gradient norm of a whole layer
EXPLODING_GRADIENT = 1e3
TOO_LARGE_UPDATE = 0.1  # one step moves a parameter by a tenth of its norm
TOO_SMALL_UPDATE = 1e-7
SATURATED_GATES = 0.8  # share of an LSTM layer's gate values (trained ones: 35-56 %)
DEAD_UNITS = 0.25  # share of a layer's units (trained ones: under 2 %)
COLLAPSED_HEAD_BITS = 0.05  # a head that puts all its attention on one position
MOSTLY_COLLAPSED = 0.5  # share of a layer's heads


def _layer(name: str) -> str:
    """A parameter's layer: its name without the last part (``blocks.0.mlp.c_fc``)."""
    return name.rpartition(".")[0] or name


def weight_stats(model: nn.Module) -> list[Record]:
    records = []
    for name, p in model.named_parameters():
        w = p.detach().float()
        records += [(name, "weight_norm", w.norm().item()), (name, "weight_std", w.std().item()
                                                             if w.numel() > 1 else 0.0)]
    return records


def gradient_stats(model: nn.Module) -> list[Record]:
    """Each parameter's gradient norm (after ``backward``, before clipping)."""
    return [(name, "grad_norm", p.grad.detach().float().norm().item())
            for name, p in model.named_parameters() if p.grad is not None]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def update_ratios(before: dict[str, torch.Tensor], model: nn.Module) -> list[Record]:
    """||step|| / ||weight|| of each parameter that the step moved from ``before``."""
    records = []
    for name, p in model.named_parameters():
        old = before.get(name)
        if old is None:
            continue
        norm = old.float().norm().item()
        if norm > 0:
            records.append((name, "update_ratio", (p.detach().float() - old.float()).norm().item() / norm))
    return records


@torch.no_grad()
def probe(model: nn.Module, ids: torch.Tensor) -> list[Record]:
    """One forward pass over ``ids`` (batch, time) in eval mode, recording activations,
    LSTM gates and units, GELU units and attention entropy (model untouched)."""
    records: list[Record] = []
    hooks = []
    names = {module: name for name, module in model.named_modules()}
    outputs: dict[nn.Module, torch.Tensor] = {}  # each Linear's output, for the hooks after it

    def activations(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            outputs[module] = out
            out = out.float()
            records.extend([(names[module], "activation_mean", out.mean().item()),
                            (names[module], "activation_std", out.std().item())])

    def recurrent(module, inputs, output):
        out = output[0]
        if not isinstance(out, torch.Tensor):  # a packed sequence: not probed
            return
        units = out.float().abs().flatten(0, -2).amax(0)
        records.append((names[module], "dead_units", (units < DEAD_LEVEL).float().mean().item()))
        if isinstance(module, nn.LSTM) and module.num_layers == 1 and not module.bidirectional:
            records.append((names[module], "saturated_gates", _lstm_saturation(module, inputs[0], out)))

    def gelu_units(module, inputs, output):
        hidden = F.gelu(outputs[module.c_fc]).flatten(0, -2)
        dead = (hidden.amax(0) <= DEAD_LEVEL).float().mean().item()
        records.append((names[module], "dead_units", dead))

    def attention(module, inputs, output):
        records.extend((f"{names[module]}.head{h}", "attention_entropy_bits", bits)
                       for h, bits in enumerate(_head_entropy(module, outputs[module.c_attn])))

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RNNBase)):
            hooks.append(module.register_forward_hook(activations))
        if isinstance(module, nn.RNNBase):
            hooks.append(module.register_forward_hook(recurrent))
        elif isinstance(module, MLP):
            hooks.append(module.register_forward_hook(gelu_units))
        elif isinstance(module, SelfAttention):
            hooks.append(module.register_forward_hook(attention))
    training = model.training
    model.eval()
    try:
        model(ids)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return records


def _lstm_saturation(lstm: nn.LSTM, x: torch.Tensor, out: torch.Tensor) -> float:
    """Share of input, forget and output gate values outside [GATE_LOW, GATE_HIGH]: the
    gates are recomputed from the layer's inputs and its outputs one step earlier."""
    x, out = x.float(), out.float()
    previous = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)
    gates = (x @ lstm.weight_ih_l0.float().T + previous @ lstm.weight_hh_l0.float().T
             + lstm.bias_ih_l0.float() + lstm.bias_hh_l0.float())
    i, f, _, o = gates.chunk(4, dim=-1)
    sigmoid = torch.sigmoid(torch.cat([i, f, o], dim=-1))
    return ((sigmoid < GATE_LOW) | (sigmoid > GATE_HIGH)).float().mean().item()


def _head_entropy(attention: SelfAttention, qkv: torch.Tensor) -> list[float]:
    """Mean entropy (bits) of each head's attention over the positions it may see, from
    the layer's query/key/value projection (B, T, 3C)."""
    B, T, C3 = qkv.shape
    q, k, _ = qkv.view(B, T, 3, attention.n_head, C3 // 3 // attention.n_head) \
        .permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.size(-1))
    if attention.causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    p = scores.softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log2()).sum(-1)  # (B, heads, T)
    return entropy[:, :, 1:].mean((0, 2)).tolist() if T > 1 else [0.0] * attention.n_head


# ---- diagnosis ------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    kind: str  # "vanishing gradients", "exploding gradients", "dead units", ...
    layer: str
    text: str  # the problem in plain words, with its numbers


def _by(records: Iterable[Record], metric: str) -> dict[str, float]:
    return {layer: value for layer, name, value in records if name == metric}


#: metric -> (under, its problem, over, its problem): a value outside the range (or not
#: a finite number) is the problem, its text formatted with the layer's name and the value.
RANGES = {
    "grad_norm": (
        VANISHING_GRADIENT, ("vanishing gradients", "{name}: the gradient norm is {value:.3g} "
                             f"(under {VANISHING_GRADIENT:g}): this layer has stopped learning"),
        EXPLODING_GRADIENT, ("exploding gradients", "{name}: the gradient norm is {value:.3g} "
                             f"(over {EXPLODING_GRADIENT:g}); lower the learning rate or clip "
                             "gradients (training.grad_clip)")),
    "update_ratio": (
        TOO_SMALL_UPDATE, ("updates too small", "{name}: one step changes the weights by "
                           "{value:.1e} of their size: they are not learning"),
        TOO_LARGE_UPDATE, ("updates too large", "{name}: one step changes the weights by "
                           "{value:.1%} of their size (a healthy step is around 0.1 %, over "
                           f"{TOO_LARGE_UPDATE:.0%} is a problem); lower the learning rate")),
}


def diagnose(records: Iterable[Record]) -> list[Problem]:
    """The problems ``records`` (one probe and/or one training step's statistics) show."""
    records = list(records)
    problems = []
    for metric, (low, under, high, over) in RANGES.items():
        for name, value in _by(records, metric).items():
            if not math.isfinite(value) or value > high or value < low:
                kind, text = over if not value < low else under
                problems.append(Problem(kind, name, text.format(name=name, value=value)))
    for name, value in _by(records, "dead_units").items():
        if value > DEAD_UNITS:
            problems.append(Problem("dead units", name, (
                f"{name}: {value:.0%} of its units never activate on this text (dead units; "
                "often a learning rate too high, or weights initialised too small)")))
    for name, value in _by(records, "saturated_gates").items():
        if value > SATURATED_GATES:
            problems.append(Problem("saturated gates", name, (
                f"{name}: {value:.0%} of its gate values are saturated (under {GATE_LOW} or "
                f"over {GATE_HIGH}), where gradients vanish; often a learning rate too high")))
    heads: dict[str, list[float]] = {}
    for name, value in _by(records, "attention_entropy_bits").items():
        heads.setdefault(_layer(name), []).append(value)
    for layer, entropies in heads.items():
        collapsed = [e for e in entropies if e < COLLAPSED_HEAD_BITS]
        if len(collapsed) > MOSTLY_COLLAPSED * len(entropies):
            problems.append(Problem("collapsed attention", layer, (
                f"{layer}: {len(collapsed)} of {len(entropies)} heads have collapsed (each puts "
                f"all its attention on one position: entropy under {COLLAPSED_HEAD_BITS} bits)")))
    diverged = dict.fromkeys(layer for layer, name, value in records
                             if name.startswith("activation") and not math.isfinite(value))
    problems += [Problem("non-finite activations", layer, f"{layer}: its activations are not "
                         "finite numbers (the weights have diverged)") for layer in diverged]
    return problems
