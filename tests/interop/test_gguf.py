"""GGUF export: what llama.cpp's gpt2 loader reads, the refusals, and (with llama-cpp-python
installed) llama.cpp's greedy text against Fable's for the bundled TinyStories GPT."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import decoders, pre_tokenizers

from tests.app_support import TEXT
from models_src import ModelConfig, build_model
from models_src.checkpoint import load_checkpoint
from models_src.generation import generate
from models_src.gguf_export import export_to_gguf
from models_src.sampling import SamplingParams
from models_src.tokenization import SPECIAL_TOKENS, Tokenizer

pytestmark = pytest.mark.interop

CARD = "---\nmodel-index:\n- name: tiny-story\n---\n# tiny-story\nA test card.\n"
BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "tinystories-gpt"
PAD = 3  # extra model rows past the tokenizer's ids, as a vocabulary padded for speed


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT] * 4, vocab_size=300)


def tiny_gpt(tokenizer, **overrides):
    torch.manual_seed(0)
    config = dict(arch="gpt", vocab_size=tokenizer.vocab_size + PAD, n_layer=2, n_embd=32,
                  n_head=4, n_hidden=32, block_size=48, sep_id=tokenizer.sep_id,
                  pad_id=tokenizer.pad_id)
    return build_model(ModelConfig(**{**config, **overrides})).eval()


def fields(path) -> dict:
    return {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}


def tensors(path) -> dict:
    """name -> (numpy shape, i.e. ggml's ne reversed; ggml type name; data)"""
    return {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name, np.array(t.data))
            for t in gguf.GGUFReader(path).tensors}


def test_metadata_is_llama_cpps_gpt2(tmp_path, tokenizer):
    path = export_to_gguf(tiny_gpt(tokenizer), tokenizer, tmp_path / "m.gguf", card=CARD)
    meta = fields(path)
    assert meta["general.architecture"] == "gpt2"
    assert meta["general.name"] == "tiny-story"
    assert meta["general.description"] == CARD
    assert meta["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert {k: meta[f"gpt2.{k}"] for k in ("context_length", "embedding_length", "block_count",
                                           "feed_forward_length", "attention.head_count")} == {
        "context_length": 48, "embedding_length": 32, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 4}
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)


def test_card_file_is_read_and_name_falls_back_to_the_file_stem(tmp_path, tokenizer):
    (tmp_path / "README.md").write_text("# A card without front matter\n")
    model = tiny_gpt(tokenizer)
    carded = fields(export_to_gguf(model, tokenizer, tmp_path / "story.gguf",
                                   card=tmp_path / "README.md"))
    assert (carded["general.name"], carded["general.description"]) == (
        "story", "# A card without front matter\n")
    bare = fields(export_to_gguf(model, tokenizer, tmp_path / "bare.gguf"))
    assert "general.description" not in bare


def test_every_tensor_has_llama_cpps_name_shape_and_values(tmp_path, tokenizer):
    model = tiny_gpt(tokenizer)
    found = tensors(export_to_gguf(model, tokenizer, tmp_path / "m.gguf"))
    state = model.state_dict()
    expected = {"token_embd.weight": state["wte.weight"],
                "position_embd.weight": state["wpe.weight"],
                "output_norm.weight": state["ln_f.weight"],
                "output_norm.bias": state["ln_f.bias"]}
    for i in range(2):
        for fable, ours in [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"),
                            ("attn.c_proj", "attn_output"), ("ln_2", "ffn_norm"),
                            ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]:
            for kind in ("weight", "bias"):
                expected[f"blk.{i}.{ours}.{kind}"] = state[f"blocks.{i}.{fable}.{kind}"]
    # the tied head is left out: llama.cpp then reuses token_embd
    assert set(found) == set(expected)
    for name, tensor in expected.items():
        shape, kind, data = found[name]
        assert (shape, kind) == (tuple(tensor.shape), "F32"), name
        assert np.array_equal(data.reshape(shape), tensor.numpy()), name
    # nn.Linear's (out, in) is llama.cpp's {in, out} (ggml lists the fastest dimension first)
    assert found["blk.0.attn_qkv.weight"][0] == (3 * 32, 32)


def test_untied_head_is_written_as_output(tmp_path, tokenizer):
    model = tiny_gpt(tokenizer, tie_weights=False)
    shape, _, data = tensors(export_to_gguf(model, tokenizer, tmp_path / "m.gguf"))["output.weight"]
    assert np.array_equal(data.reshape(shape), model.lm_head.weight.detach().numpy())


def test_f16_halves_the_matrices_and_keeps_vectors_f32(tmp_path, tokenizer):
    model = tiny_gpt(tokenizer)
    full = export_to_gguf(model, tokenizer, tmp_path / "full.gguf")
    half = export_to_gguf(model, tokenizer, tmp_path / "half.gguf", dtype="f16")
    assert half.stat().st_size < 0.6 * full.stat().st_size
    assert fields(half)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    for name, (shape, kind, _) in tensors(half).items():
        assert kind == ("F16" if len(shape) == 2 else "F32"), name


def dequantized(path, model):
    """A copy of ``model`` with the weights a GGUF file holds, each read back as floats."""
    import copy

    from models_src.gguf_export import gguf_name

    names = {gguf_name(n): n for n in model.state_dict() if n != "lm_head.weight"}
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape)
        state[names[t.name]] = torch.from_numpy(values.astype(np.float32))
    twin = copy.deepcopy(model)
    twin.load_state_dict(state, strict=False)  # the tied head is the embedding
    return twin.eval()


def test_q8_0_quantizes_the_matrices_and_keeps_the_rest(tmp_path, tokenizer):
    model = tiny_gpt(tokenizer, n_embd=64, n_hidden=64)  # rows of whole 32-weight blocks
    full = export_to_gguf(model, tokenizer, tmp_path / "full.gguf")
    q8 = export_to_gguf(model, tokenizer, tmp_path / "q8.gguf", dtype="q8_0")
    assert q8.stat().st_size < 0.4 * full.stat().st_size
    assert fields(q8)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    for name, (shape, kind, _) in tensors(q8).items():
        expected = "F32" if len(shape) == 1 else "F16" if name == "position_embd.weight" else "Q8_0"
        assert kind == expected, name
    # each weight within half a quantization step of its block (the block's largest / 127),
    # plus what the step's own rounding to f16 adds (up to 127 steps of 2^-11 of it)
    twin = dequantized(q8, model)
    for name, weight in model.state_dict().items():
        if weight.dim() == 2 and name != "wpe.weight":
            blocks = weight.reshape(-1, 32)
            step = blocks.abs().amax(dim=1, keepdim=True) / 127
            error = (twin.state_dict()[name].reshape(-1, 32) - blocks).abs()
            assert (error <= step * (0.5 + 127 * 2 ** -11) + 1e-7).all(), name
    odd = export_to_gguf(tiny_gpt(tokenizer), tokenizer, tmp_path / "odd.gguf", dtype="q8_0")
    assert tensors(odd)["blk.0.ffn_up.weight"][1] == "Q8_0"  # 32 wide: one block a row
    assert tensors(odd)["token_embd.weight"][1] == "Q8_0"


@pytest.mark.skipif(not BUNDLED.is_dir(), reason="bundled checkpoint absent")
def test_the_bundled_model_in_q8_0_writes_its_greedy_text(tmp_path):
    """What q8_0 costs the bundled story model: the same greedy text from its dequantized
    weights for the three prompts, and its logits within a few hundredths."""
    checkpoint = load_checkpoint(BUNDLED)
    path = export_to_gguf(checkpoint.model, checkpoint.tokenizer, tmp_path / "q8.gguf", dtype="q8_0")
    twin = dequantized(path, checkpoint.model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
        for prompt in PROMPTS:
            ours = generate(checkpoint.model, checkpoint.tokenizer, prompt, greedy)[0]
            theirs = generate(twin, checkpoint.tokenizer, prompt, greedy)[0]
            assert theirs.text == ours.text, prompt
            ids = torch.tensor([[checkpoint.tokenizer.bos_id, *checkpoint.tokenizer.encode(prompt)]])
            with torch.no_grad():
                gap = (twin(ids)[0] - checkpoint.model(ids)[0]).abs().max().item()
            assert gap < 0.1, prompt
    finally:
        torch.set_num_threads(threads)


def test_tokenizer_is_byte_level_bpe_with_fables_specials(tmp_path, tokenizer):
    meta = fields(export_to_gguf(tiny_gpt(tokenizer), tokenizer, tmp_path / "m.gguf"))
    n = tokenizer.vocab_size
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.id_to_token(i) for i in range(n)] + [
        f"[PAD{i}]" for i in range(n, n + PAD)]
    types = meta["tokenizer.ggml.token_type"]
    assert types[:6] == [gguf.TokenType.CONTROL] * 6  # <pad> <unk> <bos> <eos> <blank> <sep>
    assert set(types[6:n]) == {gguf.TokenType.NORMAL}
    assert types[n:] == [gguf.TokenType.UNUSED] * PAD
    trained = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in trained]  # in rank order
    ids = {role: meta[f"tokenizer.ggml.{key}_token_id"] for role, key in
           [("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")]}
    assert ids == {role: list(SPECIAL_TOKENS).index(role) for role in ids}
    assert meta["tokenizer.ggml.add_bos_token"] is True  # Fable prompts with [bos] + encode(...)
    assert meta["tokenizer.ggml.add_eos_token"] is False


def test_gpt2_kind_has_endoftext_as_bos_and_eos(tmp_path, tokenizer):
    tokenizer.backend.model.save(str(tmp_path))  # GPT-2's vocab.json + merges.txt layout
    gpt2 = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    meta = fields(export_to_gguf(tiny_gpt(gpt2), gpt2, tmp_path / "m.gguf"))
    endoftext = gpt2.token_to_id("<|endoftext|>")
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == endoftext
    assert meta["tokenizer.ggml.token_type"][endoftext] == gguf.TokenType.CONTROL
    assert "tokenizer.ggml.unknown_token_id" not in meta  # byte-level: nothing is unknown


@pytest.mark.parametrize("arch, reason", [("lstm", "no LSTM"), ("gru", "no LSTM, GRU"),
                                          ("rnn", "recurrent"), ("seq2seq", "encoder-decoder")])
def test_refuses_architectures_llama_cpp_has_no_graph_for(tmp_path, tokenizer, arch, reason):
    with pytest.raises(ValueError, match=reason):
        export_to_gguf(tiny_gpt(tokenizer, arch=arch), tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_refuses_models_without_biases(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="requires every bias"):
        export_to_gguf(tiny_gpt(tokenizer, bias=False), tokenizer, tmp_path / "m.gguf")


@pytest.mark.parametrize("kind, reason", [("char", "one token per Unicode character"),
                                          ("word", "lower-cases")])
def test_refuses_tokenizers_llama_cpp_cannot_reproduce(tmp_path, kind, reason):
    other = getattr(Tokenizer, f"train_{kind}")([TEXT])
    with pytest.raises(ValueError, match=reason):
        export_to_gguf(tiny_gpt(other), other, tmp_path / "m.gguf")


def test_refuses_a_bpe_that_is_not_split_as_gpt2(tmp_path):
    # an "hf" BPE with a whitespace pre-tokenizer: llama.cpp's "gpt-2" split would differ
    backend = Tokenizer.train_bpe([TEXT], vocab_size=280).backend
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.BPEDecoder()
    other = Tokenizer(backend, "hf", SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="pre-tokenizer is not GPT-2's.*decoder is not byte-level"):
        export_to_gguf(tiny_gpt(other), other, tmp_path / "m.gguf")


def test_a_failed_write_leaves_no_file(tmp_path, tokenizer, monkeypatch):
    def disk_full(self, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_to_gguf(tiny_gpt(tokenizer), tokenizer, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_refuses_an_unknown_dtype(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="dtype"):
        export_to_gguf(tiny_gpt(tokenizer), tokenizer, tmp_path / "m.gguf", dtype="q4_k")


# ---- llama.cpp itself (opt-in: pip install llama-cpp-python) -----------------------------

PROMPTS = ["Once upon a time", "The little dog saw a big red ball.",
           "Lily and Tom went to the park. They"]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def bundled():
    return load_checkpoint(BUNDLED)


@pytest.fixture(scope="module")
def fable_texts(bundled):
    """Fable's greedy completions, on one torch thread like llama.cpp's: on a shared
    machine, two threads on two busy cores run a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0)
    try:
        return {p: generate(bundled.model, bundled.tokenizer, p, greedy)[0].text for p in PROMPTS}
    finally:
        torch.set_num_threads(threads)  # leave the process as other test files expect it


@pytest.fixture(scope="module", params=["f32", "q8_0"])
def llama(bundled, tmp_path_factory, request):
    """llama.cpp on the bundled model exported as f32, and as q8_0 (whose dequantized weights
    write Fable's greedy text: test_the_bundled_model_in_q8_0_writes_its_greedy_text)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; "
                                    "`pip install llama-cpp-python` runs the llama.cpp checks")
    path = tmp_path_factory.mktemp("gguf") / f"ts-{request.param}.gguf"
    export_to_gguf(bundled.model, bundled.tokenizer, path, dtype=request.param)
    # an f32 key/value cache, as Fable's: llama.cpp's default f16 one may flip a near-tie
    # (96 tokens of "Sue found a shiny stone" part at a 0.0004 logit margin)
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=bundled.config.block_size, n_threads=1,
                           n_threads_batch=1, type_k=f32, type_v=f32, verbose=False,
                           logits_all=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_cpp_tokenizes_as_fable_prompts(llama, bundled, prompt):
    tok = bundled.tokenizer
    ids = llama.tokenize(prompt.encode(), add_bos=True, special=False)
    assert ids == [tok.bos_id, *tok.encode(prompt)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_cpp_greedy_text_equals_fables(llama, fable_texts, prompt):
    out = llama.create_completion(prompt, max_tokens=NEW_TOKENS, temperature=0, top_k=1,
                                  top_p=1.0, min_p=0.0, repeat_penalty=1.0)
    assert out["choices"][0]["text"] == fable_texts[prompt]
