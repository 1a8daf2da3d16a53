"""Cross-entropy whose backward reuses the forward's log-probabilities.

``F.cross_entropy`` on the CPU is ``log_softmax`` then ``nll_loss``, and its backward
allocates two more tensors the size of the logits: the loss's gradient, all zeros but one
entry a row, and then the log-softmax's gradient. With a vocabulary of a few thousand
words those are tens of megabytes a step, each written (and, freshly mapped, page-faulted)
in full. The gradient of the mean cross-entropy is ``(softmax - one_hot) / n``, so the
backward here turns the saved log-probabilities into it in place: one ``exp_``, one
subtraction per row and one scaling, and no new buffer.
"""

from __future__ import annotations

import torch


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = targets != ignore_index
        safe = targets.masked_fill(~scored, 0)  # any valid index: the row is not counted
        picked = log_probs.gather(1, safe[:, None]).squeeze(1)
        count = scored.sum()
        ctx.save_for_backward(log_probs, safe, scored, count)
        return -torch.where(scored, picked, 0.0).sum() / count  # no target scored: nan, as F's

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if getattr(ctx, "spent", False):
            raise RuntimeError("this cross-entropy's backward runs once: its buffer became the "
                               "gradient (use F.cross_entropy to backward through it twice)")
        ctx.spent = True
        log_probs, safe, scored, count = ctx.saved_tensors
        grad = log_probs.exp_()  # in place: the forward's buffer is not needed again
        grad[torch.arange(grad.size(0), device=grad.device), safe] -= 1.0
        grad.mul_((grad_loss / count) * scored[:, None])  # ignored rows get no gradient
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets, skipping ``ignore_index``:
    ``F.cross_entropy(logits, targets, ignore_index=ignore_index)``, with a lighter backward."""
    return _CrossEntropy.apply(logits, targets, ignore_index)
