"""Export a checkpoint for other tools: Hugging Face transformers (GPT-2 format, model
card included) or GGUF (llama.cpp, Ollama).

    python -m training.export --checkpoint checkpoints/tinystories-gpt --format hf \
        --out exports/tinystories-gpt
    python -m training.export --checkpoint checkpoints/tinystories-gpt --format gguf \
        --out exports/tinystories-gpt.gguf [--dtype f16]

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


EXPORTERS = {"hf": export_hf, "gguf": export_gguf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint directory")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS),
                        help="hf: a transformers GPT-2 directory; gguf: one .gguf file")
    parser.add_argument("--out", required=True, type=Path,
                        help="the directory (hf) or file (gguf) to write")
    parser.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default="f32",
                        help="gguf: the matrices' precision (f16 halves the file)")
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
