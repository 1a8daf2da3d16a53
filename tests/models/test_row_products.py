"""Fable's decoding kernels (``models_src/row_products``): built with this machine's C
compiler, the products F.linear's to float32 rounding, the same numbers on any number of
threads, and torch's products wherever no library can be built."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from models_src import fast_decode, row_products
from models_src.row_products import RowProduct

COMPILER = os.environ.get("CC") or "cc"
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None,
                                    reason=f"no C compiler ({COMPILER}) on this machine")


@pytest.fixture(scope="module")
def lib():
    built = row_products.library()
    assert built is not None, "a C compiler is here, yet the kernels did not build"
    return built


def weights(inputs: int, out: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inputs, generator=generator) / inputs ** 0.5
    return weight, (torch.randn(out, generator=generator) if bias else None)


@needs_compiler
@pytest.mark.parametrize("inputs, out", [(256, 768), (100, 65), (7, 5), (33, 130)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_products_are_f_linears(lib, inputs, out, rows, bias):
    weight, b = weights(inputs, out, bias)
    x = torch.randn(rows, inputs)
    torch.testing.assert_close(RowProduct(lib, weight, b)(x), F.linear(x, weight, b),
                               rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 5])
def test_int8_products_are_the_rounded_weights_times_float_rows(lib, rows):
    weight, bias = weights(256, 130, True)
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    rounded = torch.round(weight / scale) * scale
    x = torch.randn(rows, 256)
    got = RowProduct(lib, weight, bias, int8=True)(x)
    torch.testing.assert_close(got, F.linear(x, rounded, bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("int8", [False, True])
def test_every_thread_count_gives_the_same_numbers(lib, int8):
    """Each output tile is summed by one thread, in one order, whatever the count."""
    product = RowProduct(lib, *weights(256, 1024, True), int8=int8)
    x = torch.randn(5, 256)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(product(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@needs_compiler
def test_rows_of_the_wrong_width_or_dtype_are_refused_not_read_past(lib):
    weight, bias = weights(64, 32, True)
    product = RowProduct(lib, weight, bias)
    for x in (torch.randn(1, 63), torch.randn(64), torch.randn(1, 64, dtype=torch.float64)):
        with pytest.raises(ValueError, match="rows of 64 float32"):
            product(x)
    x = torch.randn(64, 2).t()  # a transposed view is read as the rows it shows
    torch.testing.assert_close(product(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_compiler
def test_the_library_is_built_once_per_machine_and_loaded_after(tmp_path, monkeypatch):
    runs = []
    real_run = row_products.subprocess.run
    monkeypatch.setattr(row_products.subprocess, "run", lambda *a, **k: runs.append(a) or real_run(*a, **k))
    first = row_products.load(tmp_path)
    built = sorted(p.name for p in tmp_path.iterdir())
    assert first is not None and len(runs) == 1
    assert len(built) == 1 and built[0].startswith("row_products-") and built[0].endswith(".so")
    assert row_products.load(tmp_path) is not None and len(runs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == built


def test_without_a_compiler_decoding_keeps_torchs_products(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="models_src.row_products"):
        assert row_products.load(tmp_path, compiler=str(tmp_path / "no-such-cc")) is None
    assert "decoding keeps torch's products" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing half-built is left


def test_a_compiler_that_fails_leaves_nothing_behind(tmp_path, caplog):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'error: no vectors today' >&2\ntouch \"$(eval echo \\${$#})\"\nexit 1\n")
    failing.chmod(0o755)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="models_src.row_products"):
        assert row_products.load(cache, compiler=str(failing)) is None
    assert "no vectors today" in caplog.text
    assert list(cache.iterdir()) == []


def test_decode_products_use_the_kernels_when_built_and_torch_otherwise(monkeypatch):
    linear = torch.nn.Linear(16, 24)
    module = torch.nn.Module()
    x = torch.randn(2, 16)
    with torch.no_grad():
        product, = fast_decode.decode_products(module, [(linear.weight, linear.bias)])
        assert isinstance(product, RowProduct) == (row_products.library() is not None)
        monkeypatch.setattr(fast_decode, "library", lambda: None)
        other = torch.nn.Module()
        fallback, = fast_decode.decode_products(other, [(linear.weight, linear.bias)])
        assert not isinstance(fallback, RowProduct)
        torch.testing.assert_close(product(x), linear(x))
        torch.testing.assert_close(fallback(x), linear(x))


def model_and_cache(bias: bool, activation: str, lengths: list[int], seed: int = 0):
    """A two-block GPT and a cache whose rows hold ``lengths`` positions, written by the
    module path from tokens whose embeddings are scaled up: scores that a softmax without
    its maximum would overflow."""
    from models_src import ModelConfig, build_model
    torch.manual_seed(seed)
    model = build_model(ModelConfig(arch="gpt", vocab_size=50, n_layer=2, n_embd=64, n_head=4,
                                    block_size=256, bias=bias, activation=activation))
    with torch.no_grad():
        model.wte.weight.mul_(30)
    cache = model.init_state(len(lengths))
    if max(lengths):
        ids = torch.randint(0, 50, (len(lengths), max(lengths)))
        with torch.no_grad():
            model.train().step(ids, cache, torch.tensor(lengths))
    return model.eval(), cache


@needs_compiler
@pytest.mark.parametrize("lengths", [[0], [1], [63], [64], [200], [5, 200, 64]])
@pytest.mark.parametrize("bias, activation", [(True, "gelu"), (False, "gelu"), (True, "gelu_tanh")])
def test_a_one_token_step_in_one_call_is_the_module_paths(lib, lengths, bias, activation):
    """GPTStep (eval mode) against the module path (training mode, no dropout) on copies of
    the same cache: keys past one chunk of 64, rows at different positions, with and
    without biases, both GELUs; the tokens' keys and values are stored alike."""
    import copy
    model, ours = model_and_cache(bias, activation, lengths)
    theirs = copy.deepcopy(ours)
    tokens = torch.randint(0, 50, (len(lengths), 1))
    with torch.no_grad():
        got = model.eval().step(tokens, ours)[0]
        assert model.__dict__["_decode_one_token_step"][1] is not None  # the kernel ran
        want = model.train().step(tokens, theirs)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(ours.k, theirs.k)
    torch.testing.assert_close(ours.v, theirs.v)
    assert torch.equal(ours.lengths, theirs.lengths)


@needs_compiler
def test_a_one_token_step_refuses_rows_or_a_cache_that_do_not_match(lib):
    model, cache = model_and_cache(True, "gelu", [3, 3])
    step = fast_decode._one_token_step(model)
    cache.begin(1, None)
    keys, values, positions = cache.one_token_storage()
    for x, k, p in [(torch.zeros(2, 63), keys, positions), (torch.zeros(3, 64), keys, positions),
                    (torch.zeros(2, 64), keys, positions.long()), (torch.zeros(2, 64), keys.double(), positions),
                    (torch.zeros(2, 64), keys[:1], positions), (torch.zeros(2, 64), keys[:, :, :2], positions)]:
        with pytest.raises(ValueError, match="do not match"):
            step(x, k, values if k is keys else k.clone(), p)


@needs_compiler
def test_a_one_token_step_is_made_again_when_a_weight_or_the_precision_changes(lib):
    model, _ = model_and_cache(True, "gelu", [3])
    steps = [fast_decode._one_token_step(model)]
    assert fast_decode._one_token_step(model) is steps[-1]
    with torch.no_grad():
        model.blocks[1].ln_2.weight.add_(1)  # in place: a new version
    steps.append(fast_decode._one_token_step(model))
    model.decode_precision = "int8"
    steps.append(fast_decode._one_token_step(model))
    model.blocks[0].mlp.c_fc.weight = torch.nn.Parameter(model.blocks[0].mlp.c_fc.weight.detach().clone())
    steps.append(fast_decode._one_token_step(model))
    assert None not in steps and len({id(step) for step in steps}) == 4
