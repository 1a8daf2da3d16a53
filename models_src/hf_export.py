"""Export a GPT checkpoint to the Hugging Face GPT-2 format.

The GPT's layout already is GPT-2's; the only differences are the ``transformer.``
name prefix and GPT-2's Conv1D layers, which store their weights transposed.
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` then loads the
export and gives the same logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .gpt import GPT
from .tokenization import Tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            hf_name = "transformer.h." + name.removeprefix("blocks.")
        elif name == "lm_head.weight":
            hf_name = name
        else:
            hf_name = "transformer." + name
        state[hf_name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
    return state


def export_to_hf(model: GPT, tokenizer: Tokenizer, out_dir, card: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer in HF's layout, and
    the model card (a checkpoint's ``README.md``) when given."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: only when exporting

    c = model.config
    if c.arch != "gpt":
        raise ValueError(f"only GPT models export to GPT-2's format, not {c.arch!r}")
    if not c.bias:
        raise ValueError("GPT-2's format has biases everywhere; this model was built with bias=False")
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        tie_word_embeddings=c.tie_weights)
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(gpt2_state_dict(model), strict=False)
    # GPT-2 keeps no buffers we lack; the tied head is the only name it may fill itself.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    out = Path(out_dir)
    hf_model.save_pretrained(out)
    tokenizer.save(out)
    if card is not None:
        (out / "README.md").write_text(Path(card).read_text())
    return out
