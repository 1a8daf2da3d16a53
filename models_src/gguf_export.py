"""Export a GPT checkpoint to GGUF, the one-file format of llama.cpp (and of Ollama).

Fable's GPT has GPT-2's layout, so the file uses llama.cpp's "gpt2" architecture: the
metadata keys and tensor names that llama.cpp's gpt2 loader reads (src/models/gpt2.cpp)
and that its converter writes for GPT-2 (convert_hf_to_gguf.py, class GPT2Model). The
tokenizer goes in as llama.cpp's byte-level BPE ("gpt2" model, "gpt-2" pre-tokenizer);
only tokenizers that llama.cpp splits and merges exactly as Fable does are exported.

    llama-cli -m model.gguf -p "Once upon a time" -n 64

Written with ``gguf`` (ggml's own writer, gguf-py); ``gguf.GGUFReader`` reads it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch
import yaml

from .checkpoint import CARD_FILE, load_checkpoint, split_card, unwrap
from .tokenization import Tokenizer

ARCH = "gpt2"
DTYPES = {"f32": np.float32, "f16": np.float16, "q8_0": np.float32}
# q8_0: blocks of 32 weights as int8 with one f16 scale (8.5 bits a weight), what llama.cpp
# and Ollama users run; the matrices whose rows split into such blocks are quantized, the
# others (and the learned positions, as llama.cpp's converter keeps them) stay f16
QUANTIZED = {"q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_KEPT_UNQUANTIZED = {"position_embd.weight"}
# llama.cpp's gpt2 graph runs ggml_gelu, GELU's tanh approximation; Fable's "gelu" is exact.
# On the bundled TinyStories GPT that moves logits by < 0.004 and no greedy token
# (tests/interop/test_gguf.py compares the texts through llama.cpp), so both GELUs are exported.

# Why the other architectures Fable trains cannot be GGUF files: llama.cpp runs a file
# only through a compute graph written in C++ for the file's architecture.
_RECURRENT = ("llama.cpp has no LSTM, GRU or RNN architecture: it runs a GGUF file only "
              "through a compute graph written for the file's architecture, and it has none "
              "for recurrent cells")
_NO_GGUF = {
    "lstm": _RECURRENT, "gru": _RECURRENT, "rnn": _RECURRENT,
    "seq2seq": "llama.cpp has no graph for Fable's encoder-decoder (its only encoder-decoder, "
               "T5, uses relative position buckets and RMSNorm, not learned positions and "
               "LayerNorm)",
}

# Why the vocabularies that are not byte-level BPE cannot go: llama.cpp tokenizes with
# its own code, so the file holds the vocabulary and the rules, not Fable's tokenizer.
_NO_TOKENIZER = {
    "char": "a 'char' vocabulary is one token per Unicode character seen in training, "
            "others mapping to <unk>; llama.cpp's tokenizers work on bytes or subwords "
            "(SentencePiece, byte-level BPE, WordPiece) and none reproduces it",
    "word": "the 'word' kind lower-cases, rewrites punctuation with torchtext's "
            "basic_english rules and splits on whitespace into whole words; no llama.cpp "
            "tokenizer does that (its WordPiece splits punctuation differently and adds "
            "'##' pieces)",
}

# Fable's parameter names -> llama.cpp's (gguf-py constants.py, MODEL_TENSOR names).
_GLOBAL_NAMES = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
    "lm_head.weight": "output.weight",
}
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",  # fused q, k, v rows, in that order: llama.cpp's split too
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def export_checkpoint(directory, path, dtype: str = "f32") -> Path:
    """Export a checkpoint directory, its model card included (as general.description)."""
    checkpoint = load_checkpoint(directory)
    card = Path(directory) / CARD_FILE
    return export_to_gguf(checkpoint.model, checkpoint.tokenizer, path,
                          card=card if card.is_file() else None, dtype=dtype)


def export_to_gguf(model, tokenizer: Tokenizer, path, *, card: str | Path | None = None,
                   dtype: str = "f32") -> Path:
    """Write ``model`` and ``tokenizer`` as one GGUF file at ``path`` and return it.

    ``card`` is the model card's text (a ``Path`` is read), stored as general.description;
    general.name is the card's model-index name, else the file's stem. ``dtype`` "f16"
    halves the matrices, "q8_0" quantizes them to 8.5 bits a weight (vectors stay f32, as
    llama.cpp's converter keeps them).
    Raises ValueError, naming the reason, for what llama.cpp cannot run faithfully."""
    model = unwrap(model)
    check_exportable(model, tokenizer)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card_text = Path(card).read_text(encoding="utf-8") if isinstance(card, Path) else card
    tmp = path.with_name(f".{path.name}.tmp")  # a crash leaves no half-written model.gguf
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _write_metadata(writer, model, dtype, _model_name(card_text, path), card_text)
        _write_tokenizer(writer, tokenizer, model.config.vocab_size)
        for name, array in gguf_tensors(model, dtype).items():
            _add_tensor(writer, name, array, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_exportable(model, tokenizer: Tokenizer) -> None:
    """Raise ValueError saying why llama.cpp could not run this model as Fable does."""
    c = model.config
    if c.arch != "gpt":
        reason = _NO_GGUF.get(c.arch, "llama.cpp has no graph for it")
        raise ValueError(f"only GPT models export to GGUF, not {c.arch!r}: {reason}")
    if not c.bias:
        raise ValueError("llama.cpp's gpt2 graph requires every bias (attention, MLP and "
                         "LayerNorm biases); this model was built with bias=False")
    check_tokenizer(tokenizer)
    if tokenizer.vocab_size > c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{c.vocab_size}")


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """Accept only byte-level BPE with GPT-2's split, whatever its kind ("bpe", "gpt2",
    or an "hf" tokenizer built that way): llama.cpp's "gpt2" + "gpt-2" tokenizer."""
    if tokenizer.kind in _NO_TOKENIZER:
        reason = _NO_TOKENIZER[tokenizer.kind]
        raise ValueError(f"llama.cpp cannot reproduce this tokenizer: {reason}")
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    problems = []
    extras = ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix",
              "ignore_merges")
    if model.get("type") != "BPE" or any(model.get(key) for key in extras):
        problems.append("its model is not plain BPE")
    if spec.get("normalizer") is not None:
        problems.append("it normalizes text first")
    if not tokenizer.splits_like_gpt2():
        problems.append("its pre-tokenizer is not GPT-2's byte-level split")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append("its decoder is not byte-level")
    if problems:
        raise ValueError(f"llama.cpp cannot reproduce this {tokenizer.kind!r} tokenizer: "
                         + "; ".join(problems) + " (GGUF export needs byte-level BPE with "
                         "GPT-2's pre-tokenizer)")


def gguf_tensors(model, dtype: str = "f32") -> dict[str, np.ndarray]:
    """The weights under llama.cpp's names, as numpy arrays. nn.Linear keeps (out, in),
    which is what llama.cpp wants (HF's GPT-2 Conv1D is the one the converter transposes);
    the tied head is left out: llama.cpp reuses token_embd when there is no output.weight."""
    tied = model.lm_head.weight is model.wte.weight
    arrays = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        # vectors (norms, biases) stay f32, as in llama.cpp's converter
        arrays[gguf_name(name)] = array if array.ndim == 1 else array.astype(DTYPES[dtype])
    return arrays


def _add_tensor(writer, name: str, array: np.ndarray, dtype: str) -> None:
    """A tensor as ``dtype`` asks: quantized matrices where a row splits into whole blocks."""
    qtype = QUANTIZED.get(dtype)
    if qtype is None or array.ndim == 1:
        writer.add_tensor(name, array)
        return
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if name in _KEPT_UNQUANTIZED or array.shape[-1] % block:
        writer.add_tensor(name, array.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def gguf_name(name: str) -> str:
    """llama.cpp's name for a GPT parameter, e.g. blocks.3.mlp.c_fc.bias -> blk.3.ffn_up.bias."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    module = ".".join(parts[2:-1])
    if parts[0] != "blocks" or module not in _BLOCK_NAMES:
        raise ValueError(f"no GGUF name for the parameter {name!r}")
    return f"blk.{parts[1]}.{_BLOCK_NAMES[module]}.{parts[-1]}"


def _write_metadata(writer, model, dtype: str, name: str, card: str | None) -> None:
    c, block = model.config, model.blocks[0]
    writer.add_name(name)
    if card:
        writer.add_description(card)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_context_length(c.block_size)  # learned positions: no longer context exists
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(block.mlp.c_fc.weight.shape[0])
    writer.add_head_count(c.n_head)
    writer.add_layer_norm_eps(block.ln_1.eps)


def _write_tokenizer(writer, tokenizer: Tokenizer, n_vocab: int) -> None:
    """As llama.cpp's converter writes a GPT-2 BPE vocabulary; ids past the tokenizer's
    (a model vocabulary padded for speed) become unused "[PAD<id>]" tokens."""
    spec = json.loads(tokenizer.backend.to_str())
    special = {t["id"] for t in spec.get("added_tokens", []) if t["special"]}
    added = {t["id"] for t in spec.get("added_tokens", [])}
    by_id = {i: token for token, i in tokenizer.backend.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [_token_type(i, by_id, special, added) for i in range(n_vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's regex split, as the ByteLevel pre-tokenizer's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = spec["model"]["merges"]  # "a b" strings, or [a, b] pairs in newer files
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if tokenizer.unk_id is not None:
        writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_add_bos_token(True)  # Fable prompts with [bos] + encode(prompt)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _token_type(i: int, by_id: dict, special: set[int], added: set[int]) -> int:
    if i not in by_id:
        return gguf.TokenType.UNUSED
    if i in special:  # llama.cpp never matches a control token in typed text, nor does Fable
        return gguf.TokenType.CONTROL
    return gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL


def _model_name(card: str | None, path: Path) -> str:
    """The card's ``model-index`` name (as the Hugging Face hub shows it), else the stem."""
    try:
        front, _ = split_card(card or "")
        return str(yaml.safe_load(front or "")["model-index"][0]["name"])
    except (yaml.YAMLError, ValueError, IndexError, KeyError, TypeError):
        return path.stem
