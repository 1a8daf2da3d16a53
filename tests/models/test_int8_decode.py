"""int8 decoding (a GPT's ``decode_precision``): the inference path's products in int8,
the rest of the model as it was; set per checkpoint, by ``--format fable`` export, and
scored by ``evaluate`` through the same path."""

from __future__ import annotations

import json

import pytest
import torch

from models_src import ModelConfig, build_model
from models_src.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models_src.tokenization import Tokenizer
from training.export import main as export_main
from training.metrics import score

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_char([TEXT])


def small_model(vocab_size: int, arch: str = "gpt"):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=vocab_size, n_layer=2, n_embd=64,
                                   n_head=4, n_hidden=48, block_size=64)).eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("kernels", [True, False], ids=["fable-kernels", "fbgemm"])
def test_int8_products_stay_within_a_few_percent_of_float32_in_every_decode_call(kernels, monkeypatch):
    if not kernels:
        monkeypatch.setattr("models_src.fast_decode.library", lambda: None)
    model = small_model(96)
    prompts = [[5, 9, 12, 40, 7], [3, 3, 60, 2, 8, 11, 90, 14]]
    with torch.inference_mode():
        want_prefill, state = model.prefill(prompts)
        want_step, _ = model.step(torch.tensor([[20], [21]]), state)
        model.decode_precision = "int8"
        got_prefill, state = model.prefill(prompts)
        got_step, _ = model.step(torch.tensor([[20], [21]]), state)
    assert 0 < relative_error(got_prefill, want_prefill) < 0.03
    assert 0 < relative_error(got_step, want_step) < 0.03
    assert torch.equal(got_step.argmax(-1), want_step.argmax(-1))


def test_int8_decodes_a_model_kept_in_bfloat16():
    model = small_model(96)
    with torch.inference_mode():
        want, _ = model.step(torch.tensor([[5, 9, 12, 40]]), model.init_state(1))
        model.to(torch.bfloat16).decode_precision = "int8"
        got, _ = model.step(torch.tensor([[5, 9, 12, 40]]), model.init_state(1))
    assert got.dtype == torch.bfloat16
    assert relative_error(got.float(), want) < 0.05


def test_int8_products_follow_weight_changes_and_the_precision():
    model = small_model(96)
    ids = torch.tensor([[5, 9, 12, 40]])

    def last_logits():
        with torch.inference_mode():
            return model.step(ids, model.init_state(1))[0][:, -1]

    float_logits = last_logits()
    model.decode_precision = "int8"
    before = last_logits()
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(1.5)  # in place: same storage, new version
    changed = last_logits()
    model.decode_precision = "float32"
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.div_(1.5)
    assert not torch.equal(before, changed)
    torch.testing.assert_close(last_logits(), float_logits, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_says_its_decode_precision_and_a_load_may_override_it(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer.vocab_size), tokenizer)
    assert load_checkpoint(path).model.decode_precision == "float32"
    assert load_checkpoint(path, decode_precision="int8").model.decode_precision == "int8"
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "decode_precision": "int8"}))
    assert load_checkpoint(path).model.decode_precision == "int8"
    assert load_checkpoint(path, decode_precision="float32").model.decode_precision == "float32"
    (path / "config.json").write_text(json.dumps({**config, "decode_precision": "int4"}))
    with pytest.raises(CheckpointError, match="decode_precision must be one of float32, int8"):
        load_checkpoint(path)


def test_int8_is_refused_for_a_recurrent_model(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer.vocab_size, "lstm"), tokenizer)
    with pytest.raises(CheckpointError, match="for GPT models; this one is a lstm"):
        load_checkpoint(path, decode_precision="int8")


def test_the_fable_export_copies_the_checkpoint_decoded_in_int8(tmp_path, tokenizer, capsys):
    source = save_checkpoint(tmp_path / "m", small_model(tokenizer.vocab_size), tokenizer)
    (source / "README.md").write_text("# a card\n")
    out = tmp_path / "checkpoints" / "m-int8"
    assert export_main(["--checkpoint", str(source), "--format", "fable", "--dtype", "int8",
                        "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["decode_precision"] == "int8"
    assert (out / "README.md").read_text() == "# a card\n"
    assert "decode_precision" not in json.loads((source / "config.json").read_text())
    assert load_checkpoint(out).model.decode_precision == "int8"
    assert [p.name for p in out.parent.iterdir()] == ["m-int8"]  # nothing staged is left
    # an existing name, a precision GGUF's, a model int8 cannot serve: each a clear error
    assert export_main(["--checkpoint", str(source), "--format", "fable", "--dtype", "int8",
                        "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(source), "--format", "fable", "--dtype", "q8_0",
                        "--out", str(tmp_path / "q")]) == 2
    assert "--dtype f32 or int8" in capsys.readouterr().err
    lstm = save_checkpoint(tmp_path / "lstm", small_model(tokenizer.vocab_size, "lstm"), tokenizer)
    assert export_main(["--checkpoint", str(lstm), "--format", "fable", "--dtype", "int8",
                        "--out", str(tmp_path / "lstm-int8")]) == 2
    assert "for GPT models" in capsys.readouterr().err
    assert not (tmp_path / "lstm-int8").exists()


def test_scoring_an_int8_model_goes_through_the_int8_products(tokenizer):
    """What evaluate reports for an int8 checkpoint is what the server computes: close to
    the float32 score, and not the module path's float32 numbers under another name."""
    model = small_model(tokenizer.vocab_size)
    tokens = torch.tensor(tokenizer.encode(TEXT)).numpy()
    float_loss = score(model, tokens, 32).loss
    model.decode_precision = "int8"
    int8_loss = score(model, tokens, 32).loss
    assert int8_loss != float_loss
    assert abs(int8_loss - float_loss) < 0.01 * float_loss
