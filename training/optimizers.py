"""The optimizer a run trains with: AdamW for every parameter, or Muon for the hidden
matrices and AdamW for the rest.

Muon (``torch.optim.Muon``) orthogonalises each matrix's momentum before the step; it is
meant for the 2-D weights inside the network, not for embeddings, the output head (tied to
the embedding here) or vectors, which keep AdamW (Jordan et al., 2024). Its
``match_rms_adamw`` scaling (Liu et al., 2025, "Muon is Scalable for LLM Training") lets
both share one learning rate and weight decay, so the schedule and the config stay as
they are. torch has no optimizer over two others, hence ``Paired``.
"""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")


def build_optimizer(model: nn.Module, kind: str, *, lr: float, weight_decay: float,
                    betas: tuple[float, float]):
    params = list({id(p): p for p in model.parameters()}.values())
    # No weight decay on biases, norms and (for RNNs) nothing 1-D: decay shrinks matrices.
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    if kind == "adamw":
        return _adamw(matrices, vectors, lr, weight_decay, betas)
    if kind != "muon":
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {kind!r}")
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = [p for p in matrices if p.dim() == 2 and id(p) not in embedded]
    rest = [p for p in matrices if p.dim() != 2 or id(p) in embedded]
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    return Paired(muon, _adamw(rest, vectors, lr, weight_decay, betas))


def _adamw(matrices, vectors, lr, weight_decay, betas) -> torch.optim.AdamW:
    groups = [{"params": matrices, "weight_decay": weight_decay},
              {"params": vectors, "weight_decay": 0.0}]
    # The fused kernel (CPU and CUDA) does the whole update in one pass (benchmarks/README.md).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, fused=True)


class Paired:
    """Two optimizers over disjoint parameters, stepped, zeroed and saved as one. The
    trainer sets the learning rate through ``param_groups``, which lists both's groups."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"paired": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("paired", ())) != len(self.optimizers):
            raise ValueError("the saved state is not of a Muon and AdamW pair")
        for o, s in zip(self.optimizers, state["paired"]):
            o.load_state_dict(s)
