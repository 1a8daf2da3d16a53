"""Model inspection: parameter count, size in memory, a per-layer table."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Parameters counted once even when tied (``parameters()`` de-duplicates)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def size_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers, in MB (10^6 bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def layer_rows(model: nn.Module) -> list[tuple[str, str, int, str]]:
    """(layer, module type, parameters, shapes) for each module that holds parameters; a
    tied parameter is counted at its first owner and marked at the others."""
    rows, owner = [], {}
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        own = [(n, p) for n, p in params if id(p) not in owner]
        tied = [f"{n} tied to {owner[id(p)]}" for n, p in params if id(p) in owner]
        owner.update({id(p): f"{name}.{n}" for n, p in own})
        shapes = ", ".join("x".join(map(str, p.shape)) for _, p in own)
        rows.append((name or "(root)", type(module).__name__, sum(p.numel() for _, p in own),
                     ", ".join(filter(None, [shapes] + tied))))
    return rows


def layer_summary(model: nn.Module) -> str:
    """``layer_rows`` as a text table, with the total and the size in memory."""
    rows = layer_rows(model)
    width = max(len(r[0]) for r in rows)
    lines = [f"{'layer':<{width}}  {'type':<14} {'params':>10}  shapes"]
    lines += [f"{n:<{width}}  {t:<14} {c:>10,}  {s}" for n, t, c, s in rows]
    lines.append(f"total: {count_parameters(model):,} parameters, {size_mb(model):.2f} MB")
    return "\n".join(lines)
