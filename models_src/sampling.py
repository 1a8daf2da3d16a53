"""One sampling loop for every architecture.

Generation needs nothing but the contract of :class:`models_src.base.LanguageModel`:
one ``prefill`` of the prompts (a fresh state fed them in one batched step), then one
``step`` of a single token per row for every new token. So an RNN, a GPT with a
key/value cache and the encoder-decoder all share this code.

The logit processors are small pure functions on (B, V) tensors, applied in the order
Hugging Face uses: repetition penalty, temperature, top-k, top-p. The only host sync
per step is one ``tolist()`` of the sampled tokens, which detokenization needs anyway.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

GREEDY_BELOW = 1e-4  # dividing float32 logits by a smaller temperature overflows to inf
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for bytes that are not (yet) a character


class Tokenizer(Protocol):
    """What sampling needs from a tokenizer (duck-typed; see ``models_src.tokenization``)."""
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class SamplingParams:
    """How each next token is picked, and when a completion ends."""
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 (or below 1e-4, which float32 logits cannot honour) is greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already seen
    stop: list[str] = field(default_factory=list)  # the text is cut before the first match
    seed: int | None = None  # None: fresh entropy each call
    ignore_eos: bool = False  # keep going past eos (benchmarks that need exact lengths)

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
        if not math.isfinite(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, "
                             f"got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SAFE_FACTOR_MIN, SAFE_FACTOR_MAX = 1e-30, 1e30


def float32_safe(factor: float) -> float:
    """A temperature or penalty clamped to [1e-30, 1e30]: dividing float32 logits (at most
    ~1e2) by it stays finite, and -inf logits stay -inf (never inf / inf = NaN)."""
    return min(max(factor, SAFE_FACTOR_MIN), SAFE_FACTOR_MAX)


@dataclass
class Completion:
    text: str  # cut before a stop string; never contains eos
    token_ids: list[int]  # generated ids without eos (a matched stop string's tokens included)
    finish_reason: str  # "stop" (eos or stop string) or "length" (max_new_tokens)
    prompt_tokens: int  # ids in the prompt, bos included
    completion_tokens: int  # tokens the model generated for this row, eos included


# --- logit processing: pure functions on (B, V) float logits -----------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """Make every token in ``seen`` (B, V bool) less likely by ``penalty`` (CTRL, Keskar 2019).

    A positive logit is divided and a negative one multiplied: both move towards lower
    probability. Dividing a negative logit would *raise* it (Hugging Face issue #2302).
    """
    if penalty == 1.0:
        return logits
    return penalise(logits, seen, float32_safe(penalty))


def penalise(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """The penalty's sign rule; ``penalty`` a float or a (B, 1) tensor (one per row)."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sharpen (< 1) or flatten (> 1) the distribution; 0 is handled as greedy by the caller."""
    return logits if temperature == 1.0 else logits / float32_safe(temperature)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits of each row (more when several tie with the k-th)."""
    if k >= logits.size(-1):
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman 2019): keep the smallest set of most likely tokens whose
    probability is at least p. A token is dropped when the tokens ranked above it already
    reach p, so the top token (nothing above it) is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop_sorted = outside_nucleus(sorted_logits, p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def outside_nucleus(sorted_logits: torch.Tensor, p) -> torch.Tensor:
    """Which of the descending ``sorted_logits`` top-p drops; ``p`` a float or (B, 1)."""
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p
    drop[..., 0] = False  # explicit: a p below float32 resolution would compare equal to 0
    return drop


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with fresh entropy when None (never torch's
    global generator). Sampling draws one uniform per row per step, so they are made on
    the CPU whatever the model's device: a seed gives the same draws on any device, and a
    server's rows can fetch theirs in chunks without a device sync per row
    (``batching.Sequence.uniform``)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Pick one token per row from logits (B, V); return (B,) ids on the logits' device."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p is not None:
        logits = apply_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return inverse_cdf(probs, uniforms(probs.size(0), generator, probs.device))


def uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(rows, 1) draws from U[0, 1) on ``device``: what ``inverse_cdf`` turns into tokens.
    They are drawn where ``generator`` lives (the CPU without one, and for
    ``make_generator``'s). A row sampled alone draws one, so a seed gives the same tokens
    whatever batch runs it."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(rows, 1, generator=generator, device=where).to(device)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V): the first whose cumulative probability
    exceeds ``u`` (B, 1) times the row's total (inverse transform sampling).

    One uniform per row: torch.multinomial (and HF's sampling through it) races an
    exponential draw per token, ~32 ns each, 1 ms of a batch-8 step over 4,096 tokens, 88 %
    of the sampling time (torch.profiler; benchmarks/README.md). Tokens of probability 0
    (cut by top-k or top-p) are never picked: the sum only steps up at a token that has
    some, and the target stays below the total even where ``u * total`` rounds up to it.
    The clamp keeps a NaN row to a valid id rather than an error, as greedy's argmax always
    did."""
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


# --- the loop -----------------------------------------------------------------------------

def _prefill(model, rows: list[list[int]], keep: int | None):
    """A fresh state fed each row cut to ``keep`` positions by ``model.context_ids``
    (whole when None). Returns (state, logits after each row's last id (B, V), the
    positions each row's state holds)."""
    rows = [model.context_ids(r, keep) for r in rows] if keep is not None else rows
    logits, state = model.prefill(rows)
    return state, logits, [model.context_length(r) for r in rows]


def _accept(text: TextStream, token: int, eos_id: int | None,
            limit: int) -> tuple[str, str | None]:
    """Give one sampled token to a row; return its new text and finish reason (None: goes on)."""
    if token == eos_id:
        return text.flush(), "stop"
    piece = text.push(token)
    if not text.stopped and len(text.ids) == limit:
        piece += text.flush()
    return piece, "stop" if text.stopped else "length" if len(text.ids) == limit else None


def _steps(model, tokenizer: Tokenizer, prompt_ids: list[list[int]],
           params: SamplingParams) -> Generator[list[str], None, list[Completion]]:
    """The core loop: yields each step's new text per row, returns the completions.

    Finished rows are still fed (their sampled token) so the batch keeps its shape, but
    their output is ignored; the loop ends when every row has finished.
    """
    B, ctx, limit = len(prompt_ids), model.max_context, params.max_new_tokens
    streams = [TextStream(tokenizer, params.stop, context=p) for p in prompt_ids]
    eos_id = None if params.ignore_eos else tokenizer.eos_id
    reasons: list[str | None] = [None] * B
    generated = [0] * B  # tokens sampled per row, eos included

    def completions() -> list[Completion]:
        return [Completion(s.text, s.ids, reason or "length", len(p), n)
                for s, reason, p, n in zip(streams, reasons, prompt_ids, generated)]

    if not B or not limit:
        return completions()
    device = model.device
    generator = make_generator(params.seed)
    with torch.inference_mode():
        state, logits, held = _prefill(model, prompt_ids, ctx)
        filled = max(held)  # positions the fullest row's state holds
        seen = None  # (B, V) tokens in the prompt or generated: only the penalty needs it
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, logits.size(-1), dtype=torch.bool, device=device)
            for row, ids in enumerate(prompt_ids):
                seen[row, ids] = True
    for _ in range(limit):
        with torch.inference_mode():
            tokens = sample_next(logits, params, generator, seen)
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
        pieces = [""] * B
        for row, token in enumerate(tokens.tolist()):  # the one host sync per step
            if reasons[row] is None:
                generated[row] += 1
                pieces[row], reasons[row] = _accept(streams[row], token, eos_id, limit)
        yield pieces
        if all(reasons):
            break
        with torch.inference_mode():
            if ctx is not None and filled + 1 > ctx:
                # Re-prime: restart from the last half-context of every row, so the next
                # overflow is ctx // 2 tokens away (constant amortised cost per token).
                history = [p + s.ids for p, s in zip(prompt_ids, streams)]
                state, logits, held = _prefill(model, history, max(1, ctx // 2))
                filled = max(held)
            else:
                logits, state = model.step(tokens[:, None], state)
                logits, filled = logits[:, -1], filled + 1
    return completions()


def _resolve_prompts(tokenizer, prompts, prompt_ids) -> list[list[int]]:
    if (prompts is None) == (prompt_ids is None):
        raise ValueError("pass exactly one of prompts (text) or prompt_ids (token ids)")
    if prompt_ids is not None:
        rows = [list(r) for r in prompt_ids]
        if any(not r for r in rows):
            raise ValueError("every row of prompt_ids needs at least one token (e.g. bos)")
        return rows
    if isinstance(prompts, str):
        prompts = [prompts]
    return [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]


def generate(model, tokenizer: Tokenizer, prompts: str | list[str] | None = None,
             params: SamplingParams | None = None, *,
             prompt_ids: list[list[int]] | None = None) -> list[Completion]:
    """Complete each prompt; one Completion per prompt, in order.

    Text prompts become ``[bos] + encode(prompt)`` (an empty prompt starts from bos);
    ``prompt_ids`` are used exactly as given (e.g. an infilling ``first <blank> last <sep>``).
    With sampling, a seed reproduces a whole batch; a row's text may depend on its batch.
    """
    steps = _steps(model, tokenizer, _resolve_prompts(tokenizer, prompts, prompt_ids),
                   params or SamplingParams())
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


class Stream:
    """Iterator over the text pieces of one completion; ``completion`` is set at its end.

    The pieces concatenate to exactly ``completion.text``: no partial character and no
    part of a stop string is ever yielded.
    """

    def __init__(self, steps: Generator[list[str], None, list[Completion]]) -> None:
        self.completion: Completion | None = None
        self._pieces = self._run(steps)

    def _run(self, steps) -> Iterator[str]:
        while True:
            try:
                piece = next(steps)[0]
            except StopIteration as end:
                self.completion = end.value[0]
                return
            if piece:
                yield piece

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)


def stream(model, tokenizer: Tokenizer, prompt: str | None = None,
           params: SamplingParams | None = None, *, prompt_ids: list[int] | None = None) -> Stream:
    """Like ``generate`` for one prompt, yielding text as soon as it is certain."""
    rows = _resolve_prompts(tokenizer, prompt, None if prompt_ids is None else [prompt_ids])
    return Stream(_steps(model, tokenizer, rows, params or SamplingParams()))
