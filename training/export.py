"""Export a checkpoint for other tools: Hugging Face transformers (GPT-2 format, model
card included) or GGUF (llama.cpp, Ollama); or a copy that Fable itself decodes in int8.

    python -m training.export --checkpoint checkpoints/tinystories-gpt --format hf \
        --out exports/tinystories-gpt
    python -m training.export --checkpoint checkpoints/tinystories-gpt --format gguf \
        --out exports/tinystories-gpt.gguf [--dtype f16]
    python -m training.export --checkpoint checkpoints/tinystories-gpt --format fable \
        --dtype int8 --out checkpoints/tinystories-gpt-int8

``--format fable`` copies the checkpoint, weights and card included, with its
``decode_precision`` set: the server and ``fable evaluate`` then decode it with int8
products (a GPT's; the weights on disk are unchanged, quantized when loaded).

Exit status 2 on bad input (a checkpoint that does not load, a model the format cannot
hold, an output that cannot be written), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models_src.checkpoint import CheckpointError


def export_hf(checkpoint_dir: Path, out: Path, dtype: str) -> Path:
    from models_src.hf_export import export_checkpoint  # imports transformers: only when asked

    if dtype != "f32":
        raise ValueError("the Hugging Face export is float32; --dtype f16 and q8_0 are for gguf")

    return export_checkpoint(checkpoint_dir, out)


def export_gguf(checkpoint_dir: Path, out: Path, dtype: str) -> Path:
    from models_src.gguf_export import export_checkpoint  # imports gguf: only when asked

    return export_checkpoint(checkpoint_dir, out, dtype)


def export_fable(checkpoint_dir: Path, out: Path, dtype: str) -> Path:
    """A copy of the checkpoint decoded at ``dtype`` (decode_precision), written beside
    ``out`` and renamed into place, so that a server watching the folder never loads half."""
    import shutil
    import tempfile

    from models_src.checkpoint import CONFIG_FILE, load_checkpoint, read_config
    from training.model_card import write_json_atomically

    precision = DECODE_PRECISIONS.get(dtype)
    if precision is None:
        raise ValueError(f"--format fable takes --dtype {' or '.join(DECODE_PRECISIONS)}, not {dtype}")
    config = read_config(checkpoint_dir)
    if "imported" in config:
        raise ValueError(f"{checkpoint_dir} is a Hugging Face directory: only a Fable checkpoint "
                         "has a decode_precision")
    load_checkpoint(checkpoint_dir, decode_precision=precision)  # refuses what it cannot serve
    if out.exists():
        raise ValueError(f"{out} exists; choose a new name")
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shutil.copytree(checkpoint_dir, staged, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("last", ".*"))  # not a training's resume state
        write_json_atomically(staged / CONFIG_FILE, {**config, "decode_precision": precision})
        staged.chmod(0o755)  # mkdtemp's folder is private; a checkpoint is not
        staged.rename(out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return out


DECODE_PRECISIONS = {"f32": "float32", "int8": "int8"}  # --dtype for --format fable
EXPORTERS = {"hf": export_hf, "gguf": export_gguf, "fable": export_fable}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint directory")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS),
                        help="hf: a transformers GPT-2 directory; gguf: one .gguf file; "
                        "fable: a checkpoint decoded at --dtype")
    parser.add_argument("--out", required=True, type=Path,
                        help="the directory (hf, fable) or file (gguf) to write")
    parser.add_argument("--dtype", choices=("f32", "f16", "q8_0", "int8"), default="f32",
                        help="gguf: the matrices' precision (f16 halves the file, q8_0 quarters "
                        "it); fable: f32 or int8 products when decoding")
    args = parser.parse_args(argv)  # bad usage exits with status 2
    try:
        path = EXPORTERS[args.format](args.checkpoint, args.out, args.dtype)
    except (CheckpointError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
