"""Whole-example training data: story infilling, and plain stories mixed in.

Examples (``<bos> first <blank> last <sep> middle <eos>``, or a plain story) are built,
cached beside the token streams and batched whole, one per row, padding never scored; a
recurrent model reads them as one shuffled stream. The design: docs/training.md.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from sentencex import segment

from models_src.base import IGNORE_INDEX
from models_src.infill import infill_example_ids

from .data import DataConfig, PreparedData, load_documents, token_dtype

TASKS = ("lm", "infill", "infill+lm")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in segment("en", " ".join(text.split())) if s.strip()]


def split_story(text: str) -> tuple[str, str, str] | None:
    """(first sentence, middle, last sentence), or None when there is no middle."""
    return _first_middle_last(split_sentences(text))


def _first_middle_last(sentences: list[str]) -> tuple[str, str, str] | None:
    if len(sentences) < 3:
        return None
    return sentences[0], " ".join(sentences[1:-1]), sentences[-1]


@dataclass
class Examples:
    """Variable-length examples stored flat: example i is ``tokens[offsets[i]:offsets[i+1]]``."""
    tokens: np.ndarray
    offsets: np.ndarray  # int64, one more than there are examples
    scored_from: np.ndarray  # int64: first target position of the part that infilling scores
    infill: np.ndarray  # bool: an infilling example (else plain text)
    skipped: int = 0  # stories too short to have a middle

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @cached_property
    def lengths(self) -> torch.Tensor:
        """Each example's length in tokens (what batches are grouped by)."""
        return torch.from_numpy(np.diff(self.offsets))


def random_spans(sentences: list[str], count: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """``count`` (first, middle, last) triples from random runs of at least three sentences."""
    n = len(sentences)
    if n < 3:
        return []
    spans = []
    for _ in range(count):
        length = rng.randint(3, n)
        start = rng.randint(0, n - length)
        spans.append(_first_middle_last(sentences[start:start + length]))
    return spans


def build_examples(docs: list[str], tokenizer, task: str, infill_fraction: float, max_len: int | None,
                   seed: int, spans: int = 0) -> Examples:
    """Encode ``docs`` for ``task`` (plus ``spans`` extra infilling examples per story);
    examples longer than ``max_len + 1`` tokens are cut (None: none is)."""
    rng = random.Random(seed)
    rows, scored_from, infill, skipped = [], [], [], 0

    def add_infill(parts):
        ids, middle_start = infill_example_ids(tokenizer, *parts)
        rows.append(ids), scored_from.append(middle_start - 1), infill.append(True)

    for doc in docs:
        as_infill = task == "infill" or rng.random() < infill_fraction
        sentences = split_sentences(doc) if as_infill or spans else None  # segmented once
        parts = _first_middle_last(sentences) if as_infill else None
        if task != "infill":
            rows.append([tokenizer.bos_id, *tokenizer.encode(doc.strip()), tokenizer.eos_id])
            scored_from.append(0), infill.append(False)
        if parts is not None:
            add_infill(parts)
        elif task == "infill":
            skipped += 1
        if spans:
            for span in random_spans(sentences, spans, rng):
                add_infill(span)
    if max_len is not None:
        rows = [r[:max_len + 1] for r in rows]
    offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
    tokens = np.fromiter((t for r in rows for t in r), dtype=token_dtype(tokenizer.vocab_size),
                         count=int(offsets[-1]))
    return Examples(tokens, offsets, np.array(scored_from, dtype=np.int64),
                    np.array(infill, dtype=bool), skipped)


def prepare_examples(data: DataConfig, prepared: PreparedData, max_len: int | None) -> dict[str, Examples]:
    """Examples of every split, cached beside the token streams they share a tokenizer with
    (``max_len`` None: whole, for a recurrent model)."""
    key = f"examples-v2-{data.task}-{data.infill_fraction}-{data.infill_spans}-{max_len or 'whole'}-{data.seed}"
    directory = Path(prepared.cache_path) / key
    if not directory.is_dir():
        splits = load_documents(data)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=directory.parent))
        try:
            meta = {}
            for name, docs in splits.items():
                ex = build_examples(docs, prepared.tokenizer, data.task, data.infill_fraction,
                                    max_len, data.seed, data.infill_spans if name == "train" else 0)
                for field in ("tokens", "offsets", "scored_from", "infill"):
                    np.save(tmp / f"{name}.{field}.npy", getattr(ex, field))
                meta[name] = {"examples": len(ex), "skipped": ex.skipped}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.replace(tmp, directory)
            except OSError:
                if not directory.is_dir():
                    raise  # else another process (a torchrun rank) built the same examples first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((directory / "meta.json").read_text())
    return {name: Examples(*(np.load(directory / f"{name}.{f}.npy", mmap_mode="r")
                             for f in ("tokens", "offsets", "scored_from", "infill")), info["skipped"])
            for name, info in meta.items()}


def as_stream(examples: Examples, seed: int) -> np.ndarray:
    """Every example once, one after another in a random order: what a recurrent model
    reads by truncated back-propagation through time, carrying its state from one example
    into the next as it does across the documents of a language-modelling stream (each
    example starts with <bos>, so it learns where one begins). Shuffled, so that a story's
    infilling example is not read just after the story it would copy from."""
    order = np.random.default_rng(seed).permutation(len(examples))
    return np.concatenate([examples.ids(i) for i in order]) if len(order) else examples.tokens[:0]


def collate(examples: Examples, indices, pad_id: int, only_scored: bool = False):
    """Right-padded (x, y) for the given examples; padding (and, with ``only_scored``, the
    part before each example's middle) gets target ``IGNORE_INDEX``."""
    rows = [torch.from_numpy(examples.ids(i).astype(np.int64)) for i in indices]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for b, (i, row) in enumerate(zip(indices, rows)):
        n = len(row) - 1
        x[b, :n], y[b, :n] = row[:-1], row[1:]
        if only_scored:
            y[b, :examples.scored_from[i]] = IGNORE_INDEX
    return x, y


GROUP = 8  # a batch is drawn from this many batches' worth of examples


def example_batch(examples: Examples, batch_size: int, generator: torch.Generator, pad_id: int,
                  middle_only: bool = False):
    """A random batch of whole examples of similar length (indices drawn from ``generator``
    for exact resume); with ``middle_only`` only the middle of infilling examples is scored
    (plain ones whole).

    ``GROUP`` batches' worth of uniform draws are sorted by length and one run of
    ``batch_size`` neighbours, chosen at random, is the batch: each example is still drawn
    uniformly, but a row is padded to a similar length, not to the longest of 16 random
    stories (docs/training.md, "Whole-example batches")."""
    drawn = torch.randint(len(examples), (GROUP * batch_size,), generator=generator)
    by_length = drawn[torch.argsort(examples.lengths[drawn], stable=True)]
    start = int(torch.randint(GROUP, (1,), generator=generator)) * batch_size
    return collate(examples, by_length[start:start + batch_size].tolist(), pad_id, only_scored=middle_only)


def in_order(examples: Examples, batch_size: int, pad_id: int, only_scored: bool = False,
             only_infill: bool = False, limit: int | None = None):
    """Every example once, in order, in batches (for evaluation)."""
    indices = [i for i in range(len(examples)) if not only_infill or examples.infill[i]][:limit]
    for start in range(0, len(indices), batch_size):
        yield collate(examples, indices[start:start + batch_size], pad_id, only_scored)
