"""How each next token is picked, and how the picked tokens become text.

``SamplingParams`` says what one request wants; ``RowSettings`` holds the settings of a
batch's rows as (B, 1) tensors, and ``sample`` picks one token per row with the logit
processors (repetition penalty, temperature, top-k, top-p, min-p: Hugging Face's order) and one
uniform draw per row from the row's own generator. ``TextStream`` turns a row's ids into
text that is safe to show as it comes. The decode loop itself is ``models_src.generation``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

MAX_LOGPROBS = 20  # alternatives a row may ask for at each position (OpenAI's limit)
GREEDY_BELOW = 1e-4  # dividing float32 logits by a smaller temperature overflows to inf
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for bytes that are not (yet) a character


class Tokenizer(Protocol):
    """What sampling needs from a tokenizer (duck-typed; see ``models_src.tokenization``)."""
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids a model is prompted with: bos, where the model expects one (a tokenizer's
    ``adds_bos``, True unless it says otherwise), and the text; an empty text is bos alone."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if getattr(tokenizer, "adds_bos", True) or not ids else ids


@dataclass
class SamplingParams:
    """How each next token is picked, and when a completion ends."""
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 (or below 1e-4, which float32 logits cannot honour) is greedy
    top_k: int | None = None
    top_p: float | None = None
    # keep the tokens at least min_p times as likely as the likeliest (Nguyen et al., 2024)
    min_p: float | None = None
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already seen
    stop: list[str] = field(default_factory=list)  # the text is cut before the first match
    seed: int | None = None  # None: fresh entropy each call
    ignore_eos: bool = False  # keep going past eos (benchmarks that need exact lengths)
    # None: no log-probabilities; n: each token's, and the n likeliest alternatives'
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a lone string would otherwise be split into characters
            self.stop = [self.stop]
        # `not x >= 0` rather than `x < 0` so that NaN is rejected too
        if not _is_int(self.max_new_tokens) or not self.max_new_tokens >= 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (not _is_int(self.top_k) or not self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (or None), got {self.min_p}")
        if not math.isfinite(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, "
                             f"got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (or None), "
                             f"got {self.logprobs}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SAFE_FACTOR_MIN, SAFE_FACTOR_MAX = 1e-30, 1e30


def float32_safe(factor: float) -> float:
    """A temperature or penalty clamped to [1e-30, 1e30]: dividing float32 logits (at most
    ~1e2) by it stays finite, and -inf logits stay -inf (never inf / inf = NaN)."""
    return min(max(factor, SAFE_FACTOR_MIN), SAFE_FACTOR_MAX)


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model's own distribution (before
    temperature, top-k/top-p and the repetition penalty, as vLLM reports by default), and
    the likeliest tokens at its position, best first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str  # cut before a stop string; never contains eos
    token_ids: list[int]  # generated ids without eos (a matched stop string's tokens included)
    finish_reason: str  # "stop" (eos or stop string) or "length" (max_new_tokens)
    prompt_tokens: int  # ids in the prompt, bos included
    completion_tokens: int  # tokens the model generated for this row, eos included
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when asked for


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Each row's picked token's log-probability, with its ``top`` likeliest alternatives;
    ``logits`` (R, V) are the raw ones, for only the rows that asked."""
    # -9999 stands for "impossible", as OpenAI's API has it: JSON has no -inf
    logp = torch.log_softmax(logits.float(), dim=-1).clamp(min=-9999.0)
    picked = logp.gather(1, tokens[:, None]).view(-1).tolist()
    ids = tokens.tolist()
    if not top:
        return [TokenLogprob(i, lp) for i, lp in zip(ids, picked)]
    values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
    return [TokenLogprob(i, lp, list(zip(ix, vs)))
            for i, lp, ix, vs in zip(ids, picked, indices.tolist(), values.tolist())]


# --- logit processing: pure functions on (B, V) float logits -----------------------------
# Each takes one value for every row (a float) or one per row (a (B, 1) tensor).

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """Make every token in ``seen`` (B, V bool) less likely by ``penalty`` (CTRL, Keskar 2019).

    A positive logit is divided and a negative one multiplied: both move towards lower
    probability. Dividing a negative logit would *raise* it (Hugging Face issue #2302).
    """
    if isinstance(penalty, float):
        if penalty == 1.0:
            return logits
        penalty = float32_safe(penalty)
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution; 0 is handled as greedy by the caller."""
    if isinstance(temperature, float):
        return logits if temperature == 1.0 else logits / float32_safe(temperature)
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep the k highest logits of each row (more when several tie with the k-th)."""
    V = logits.size(-1)
    if isinstance(k, int):
        if k >= V:
            return logits
        kth = logits.topk(k, dim=-1).values[..., -1:]
    else:
        k = k.clamp(max=V)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(-1, k - 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """Nucleus sampling (Holtzman 2019): keep the smallest set of most likely tokens whose
    probability is at least p. A token is dropped when the tokens ranked above it already
    reach p, so the top token (nothing above it) is always kept."""
    if isinstance(p, float) and p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop_sorted[..., 0] = False  # explicit: a p below float32 resolution would compare equal to 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, m) -> torch.Tensor:
    """Drop the tokens less than ``m`` times as likely as the row's likeliest: a cut that
    follows the model's confidence, tight when one token dominates and loose when many are
    plausible. The top token always stays (m <= 1)."""
    if isinstance(m, float) and m <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    # p_i < m * p_max  <=>  logit_i < logit_max + log(m); log(0) = -inf keeps every token
    return logits.masked_fill(logits < top + torch.log(torch.as_tensor(m, dtype=logits.dtype,
                                                                        device=logits.device)),
                              float("-inf"))


class RowSettings:
    """The sampling settings of a batch's rows as (B, 1) tensors. A processor no row uses
    is None (skipped); rows without it get a neutral value."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device) -> None:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        self.greedy_list = [p.temperature < GREEDY_BELOW for p in params]
        self.greedy = torch.tensor(self.greedy_list, device=device)
        self.all_greedy, self.any_greedy = all(self.greedy_list), any(self.greedy_list)
        self.temperature = None  # None: every row samples at temperature 1 (or is greedy)
        if any(not g and p.temperature != 1.0 for p, g in zip(params, self.greedy_list)):
            self.temperature = column([1.0 if g else float32_safe(p.temperature)
                                       for p, g in zip(params, self.greedy_list)])
        self.penalty = self.top_k = self.top_p = self.min_p = None
        if any(p.repetition_penalty != 1.0 for p in params):
            self.penalty = column([float32_safe(p.repetition_penalty) for p in params])
        if any(p.top_k is not None and p.top_k < vocab_size for p in params):
            self.top_k = column([min(p.top_k or vocab_size, vocab_size) for p in params], torch.long)
        if any(p.top_p is not None and p.top_p < 1.0 for p in params):
            self.top_p = column([1.0 if p.top_p is None else p.top_p for p in params])
        if any(p.min_p for p in params):
            self.min_p = column([p.min_p or 0.0 for p in params])
        # (row, alternatives) of the rows that ask for log-probabilities; [] costs a step nothing
        self.logprobs = [(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None]


def sample(logits: torch.Tensor, rows: RowSettings, u: torch.Tensor,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row (B,) of ``logits`` (B, V), each row with its own settings and its
    own uniform draw ``u`` (B, 1) (ignored for greedy rows); ``seen`` (B, V bool) marks the
    tokens the repetition penalty applies to."""
    logits = logits.float()
    if rows.penalty is not None:
        logits = apply_repetition_penalty(logits, seen, rows.penalty)
    greedy = logits.argmax(dim=-1) if rows.any_greedy else None
    if rows.all_greedy:
        return greedy
    if rows.temperature is not None:
        logits = apply_temperature(logits, rows.temperature)
    if rows.top_k is not None:
        logits = apply_top_k(logits, rows.top_k)
    if rows.top_p is not None:
        logits = apply_top_p(logits, rows.top_p)
    if rows.min_p is not None:
        logits = apply_min_p(logits, rows.min_p)
    drawn = inverse_cdf(logits.softmax(dim=-1), u)
    return torch.where(rows.greedy, greedy, drawn) if rows.any_greedy else drawn


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with fresh entropy when None (never torch's
    global generator). Draws are made on the CPU whatever the model's device, so a seed
    gives the same draws on any device."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(rows, 1) draws from U[0, 1) on ``device``, drawn where ``generator`` lives (the CPU
    without one): what ``inverse_cdf`` turns into tokens."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(rows, 1, generator=generator, device=where).to(device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V): the first whose cumulative probability
    exceeds ``u`` (B, 1) times the row's total (inverse transform sampling).

    One uniform per row, where torch.multinomial races an exponential draw per token
    (benchmarks/README.md). Tokens of probability 0 (cut by top-k or top-p) are never
    picked: the sum only steps up at a token that has some, and the target stays below
    the total even where ``u * total`` rounds up to it. The clamp keeps a NaN row to a
    valid id rather than an error, as greedy's argmax does."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


# --- detokenization -----------------------------------------------------------------------

class TextStream:
    """Turns one row's generated ids into text pieces that are safe to show as they come.

    Two things are held back: bytes of a character not yet complete (byte-level BPE can
    split a character across tokens; the decode then ends in U+FFFD), and any tail of the
    text that could be the beginning of a stop string, until the match is decided. Each
    step decodes only a window of recent ids: ``ids[prefix:read]`` was already turned into
    text and is decoded again as left context (tokenizers such as SentencePiece render a
    token differently at the start of a string), ``ids[read:]`` is what is new (vLLM's scheme).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 context: Sequence[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []  # the generated ids
        self.text = ""  # everything decoded so far; cut before the stop string once stopped
        self.stopped = False  # a stop string was found
        # ``context`` (the prompt's last id) is decoded as left context only: a word-level
        # tokenizer then puts the space between the prompt and the first new word.
        context = list(context)[-1:]
        if context and tokenizer.decode(context, skip_special_tokens=True).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt that ends inside a character: no usable left context
        self._all = context  # context + ids: what the window offsets index
        self._prefix, self._read = 0, len(context)  # window offsets into _all
        self._sent = 0  # characters of text already handed out

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text that is now certain (maybe "")."""
        self.ids.append(token_id)
        self._all.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The row has ended: return everything still held back (bar a stop match)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        before = decode(self._all[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self._all[self._prefix:], skip_special_tokens=True)
        if len(window) > len(before) and (final or not window.endswith(REPLACEMENT_CHAR)):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(self._all)
        # No match can start before _sent: that text was never a possible stop prefix.
        hits = [i for i in (self.text.find(s, self._sent) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[:min(hits)]
            end = len(self.text)
        else:
            end = len(self.text) - (0 if final else self._possible_stop_start())
        piece, self._sent = self.text[self._sent:end], end
        return piece

    def _possible_stop_start(self) -> int:
        """Length of the longest unsent suffix of the text that begins some stop string."""
        tail, longest = self.text[self._sent:], 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:k]):
                    longest = k
                    break
        return longest
