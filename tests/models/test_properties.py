"""Property tests (hypothesis) for what every request's input reaches: sampling parameters,
the sampler, and every kind of tokenizer.

- ``SamplingParams`` accepts exactly the valid values and raises ValueError for the rest;
- ``sample`` picks an id in range, never a masked one, for any valid parameters on
  random logits;
- every tokenizer kind survives any text (empty, control characters, random Unicode
  without lone surrogates, very long): ``encode`` never raises and its ids are in the
  vocabulary, ``decode`` gives a string back, and byte-level BPE round-trips exactly.

Example counts stay small: the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.serving.schema import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY
from models_src.sampling import RowSettings, SamplingParams, sample, uniforms
from models_src.tokenization import Tokenizer

REPO = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAN, INF = math.nan, math.inf
BIG = 1e6  # large but finite parameters are valid too


# ---- SamplingParams -------------------------------------------------------------------------

def _nullable(strategy):
    return st.one_of(st.none(), strategy)


#: field -> (values it must accept, values it must refuse or None)
FIELDS = {
    "max_new_tokens": (st.integers(0, 10**6),
                       st.one_of(st.integers(max_value=-1), st.sampled_from([NAN, -INF]))),
    "temperature": (st.floats(0, BIG),
                    st.one_of(st.floats(max_value=-1e-300, allow_infinity=True),
                              st.just(NAN))),
    "top_k": (_nullable(st.integers(1, 10**6)),
              st.one_of(st.integers(max_value=0), st.sampled_from([NAN, -INF]))),
    "top_p": (_nullable(st.floats(0, 1, exclude_min=True)),
              st.one_of(st.floats(max_value=0, allow_infinity=True),
                        st.floats(min_value=1, exclude_min=True, allow_infinity=True),
                        st.just(NAN))),
    "repetition_penalty": (st.floats(0, BIG, exclude_min=True),
                           st.one_of(st.floats(max_value=0, allow_infinity=True),
                                     st.just(NAN))),
    "stop": (st.one_of(st.text(min_size=1, max_size=5),
                       st.lists(st.text(min_size=1, max_size=5), max_size=4)),
             st.one_of(st.just(""),
                       st.lists(st.one_of(st.just(""), st.integers(), st.none()), min_size=1,
                                max_size=3))),
    "seed": (_nullable(st.integers(-(2**63), 2**64 - 1)), None),  # any integer will do
}


@st.composite
def sampling_kwargs(draw):
    """Keyword arguments for SamplingParams, each field valid or not; and whether all are."""
    kwargs, all_valid = {}, True
    for name, (valid, invalid) in FIELDS.items():
        if not draw(st.booleans()):
            continue  # left at its default
        bad = invalid is not None and draw(st.booleans())
        kwargs[name] = draw(invalid if bad else valid)
        all_valid = all_valid and not bad
    return kwargs, all_valid


@FAST
@given(sampling_kwargs())
@example(({"top_p": 0.0}, False))
@example(({"temperature": NAN}, False))
@example(({"repetition_penalty": 0.0}, False))
@example(({"max_new_tokens": 0, "temperature": 0.0, "top_p": 1.0}, True))
def test_sampling_params_accept_exactly_the_valid_values(case):
    kwargs, valid = case
    if not valid:
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
        return
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        expected = [value] if name == "stop" and isinstance(value, str) else value
        assert getattr(params, name) == expected


@pytest.mark.parametrize("kwargs", [
    {"temperature": INF},
    {"max_new_tokens": INF},
    {"top_k": INF},
    {"repetition_penalty": INF},  # then sampling raises
    {"max_new_tokens": 1.5},
    {"top_k": 1.5},
    {"top_p": INF},
])
def test_sampling_params_refuse_infinite_and_fractional_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---- sample ----------------------------------------------------------------------------------

def sample_next(logits, params, generator=None, seen=None):
    """``sample`` with one set of settings for every row."""
    rows = RowSettings([params] * logits.size(0), logits.size(-1), logits.device)
    seen = torch.zeros_like(logits, dtype=torch.bool) if seen is None else seen
    return sample(logits, rows, uniforms(logits.size(0), generator, logits.device), seen)


@st.composite
def logits_and_params(draw):
    """Random (B, V) logits, some entries masked to -inf (never a whole row), a random
    'already seen' mask, and any valid parameters."""
    rows, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    values = st.floats(-30, 30, width=32)
    logits = torch.tensor([draw(st.lists(values, min_size=vocab, max_size=vocab))
                           for _ in range(rows)], dtype=torch.float32)
    masked = torch.tensor([draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
                           for _ in range(rows)])
    masked[:, draw(st.integers(0, vocab - 1))] = False  # one token per row stays possible
    logits = logits.masked_fill(masked, -INF)
    seen = None
    if draw(st.booleans()):
        seen = torch.tensor([draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab))
                             for _ in range(rows)])
    params = SamplingParams(
        temperature=draw(st.floats(0, BIG)),
        top_k=draw(FIELDS["top_k"][0]),
        top_p=draw(FIELDS["top_p"][0]),
        # the app's bounds (app/serving/schema.py); far smaller penalties overflow float32
        repetition_penalty=draw(st.floats(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)))
    return logits, params, seen, draw(st.integers(0, 2**32))


@SLOW
@given(logits_and_params())
def test_sample_next_picks_a_possible_id_for_any_valid_params(case):
    logits, params, seen, seed = case
    generator = torch.Generator().manual_seed(seed)
    ids = sample_next(logits, params, generator=generator, seen=seen)
    assert ids.shape == (logits.size(0),) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < logits.size(1))).all()
    assert torch.isfinite(logits.gather(1, ids[:, None])).all()  # never a masked token
    if params.temperature == 0 and seen is None:
        assert torch.equal(ids, logits.argmax(dim=-1))


@pytest.mark.parametrize("kwargs, logits", [
    # found by the test above before its ranges were narrowed: float32 overflowed to NaN
    ({"repetition_penalty": 1e-40}, [30.0, -30.0, 0.0]),
    ({"temperature": 1e300}, [30.0, -INF, 0.0]),
    ({"repetition_penalty": MIN_REPETITION_PENALTY, "temperature": 1e-4}, [30.0, -30.0, 0.0]),
    ({"repetition_penalty": MAX_REPETITION_PENALTY, "temperature": 1e-4}, [30.0, -30.0, 0.0]),
    ({"temperature": 1e300}, [30.0, -30.0, 0.0]),
])
def test_sample_next_at_extreme_parameters(kwargs, logits):
    ids = sample_next(torch.tensor([logits]), SamplingParams(**kwargs),
                      seen=torch.ones(1, len(logits), dtype=torch.bool))
    assert 0 <= int(ids[0]) < len(logits)


# ---- tokenizers -----------------------------------------------------------------------------

WORDS = ("once upon a time there was little girl named Lily she liked to play outside "
         "the dog ran fast and happy sun café naïve Ελληνικά 日本語 🦊").split()


def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 15))) + rng.choice(".!?\n")
            for _ in range(300)]


def gpt2_tokenizer() -> Tokenizer:
    gpt2 = Path(os.environ.get("FABLE_DATA_DIR", REPO.parent / "shared" / "data")) / "gpt2"
    vocab, merges = gpt2 / "vocab.json", gpt2 / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"GPT-2 vocab.json/merges.txt not found under {gpt2}")
    return Tokenizer.from_gpt2_files(vocab, merges)


BUILDERS = {
    "char": lambda: Tokenizer.train_char(corpus()),
    "word": lambda: Tokenizer.train_word(corpus()),
    "bpe": lambda: Tokenizer.train_bpe(corpus(), vocab_size=400),
    "gpt2": gpt2_tokenizer,
}
BYTE_LEVEL = ("bpe", "gpt2")  # every byte is in the vocabulary: text round-trips exactly


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request) -> Tokenizer:
    return BUILDERS[request.param]()


CONTROL = st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Co"])
texts = st.one_of(
    st.text(max_size=300),  # any Unicode but lone surrogates, which UTF-8 cannot encode
    st.text(alphabet=CONTROL, max_size=100),  # NUL, escapes, BOM, ZWJ, bidi marks, ...
    st.text(max_size=8).map(lambda s: s * 5000),  # very long (up to 40,000 characters)
)
LONG_STORY = "Once upon a time, Lily found a ball. " * 2000


@SLOW
@given(texts)
@example("")
@example("\x00\x01\x1b[31m\x7f\u200b\ufeff\u202e\r\n\t")
@example(LONG_STORY)
@example("<eos><pad><bos>")  # special tokens typed as text
def test_any_text_encodes_into_the_vocabulary(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert isinstance(tokenizer.decode(ids), str)
    if tokenizer.kind in BYTE_LEVEL:
        assert tokenizer.decode(ids) == text
    if not text:
        assert ids == []
