"""Each token of a prompt scored given the tokens before it: what an echoed prompt's
log-probabilities are (OpenAI's ``echo`` with ``logprobs``), and what an evaluation
harness sums to compare answers."""

from __future__ import annotations

import torch

from .sampling import TokenLogprob, token_logprobs


def prompt_logprobs(model, ids: list[int], top: int = 0) -> list[TokenLogprob | None]:
    """One forward pass over ``ids`` (which must fit the model's context): entry 0 is None,
    nothing comes before it; entry i is ``ids[i]``'s log-probability after ``ids[:i]``,
    with its ``top`` likeliest alternatives, as the sampler reports a generated token's."""
    if len(ids) < 2:
        return [None] * len(ids)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model(x)[0][0, :-1]
    finally:
        model.train(was_training)
    return [None, *token_logprobs(logits, x[0, 1:], top)]
