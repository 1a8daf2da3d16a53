"""Tests for models_src.tokenization: round trips, special tokens, save/load, HF interop."""

from __future__ import annotations

import json
import random
import os
from pathlib import Path

import pytest
import tokenizers
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from models_src.tokenization import (
    KINDS,
    SPECIAL_TOKENS,
    Tokenizer,
    basic_english,
    build_tokenizer,
)

REPO = Path(__file__).resolve().parents[2]

CORPUS = [
    "Once upon a time, a little fox found a red ball.",
    "The fox said: \"Can I play?\" The bear said yes!",
    "They played (all day) in the park; then they went home.",
    "Tabs\tand\nnewlines\r\nstay. Café, naïve, Ελληνικά, 日本語, emoji 🦊🏳️‍🌈.",
    "It's a dog's life<br />for the old dog.",
]
EXOTIC = "a\u0301 \x00\x1c\u200d\U0010fffd 🦊🏳️‍🌈 \r\n\t end"  # combining mark, controls, ZWJ
HYPO = settings(max_examples=60, deadline=None)

# Pieces that `basic_english`'s rules act on, mixed with letters, so every rule fires often.
RULE_PIECES = list("aAbZ ΣσΑ'\".,()!?;:<>/\n\t\x1c\x85\u3000\u0301İ") + ["<br />", "<BR />"]
rule_heavy_text = st.lists(st.sampled_from(RULE_PIECES), max_size=30).map("".join)
# Leave out code points unassigned in Python's Unicode database: the tokenizers library
# (Rust) may know a newer Unicode with case mappings for them that str.lower() lacks.
assigned_text = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn")), max_size=40)


def data_dir() -> Path:
    """Shared read-only data: $FABLE_DATA_DIR, else <repo>/../shared/data."""
    return Path(os.environ.get("FABLE_DATA_DIR", REPO.parent / "shared" / "data"))


def gpt2_files() -> tuple[Path, Path]:
    gpt2 = data_dir() / "gpt2"
    vocab, merges = gpt2 / "vocab.json", gpt2 / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"GPT-2 vocab.json/merges.txt not found under {gpt2}")
    return vocab, merges


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train_char(CORPUS)


@pytest.fixture(scope="module")
def word_tok() -> Tokenizer:
    return Tokenizer.train_word(CORPUS)


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return Tokenizer.train_bpe(CORPUS * 3, vocab_size=320)


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return Tokenizer.from_gpt2_files(*gpt2_files())


@pytest.fixture(params=["char", "word", "bpe", "gpt2"])
def any_tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


def hf_dir_from(tok: Tokenizer, directory: Path) -> Path:
    """Save ``tok``'s backend the way transformers users do (a plain HF tokenizer dir)."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())  # don't mutate the fixture
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>").save_pretrained(directory)
    return directory


# ---- char ---------------------------------------------------------------------------------


@HYPO
@given(st.data())
def test_char_round_trips_text_over_its_alphabet(char_tok: Tokenizer, data: st.DataObject) -> None:
    alphabet = sorted(set("".join(CORPUS)))
    text = data.draw(st.text(alphabet=st.sampled_from(alphabet)))
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert char_tok.unk_id not in ids
    assert char_tok.decode(ids) == text


@HYPO
@given(st.text())
@example(EXOTIC)
@example("")
def test_char_fitted_on_any_text_round_trips_it(text: str) -> None:
    tok = Tokenizer.train_char([text])
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) == len(text)


def test_char_unseen_characters_are_unk(char_tok: Tokenizer) -> None:
    ids = char_tok.encode("fox\u2603Q")  # snowman and capital Q never occur in CORPUS
    assert ids[:3] == [char_tok.token_to_id(c) for c in "fox"]
    assert ids[3:] == [char_tok.unk_id, char_tok.unk_id]


def test_char_vocabulary_is_specials_then_sorted_characters() -> None:
    tok = Tokenizer.train_char(["ba\n", "c😀a"])
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == [
        *SPECIAL_TOKENS.values(), "\n", "a", "b", "c", "😀"
    ]


# ---- word ---------------------------------------------------------------------------------


def test_basic_english_matches_torchtext() -> None:
    assert basic_english("Hello, World! It's (really) \"fine\"; ok: yes?<br />No.") == [
        "hello", ",", "world", "!", "it", "'", "s", "(", "really", ")", "fine", "ok", "yes",
        "?", "no", ".",
    ]


@HYPO
@given(st.one_of(rule_heavy_text, assigned_text))
@example("ΑΣ ΟΔΟΣ'Σ σΣ")  # word-final capital sigma lower-cases to "ς"
@example("İstanbul\x1ca\u2028b\x85c")  # "İ" lower-cases to two code points; Python-only spaces
def test_word_pipeline_reproduces_basic_english(text: str) -> None:
    expected = basic_english(text)
    assume(not set(expected) & set(SPECIAL_TOKENS.values()))  # those are escaped, see below
    tok = Tokenizer.train_word([text])
    ids = tok.encode(text)
    assert [tok.id_to_token(i) for i in ids] == expected
    assert tok.encode(tok.decode(ids)) == ids  # the prose reads back as the same words


def test_word_min_freq_makes_rare_words_unk() -> None:
    tok = Tokenizer.train_word(["the cat and the dog and the bird"], min_freq=2)
    assert tok.token_to_id("cat") is None
    assert tok.encode("The cat and") == [tok.token_to_id("the"), tok.unk_id, tok.token_to_id("and")]
    assert tok.decode(tok.encode("The cat and")) == "the and"
    assert tok.decode(tok.encode("The cat and"), skip_special_tokens=False) == "the <unk> and"


def test_word_vocabulary_is_by_frequency_then_alphabetical_and_capped() -> None:
    tok = Tokenizer.train_word(["b a a c c b d a"], max_size=len(SPECIAL_TOKENS) + 3)
    words = [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS), tok.vocab_size)]
    assert words == ["a", "b", "c"]  # a:3, then b:2 and c:2 alphabetically; d dropped by max_size


def test_word_special_strings_in_the_corpus_do_not_break_the_vocabulary() -> None:
    tok = Tokenizer.train_word(["a <unk> <eos> b <UNK>"])
    ids = sorted(tok.backend.get_vocab().values())
    assert ids == list(range(tok.vocab_size))  # no duplicate token, no hole
    assert tok.encode("a <eos> b") == [tok.token_to_id("a"), tok.unk_id, tok.token_to_id("b")]


# ---- bpe and gpt2 ------------------------------------------------------------------------


@HYPO
@given(st.text())
@example(EXOTIC)
@example("")
@example("<eos><blank> <|endoftext|>")
def test_bpe_round_trips_any_text(bpe_tok: Tokenizer, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_gpt2_ids_match_openai(gpt2_tok: Tokenizer) -> None:
    assert gpt2_tok.encode("Hello world!") == [15496, 995, 0]
    assert gpt2_tok.bos_id == gpt2_tok.eos_id == 50256
    assert gpt2_tok.unk_id is None
    assert [gpt2_tok.pad_id, gpt2_tok.blank_id, gpt2_tok.sep_id] == [50257, 50258, 50259]
    assert gpt2_tok.vocab_size == len(gpt2_tok) == 50260


@HYPO
@given(st.text())
@example(EXOTIC)
def test_gpt2_round_trips_any_text(gpt2_tok: Tokenizer, text: str) -> None:
    assert gpt2_tok.decode(gpt2_tok.encode(text)) == text


# ---- special tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("make", [Tokenizer.train_char, Tokenizer.train_word, Tokenizer.train_bpe])
def test_trained_kinds_put_specials_first(make) -> None:
    tok = make(CORPUS, vocab_size=300) if make == Tokenizer.train_bpe else make(CORPUS)
    ids = [tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.blank_id, tok.sep_id]
    assert ids == [0, 1, 2, 3, 4, 5]
    assert tok.special_ids == set(ids)
    assert [tok.id_to_token(i) for i in ids] == list(SPECIAL_TOKENS.values())


def test_typed_special_strings_are_plain_text(any_tok: Tokenizer) -> None:
    text = "the end " + " ".join([*SPECIAL_TOKENS.values(), "<EOS>", "<|endoftext|>"])
    ids = any_tok.encode(text)
    # at most unknown (an unknown character or word), never a control token
    assert not set(ids) & (any_tok.special_ids - {any_tok.unk_id})
    if any_tok.kind in ("bpe", "gpt2"):  # byte-level kinds spell any text out exactly
        assert any_tok.decode(ids) == text


def test_decode_skips_specials_unless_asked(any_tok: Tokenizer) -> None:
    tok = any_tok
    ids = [tok.bos_id, *tok.encode("the fox"), tok.blank_id, *tok.encode("."), tok.eos_id]
    assert tok.decode(ids) == tok.decode([i for i in ids if i not in tok.special_ids])
    kept = tok.decode(ids, skip_special_tokens=False)
    for role in ("bos", "blank", "eos"):
        assert tok.special_tokens[role] in kept


def test_batch_calls_match_single_calls(any_tok: Tokenizer) -> None:
    batch = any_tok.encode_batch(CORPUS)
    assert batch == [any_tok.encode(text) for text in CORPUS]
    assert any_tok.decode_batch(batch) == [any_tok.decode(ids) for ids in batch]


# ---- save / load / transformers ---------------------------------------------------------


def test_save_load_round_trip(any_tok: Tokenizer, tmp_path: Path) -> None:
    any_tok.save(tmp_path / "nested" / "tok")
    loaded = Tokenizer.load(tmp_path / "nested" / "tok")
    assert (loaded.kind, loaded.vocab_size) == (any_tok.kind, any_tok.vocab_size)
    assert loaded.special_tokens == any_tok.special_tokens
    assert loaded.special_ids == any_tok.special_ids
    texts = [*CORPUS, EXOTIC, "typed <eos> stays text"]
    assert loaded.encode_batch(texts) == any_tok.encode_batch(texts)


@pytest.mark.interop
def test_transformers_loads_a_saved_tokenizer(any_tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    any_tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*CORPUS, EXOTIC]:
        assert hf.encode(text, add_special_tokens=False) == any_tok.encode(text)
    assert hf.eos_token == any_tok.special_tokens["eos"]
    assert hf.pad_token == any_tok.special_tokens["pad"]
    assert hf.convert_tokens_to_ids(["<blank>", "<sep>"]) == [any_tok.blank_id, any_tok.sep_id]


def test_from_pretrained_directory(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(hf_dir_from(bpe_tok, tmp_path))
    assert tok.kind == "hf"
    assert tok.encode_batch(CORPUS) == bpe_tok.encode_batch(CORPUS)
    assert tok.decode(tok.encode(EXOTIC)) == EXOTIC
    # the HF tokenizer names only eos: bos falls back to it, the rest are Fable's
    assert tok.eos_id == tok.bos_id == bpe_tok.eos_id
    assert [tok.pad_id, tok.blank_id, tok.sep_id] == [bpe_tok.pad_id, bpe_tok.blank_id, bpe_tok.sep_id]
    assert tok.unk_id is None


def test_from_pretrained_adds_missing_specials(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    vocab, merges = gpt2_files()
    bare = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(vocab), str(merges)))
    bare.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = tokenizers.decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|endoftext|>")
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("Hello world!") == [15496, 995, 0]
    assert tok.bos_id == tok.eos_id == 50256
    assert {tok.pad_id, tok.blank_id, tok.sep_id} == {50257, 50258, 50259}
    assert tok.encode("<sep>") != [tok.sep_id]


def test_from_pretrained_offline_hub_cache(
    bpe_tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--fable--tiny"
    hf_dir_from(bpe_tok, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    tok = Tokenizer.from_pretrained("fable/tiny", cache_dir=tmp_path)
    assert tok.encode_batch(CORPUS) == bpe_tok.encode_batch(CORPUS)


def test_from_pretrained_missing_says_nothing_is_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="fable/absent.*Nothing is downloaded"):
        Tokenizer.from_pretrained("fable/absent", cache_dir=tmp_path)
    with pytest.raises(OSError, match="Nothing is downloaded"):
        Tokenizer.from_pretrained(tmp_path)  # a directory without tokenizer files


def test_load_missing_files(char_tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path / "nowhere")
    char_tok.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.load(tmp_path)


def test_load_corrupt_files(char_tok: Tokenizer, tmp_path: Path) -> None:
    char_tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{truncated")
    with pytest.raises(ValueError, match=str(tmp_path / "tokenizer_config.json")):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "X"}))
    with pytest.raises(ValueError, match="not a Fable tokenizer"):
        Tokenizer.load(tmp_path)


def test_load_rejects_a_config_that_does_not_match_the_vocabulary(
    char_tok: Tokenizer, tmp_path: Path
) -> None:
    char_tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'</s>'.*not in the vocabulary"):
        Tokenizer.load(tmp_path)


# ---- determinism and the factory --------------------------------------------------------


@pytest.mark.parametrize("make", [Tokenizer.train_char, Tokenizer.train_word])
def test_training_is_deterministic(make) -> None:
    first, second = make(CORPUS), make(list(reversed(CORPUS)))
    assert first.backend.get_vocab() == second.backend.get_vocab()
    assert first.backend.to_str() == make(CORPUS).backend.to_str()


def test_build_tokenizer_trained_and_hf_kinds(tmp_path: Path) -> None:
    assert build_tokenizer("char", CORPUS).kind == "char"
    assert build_tokenizer("word", CORPUS, min_freq=2).token_to_id("fox") is not None
    bpe = build_tokenizer("bpe", CORPUS, vocab_size=300, min_frequency=1)
    assert bpe.kind == "bpe"
    assert build_tokenizer("hf", path=hf_dir_from(bpe, tmp_path)).encode("fox") == bpe.encode("fox")


def test_build_tokenizer_gpt2() -> None:
    vocab, merges = gpt2_files()
    assert build_tokenizer("gpt2", path=vocab.parent).encode("Hello world!") == [15496, 995, 0]
    gpt2 = build_tokenizer("gpt2", vocab_file=vocab, merges_file=merges)
    assert gpt2.encode("Hello world!") == [15496, 995, 0]


def test_build_tokenizer_errors() -> None:
    with pytest.raises(ValueError, match="char.*word.*bpe.*gpt2.*hf"):
        build_tokenizer("sentencepiece", CORPUS)
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer("word")
    with pytest.raises(ValueError, match="vocab_file"):
        build_tokenizer("gpt2")
    with pytest.raises(ValueError, match="path"):
        build_tokenizer("hf")
    assert set(KINDS) == {"char", "word", "bpe", "gpt2", "hf"}


def test_len_and_repr(bpe_tok: Tokenizer) -> None:
    assert len(bpe_tok) == bpe_tok.vocab_size
    assert repr(bpe_tok) == f"Tokenizer(kind='bpe', vocab_size={bpe_tok.vocab_size})"


def test_word_text_comes_back_as_prose_and_streams_as_it_decodes() -> None:
    from models_src.sampling import TextStream

    text = 'Mr. Holmes, I said (quietly), "don\'t!" Is it? Yes.” “No,” she said.'
    tok = Tokenizer.train_word([text])
    assert tok.decode(tok.encode(text)) == "mr. holmes, I said (quietly), don't! is it? yes.” “no,” she said."
    rng = random.Random(0)
    words = list(range(len(SPECIAL_TOKENS), tok.vocab_size))
    for _ in range(200):  # any order of words: each piece as the stream writes it, the same text
        context, ids = [rng.choice(words)], [rng.choice(words) for _ in range(rng.randrange(1, 30))]
        stream = TextStream(tok, context=context)
        streamed = "".join(stream.push(i) for i in ids) + stream.flush()
        assert streamed == tok.decode(context + ids)[len(tok.decode(context)):]
