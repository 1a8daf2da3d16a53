"""Serve a GPT-2-format Hugging Face directory, trained elsewhere, as a Fable GPT.

``load_checkpoint`` sends here a directory whose ``config.json`` has a ``model_type`` and
no Fable ``format_version``: ``checkpoint_config`` turns that config into Fable's (or
refuses, naming what Fable's GPT would compute differently), ``load_tokenizer`` reads
the tokenizer files as they are, and ``from_gpt2`` renames the tensors. The checks of a
Fable checkpoint (every tensor present, every shape right) then apply unchanged.

The two layouts differ only in names, in GPT-2's Conv1D weights (stored transposed) and
in config field names; that mapping is kept here once and ``hf_export`` writes with it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenization import Tokenizer

# (Fable prefix, GPT-2 prefix), tried in order both ways (the catch-all "" last).
_PREFIXES = (("blocks.", "transformer.h."), ("lm_head.", "lm_head."), ("", "transformer."))
# GPT-2's Conv1D layers store their weights (in, out), nn.Linear (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2's causal-mask buffers, which files written by older transformers still hold.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")

#: ModelConfig field -> GPT2Config field (the activation has its own table).
CONFIG_FIELDS = {"vocab_size": "vocab_size", "block_size": "n_positions", "n_embd": "n_embd",
                 "n_layer": "n_layer", "n_head": "n_head", "tie_weights": "tie_word_embeddings",
                 "dropout": "resid_pdrop"}
#: transformers' activation_function -> ModelConfig.activation; an export writes the
#: first name of each.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_python": "gelu",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh"}
#: The epsilon of every Fable layer norm (nn.LayerNorm's default).
LAYER_NORM_EPS = 1e-5
# GPT2Config options whose other values change the maths, and the value Fable computes.
_FIXED = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
          "reorder_and_upcast_attn": False, "add_cross_attention": False,
          "layer_norm_epsilon": LAYER_NORM_EPS}
_ARCHITECTURES = {"GPT2LMHeadModel", "GPT2Model"}  # a bare GPT2Model's head is its tied embedding


def is_foreign(config: dict) -> bool:
    """Whether a parsed config.json was written by transformers rather than by Fable."""
    return "format_version" not in config and "model_type" in config


def _rename(name: str, pairs) -> str:
    source, target = next((s, t) for s, t in pairs if name.startswith(s))
    return target + name.removeprefix(source)


def _conv1d(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t().contiguous() if name.endswith(_CONV1D) else tensor


def to_gpt2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Fable GPT's state dict under GPT2LMHeadModel's names and layout."""
    return {_rename(name, _PREFIXES): _conv1d(name, t) for name, t in state.items()}


def from_gpt2(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel (or GPT2Model) state dict under Fable's names and layout; the
    mask buffers go, and so does a tied head stored twice."""
    back = [(gpt2, fable) for fable, gpt2 in _PREFIXES]
    fable = {}
    for name, tensor in state.items():
        if name.endswith(_MASK_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):  # GPT2Model's files: no prefix
            name = "transformer." + name
        fable[_rename(name, back)] = _conv1d(name, tensor)
    if tied:
        fable.pop("lm_head.weight", None)
    return fable


def checkpoint_config(hf: dict) -> dict:
    """A transformers config.json as Fable's checkpoint config (``"imported": "gpt2"``
    marks it); a ValueError names everything Fable cannot compute the same way."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"model_type {hf.get('model_type')!r} cannot be imported: only "
                         f"GPT-2-format models (model_type 'gpt2') can")
    from transformers import GPT2Config  # slow to import; the tokenizer needs it anyway

    try:  # transformers' own defaults for the fields a file leaves out
        config = GPT2Config.from_dict(hf)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid GPT-2 config ({e})") from None
    problems = [f"architecture {a!r} (only {sorted(_ARCHITECTURES)})"
                for a in config.architectures or [] if a not in _ARCHITECTURES]
    problems += [f"{name} = {getattr(config, name)!r} (Fable computes {value!r})"
                 for name, value in _FIXED.items() if getattr(config, name) != value]
    if config.n_inner not in (None, 4 * config.n_embd):
        problems.append(f"n_inner = {config.n_inner} (Fable's MLP is 4 * n_embd wide)")
    if config.activation_function not in ACTIVATIONS:
        problems.append(f"activation_function {config.activation_function!r} "
                        f"(Fable has {sorted(ACTIVATIONS)})")
    if problems:
        raise ValueError("cannot import this GPT-2 model: " + "; ".join(problems))
    model = {fable: getattr(config, name) for fable, name in CONFIG_FIELDS.items()}
    model.update(arch="gpt", bias=True, activation=ACTIVATIONS[config.activation_function])
    return {"imported": "gpt2", "model": model, "training": {},
            "dtype": str(hf.get("dtype") or hf.get("torch_dtype") or "float32")}


def load_tokenizer(directory) -> Tokenizer:
    """The directory's own tokenizer, its vocabulary as the model was trained with it."""
    directory = Path(directory)
    if not ((directory / "tokenizer.json").is_file()
            or all((directory / f).is_file() for f in ("vocab.json", "merges.txt"))):
        raise ValueError("no tokenizer files: a GPT-2-format directory needs tokenizer.json, "
                         "or vocab.json and merges.txt")
    return Tokenizer.from_pretrained(directory, fixed_vocab=True)
