"""Story-infilling evaluation: how likely is the true middle, and how close are generated ones.

    python -m training.evaluate --checkpoint DIR --task infill [--bleu 50]

* perplexity of the true middle's tokens given the first **and** last sentence
  (``--given first+last``, the infilling format), or given only the first sentence as
  plain text (``--given first``: what a plain language model can do), over every
  validation story that has a middle. The end marker is not scored: after the middle a
  plain model would go on with the last sentence, so only the middle compares;
* BLEU (sacrebleu) and the length ratio of generated middles against the true ones.
"""

from __future__ import annotations

import numpy as np
import sacrebleu

from models_src.infill import infill, infill_example_ids
from models_src.sampling import SamplingParams

from .examples import Examples, in_order, split_story
from .metrics import Scores, score_batches

GIVEN = ("first+last", "first")


def story_parts(docs: list[str]) -> tuple[list[tuple[str, str, str]], int]:
    """(first, middle, last) of every story that has a middle, and how many had none."""
    parts = [split_story(doc) for doc in docs]
    return [p for p in parts if p], sum(p is None for p in parts)


def _examples(rows: list[list[int]], scored_from: list[int], dtype) -> Examples:
    offsets = np.cumsum([0] + [len(r) for r in rows], dtype=np.int64)
    tokens = np.fromiter((t for r in rows for t in r), dtype=dtype, count=int(offsets[-1]))
    return Examples(tokens, offsets, np.array(scored_from, dtype=np.int64), np.ones(len(rows), bool))


def middle_scores(checkpoint, parts, given: str = "first+last", batch_size: int = 16,
                  max_len: int | None = None) -> Scores:
    """Loss of the middle's tokens, given the first (and last) sentence."""
    tok = checkpoint.tokenizer
    rows, scored_from = [], []
    for first, middle, last in parts:
        ids, start = infill_example_ids(tok, first, middle, last)
        # Stories too long for the context are left out, judged by the longer (infilling)
        # format so that both ways of conditioning score the same stories.
        if max_len is not None and len(ids) > max_len + 1:
            continue
        ids = ids[:-1]  # the end marker
        if given == "first":
            prefix = [tok.bos_id, *tok.encode(first)]
            ids, start = prefix + tok.encode(" " + middle), len(prefix)
        rows.append(ids), scored_from.append(start - 1)
    examples = _examples(rows, scored_from, np.int64)
    return score_batches(checkpoint.model, in_order(examples, batch_size, tok.pad_id, only_scored=True))


def generated_middles(checkpoint, parts, count: int, params: SamplingParams | None = None) -> dict:
    """BLEU and length ratio of ``count`` generated middles against the true ones."""
    params = params or SamplingParams(max_new_tokens=160, temperature=0.0)
    hypotheses, references = [], []
    for first, middle, last in parts[:count]:
        hypotheses.append(infill(checkpoint.model, checkpoint.tokenizer, first, last, params).text)
        references.append(middle)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    return {"bleu": bleu.score, "length_ratio": bleu.sys_len / max(bleu.ref_len, 1),
            "examples": [{"first": p[0], "generated": h, "true": p[1], "last": p[2]}
                         for p, h in zip(parts[:3], hypotheses)]}
