"""Which sampling settings should a model's requests get by default? A sweep over
temperature, top-p and min-p: for each setting the model writes one story per seed from
the same prompt, to the end of its context, and four things are counted.

    python benchmarks/sampling_defaults.py --checkpoint checkpoints/tinystories-gpt --seeds 40
    python benchmarks/sampling_defaults.py ... --write     # the choice into generation_config.json

The corpus is the one the checkpoint was trained on (its config's data section), split as
its training run split it; ``--data`` points elsewhere.

- **ended**: stories that ended by themselves (end-of-text before the context was full);
- **distinct-2**: distinct word pairs over all word pairs of the setting's stories, a
  measure of how different the stories are from each other (low: the same story again);
- **repeated 4-grams**: word 4-grams that already stood earlier in the same story, a
  measure of a story looping on itself ("she waved it and waved it"), which distinct-2,
  counted across stories, sees only in part;
- **the judge**: word pairs no story of the training corpus has (a word pair a few million
  words of human-edited text never uses is most often a slip: "the zoo and a little
  rabbit went", "I am their compassionate man"), and words the corpus never uses
  (invented ones). The model's own log-probability would be no judge: it rewards the
  dullest text, which is what lowering the temperature buys. Unseen pairs are not all
  slips (the validation stories have some), so the judge is read together with diversity.

The validation stories are the reference row. The setting chosen is the one with the
fewest unseen word pairs among those where at least 90 % of stories end by themselves,
whose distinct-2 is at least half the validation stories' (below that, the stories are
one story told again) and whose repeated 4-grams are at most twice theirs (above that, a
story loops).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import torch

from _common import ROOT, environment
from app.platform.settings import Settings
from models_src.checkpoint import load_checkpoint, suggested_prompt
from models_src.generation import Batch
from models_src.sampling import encode_prompt
from models_src.sampling_defaults import GENERATION_CONFIG, SamplingDefaults
from training.data import DataConfig, DataError, load_documents

DATA_FIELDS = {f.name for f in fields(DataConfig)}

CORPUS = ROOT.parent / "shared" / "data" / "tinystories"
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)
CUTS = ({}, {"top_p": 0.9}, {"top_p": 0.95}, {"min_p": 0.05}, {"min_p": 0.1})
MIN_ENDED = 90.0  # % of stories that must end by themselves
DIVERSITY_FLOOR = 0.5  # distinct-2 at least this share of the validation stories'
# repeated 4-grams within a text at most this many times the validation stories' (and
# never held under 1 %: a short reference may repeat nothing), so that no text loops
REPEAT_CEILING = 2.0


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def pairs(text: str) -> list[tuple[str, str]]:
    """Consecutive words within a sentence (a pair across a full stop is no slip)."""
    found = []
    for sentence in re.split(r"[.!?\n]+", text):
        w = words(sentence)
        found += zip(w, w[1:])
    return found


def repeats(text: str) -> tuple[int, int]:
    """(word 4-grams that already stood earlier in the same text, all its 4-grams): a text
    that loops on a phrase ("she waved it and waved it and waved it") has many."""
    w = words(text)
    seen, repeated = set(), 0
    for gram in zip(w, w[1:], w[2:], w[3:]):
        repeated += gram in seen
        seen.add(gram)
    return repeated, max(0, len(w) - 3)


class Judge:
    """What the training corpus says of a text's words and word pairs."""

    def __init__(self, corpus: list[str]) -> None:
        self.words = {w for story in corpus for w in words(story)}
        self.pairs = {p for story in corpus for p in pairs(story)}

    def score(self, texts: list[str]) -> dict:
        all_words = [w for t in texts for w in words(t)]
        all_pairs = [p for t in texts for p in pairs(t)]
        counts = Counter(all_pairs)
        grams = [repeats(t) for t in texts]
        return {"repeats": 100 * sum(r for r, _ in grams) / max(1, sum(n for _, n in grams)),
                "unseen_pairs": 100 * sum(p not in self.pairs for p in all_pairs) / max(1, len(all_pairs)),
                "unknown_words": 100 * sum(w not in self.words for w in all_words) / max(1, len(all_words)),
                "distinct2": len(counts) / max(1, len(all_pairs)),
                "words": len(all_words) / max(1, len(texts))}


def write_stories(checkpoint, prompt: str, setting: dict, seeds: range, cap: int) -> tuple[list[str], float, float]:
    """One story per seed, all in one batch; their texts, the share that ended, seconds."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    ids = encode_prompt(tokenizer, prompt)
    defaults = SamplingDefaults(**setting)
    rows = [(ids, defaults.params({"seed": seed}, prompt_tokens=len(ids), context=model.max_context, cap=cap))
            for seed in seeds]
    start = time.perf_counter()
    batch = Batch(model, tokenizer)
    seqs = batch.add(rows)
    while batch:
        batch.step()
    texts = [prompt + s.completion.text for s in seqs]
    ended = 100 * sum(s.completion.finish_reason == "stop" for s in seqs) / len(seqs)
    return texts, ended, time.perf_counter() - start


def label(setting: dict) -> str:
    return SamplingDefaults(**setting).described()


def corpus(checkpoint, path: str | None) -> dict[str, list[str]]:
    """The training and validation documents, split as the checkpoint's training run split
    them (its config's data section; ``path`` moves the corpus)."""
    data = dict(checkpoint.training.config_section("data"))
    if path is not None or not (data.get("path") or data.get("corpus")):
        data = {"path": path or str(CORPUS)}
    if data.get("path") and not Path(data["path"]).is_absolute():
        data["path"] = str((ROOT / data["path"]).resolve())
    return load_documents(DataConfig(**{k: v for k, v in data.items() if k in DATA_FIELDS}))


def reference_texts(validation: list[str], count: int, words_each: int) -> tuple[list[str], bool]:
    """``count`` pieces of the validation text to compare with: its first documents where
    it has that many (stories), else that many runs of ``words_each`` words (a play or a
    book read as one stream); and whether they are documents (which end by themselves)."""
    if len(validation) >= count:
        return validation[:count], True
    tokens = " ".join(validation).split()
    step = max(words_each, 1)
    return [" ".join(tokens[i:i + step]) for i in range(0, len(tokens), step)][:count], False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "tinystories-gpt")
    parser.add_argument("--data", help="the corpus (default: the one the checkpoint was trained "
                                       "on, as its config names it, split the same way)")
    parser.add_argument("--prompt", help="default: the prompt its model card offers")
    parser.add_argument("--seeds", type=int, default=40, help="stories per setting")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true",
                        help=f"write the chosen setting into the checkpoint's {GENERATION_CONFIG}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    try:
        splits = corpus(checkpoint, args.data)
    except DataError as e:
        sys.exit(f"sampling_defaults: {e}; pass --data PATH")
    prompt = args.prompt or suggested_prompt(args.checkpoint) or "Once upon a time"
    judge = Judge(splits["train"])
    cap = Settings.model_fields["max_new_tokens"].default
    print(f"# sampling defaults — {args.checkpoint.name}, {args.seeds} texts per setting from "
          f"{prompt!r}, to the end of the context (at most {cap} tokens) — {environment()}",
          flush=True)
    rows = []
    for temperature in TEMPERATURES:
        for cut in CUTS:
            setting = {"temperature": temperature, **cut}
            texts, ended, seconds = write_stories(checkpoint, prompt, setting,
                                                  range(1, args.seeds + 1), cap)
            rows.append({"setting": setting, "ended": ended, **judge.score(texts), "seconds": seconds})
    words_each = round(sum(r["words"] for r in rows) / len(rows))
    reference, documents = reference_texts(splits["validation"], args.seeds, words_each)
    ref = judge.score(reference)
    print("| setting | ended by themselves | distinct-2 | repeated 4-grams | unseen word pairs | unknown words "
          "| words per text | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| validation {'stories' if documents else 'text'} (reference) | "
          f"{'100 %' if documents else '–'} | {ref['distinct2']:.3f} | {ref['repeats']:.1f} % | "
          f"{ref['unseen_pairs']:.2f} % | {ref['unknown_words']:.2f} % | {ref['words']:.0f} | |")
    for r in rows:
        print(f"| {label(r['setting'])} | {r['ended']:.0f} % | {r['distinct2']:.3f} | {r['repeats']:.1f} % | "
              f"{r['unseen_pairs']:.2f} % | {r['unknown_words']:.2f} % | {r['words']:.0f} | "
              f"{r['seconds']:.0f} |")
    # a text read as one stream has no ends to reach: there only diversity and the judge count
    eligible = [r for r in rows if (not documents or r["ended"] >= MIN_ENDED)
                and r["distinct2"] >= DIVERSITY_FLOOR * ref["distinct2"]
                and r["repeats"] <= REPEAT_CEILING * max(ref["repeats"], 0.5)]
    if not eligible:
        sys.exit("no setting ends often enough, stays diverse enough and keeps from looping; nothing chosen")
    best = min(eligible, key=lambda r: r["unseen_pairs"])
    print(f"chosen: {label(best['setting'])}")
    if args.write:
        # the setting over the model's own, its former cuts cleared
        chosen = replace(checkpoint.defaults, **{"top_p": None, "min_p": None, **best["setting"]})
        chosen.write(args.checkpoint, checkpoint.tokenizer)
        print(f"written to {args.checkpoint / GENERATION_CONFIG}")


if __name__ == "__main__":
    main()
