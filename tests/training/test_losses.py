"""The models' cross-entropy against torch's: the same loss and the same gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from models_src import IGNORE_INDEX
from models_src.losses import cross_entropy


def loss_and_grad(fn, logits, targets, scale):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets)
    (loss * scale).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_it_matches_torch_with_ignored_targets(dtype):
    torch.manual_seed(0)
    logits = torch.randn(37, 11, dtype=dtype) * 3
    targets = torch.randint(0, 11, (37,))
    targets[::5] = IGNORE_INDEX
    ours = loss_and_grad(lambda x, t: cross_entropy(x, t, IGNORE_INDEX), logits, targets, 0.7)
    torchs = loss_and_grad(lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE_INDEX),
                           logits, targets, 0.7)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(ours[0], torchs[0], **tol)
    torch.testing.assert_close(ours[1], torchs[1], **tol)
    assert not ours[1][::5].any()  # an ignored row gets no gradient


def test_no_scored_target_gives_nan_as_torch_does():
    targets = torch.full((3,), IGNORE_INDEX)
    assert math.isnan(cross_entropy(torch.randn(3, 4), targets, IGNORE_INDEX).item())
    assert math.isnan(F.cross_entropy(torch.randn(3, 4), targets, ignore_index=IGNORE_INDEX).item())


def test_a_second_backward_is_refused_with_a_clear_error():
    x = torch.randn(5, 7, requires_grad=True)
    loss = cross_entropy(x, torch.arange(5), IGNORE_INDEX)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_every_architecture_trains_on_it():
    from models_src import ModelConfig, build_model
    torch.manual_seed(0)
    for arch in ("gpt", "lstm", "gru", "rnn"):
        model = build_model(ModelConfig(arch=arch, vocab_size=30, n_layer=1, n_embd=16, n_head=2,
                                        n_hidden=16, block_size=8))
        x, y = torch.randint(0, 30, (3, 8)), torch.randint(0, 30, (3, 8))
        logits, loss = model(x, y)
        expected = F.cross_entropy(logits.reshape(-1, 30).float(), y.reshape(-1), ignore_index=IGNORE_INDEX)
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad), arch
