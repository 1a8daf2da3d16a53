"""Sampling and offline generation tests against a tiny fake model and a byte-level fake tokenizer.

The fake model obeys the `LanguageModel` contract strictly: its state is each row's
token history, padding never enters it, padded positions get NaN logits (so reading the
wrong position breaks sampling), and it refuses to hold more than `max_context` tokens.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models_src.base import LanguageModel
from models_src.config import ModelConfig
from models_src.generation import generate, stream
from models_src.sampling import (
    Completion,
    RowSettings,
    SamplingParams,
    TextStream,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    inverse_cdf,
    sample,
    uniforms,
)

BOS, EOS, PAD = 256, 257, 258
# two multi-byte tokens that straddle characters: the end of "é" with "l", and the
# first and last halves of the 4-byte "🙂" (f0 9f 99 82)
STRADDLE = {259: b"\xa9l", 260: b"\xf0\x9f", 261: b"\x99\x82"}
VOCAB = 262


class ByteTokenizer:
    """ids 0..255 are bytes; a few multi-byte pieces; bos/eos/pad specials."""

    bos_id, eos_id, pad_id = BOS, EOS, PAD
    special_ids = {BOS, EOS, PAD}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(bytes([i]) if i < 256 else STRADDLE.get(i, b"") for i in ids)
        return data.decode("utf-8", errors="replace")


TOK = ByteTokenizer()


class Histories(list):
    """The fake model's state: each row's token history."""

    def select(self, rows):
        return Histories(self[i] for i in rows.tolist())

    def append(self, other):
        return Histories([*self, *other])


def pick(logits, params, generator=None, seen=None):
    """``sample`` with one set of settings for every row."""
    rows = RowSettings([params] * logits.size(0), logits.size(-1), logits.device)
    seen = torch.zeros_like(logits, dtype=torch.bool) if seen is None else seen
    return sample(logits, rows, uniforms(logits.size(0), generator, logits.device), seen)


class FakeLM(LanguageModel):
    """Deterministic contract-abiding model.

    Without a script, the logits are a fixed random row chosen by (last token, number of
    tokens held), so results depend on the state being exactly right. With a script
    (a list of ids), the model continues the longest prefix of the script that the
    history ends with, then emits eos: a way to force exact outputs.
    """

    def __init__(self, max_context: int | None = None, script: list[int] | None = None) -> None:
        super().__init__(ModelConfig(arch="gru", vocab_size=VOCAB))
        g = torch.Generator().manual_seed(0)
        table = torch.randn(VOCAB, VOCAB, generator=g) * 3
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.max_context, self.script = max_context, script
        self.prefills: list[list[int]] = []  # per init_state: the real lengths of the first step

    def init_state(self, batch_size):
        return Histories([] for _ in range(batch_size))

    def step(self, tokens, state, lengths=None):
        assert torch.is_inference_mode_enabled()
        B, T = tokens.shape
        lengths = [T] * B if lengths is None else lengths.tolist()
        if all(not h for h in state):
            self.prefills.append(lengths)
        logits = torch.full((B, T, VOCAB), float("nan"))
        for b in range(B):
            for t in range(lengths[b]):
                state[b].append(int(tokens[b, t]))
                if self.max_context is not None and len(state[b]) > self.max_context:
                    raise ValueError("state overflow")
                logits[b, t] = self._next_logits(state[b])
        return logits, state

    def _next_logits(self, history):
        if self.script is None:
            return self.table[(history[-1] * 7 + len(history)) % VOCAB]
        s = self.script
        m = next(k for k in range(min(len(s), len(history)), -1, -1)
                 if k == 0 or history[-k:] == s[:k])
        logits = torch.ones(VOCAB)
        logits[s[m] if m < len(s) else EOS] = 100.0
        return logits


def scripted(text: str | list[int], **kw) -> FakeLM:
    return FakeLM(script=TOK.encode(text) if isinstance(text, str) else text, **kw)


def streamed(model, prompt="", **params) -> tuple[list[str], Completion]:
    s = stream(model, TOK, prompt, SamplingParams(**params))
    pieces = list(s)
    return pieces, s.completion


GREEDY = dict(temperature=0.0)


# --- logit processing -------------------------------------------------------------------

def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_steers_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, -1.0], [-0.5, -1.0, -2.0]])
    seen = torch.tensor([[True, False, False], [True, False, False]])
    params = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    # row 0: 3 -> 1 < 2; row 1: -0.5 -> -1.5 < -1 (dividing would give -0.17 and keep token 0)
    assert pick(logits, params, seen=seen).tolist() == [1, 1]


def test_top_k_keeps_exactly_k_highest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    kept = torch.isfinite(apply_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.equal(apply_top_k(logits, 10), logits)


@pytest.mark.parametrize("p, expected", [
    (0.4, [True, False, False, False]),
    (0.7, [True, True, False, False]),
    (0.85, [True, True, True, False]),
    (0.99, [True, True, True, True]),
    (1.0, [True, True, True, True]),
])
def test_top_p_keeps_smallest_nucleus(p, expected):
    probs = torch.tensor([[0.3, 0.5, 0.05, 0.15]])
    kept = torch.isfinite(apply_top_p(probs.log(), p))[0].tolist()
    order = [1, 0, 3, 2]  # tokens by falling probability
    assert [kept[i] for i in order] == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.0, 1.0, exclude_min=True),
)
def test_top_p_properties(values, p):
    logits = torch.tensor([values])
    probs = logits.softmax(-1)[0]
    kept = torch.isfinite(apply_top_p(logits, p))[0]
    assert kept.any()
    assert logits[0][kept].max() == logits.max()  # a top token (any one of a tie) is kept
    mass = probs[kept].sum().item()
    assert mass >= p - 1e-5
    # minimal: dropping the least likely kept token falls below p
    assert mass - probs[kept].min().item() < p + 1e-5
    # a nucleus: everything kept is at least as likely as anything dropped
    if not kept.all():
        assert probs[kept].min() >= probs[~kept].max()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.0, 1.0),
)
def test_min_p_keeps_the_tokens_at_least_m_times_as_likely_as_the_top(values, m):
    logits = torch.tensor([values])
    probs = logits.softmax(-1)[0].double()
    kept = torch.isfinite(apply_min_p(logits, m))[0]
    assert kept[logits[0].argmax()]  # the top token always stays
    ratio = probs / probs.max()
    assert (ratio[kept] >= m * (1 - 1e-5)).all() and (ratio[~kept] < m * (1 + 1e-5)).all()


def test_min_p_is_per_row_and_zero_keeps_everything():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(3, 1)
    m = torch.tensor([[0.0], [0.5], [0.2]])
    assert torch.isfinite(apply_min_p(logits, m)).tolist() == [
        [True, True, True, True], [True, True, False, False], [True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    picked = pick(logits[:1].repeat(400, 1), SamplingParams(min_p=0.5), g)
    assert set(picked.tolist()) == {0, 1}


def test_sampling_never_picks_filtered_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    picked = set(pick(logits, SamplingParams(top_k=2), g).tolist())
    assert picked == {3, 4}


def test_sampling_follows_the_distribution():
    # 40,000 draws over 6 tokens: each frequency within 5 standard errors of its probability
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.1, 0.025])
    logits = probs.clamp_min(1e-30).log().repeat(40_000, 1)
    logits[:, 3] = float("-inf")
    picked = pick(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(picked, minlength=6).double() / len(picked)
    se = (probs.double() * (1 - probs.double()) / len(picked)).sqrt()
    assert freq[3] == 0 and ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([[0.0], [0.49], [0.5], [1 - 2**-24]])  # the largest float32 below 1
    assert inverse_cdf(probs, u).tolist() == [1, 1, 3, 3]  # never a token of probability 0
    assert inverse_cdf(torch.full((1, 3), float("nan")), u[:1]).item() in (0, 1, 2)  # an id, not an error


# --- parameters -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stop=["ok", ""]), "stop"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="END").stop == ["END"]


def test_prompt_arguments_are_checked():
    model = FakeLM()
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, TOK)
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, TOK, "a", prompt_ids=[[BOS]])
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, TOK, prompt_ids=[[]])


# --- the loop ---------------------------------------------------------------------------

def test_greedy_is_deterministic_and_ignores_seed():
    model = FakeLM()
    runs = [generate(model, TOK, "abc", SamplingParams(max_new_tokens=20, seed=s, **GREEDY))[0]
            for s in (1, 2, None)]
    assert runs[0] == runs[1] == runs[2]
    # greedy really is argmax of the model's own next-token logits
    history = [BOS, *b"abc"]
    for token in runs[0].token_ids:
        assert token == int(model._next_logits(history).argmax())
        history.append(token)


def test_seed_reproduces_and_different_seeds_differ():
    model = FakeLM()
    params = dict(max_new_tokens=30, temperature=1.0, top_k=50)
    a = generate(model, TOK, ["x", "yy"], SamplingParams(seed=7, **params))
    b = generate(model, TOK, ["x", "yy"], SamplingParams(seed=7, **params))
    c = generate(model, TOK, ["x", "yy"], SamplingParams(seed=8, **params))
    assert a == b
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_rows_of_a_seeded_batch_are_seeded_one_after_another():
    """Row i gets seed + i: its text is what it gives alone with that seed, whatever runs
    beside it."""
    model = FakeLM()
    prompts = ["x", "yy", "x"]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5)
    together = generate(model, TOK, prompts, params)
    alone = [generate(model, TOK, p, dataclasses.replace(params, seed=5 + i))[0]
             for i, p in enumerate(prompts)]
    assert together == alone
    assert together[0].token_ids != together[2].token_ids  # the same prompt, another seed


def test_stream_concatenation_equals_generate_text():
    model = FakeLM()
    params = dict(max_new_tokens=60, temperature=1.0, seed=3)
    pieces, done = streamed(model, "hi", **params)
    full = generate(model, TOK, "hi", SamplingParams(**params))[0]
    assert "".join(pieces) == done.text == full.text
    assert done == full
    # without stop strings the text is just the decode of the generated ids
    assert full.text == TOK.decode(full.token_ids)


def test_eos_ends_row_with_stop():
    out = generate(scripted("ok"), TOK, "", SamplingParams(**GREEDY))[0]
    assert out == Completion("ok", list(b"ok"), "stop", prompt_tokens=1, completion_tokens=3)


def test_ignore_eos_runs_to_the_length_limit():
    out = generate(scripted("ok"), TOK, "", SamplingParams(max_new_tokens=5, ignore_eos=True,
                                                           **GREEDY))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.text.startswith("ok")


def test_length_limit():
    out = generate(FakeLM(), TOK, "abc", SamplingParams(max_new_tokens=7, **GREEDY))[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == out.completion_tokens == 7
    assert out.prompt_tokens == 4


def test_max_new_tokens_zero():
    model = FakeLM()
    outs = generate(model, TOK, ["", "abc"], SamplingParams(max_new_tokens=0))
    assert [(o.text, o.token_ids, o.finish_reason, o.completion_tokens) for o in outs] == \
        [("", [], "length", 0)] * 2
    assert [o.prompt_tokens for o in outs] == [1, 4]
    assert model.prefills == []  # the model is not even run
    pieces, done = streamed(model, "abc", max_new_tokens=0)
    assert pieces == [] and done.text == ""


def test_empty_batch():
    assert generate(FakeLM(), TOK, []) == []


def test_prompt_ids_are_used_as_given():
    model = FakeLM()
    ids = [BOS, *b"first", PAD, *b"last"]
    params = SamplingParams(max_new_tokens=5, **GREEDY)
    by_ids = generate(model, TOK, prompt_ids=[ids], params=params)
    assert by_ids[0].prompt_tokens == len(ids)
    s = stream(model, TOK, prompt_ids=ids, params=params)
    assert "".join(s) == by_ids[0].text and s.completion == by_ids[0]


def test_batched_prompts_match_running_alone():
    model = FakeLM()
    prompts = ["", "a", "hello there", "xyz"]
    params = SamplingParams(max_new_tokens=25, **GREEDY)
    batched = generate(model, TOK, prompts, params)
    assert model.prefills[-1] == [1, 2, 12, 4]  # uneven rows are prefilled with lengths
    alone = [generate(model, TOK, p, params)[0] for p in prompts]
    assert batched == alone


def test_rows_finish_independently():
    # a prompt that already holds the script's start continues from there
    model = scripted("stop here")
    params = SamplingParams(max_new_tokens=30, **GREEDY, stop=["here"])
    outs = generate(model, TOK, ["", "st"], params)
    assert outs[0].text == "stop " and outs[0].finish_reason == "stop"
    assert outs[1].text == "op " and outs[1].finish_reason == "stop"
    assert outs == [generate(model, TOK, p, params)[0] for p in ["", "st"]]


def test_reprime_when_context_is_full():
    model = FakeLM(max_context=8)  # the fake raises if a row ever holds more than 8 tokens
    outs = generate(model, TOK, ["abcdefghijkl", "ab"], SamplingParams(max_new_tokens=40, **GREEDY))
    assert [len(o.token_ids) for o in outs] == [40, 40]
    assert all(o.finish_reason == "length" for o in outs)
    # prompts longer than the context keep their tail; a full row re-primes alone with
    # the last max_context // 2 tokens
    assert model.prefills[0] == [8, 3]
    assert len(model.prefills) > 5 and all(p in ([4], [4, 4]) for p in model.prefills[1:])


def test_reprime_continues_the_text():
    # The script model continues whatever script prefix the history ends with, so after
    # re-priming with the last 4 tokens it must carry on exactly where it was.
    model = FakeLM(max_context=8, script=TOK.encode("abcd" * 50))
    out = generate(model, TOK, "", SamplingParams(max_new_tokens=100, **GREEDY))[0]
    assert out.text == "abcd" * 25 and out.finish_reason == "length"
    assert len(model.prefills) > 10


def test_repetition_penalty_in_the_loop():
    # The script wants "aaaa"; every other token has logit 1. A strong penalty pushes "a"
    # (seen in the prompt) below 1, then each generated token below the next unseen one.
    model = scripted("aaaaaaaa")
    plain = generate(model, TOK, "", SamplingParams(max_new_tokens=4, **GREEDY))[0]
    assert plain.text == "aaaa"
    params = SamplingParams(max_new_tokens=4, repetition_penalty=1e6, **GREEDY)
    assert generate(model, TOK, "a", params)[0].token_ids == [0, 1, 2, 3]


# --- stop strings and streaming ---------------------------------------------------------

def test_stop_string_spanning_tokens_is_cut_and_never_streamed():
    # "EN" first appears as a false alarm (held back, then released), then as part of "END"
    model = scripted("one EN two END three")
    pieces, done = streamed(model, stop=["END"], max_new_tokens=50, **GREEDY)
    assert done.text == "one EN two " and done.finish_reason == "stop"
    assert "".join(pieces) == done.text
    out = generate(model, TOK, "", SamplingParams(stop=["END"], max_new_tokens=50, **GREEDY))[0]
    assert out.text == done.text
    # the tokens that spelled the stop string were generated, the text is cut before them
    assert TOK.decode(out.token_ids) == "one EN two END"


def test_earliest_of_several_stop_strings_wins():
    pieces, done = streamed(scripted("one EN two END three"), stop=["two", " EN "], **GREEDY)
    assert done.text == "one" and "".join(pieces) == "one"


def test_held_back_stop_prefix_is_flushed_at_length():
    pieces, done = streamed(scripted("abc EN"), stop=["END"], max_new_tokens=6, **GREEDY)
    assert done.finish_reason == "length"
    assert "".join(pieces) == done.text == "abc EN"


def test_held_back_stop_prefix_is_flushed_at_eos():
    pieces, done = streamed(scripted("abc EN"), stop=["END"], **GREEDY)
    assert done.finish_reason == "stop"
    assert "".join(pieces) == done.text == "abc EN"


def test_stream_never_yields_partial_characters():
    text = "héllo 🙂 ok"
    for script in (TOK.encode(text),  # one byte per token
                   [*b"h\xc3", 259, *b"lo ", 260, 261, *b" ok"]):  # tokens straddling characters
        pieces, done = streamed(scripted(script), **GREEDY)
        assert done.text == text == "".join(pieces)
        assert all("\ufffd" not in p for p in pieces)
        assert len(pieces) > 1  # it really streamed


def test_stop_string_with_multibyte_characters():
    pieces, done = streamed(scripted("café 🙂 fin"), stop=["é 🙂"], **GREEDY)
    assert done.text == "caf" == "".join(pieces)


def test_text_stream_holds_back_only_what_could_be_a_stop():
    s = TextStream(TOK, stop=["<end>"])
    out = [s.push(i) for i in TOK.encode("a<b<e")]
    assert out == ["a", "", "<b", "", ""]  # "<" and "<e" are held back
    assert s.push(ord("x")) == "<ex"
    assert [s.push(i) for i in TOK.encode("<end>tail")] == [""] * 9
    assert s.stopped and s.text == "a<b<ex"
    assert s.flush() == ""


def test_invalid_bytes_are_flushed_at_the_end():
    # a lone lead byte can never complete: it is held, then shown as U+FFFD at the end
    s = TextStream(TOK)
    assert s.push(ord("a")) == "a"
    assert s.push(0xE2) == ""
    assert s.flush() == "\ufffd"
    assert s.text == TOK.decode(s.ids)


def test_a_vanishing_temperature_is_greedy_not_an_overflow():
    model = FakeLM()
    greedy = generate(model, TOK, "abc", SamplingParams(max_new_tokens=6, temperature=0))[0]
    tiny = generate(model, TOK, "abc", SamplingParams(max_new_tokens=6, temperature=1e-300, seed=1))[0]
    assert tiny.token_ids == greedy.token_ids


def test_a_word_level_continuation_starts_with_its_space():
    from models_src.tokenization import Tokenizer

    words = Tokenizer.train_word(["the cat sat on the mat"])
    stream = TextStream(words, context=words.encode("the cat"))
    assert stream.push(words.encode("sat")[0]) + stream.flush() == " sat"
    assert stream.ids == words.encode("sat")
    fresh = TextStream(words, context=[words.bos_id])  # nothing before: no space
    assert fresh.push(words.encode("sat")[0]) + fresh.flush() == "sat"
