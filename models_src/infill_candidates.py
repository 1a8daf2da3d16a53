"""A middle that arrives: write several candidate middles, keep the one the ending fits.

One sampled middle often runs out of tokens mid-sentence or wanders off. So K middles are
decoded at once (one ``Batch``, seeds ``seed, seed + 1, ...``, so a seed still gives one
answer), each is cut back to its last complete sentence when it did not end by itself,
and the model scores each: the given last sentence's mean log-probability per character
after ``first + middle``, read as plain text. The ending is the same for every candidate,
so per character of it is a fair comparison whatever the middles' lengths. A middle that
ended by itself beats one that had to be cut; among equals the higher score wins.

    choice = best_middle(model, tokenizer, first, last, params, candidates=8)
    choice.best.text, choice.any_ended, [c.score for c in choice.candidates]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from .base import right_pad
from .generation import Batch
from .infill import infill_params, infill_prompt_ids
from .sampling import Completion, SamplingParams

# A sentence ends with . ! or ? (repeated: "..."), maybe closed by quotes or a bracket,
# before a space or the end of the text.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
_WORD = re.compile(r"[\w']+")
#: Candidate middles an infill writes by default: the most whose infill still answers
#: within about 3 s on a 2-vCPU machine (benchmarks/README.md, "Infilled middles that arrive").
DEFAULT_CANDIDATES = 16


@dataclass
class Candidate:
    text: str  # the middle, cut after its last complete sentence when it did not end
    ended: bool  # it ended by itself at a sentence boundary: nothing was cut
    score: float | None  # the ending's mean log-prob per character after first + text
    completion: Completion  # as decoded (text uncut)


@dataclass
class Choice:
    best: Candidate
    candidates: list[Candidate]  # in seed order

    @property
    def any_ended(self) -> bool:
        return any(c.ended for c in self.candidates)


def cut_to_sentence(text: str, finish_reason: str) -> tuple[str, bool]:
    """(the middle up to its last complete sentence, whether it ended by itself). A middle
    ended by itself when it stopped (eos, or it reached the last sentence) right after a
    sentence; otherwise what follows its last sentence end is dropped. One without any
    complete sentence is kept as written (there is nothing to cut back to), not ended."""
    text = text.strip()
    ends = list(_SENTENCE_END.finditer(text))
    if ends and ends[-1].end() == len(text) and finish_reason == "stop":
        return text, True
    return (text[:ends[-1].end()] if ends else text), False


def complete_sentences(text: str) -> int:
    """How much of a text still being written is complete sentences: up to the last
    sentence end that more text already follows (a "." at the very end may yet become
    "..." or gain a closing quote)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() < len(text)]
    return ends[-1] if ends else 0


def at_boundary(text: str) -> bool:
    """The text is empty or ends a sentence (nothing of a sentence runs into the ending)."""
    ends = list(_SENTENCE_END.finditer(text.strip()))
    return not text.strip() or bool(ends) and ends[-1].end() == len(text.strip())


def copies_ending(middle: str, last: str, n: int = 4) -> bool:
    """The middle repeats a word n-gram of the last sentence (a middle that wins by
    copying the ending would look likely and say nothing)."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = _WORD.findall(text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    return bool(grams(middle) & grams(last))


def can_score(model) -> bool:
    """Scoring reads ``first middle last`` as plain text: a decoder-only model does; an
    encoder-decoder reads only ``source <sep> target`` pairs."""
    return model.config.arch != "seq2seq"


def ending_logprobs(model, tokenizer, first: str, middles: list[str], last: str) -> list[float]:
    """For each middle, the last sentence's mean log-probability per character after
    ``<bos> first middle`` as plain continuation: one padded forward pass over them all.
    Each part is encoded as the infilling format encodes it (a leading space after a
    sentence), so the ending's tokens are the same in every row."""
    ending = tokenizer.encode(" " + last.strip())
    limit = model.max_context
    scored = ending
    if limit is not None and len(ending) > limit - 1:
        # an ending longer than the context: its tail, after at least one id before it
        # (the same tail for every middle, so the comparison stays fair)
        scored = ending[len(ending) - (limit - 1):]
    chars = max(1, len(tokenizer.decode(scored)))
    rows = []
    for middle in middles:
        ids = [tokenizer.bos_id, *tokenizer.encode(first.strip())]
        if middle.strip():
            ids += tokenizer.encode(" " + middle.strip())
        ids += ending
        if limit is not None and len(ids) > limit:  # keep the end: the ending is what is scored
            ids = ids[-limit:]
        rows.append(ids)
    padded, _ = right_pad(rows, model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logp = torch.log_softmax(model(padded)[0].float(), dim=-1)
    finally:
        model.train(was_training)
    targets = torch.tensor(scored, device=logp.device)
    scores = []
    for row, ids in enumerate(rows):
        start = len(ids) - len(scored)  # the logits at position p predict token p + 1
        predicted = logp[row, start - 1:start - 1 + len(scored)]
        scores.append(predicted.gather(1, targets[:, None]).sum().item() / chars)
    return scores


def choose(model, tokenizer, first: str, last: str, completions: list[Completion]) -> Choice:
    """Cut each decoded middle to a sentence boundary, score it, and keep the best: one
    that ended by itself over one that was cut, one cut at a sentence over one with no
    sentence at all, then the higher score (the first of equals)."""
    cut = [cut_to_sentence(c.text, c.finish_reason) for c in completions]
    scores: list[float | None] = [None] * len(cut)
    if len(cut) > 1 and can_score(model):  # one candidate needs no score
        scores = ending_logprobs(model, tokenizer, first, [text for text, _ in cut], last)
    candidates = [Candidate(text, ended, score, completion)
                  for (text, ended), score, completion in zip(cut, scores, completions)]
    best = max(candidates, key=lambda c: (c.ended, at_boundary(c.text),
                                          c.score if c.score is not None else 0.0))
    return Choice(best, candidates)


def candidate_params(params: SamplingParams | None, last: str, candidates: int) -> list[SamplingParams]:
    """Each candidate's settings: the infill's (the last sentence a stop string), candidate
    i seeded with ``seed + i`` (no seed: fresh entropy each)."""
    params = infill_params(params, last)
    if params.seed is None:
        return [params] * candidates
    return [replace(params, seed=params.seed + i) for i in range(candidates)]


def best_middle(model, tokenizer, first: str, last: str, params: SamplingParams | None = None,
                candidates: int = 1) -> Choice:
    """Decode ``candidates`` middles in one batch and keep the one the ending fits best."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    prompt = infill_prompt_ids(tokenizer, first, last)
    batch = Batch(model, tokenizer)
    seqs = batch.add([(prompt, p) for p in candidate_params(params, last, candidates)])
    while batch:
        batch.step()
    return choose(model, tokenizer, first, last, [s.completion for s in seqs])
