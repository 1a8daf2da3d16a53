"""Export a Fable GPT to Hugging Face transformers, load it back with the Auto classes,
and check that it writes the same greedy text as Fable's own generation.

Shows `models_src.hf_export.export_checkpoint`: the export is a plain GPT-2 directory
(config.json, model.safetensors, tokenizer.json, generation_config.json, the model card) that `AutoModelForCausalLM` and
`AutoTokenizer` load from the local path; nothing is downloaded.

    python examples/export_to_transformers.py
    python examples/export_to_transformers.py --checkpoint checkpoints/char-gpt-shakespeare \\
        --prompt "ROMEO:" --out /tmp/hf-export
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the library is imported from the checkout, not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: the hub is never asked

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from models_src.checkpoint import load_checkpoint  # noqa: E402
from models_src.generation import generate  # noqa: E402
from models_src.hf_export import export_checkpoint  # noqa: E402
from models_src.sampling import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinystories-gpt"))
    parser.add_argument("--prompt", default="Once upon a time, there was a little dog named Max.")
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--out", help="export directory (default: a temporary directory)")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one-token steps on a small model: one thread is fastest
    hf_logging.disable_progress_bar()  # no bars for writing and loading a 20 MB file
    # float32 (load_checkpoint's default, spelled out): the bundled weights are stored in
    # float16, and both sides must compute in one precision for their greedy picks to agree.
    checkpoint = load_checkpoint(args.checkpoint, dtype=torch.float32)
    out = export_checkpoint(args.checkpoint, args.out or tempfile.mkdtemp(prefix="fable-hf-"))
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {checkpoint.name} to {out}: {files}")

    # Fable: greedy decoding (temperature 0) of [bos] + the prompt's tokens.
    ours = generate(checkpoint.model, checkpoint.tokenizer, args.prompt,
                    SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0))[0]

    # transformers, from the export alone: its tokenizer puts <bos> first, as Fable does.
    hf_model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = hf_tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.max_tokens,
                                      pad_token_id=hf_tokenizer.pad_token_id)
    theirs_ids = generated[0, ids.size(1):].tolist()
    if theirs_ids and theirs_ids[-1] == hf_tokenizer.eos_token_id:
        theirs_ids.pop()  # Fable's token_ids leave out the <eos> that ended the text
    theirs = hf_tokenizer.decode(theirs_ids, skip_special_tokens=True)

    print(f"prompt:       {args.prompt!r}")
    print(f"Fable:        {ours.text!r}")
    print(f"transformers: {theirs!r}")
    same = ours.token_ids == theirs_ids and ours.text == theirs
    print(f"identical: {'yes' if same else 'NO'} ({len(theirs_ids)} tokens)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
