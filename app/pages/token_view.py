"""What a finished page generation tells beyond its text: each token with its probability
and likeliest alternatives (the token view, drawn by static/tokens.js), and a run's
figures (tokens per second, time to first token, mean log-probability per character).

All of it comes from the engine's log-probabilities (``SamplingParams.logprobs``), taken
under the model's own distribution: before temperature, top-k/top-p and the repetition
penalty. Each token's text is decoded as the stream decoded it (``TextStream``, with the
prompt's last id as left context), so the tokens spell exactly the text shown: a stop
string's tokens are cut off, and so is the whitespace an infilled middle loses at its
ends. A token that completed no character yet (part of a UTF-8 character) has no text of
its own; the next one carries it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from markupsafe import Markup

from app.serving.service import GenerationStream
from models_src.sampling import TextStream, TokenLogprob

DIGITS = 4  # decimals of the log-probabilities sent to the page


@dataclass(frozen=True)
class Token:
    text: str
    logprob: float
    top: list[tuple[str, float]]  # the likeliest tokens at its position, best first


@dataclass(frozen=True)
class RunStats:
    """One finished generation's figures, for a comparison column."""
    tokens: int  # tokens the model generated (eos included)
    tokens_per_s: float | None  # decoding speed after the first token (None: one token)
    ttft_ms: float | None  # from the request (queue included) to its first text
    logprob_per_char: float | None  # sum of its tokens' log-probabilities / characters

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "tokens_per_s": _round(self.tokens_per_s, 1),
                "ttft_ms": _round(self.ttft_ms, 1),
                "logprob_per_char": _round(self.logprob_per_char, DIGITS)}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def token_pieces(tokenizer, context: list[int], ids: list[int]) -> list[str]:
    """Each id's text as a stream decodes it after ``context``; they join into the text."""
    stream = TextStream(tokenizer, (), context=context)
    pieces = [stream.push(i) for i in ids]
    if pieces:
        pieces[-1] += stream.flush()
    return pieces


def tokens_of(tokenizer, context: list[int], entries: list[TokenLogprob], text: str, *,
              stripped: bool = False) -> list[Token] | None:
    """The tokens that spell ``text`` (the output as shown), or None when the decoded
    tokens do not spell it (then there is no token view rather than a wrong one).
    ``stripped``: the text lost the whitespace at its ends (an infilled middle)."""
    pieces = token_pieces(tokenizer, context, [e.token_id for e in entries])
    decoded = "".join(pieces)
    start = len(decoded) - len(decoded.lstrip()) if stripped else 0
    if not decoded.startswith(text, start):
        return None
    end = start + len(text)
    tokens, position = [], 0
    for piece, entry in zip(pieces, entries):
        begin, position = position, position + len(piece)
        inside = (begin < end and position > start if piece  # an empty one: a special token,
                  else start <= begin < end or begin == end == len(decoded))  # a part character
        if not inside:
            continue  # before the text (stripped whitespace) or after it (a stop string)
        shown = piece[max(start - begin, 0):end - begin]
        top = [(_alternative(tokenizer, i), lp) for i, lp in entry.top]
        tokens.append(Token(shown, entry.logprob, top))
    return tokens


def _alternative(tokenizer, token_id: int) -> str:
    """An alternative's text; a special token (eos) by its name, as "<eos>"."""
    return (tokenizer.decode([token_id], skip_special_tokens=True)
            or tokenizer.decode([token_id], skip_special_tokens=False))


def stream_tokens(stream: GenerationStream, tokenizer, *,
                  stripped: bool = False) -> list[Token] | None:
    """The token view of a finished stream that asked for log-probabilities, or None."""
    completion = stream.completion
    if completion is None or completion.logprobs is None or tokenizer is None:
        return None
    return tokens_of(tokenizer, stream.prompt_tail, completion.logprobs, completion.text,
                     stripped=stripped)


def run_stats(stream: GenerationStream, tokens: list[Token] | None) -> RunStats | None:
    """A finished stream's figures (None when it never finished). The mean
    log-probability needs ``tokens``; without them it is None."""
    completion = stream.completion
    if completion is None or stream.finished_ns is None:
        return None
    requested = stream.started_ns - stream.queued_ns
    first = stream.first_piece_ns
    ttft = None if first is None else (first - requested) / 1e6
    n = completion.completion_tokens
    decoding = None if first is None else (stream.finished_ns - first) / 1e9
    speed = (n - 1) / decoding if n > 1 and decoding and decoding > 0 else None
    chars = len(completion.text)
    per_char = (math.fsum(t.logprob for t in tokens) / chars
                if tokens is not None and chars else None)
    return RunStats(n, speed, ttft, per_char)


def tokens_json(tokens: list[Token]) -> str:
    """``[[text, logprob, [[alternative, logprob], ...]], ...]``: what tokens.js reads."""
    return json.dumps([[t.text, round(t.logprob, DIGITS),
                        [[a, round(lp, DIGITS)] for a, lp in t.top]] for t in tokens],
                      ensure_ascii=False, separators=(",", ":"))


def token_data(tokens: list[Token] | None) -> Markup:
    """The hidden element a stream's last event carries the token view in (an attribute,
    escaped: the model's text is never markup); empty without tokens."""
    if not tokens:
        return Markup("")
    return Markup('<span class="token-data" hidden data-tokens="{}"></span>').format(
        tokens_json(tokens))
