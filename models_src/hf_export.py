"""Export a GPT checkpoint to the Hugging Face GPT-2 format.

The GPT's layout already is GPT-2's; the renaming both ways lives in ``hf_import``.
``transformers.pipeline("text-generation", model=out_dir)`` then writes what Fable
writes: the exported tokenizer puts ``<bos>`` before the prompt as Fable's callers do
(Fable's own ``encode`` never adds it, and still does not), and ``generation_config.json``
carries the special ids and the model's own sampling settings (its checkpoint's file).
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
from tokenizers import processors

from .checkpoint import CARD_FILE, load_checkpoint
from .gpt import GPT
from .hf_import import ACTIVATIONS, CONFIG_FIELDS, LAYER_NORM_EPS, to_gpt2
from .sampling_defaults import NEUTRAL, SamplingDefaults
from .tokenization import CONFIG_FILE, TOKENIZER_FILE, Tokenizer

def export_to_hf(model: GPT, tokenizer: Tokenizer, out_dir, card: str | Path | None = None,
                 defaults: SamplingDefaults = NEUTRAL) -> Path:
    """Write ``config.json``, ``model.safetensors`` (float32), ``generation_config.json``
    (the special ids and ``defaults``, the model's sampling settings) and the tokenizer in
    HF's layout, and the model card (a checkpoint's ``README.md``) when given."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy: only when exporting

    c = model.config
    if c.arch != "gpt":
        raise ValueError(f"only GPT models export to GPT-2's format, not {c.arch!r}")
    if not c.bias:
        raise ValueError("GPT-2's format has biases everywhere; this model was built with bias=False")
    hf_config = GPT2Config(
        **{hf: getattr(c, ours) for ours, hf in CONFIG_FIELDS.items()},
        n_ctx=c.block_size,  # GPT-2's old name for n_positions, which llama.cpp's converter reads
        activation_function=next(hf for hf, ours in ACTIVATIONS.items() if ours == c.activation),
        layer_norm_epsilon=LAYER_NORM_EPS, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    hf_model = GPT2LMHeadModel(hf_config)
    missing, unexpected = hf_model.load_state_dict(to_gpt2(model.state_dict()), strict=False)
    # GPT-2 keeps no buffers we lack; the tied head is the only name it may fill itself.
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.generation_config = generation_config(tokenizer, defaults)
    out = Path(out_dir)
    hf_model.save_pretrained(out)
    save_tokenizer(tokenizer, out, context=c.block_size)
    if card is not None:
        (out / "README.md").write_text(Path(card).read_text())
    return out


def export_checkpoint(directory, out_dir) -> Path:
    """Export a checkpoint directory, its model card included. The weights are read as
    float32 (the bundled ones are stored in float16), the precision both sides compute in."""
    checkpoint = load_checkpoint(directory, dtype=torch.float32)
    card = Path(directory) / CARD_FILE
    return export_to_hf(checkpoint.model, checkpoint.tokenizer, out_dir,
                        card=card if card.is_file() else None, defaults=checkpoint.defaults)


def generation_config(tokenizer: Tokenizer, defaults: SamplingDefaults):
    """Special ids and the model's sampling settings, as transformers reads them."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                            pad_token_id=tokenizer.pad_id, **defaults.to_hf())


def save_tokenizer(tokenizer: Tokenizer, out: Path, context: int) -> None:
    """The tokenizer's files, made to add ``<bos>`` where Fable's callers put it: a
    TemplateProcessing post-processor in tokenizer.json (for any reader of that file) and
    ``add_bos_token`` (which transformers honours by building that same template).
    Fable's ``encode`` asks for no special tokens, so loading the export changes nothing.
    ``context``: the model's, which transformers' pipelines truncate a prompt to."""
    tokenizer.save(out)
    backend = tokenizers.Tokenizer.from_file(str(out / TOKENIZER_FILE))
    bos = tokenizer.special_tokens["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
        special_tokens=[(bos, tokenizer.bos_id)])
    backend.save(str(out / TOKENIZER_FILE))
    config_path = out / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # decode as Fable does: no clean-up of spaces before punctuation
    config.update(add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                  # without these transformers 4.x hands GPT-2 token_type_ids, which it
                  # embeds (garbage text), and takes the context for 10^30 tokens
                  model_input_names=["input_ids", "attention_mask"], model_max_length=context)
    if tokenizer.splits_like_gpt2():
        config["fable_pre_tokenizer"] = "gpt2"
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    config_path.write_text(text, encoding="utf-8")
