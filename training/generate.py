"""Generate from a checkpoint: continue a prompt, or infill a story.

    python -m training.generate --checkpoint DIR --prompt "Once upon a time"
    python -m training.generate --checkpoint DIR --first-sentence "Tom had a red ball." \\
        --last-sentence "He was happy again." --max-tokens 200 --temperature 1.0

Every sampling setting left out is the checkpoint's own (its generation_config.json), and
the text runs until it ends by itself or fills the model's context.

Flags also take underscores (``--first_sentence``), as the seeds' ``generate_story`` did.
"""

from __future__ import annotations

import argparse
import sys

import torch

from models_src.checkpoint import CheckpointError, load_checkpoint
from models_src.generation import stream
from models_src.infill import infill_prompt_ids
from models_src.infill_candidates import DEFAULT_CANDIDATES, best_middle
from models_src.sampling import encode_prompt

MAX_TOKENS = 2000  # the longest a text runs when neither the command nor the model says


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.split("\n\n")[0])

    def option(name: str, **kwargs):
        names = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        p.add_argument(*names, **kwargs)

    option("checkpoint", required=True, help="checkpoint directory")
    option("prompt", help="text to continue (default: start from nothing)")
    option("first-sentence", help="infilling: the story's first sentence")
    option("last-sentence", help="infilling: the story's last sentence")
    # Left out, each setting is the checkpoint's own (its generation_config.json).
    option("max-tokens", type=int, help=f"new tokens at most (default: the model's, or to the "
                                        f"end of its context; at most {MAX_TOKENS})")
    option("temperature", type=float, help="0 = greedy")
    option("top-k", type=int)
    option("top-p", type=float)
    option("min-p", type=float)
    option("repetition-penalty", type=float)
    option("stop", action="append", default=[], help="stop string (repeatable)")
    option("candidates", type=int, default=DEFAULT_CANDIDATES,
           help="infilling: candidate middles written at once; the one the last sentence "
                "fits best is kept (as the server does)")
    option("seed", type=int)
    option("device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.first_sentence is None) != (args.last_sentence is None):
        p.error("infilling needs both --first-sentence and --last-sentence")
    if args.first_sentence is not None and args.prompt is not None:
        p.error("give --prompt, or --first-sentence with --last-sentence, not both")
    given = {key: value for key, value in (
        ("max_new_tokens", args.max_tokens), ("temperature", args.temperature),
        ("top_k", args.top_k), ("top_p", args.top_p), ("min_p", args.min_p),
        ("repetition_penalty", args.repetition_penalty), ("seed", args.seed)) if value is not None}
    try:
        ckpt = load_checkpoint(args.checkpoint, device=args.device)
        if args.first_sentence is not None:
            prompt_tokens = len(infill_prompt_ids(ckpt.tokenizer, args.first_sentence, args.last_sentence))
        else:
            prompt_tokens = len(encode_prompt(ckpt.tokenizer, args.prompt or ""))
        params = ckpt.defaults.params({**given, "stop": args.stop}, prompt_tokens=prompt_tokens,
                                      context=ckpt.model.max_context, cap=MAX_TOKENS)
    except (ValueError, CheckpointError) as e:
        p.error(str(e))
    if args.first_sentence is not None:
        if args.candidates < 1:
            p.error("--candidates must be at least 1")
        first, last = args.first_sentence.strip(), args.last_sentence.strip()
        choice = best_middle(ckpt.model, ckpt.tokenizer, first, last, params, args.candidates)
        # the middle: its complete sentences, never run into the ending
        print(" ".join(part for part in (first, choice.best.text.strip(), last) if part))
        if not choice.any_ended:
            print("(no candidate middle ended by itself: shown up to its last complete "
                  "sentence)", file=sys.stderr)
    else:
        prompt = args.prompt or ""
        print(prompt, end="", flush=True)
        for piece in stream(ckpt.model, ckpt.tokenizer, prompt, params):
            print(piece, end="", flush=True)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
