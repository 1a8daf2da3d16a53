"""What a lossy tokenizer drops from a text, in bits, so bits per character compare.

A word tokenizer forgets case, spacing and the spelling of ``<unk>``; three small adaptive
count models code what it drops, and their bits are added to the model's loss. How they
code it: docs/training.md ("Bits per character of lossy tokenizers").
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence

END = "\x00"  # end of a spelled string
ANY_CODE_POINT_BITS = math.log2(0x110000)  # a character the speller has never seen
PARTS = ("spacing", "case", "unknown")
PRIME_CHARACTERS = 2_000_000  # the side models are small: more training text adds little, and costs time


class _Backoff:
    """Adaptive Witten–Bell estimate over a list of contexts, most specific first."""

    def __init__(self) -> None:
        self.counts: dict[Hashable, Counter] = {}
        self.totals: dict[Hashable, int] = {}

    def bits(self, contexts: Sequence[Hashable], symbol: Hashable, fallback: Callable[[], float]) -> float:
        cost = 0.0
        for context in contexts:
            seen = self.counts.get(context)
            if not seen:
                continue
            total, distinct = self.totals[context], len(seen)
            if symbol in seen:
                return cost - math.log2(seen[symbol] / (total + distinct))
            cost -= math.log2(distinct / (total + distinct))  # escape to the next context
        return cost + fallback()

    def update(self, contexts: Sequence[Hashable], symbol: Hashable) -> None:
        for context in contexts:
            self.counts.setdefault(context, Counter())[symbol] += 1
            self.totals[context] = self.totals.get(context, 0) + 1

    def code(self, contexts: Sequence[Hashable], symbol: Hashable, fallback: Callable[[], float]) -> float:
        cost = self.bits(contexts, symbol, fallback)
        self.update(contexts, symbol)
        return cost


class _Speller:
    """Strings character by character, each given the one before (then none), plus an end."""

    def __init__(self) -> None:
        self.chars = _Backoff()

    def code(self, text: str) -> float:
        previous, cost = END, 0.0
        for char in (*text, END):
            cost += self.chars.code(((previous,), ()), char, lambda: ANY_CODE_POINT_BITS)
            previous = char
        return cost


def _kind(token: str) -> str:
    return "w" if any(c.isalnum() for c in token) else token


def _case(surface: str) -> str:
    if surface == surface.lower():
        return "lower"
    if surface[:1].isupper() and surface[1:] == surface[1:].lower():
        return "title"
    return "upper" if surface == surface.upper() else "mixed"


class _SideModel:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        normalizer = tokenizer.backend.normalizer
        self.lowercases = normalizer is not None and normalizer.normalize_str("A") == "a"
        self.gaps, self.cases, self.unknowns, self.speller = _Backoff(), _Backoff(), _Backoff(), _Speller()

    def code(self, docs: Iterable[str]) -> dict[str, float]:
        bits = dict.fromkeys(PARTS, 0.0)
        docs = list(docs)
        unk = self.tokenizer.unk_id
        for doc, encoding in zip(docs, self.tokenizer.backend.encode_batch(docs, add_special_tokens=False)):
            previous, position, sentence_start = "<s>", 0, True
            for token_id, token, (start, end) in zip(encoding.ids, encoding.tokens, encoding.offsets):
                surface, gap = doc[start:end], doc[position:start]
                kind = "w" if token_id == unk else _kind(token)
                bits["spacing"] += self.gaps.code(((previous, kind), ()), gap, lambda g=gap: self.speller.code(g))
                if token_id == unk:
                    bits["unknown"] += self.unknowns.code(((),), surface, lambda s=surface: self.speller.code(s))
                elif self.lowercases:
                    case = _case(surface)
                    bits["case"] += self.cases.code(((token, sentence_start), (sentence_start,)), case,
                                                    lambda: 2.0)  # one of four patterns
                    if case == "mixed":  # which letters are capitals
                        bits["case"] += sum(c.isupper() or c.islower() for c in surface)
                sentence_start = token in (".", "!", "?") or "\n" in gap
                previous, position = kind, end
            tail = doc[position:]
            bits["spacing"] += self.gaps.code(((previous, "</s>"), ()), tail, lambda: self.speller.code(tail))
        return bits


def round_trips(tokenizer, docs: Iterable[str]) -> bool:
    """Whether the tokenizer gives every document back exactly (nothing dropped)."""
    docs = list(docs)
    return tokenizer.decode_batch(tokenizer.encode_batch(docs)) == docs


def dropped_bits(tokenizer, docs: Sequence[str], primed_on: Iterable[str] = ()) -> dict[str, float]:
    """Bits needed to restore ``docs`` exactly from their tokens, by part (``PARTS``);
    all zero when the tokenizer round-trips them. ``primed_on`` (the training split)
    teaches the side models first, uncharged (its first ``PRIME_CHARACTERS``)."""
    if round_trips(tokenizer, docs):
        return dict.fromkeys(PARTS, 0.0)
    model = _SideModel(tokenizer)
    model.code(_first_characters(primed_on, PRIME_CHARACTERS))
    return model.code(docs)


def _first_characters(docs: Iterable[str], budget: int) -> list[str]:
    taken = []
    for doc in docs:
        if budget <= 0:
            break
        taken.append(doc[:budget])
        budget -= len(doc)
    return taken
