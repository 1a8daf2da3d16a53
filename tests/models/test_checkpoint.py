"""Checkpoints: exact round-trips, atomic writes, clear refusals, Hugging Face export."""

import json
import pickle

import pytest
import torch

from models_src import ARCHITECTURES, ModelConfig, build_model
from models_src.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models_src.records import TrainingSummary
from models_src.tokenization import Tokenizer
from training.model_card import write_json_atomically

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_char([TEXT])


def small_model(tokenizer, arch="gpt", **overrides):
    torch.manual_seed(0)
    cfg = dict(arch=arch, vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=32, n_head=4,
               n_hidden=40, block_size=32, sep_id=tokenizer.sep_id, pad_id=tokenizer.pad_id)
    cfg.update(overrides)
    return build_model(ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_round_trip_preserves_outputs_exactly(tmp_path, tokenizer, arch):
    model = small_model(tokenizer, arch)
    ids = torch.tensor([tokenizer.encode(TEXT[:30])])
    path = save_checkpoint(tmp_path / "m", model, tokenizer, TrainingSummary(val_perplexity=3.5))
    loaded = load_checkpoint(path)
    assert torch.equal(model(ids)[0], loaded.model(ids)[0])
    assert loaded.training == TrainingSummary(val_perplexity=3.5)
    assert loaded.config == model.config
    assert loaded.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    assert not loaded.model.training


def test_fp16_weights_halve_the_file_and_load_as_float32(tmp_path, tokenizer):
    model = small_model(tokenizer)
    full = save_checkpoint(tmp_path / "full", model, tokenizer)
    half = save_checkpoint(tmp_path / "half", model, tokenizer, dtype=torch.float16)
    def size(p):
        return (p / "model.safetensors").stat().st_size
    assert size(half) < 0.6 * size(full)
    loaded = load_checkpoint(half)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"


def test_tied_weights_are_stored_once_and_tied_after_loading(tmp_path, tokenizer):
    from safetensors import safe_open
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_checkpoint(path).model
    assert model.lm_head.weight is model.wte.weight


def test_overwrite_is_atomic_and_leaves_no_temporary_dirs(tmp_path, tokenizer, monkeypatch):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer, {"step": 1})
    # A crash while writing the weights leaves the previous checkpoint untouched.
    import models_src.checkpoint as ckpt

    def boom(*a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, small_model(tokenizer, n_layer=1), tokenizer, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path).training.step == 1
    save_checkpoint(path, small_model(tokenizer), tokenizer, {"step": 3})
    assert load_checkpoint(path).training.step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_checkpoint_is_readable_by_other_users(tmp_path, tokenizer):
    # written through a private temporary folder, it must still load in a server or an
    # image that runs as another user (the Space image runs as uid 1000)
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer, {"step": 1})
    assert path.stat().st_mode & 0o777 == 0o755
    assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == {
        f.name: 0o644 for f in path.iterdir()}
    write_json_atomically(path / "config.json", {"format_version": 1})
    assert (path / "config.json").stat().st_mode & 0o777 == 0o644


def test_missing_files_are_named(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(path)


def test_truncated_weights_are_rejected(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_bad_config_json_is_rejected(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    cfg = path / "config.json"
    original = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(path)
    cfg.write_text(json.dumps({**original, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version"):
        load_checkpoint(path)
    cfg.write_text(json.dumps({**original, "model": {**original["model"], "arch": "mamba"}}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_checkpoint(path)


def test_shape_mismatch_names_the_tensor(tmp_path, tokenizer):
    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    cfg = path / "config.json"
    data = json.loads(cfg.read_text())
    data["model"]["n_embd"] = 64
    cfg.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"wte.weight: shape \(\d+, 32\) in the file, \(\d+, 64\) expected"):
        load_checkpoint(path)
    data["model"]["n_embd"], data["model"]["n_layer"] = 32, 3
    cfg.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing tensor blocks.2"):
        load_checkpoint(path)


@pytest.mark.parametrize("overrides", [
    *({"arch": arch} for arch in ARCHITECTURES),
    {"tie_weights": False, "bias": False}, {"activation": "gelu_tanh"},
    {"arch": "seq2seq", "n_decoder_layer": 3}, {"arch": "lstm", "tie_weights": False}])
def test_the_shapes_checked_before_building_are_those_of_the_built_model(tokenizer, overrides):
    """load_checkpoint compares config.json with the weights on a meta-device model built
    without its initialisers (no memory, no time): it must have the real model's tensors."""
    from models_src.checkpoint import _expected_state, _unique_state

    model = small_model(tokenizer, **overrides)
    expected = _expected_state(model.config)
    assert {k: v.shape for k, v in expected.items()} == \
        {k: v.shape for k, v in _unique_state(model).items()}
    assert all(v.device.type == "meta" for v in expected.values())


@pytest.mark.subprocess
def test_loading_never_imports_torch_dynamo(tmp_path, tokenizer):
    """A random initialiser on the meta device imports torch._dynamo (a second of every
    worker's start-up): the shape check must not run one."""
    import subprocess
    import sys
    from pathlib import Path

    path = save_checkpoint(tmp_path / "m", small_model(tokenizer), tokenizer)
    code = ("import sys; from models_src.checkpoint import load_checkpoint; "
            f"load_checkpoint({str(path)!r}); print('torch._dynamo' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_legacy_pickles_are_never_unpickled(tmp_path, tokenizer):
    model = small_model(tokenizer)
    path = save_checkpoint(tmp_path / "m", model, tokenizer)
    (path / "model.safetensors").unlink()
    # A plain state dict (as torch.save writes it) is read with weights_only=True ...
    state = {("_orig_mod." + k): v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"model": state, "iter_num": 5}, path / "model.pt")
    ids = torch.tensor([tokenizer.encode("To be")])
    assert torch.equal(load_checkpoint(path).model(ids)[0], model(ids)[0])
    # ... and a pickle holding arbitrary objects is refused, its code never run.
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('pwned').touch()",))
    (path / "model.pt").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(CheckpointError, match="refused") as refused:
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    # the refusal says what was found, not PyTorch's advice to load it trusting the file
    assert "exec" in str(refused.value) and "weights_only" not in str(refused.value)
    assert "likely succeed" not in str(refused.value)


@pytest.mark.interop  # transformers loads the export
def test_export_to_hugging_face_gives_the_same_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models_src.hf_export import export_to_hf
    model = small_model(tokenizer, block_size=64)
    with torch.no_grad():  # make the biases and layer norms non-trivial
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# a card\n")
    out = export_to_hf(model, tokenizer, tmp_path / "hf", card=card)
    assert (out / "README.md").read_text() == card.read_text()  # the export carries the card
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode(TEXT[:60])])
    with torch.no_grad():
        ours = model(ids)[0]
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    hf_tok = AutoTokenizer.from_pretrained(out)
    # transformers' tokenizer puts <bos> first, as Fable's callers do (its encode does not)
    assert hf_tok(TEXT)["input_ids"] == [tokenizer.bos_id, *tokenizer.encode(TEXT)]
    # no token_type_ids (transformers 4.x passed them to GPT-2, which embeds them: garbage
    # text), and the model's own context as the longest input
    assert set(hf_tok(TEXT)) == {"input_ids", "attention_mask"}
    assert hf_tok.model_max_length == 64
