"""Every architecture keeps the one contract: forward == incremental steps, and it learns."""

import pytest
import torch

from models_src import ARCHITECTURES, ModelConfig, build_model

V, SEP = 50, 3


def make(arch, **overrides):
    torch.manual_seed(0)
    cfg = dict(arch=arch, vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_hidden=48,
               block_size=64, sep_id=SEP)
    cfg.update(overrides)
    return build_model(ModelConfig(**cfg)).eval()


def random_ids(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (B, T), generator=g)
    return ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_token_by_token_matches_forward(arch):
    model = make(arch)
    ids = random_ids(2, 24)
    if arch == "seq2seq":
        ids[:, 9] = SEP  # source of 9 tokens, target from the separator on
    with torch.inference_mode():
        full, _ = model(ids)
        first = 10 if arch == "seq2seq" else 1  # seq2seq must see its whole source first
        state = model.init_state(2)
        logits, state = model.step(ids[:, :first], state)
        pieces = [logits]
        for t in range(first, ids.size(1)):
            logits, state = model.step(ids[:, t:t + 1], state)
            pieces.append(logits)
        stepped = torch.cat(pieces, dim=1)
    start = 9 if arch == "seq2seq" else 0
    assert (full[:, start:] - stepped[:, start:]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ragged_batch_prefill_matches_rows_alone(arch):
    """Right-padded prompts with lengths give each row what it would get alone."""
    model = make(arch)
    rows = [random_ids(1, 12, seed=2)[0], random_ids(1, 7, seed=3)[0]]
    if arch == "seq2seq":
        rows[0][4] = SEP
        rows[1][2] = SEP
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    nxt = torch.tensor([[5], [6]])
    with torch.inference_mode():
        state = model.init_state(2)
        logits, state = model.step(padded, state, lengths)
        after, _ = model.step(nxt, state)
        for i, r in enumerate(rows):
            alone_state = model.init_state(1)
            alone, alone_state = model.step(r[None], alone_state)
            assert (logits[i, len(r) - 1] - alone[0, -1]).abs().max() < 1e-5
            alone_after, _ = model.step(nxt[i:i + 1], alone_state)
            assert (after[i] - alone_after[0]).abs().max() < 1e-5


@pytest.mark.train
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_few_steps_lower_the_loss(arch):
    text = ("the cat sat on the mat. " * 40).encode()
    data = torch.tensor([b % V for b in text])
    model = make(arch).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data[:256].view(8, 32), data[1:257].view(8, 32)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_awd_lstm_regularisers_train_and_are_off_in_eval():
    model = make("lstm", dropout=0.4, dropout_input=0.3, dropout_hidden=0.25,
                 dropout_embedding=0.1, weight_drop=0.5).train()
    ids = random_ids(4, 16)
    a, loss = model(ids, ids)
    b, _ = model(ids, ids)
    assert not torch.equal(a, b)  # stochastic in training
    loss.backward()
    assert model.layers[0].weight_hh_l0.grad is not None  # DropConnect still trains W_hh
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])


@pytest.mark.parametrize("kernels", [True, False], ids=["fable-kernels", "torch-products"])
@pytest.mark.parametrize("bias, activation", [(True, "gelu"), (False, "gelu"), (True, "gelu_tanh")])
def test_gpt_decode_path_gives_the_module_path_numbers(bias, activation, kernels, monkeypatch):
    """In eval mode GPT.step runs Block.decode (direct calls, no modules, weights laid out
    (in, out)); in training mode the modules. With no dropout both give the same logits up
    to the order of the sums. Uniform prefill, one-token steps and a ragged batch; the
    exact GELU and GPT-2's tanh approximation; Fable's C kernels (where this machine builds
    them) and torch's products."""
    if not kernels:
        monkeypatch.setattr("models_src.fast_decode.library", lambda: None)
    model = make("gpt", bias=bias, activation=activation)
    ids = random_ids(2, 12)
    lengths = torch.tensor([5, 3])
    results = {}
    with torch.no_grad():
        for training in (True, False):
            model.train(training)
            state = model.init_state(2)
            out = [model.step(ids[:, :4], state)[0]]
            out += [model.step(ids[:, t:t + 1], state)[0] for t in range(4, 8)]
            ragged = model.init_state(2)
            out.append(model.step(ids[:, :5], ragged, lengths)[0])
            out.append(model.step(ids[:, 8:9], ragged)[0])
            results[training] = out
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_join_step_gives_every_row_what_it_gets_alone(arch):
    """join_step feeds the running rows one token each and starts rows from new prompts
    in the same call (the GPT in one pass over all their tokens, each row attending only to
    its own keys): every row's logits, then and at the next step, are those of the row
    decoded alone with ``step``. Rows of different lengths on both sides; and prompts with
    no running rows (a prefill)."""
    model = make(arch)
    running = [random_ids(1, 9, seed=4)[0].tolist(), random_ids(1, 5, seed=5)[0].tolist()]
    prompts = [random_ids(1, 6, seed=6)[0].tolist(), random_ids(1, 11, seed=7)[0].tolist(),
               random_ids(1, 6, seed=8)[0].tolist()]
    if arch == "seq2seq":
        for row in running + prompts:
            row[2] = SEP
    fed, nxt = [7, 8], torch.tensor([[9], [10], [11], [12], [13]])
    with torch.inference_mode():
        _, state = model.prefill(running)
        logits, state = model.join_step(torch.tensor(fed), state, prompts)
        after, _ = model.step(nxt, state)
        prefilled, _ = model.join_step(None, None, prompts)
        for i, row in enumerate(running + prompts):
            ids = row + [fed[i]] if i < len(running) else row
            alone, alone_state = model.step(torch.tensor([ids]), model.init_state(1))
            torch.testing.assert_close(logits[i], alone[0, -1], rtol=1e-5, atol=1e-5)
            if i >= len(running):
                torch.testing.assert_close(prefilled[i - len(running)], alone[0, -1], rtol=1e-5, atol=1e-5)
            alone_after, _ = model.step(nxt[i:i + 1], alone_state)
            torch.testing.assert_close(after[i], alone_after[0], rtol=1e-5, atol=1e-5)
    assert logits.shape == (5, V) and prefilled.shape == (3, V)


def test_a_training_gpt_prefills_and_joins_through_its_modules():
    """In training mode the GPT's prefill and join step take the module path (dropout
    included); with no dropout they give the decode path's numbers."""
    model = make("gpt")
    prompts = [random_ids(1, 6, seed=6)[0].tolist(), random_ids(1, 4, seed=7)[0].tolist()]
    with torch.no_grad():
        want, state = model.prefill(prompts)
        want_next, _ = model.join_step(torch.tensor([3, 4]), state, prompts[:1])
        model.train()
        got, state = model.prefill(prompts)
        got_next, _ = model.join_step(torch.tensor([3, 4]), state, prompts[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_next, want_next, rtol=1e-5, atol=1e-5)


def test_the_decode_path_follows_weight_changes():
    """The inference path (fast_decode) keeps transposed copies of the weights: a changed weight (a training
    step, a load) must be seen by the next step, never a stale copy."""
    model = make("gpt").eval()
    ids = random_ids(1, 6)

    def last_logits():
        with torch.no_grad():
            return model.step(ids, model.init_state(1))[0][:, -1]

    before = last_logits()
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(1.5)  # in place: same storage, new version
        model.lm_head.weight.add_(0.01)
    changed = last_logits()
    model.train()
    with torch.no_grad():
        want = model.step(ids, model.init_state(1))[0][:, -1]  # the module path
    model.eval()
    assert not torch.allclose(before, changed)
    torch.testing.assert_close(changed, want, rtol=1e-5, atol=1e-5)
    other = make("gpt")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    model.load_state_dict(other.state_dict())  # a load copies into the same tensors
    torch.testing.assert_close(last_logits(), other.step(ids, other.init_state(1))[0][:, -1])


def test_tied_weights_share_storage():
    lstm, gpt = make("lstm"), make("gpt")
    assert lstm.decoder.weight is lstm.embedding.weight
    assert gpt.lm_head.weight is gpt.wte.weight
    assert make("lstm", tie_weights=False).decoder.weight.shape == (V, 48)


def test_gpt_rejects_input_longer_than_its_context():
    model = make("gpt", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(1, 9))
    state = model.init_state(1)
    model.step(random_ids(1, 8), state)
    with pytest.raises(ValueError, match="context"):
        model.step(random_ids(1, 1), state)


def test_seq2seq_without_separator_is_a_language_model():
    model = make("seq2seq")
    ids = random_ids(2, 10)
    logits, loss = model(ids, ids)
    assert logits.abs().sum() > 0 and torch.isfinite(loss)


@pytest.mark.parametrize("bad", [dict(arch="transformer"), dict(n_embd=30, n_head=4),
                                 dict(arch="seq2seq", sep_id=None), dict(dropout=1.0),
                                 dict(activation="relu"),
                                 dict(arch="lstm", activation="gelu_tanh")])
def test_config_validation(bad):
    cfg = dict(arch="gpt", vocab_size=V, sep_id=SEP)
    cfg.update(bad)
    with pytest.raises(ValueError):
        ModelConfig(**cfg)


def test_inspection_counts_tied_parameters_once():
    from models_src.summary import count_parameters, layer_summary, size_mb
    model = make("gpt")
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())
    assert size_mb(model) == pytest.approx(count_parameters(model) * 4 / 1e6)
    table = layer_summary(model)
    assert "blocks.0.attn.c_attn" in table
    assert "weight tied to wte.weight" in table  # the head shares the embedding
    assert f"total: {count_parameters(model):,} parameters" in table


def test_the_tanh_gelu_is_the_one_the_gpt_computes():
    """activation="gelu_tanh" changes the MLP's GELU (module and decode paths), nothing else."""
    exact, tanh = make("gpt"), make("gpt", activation="gelu_tanh")
    tanh.load_state_dict(exact.state_dict())
    ids = random_ids(1, 8)
    with torch.no_grad():
        x = torch.randn(4, 32)
        torch.testing.assert_close(tanh.blocks[0].mlp(x), exact.blocks[0].mlp.c_proj(
            torch.nn.functional.gelu(exact.blocks[0].mlp.c_fc(x), approximate="tanh")))
        assert not torch.equal(tanh(ids)[0], exact(ids)[0])
        torch.testing.assert_close(tanh.step(ids, tanh.init_state(1))[0], tanh(ids)[0],
                                   rtol=1e-5, atol=1e-5)


def test_no_process_wide_kernel_switch_in_decoding():
    """Decoding threads share the process: a one-token step gives the same numbers
    whether oneDNN is on or off, and leaves the switch as it was (it touches none)."""
    torch.manual_seed(0)
    previous = torch._C._get_mkldnn_enabled()
    for arch in ("gpt", "lstm", "gru", "rnn"):
        model = build_model(ModelConfig(arch=arch, vocab_size=40, n_layer=2, n_embd=16,
                                        n_head=2, n_hidden=32, block_size=32)).eval()
        results = []
        with torch.inference_mode():
            for enabled in (True, False):
                _, state = model.prefill([[1, 2, 3], [4, 5, 6]])  # under the usual kernels
                torch._C._set_mkldnn_enabled(enabled)
                try:
                    logits, _ = model.step(torch.tensor([[7], [8]]), state)
                    assert torch._C._get_mkldnn_enabled() == enabled
                finally:
                    torch._C._set_mkldnn_enabled(previous)
                results.append(logits)
        assert torch.equal(*results), arch


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_decoding_gelu_is_atens_own(approximate):
    """fast_decode's in-place GELU (a transposed view, which oneDNN does not take) gives
    ATen's kernel's numbers bit for bit, for any number of rows."""
    from models_src.fast_decode import _gelu_

    previous = torch._C._get_mkldnn_enabled()
    for rows in (1, 3, 16):
        x = torch.randn(rows, 64) * 3
        torch._C._set_mkldnn_enabled(False)
        try:
            expected = torch.nn.functional.gelu(x, approximate=approximate)
        finally:
            torch._C._set_mkldnn_enabled(previous)
        got = _gelu_(x.clone(), approximate)
        assert got.is_contiguous() and torch.equal(got, expected)
