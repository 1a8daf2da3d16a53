"""Story infilling: given a story's first and last sentence, write the middle.

One sequence format serves training and generation, for the decoder-only GPT and for
the encoder–decoder model (which splits it at ``<sep>``)::

    <bos> first <blank> last <sep> middle <eos>

The middle and the last sentence are encoded with a leading space, as they follow a
sentence in running text (it matters for BPE and character vocabularies).
"""

from __future__ import annotations

from dataclasses import replace

from .generation import Stream, generate, stream
from .records import TrainingSummary
from .sampling import Completion, SamplingParams


def trained_to_infill(summary: TrainingSummary, tokenizer) -> bool:
    """Whether a checkpoint infills: its tokenizer has the markers AND it learned the format.

    Every Fable tokenizer has ``<blank>``/``<sep>``, so the markers alone say nothing. It
    learned the format when its training ran the infilling task (``data.task: infill``, or
    ``infill+lm`` with some ``infill_fraction``), or when an imported model declares it
    (``"infill": true`` in its training summary).
    """
    try:
        if tokenizer.blank_id is None or tokenizer.sep_id is None:
            return False
    except (AttributeError, KeyError):
        return False
    if summary.infill is not None:
        return summary.infill
    data = summary.config_section("data")
    fraction = data.get("infill_fraction")  # a saved config lists every field
    return data.get("task") == "infill" or (
        data.get("task") == "infill+lm" and isinstance(fraction, (int, float)) and fraction > 0)


def infill_prompt_ids(tokenizer, first: str, last: str) -> list[int]:
    """``<bos> first <blank> last <sep>``: what the model continues with the middle."""
    return [tokenizer.bos_id, *tokenizer.encode(first.strip()), tokenizer.blank_id,
            *tokenizer.encode(" " + last.strip()), tokenizer.sep_id]


def infill_example_ids(tokenizer, first: str, middle: str, last: str) -> tuple[list[int], int]:
    """A training example and the index where its middle starts (what gets scored)."""
    prompt = infill_prompt_ids(tokenizer, first, last)
    return prompt + tokenizer.encode(" " + middle.strip()) + [tokenizer.eos_id], len(prompt)


def infill_params(params: SamplingParams | None, last: str) -> SamplingParams:
    """``params`` with the last sentence as a stop string: the middle never runs on into it."""
    params = params or SamplingParams()
    return replace(params, stop=[*params.stop, last.strip()]) if last.strip() else params


def infill(model, tokenizer, first: str, last: str, params: SamplingParams | None = None) -> Completion:
    """The middle of the story, as clean text (eos ends it; the last sentence is never repeated)."""
    prompt = infill_prompt_ids(tokenizer, first, last)
    completion = generate(model, tokenizer, prompt_ids=[prompt], params=infill_params(params, last))[0]
    completion.text = completion.text.strip()
    return completion


def stream_infill(model, tokenizer, first: str, last: str, params: SamplingParams | None = None) -> Stream:
    """The middle as it is written (pieces as ``generation.stream`` yields them)."""
    return stream(model, tokenizer, prompt_ids=infill_prompt_ids(tokenizer, first, last),
                  params=infill_params(params, last))
