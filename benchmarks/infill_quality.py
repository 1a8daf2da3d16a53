"""Do infilled middles arrive? Each story of a file is split into its first sentence, its
middle and its last sentence; the model infills the middle from the first and the last
(``models_src.infill_candidates.best_middle``, at the model's own sampling defaults and
as long as the server lets a middle run), and the same
model scores how likely the true ending is after what it wrote.

    python benchmarks/infill_quality.py --checkpoint checkpoints/tinystories-gpt \\
        --data ../shared/data/tinystories/valid.txt --stories 400
    python benchmarks/infill_quality.py --stories 60 --candidates 1 2 4 8 16   # the table

Prints, for each number of candidates:

    ended by themselves: P%
    ending log-prob per character: generated G, true T, first only F
    middles repeating a 4-gram of the last sentence: generated C%, true D%

P: chosen middles that ended by themselves at a sentence boundary (the rest were cut
back to their last complete sentence). G: the last sentence's mean log-probability per
character after first + generated middle, as plain continuation; T: after the true
middle; F: after the first sentence alone. C and D guard against middles that win by
copying the ending. ``(G - F) / (T - F)`` is how far the generated middles lead towards
the ending, relative to the true ones (1: as far).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from _common import ROOT, environment
from app.platform.settings import MAX_INFILL_CANDIDATES, Settings
from models_src.checkpoint import load_checkpoint
from models_src.infill import infill_prompt_ids
from models_src.infill_candidates import best_middle, copies_ending, ending_logprobs
from training.examples import split_story

DATA = ROOT.parent / "shared" / "data" / "tinystories" / "valid.txt"
_SEPARATOR = re.compile(r"^<\|endoftext\|>\r?$", re.MULTILINE)  # as the shared corpus has it


def read_stories(path: Path, count: int) -> list[tuple[str, str, str]]:
    """(first, middle, last) of the first ``count`` stories of ``path`` that have a middle."""
    stories = [s.strip() for s in _SEPARATOR.split(path.read_text(encoding="utf-8")) if s.strip()]
    parts = [p for p in map(split_story, stories) if p]
    return parts[:count]


def measure(checkpoint, stories, given: dict, candidates: int, cap: int) -> dict:
    """Infill every story with ``candidates`` candidates, sampling with ``given`` over the
    model's defaults as the server does (``cap``: its FABLE_MAX_NEW_TOKENS); the figures
    the lines print."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    ended = copied = copied_true = 0
    generated, true, first_only, seconds = [], [], [], 0.0
    for index, (first, middle, last) in enumerate(stories):
        # each story its own seeds, far enough apart that no two stories share one
        seed = given["seed"] + index * MAX_INFILL_CANDIDATES
        story_params = checkpoint.defaults.params(
            {**given, "seed": seed}, prompt_tokens=len(infill_prompt_ids(tokenizer, first, last)),
            context=model.max_context, cap=cap)
        start = time.perf_counter()
        choice = best_middle(model, tokenizer, first, last, story_params, candidates)
        seconds += time.perf_counter() - start
        g, t, f = ending_logprobs(model, tokenizer, first, [choice.best.text, middle, ""], last)
        generated.append(g), true.append(t), first_only.append(f)
        ended += choice.best.ended
        copied += copies_ending(choice.best.text, last)
        copied_true += copies_ending(middle, last)
    n = len(stories)
    def mean(values):
        return sum(values) / n
    G, T, F = mean(generated), mean(true), mean(first_only)
    return {"candidates": candidates, "ended": 100 * ended / n, "G": G, "T": T, "F": F,
            "ratio": (G - F) / (T - F) if T != F else float("nan"),
            "copied": 100 * copied / n, "copied_true": 100 * copied_true / n,
            "seconds": seconds / n}


def print_lines(r: dict) -> None:
    print(f"ended by themselves: {r['ended']:.1f}%")
    print(f"ending log-prob per character: generated {r['G']:.4f}, true {r['T']:.4f}, "
          f"first only {r['F']:.4f}")
    print(f"middles repeating a 4-gram of the last sentence: generated {r['copied']:.1f}%, "
          f"true {r['copied_true']:.1f}%")
    print(f"# (G - F) / (T - F) = {r['ratio']:.3f}; {r['seconds']:.2f} s per infill", flush=True)


def main() -> None:
    defaults = Settings.model_fields
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "tinystories-gpt")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="stories separated by <|endoftext|> lines (default: the shared "
                             "corpus's validation stories)")
    parser.add_argument("--stories", type=int, default=400, help="the first N stories with a middle")
    parser.add_argument("--candidates", type=int, nargs="+",
                        default=[defaults["infill_candidates"].default],
                        help="candidates per infill (several: one run each, then a table); "
                             "default: the server's FABLE_INFILL_CANDIDATES default")
    for name in ("temperature", "top-p", "min-p"):
        parser.add_argument(f"--{name}", type=float, help="default: the model's own")
    parser.add_argument("--max-new-tokens", type=int, help="default: the server's, the room "
                        "left in the context, at most FABLE_MAX_NEW_TOKENS's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see README.md)")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"infill_quality: no story file at {args.data}; pass --data FILE (stories "
                 f"separated by <|endoftext|> lines, as ../shared/data/tinystories/valid.txt)")
    if not all(1 <= k <= MAX_INFILL_CANDIDATES for k in args.candidates):
        parser.error(f"--candidates must be from 1 to {MAX_INFILL_CANDIDATES}")
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    stories = read_stories(args.data, args.stories)
    if not stories:
        sys.exit(f"infill_quality: {args.data} has no story with a middle (three sentences or more)")
    given = {key: value for key, value in (
        ("temperature", args.temperature), ("top_p", args.top_p), ("min_p", args.min_p),
        ("max_new_tokens", args.max_new_tokens)) if value is not None}
    shown = checkpoint.defaults.params(given, prompt_tokens=0, context=None, cap=1)
    print(f"# infill quality — {args.checkpoint.name}, {len(stories)} stories of {args.data.name}, "
          f"temperature {shown.temperature:g}, top-p {shown.top_p}, min-p {shown.min_p}, "
          f"max new tokens {args.max_new_tokens or 'to the end of the context'} — "
          f"{environment()}", flush=True)
    results = []
    cap = defaults["max_new_tokens"].default
    for k in args.candidates:
        print(f"# {k} candidate{'s' if k != 1 else ''}")
        results.append(measure(checkpoint, stories, {**given, "seed": args.seed}, k, cap))
        print_lines(results[-1])
    if len(results) > 1:
        print("| candidates | (G − F) / (T − F) | ended by themselves | repeating a 4-gram (true) "
              "| seconds per infill |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['candidates']} | {r['ratio']:.2f} | {r['ended']:.0f} % | "
                  f"{r['copied']:.0f} % ({r['copied_true']:.0f} %) | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
