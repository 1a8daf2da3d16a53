"""Tests for training.data: every corpus format, splits, errors, the token cache, batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models_src.tokenization import Tokenizer
from training import data as data_module
from training.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    SequentialBatches,
    TokenizerConfig,
    check_enough_tokens,
    eval_windows,
    load_documents,
    prepare,
    random_batch,
    token_dtype,
)

STORIES = [f"Story {i}: once upon a time a fox called Fox{i} found {i} balls." for i in range(30)]
CHAR = TokenizerConfig()


def config(tmp_path: Path, path: Path | str, **fields) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **fields)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def all_documents(splits: dict[str, list[str]]) -> list[str]:
    return [doc for docs in splits.values() for doc in docs]


def write_tinystories(path: Path, stories: list[str]) -> Path:
    return write(path, "".join(f"{story}\n<|endoftext|>\n" for story in stories))


# ---- formats ----------------------------------------------------------------------------


def test_single_text_file_is_split_like_nanogpt_shakespeare(tmp_path):
    text = "".join(chr(97 + i % 26) + ("\n" if i % 37 == 0 else "") for i in range(1001))
    splits = load_documents(config(tmp_path, write(tmp_path / "input.txt", text)))
    n = len(text)
    assert splits == {"train": [text[: int(0.9 * n)]], "validation": [text[int(0.9 * n) :]]}


def test_three_way_split_of_one_document(tmp_path):
    text = "abcdefghij" * 100
    path = write(tmp_path / "a.txt", text)
    splits = load_documents(config(tmp_path, path, split=[0.7, 0.15, 0.15]))
    assert splits == {"train": [text[:700]], "validation": [text[700:850]], "test": [text[850:]]}


def test_three_way_split_of_many_documents_is_a_seeded_shuffle(tmp_path):
    rows = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100))
    path = write(tmp_path / "docs.jsonl", rows)
    splits = load_documents(config(tmp_path, path, split=[0.7, 0.15, 0.15]))
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [70, 15, 15]
    assert sorted(all_documents(splits)) == sorted(f"doc {i}" for i in range(100))
    assert load_documents(config(tmp_path, path, split=[0.7, 0.15, 0.15])) == splits
    assert load_documents(config(tmp_path, path, split=[0.7, 0.15, 0.15], seed=7)) != splits


def test_tinystories_file_is_split_into_stories(tmp_path):
    path = write_tinystories(tmp_path / "TinyStoriesV2-valid.txt", STORIES)
    splits = load_documents(config(tmp_path, path))
    assert sorted(all_documents(splits)) == sorted(STORIES)
    assert (len(splits["train"]), len(splits["validation"])) == (27, 3)
    # format "text" keeps the whole file as one document
    whole = load_documents(config(tmp_path, path, format="text"))
    assert "".join(all_documents(whole)) == path.read_text()


def test_folder_of_text_files_one_document_each(tmp_path):
    write(tmp_path / "books" / "b.txt", "bbbbbbbbbb")
    write(tmp_path / "books" / "sub" / "a.txt", "aaaaaaaaaa")
    write(tmp_path / "books" / ".hidden" / "c.txt", "cccccccccc")
    write(tmp_path / "books" / "notes.md", "ignored")
    splits = load_documents(config(tmp_path, tmp_path / "books"))
    assert splits == {"train": ["bbbbbbbbb", "aaaaaaaaa"], "validation": ["b", "a"]}


def test_folder_of_tinystories_files(tmp_path):
    write_tinystories(tmp_path / "stories" / "part1.txt", STORIES[:15])
    write_tinystories(tmp_path / "stories" / "part2.txt", STORIES[15:])
    assert sorted(all_documents(load_documents(config(tmp_path, tmp_path / "stories")))) == sorted(
        STORIES
    )


def test_folder_with_its_own_split_files(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "train.txt", "training text")
    write(folder / "valid.txt", "validation text")
    write(folder / "test.txt", "test text")
    write(folder / "other.txt", "not part of any split")
    splits = load_documents(config(tmp_path, folder))
    assert splits == {"train": ["training text"], "validation": ["validation text"],
                      "test": ["test text"]}


def test_own_split_files_in_jsonl(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "train.jsonl", "".join(json.dumps({"text": s}) + "\n" for s in STORIES))
    write(folder / "validation.jsonl", json.dumps({"text": "held out"}) + "\n")
    splits = load_documents(config(tmp_path, folder))
    assert splits == {"train": STORIES, "validation": ["held out"]}


def test_own_splits_without_validation_carve_it_out_of_train(tmp_path):
    folder = tmp_path / "corpus"
    write(folder / "train.txt", "x" * 90 + "y" * 10)
    write(folder / "test.txt", "test text")
    splits = load_documents(config(tmp_path, folder))
    assert splits == {"train": ["x" * 90], "validation": ["y" * 10], "test": ["test text"]}


def test_jsonl_and_json_array(tmp_path):
    rows = [{"text": s, "id": i} for i, s in enumerate(STORIES)] + [{"text": None}, {"text": " "}]
    jsonl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    array = write(tmp_path / "b.json", json.dumps(rows))
    for path in (jsonl, array):
        assert sorted(all_documents(load_documents(config(tmp_path, path)))) == sorted(STORIES)


def test_csv_with_quoted_newlines_and_custom_column(tmp_path):
    import csv

    texts = [s + '\nsecond line, with "quotes"' for s in STORIES]
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "story"])
        writer.writerows([i, t] for i, t in enumerate(texts))
    splits = load_documents(config(tmp_path, path, text_column="story"))
    assert sorted(all_documents(splits)) == sorted(texts)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": STORIES, "n": list(range(len(STORIES)))}), path)
    assert sorted(all_documents(load_documents(config(tmp_path, path)))) == sorted(STORIES)


def test_datasets_save_to_disk_dataset_dict_and_dataset(tmp_path):
    import datasets

    dataset_dict = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": STORIES[:20]}),
        "valid": datasets.Dataset.from_dict({"text": STORIES[20:25]}),
        "unsupervised": datasets.Dataset.from_dict({"text": ["unused"]}),
    })
    dataset_dict.save_to_disk(tmp_path / "dd")
    splits = load_documents(config(tmp_path, tmp_path / "dd"))
    assert splits == {"train": STORIES[:20], "validation": STORIES[20:25]}

    datasets.Dataset.from_dict({"text": STORIES}).save_to_disk(tmp_path / "ds")
    splits = load_documents(config(tmp_path, tmp_path / "ds"))
    assert (len(splits["train"]), len(splits["validation"])) == (27, 3)
    assert sorted(all_documents(splits)) == sorted(STORIES)


@pytest.fixture
def offline_hub(monkeypatch):
    """Undo the process-wide offline switches that loading from the hub cache sets."""
    import datasets
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE",
                        huggingface_hub.constants.HF_HUB_OFFLINE)


def fake_hub_cache(cache_dir: Path, repo: str, splits: dict[str, list[str]]) -> None:
    """What `load_dataset(repo, cache_dir=...)` leaves behind: one arrow stream per split."""
    import datasets
    import pyarrow as pa

    namespace, name = repo.split("/")
    folder = cache_dir / f"{namespace}___{name}" / "default" / "0.0.0" / "0123abcd"
    folder.mkdir(parents=True)
    split_infos = {}
    for split, texts in splits.items():
        table = pa.table({"text": texts})
        with pa.OSFile(str(folder / f"{name}-{split}.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        split_infos[split] = {"name": split, "num_examples": len(texts), "dataset_name": name}
    datasets.DatasetInfo(
        features=datasets.Features({"text": datasets.Value("string")}),
        config_name="default",
        dataset_name=name,
        splits=datasets.SplitDict.from_split_dict(split_infos),
    ).write_to_directory(str(folder))


def test_hub_dataset_from_the_offline_cache(tmp_path, offline_hub):
    fake_hub_cache(tmp_path / "cache" / "hf_datasets", "testorg/tiny",
                   {"train": STORIES[:25], "validation": STORIES[25:]})
    data = DataConfig(hub_name="testorg/tiny", cache_dir=str(tmp_path / "cache"))
    assert load_documents(data) == {"train": STORIES[:25], "validation": STORIES[25:]}
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_dataset_missing_from_the_offline_cache(tmp_path, offline_hub):
    data = DataConfig(hub_name="testorg/not-cached", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="not in the offline cache.*offline: false"):
        load_documents(data)


# ---- subsets ----------------------------------------------------------------------------


def test_subset_keeps_documents_per_split(tmp_path):
    rows = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100))
    data = config(tmp_path, write(tmp_path / "a.jsonl", rows), use_subset=True, subset_size=5)
    splits = load_documents(data)
    assert (len(splits["train"]), len(splits["validation"])) == (5, 5)
    full = load_documents(config(tmp_path, tmp_path / "a.jsonl"))
    assert splits == {name: docs[:5] for name, docs in full.items()}


def test_subset_of_a_single_document_counts_characters(tmp_path):
    text = "0123456789" * 100
    data = config(tmp_path, write(tmp_path / "a.txt", text), use_subset=True, subset_size=30)
    assert load_documents(data) == {"train": [text[:30]], "validation": [text[900:930]]}


# ---- errors -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="data path not found.*nope.txt"):
        load_documents(config(tmp_path, tmp_path / "nope.txt"))


def test_empty_file(tmp_path):
    path = write(tmp_path / "empty.txt", " \n")
    with pytest.raises(DataError, match=r"no text in .*empty\.txt"):
        load_documents(config(tmp_path, path))


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8.*0xe9 at offset 12 \(line 2\)"):
        load_documents(config(tmp_path, path))


def test_missing_text_column(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"story": "x"}) + "\n")
    with pytest.raises(DataError, match=r"a\.jsonl.*no 'text' text column.*'story'"):
        load_documents(config(tmp_path, path))
    path = write(tmp_path / "b.csv", "story,id\nhello,1\n")
    with pytest.raises(DataError, match=r"b\.csv has no 'text' text column.*'story', 'id'"):
        load_documents(config(tmp_path, path))


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"a\.jsonl: invalid JSON at line 2"):
        load_documents(config(tmp_path, path))


def test_unknown_format(tmp_path):
    path = write(tmp_path / "a.docx", "text")
    with pytest.raises(DataError, match=r"a\.docx: unknown format"):
        load_documents(config(tmp_path, path))
    assert load_documents(config(tmp_path, path, format="text"))["train"] == ["tex"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": "a.txt", "colour": "red"}, "unknown data config keys: colour"),
        ({}, "exactly one of"),
        ({"path": "a.txt", "hub_name": "x/y"}, "exactly one of"),
        ({"path": "a.txt", "split": [0.8, 0.1]}, "summing to 1"),
        ({"path": "a.txt", "split": [1.0]}, "2 or 3"),
        ({"path": "a.txt", "format": "docx"}, "unknown format"),
    ],
)
def test_invalid_data_config(fields, message):
    with pytest.raises(DataError, match=message):
        DataConfig.from_dict(fields)


def test_tokenizer_config():
    config = TokenizerConfig.from_dict({"kind": "word", "min_freq": 2})
    assert (config.kind, config.options) == ("word", {"min_freq": 2})
    assert config.to_dict() == {"kind": "word", "min_freq": 2}
    with pytest.raises(DataError, match="kind 'char' has no option.*vocab_size"):
        TokenizerConfig.from_dict({"kind": "char", "vocab_size": 10})
    with pytest.raises(DataError, match="needs vocab_size"):
        TokenizerConfig.from_dict({"kind": "bpe"})
    # null leaves an option out: how an override switches a word config to BPE
    switched = TokenizerConfig.from_dict({"kind": "bpe", "min_freq": None, "vocab_size": 300})
    assert switched.options == {"vocab_size": 300}
    with pytest.raises(DataError, match="unknown kind"):
        TokenizerConfig.from_dict({"kind": "sentencepiece"})


def test_corpus_too_short_for_one_batch(tmp_path):
    prepared = prepare(config(tmp_path, write(tmp_path / "tiny.txt", "a short text")), CHAR)
    check_enough_tokens(prepared, batch_size=4, seq_len=2)
    with pytest.raises(DataError, match=r"tiny\.txt: the train split has 11 tokens, too short"):
        check_enough_tokens(prepared, batch_size=4, seq_len=11)
    with pytest.raises(DataError, match=r"tiny\.txt: the validation split has 3 tokens"):
        check_enough_tokens(prepared, batch_size=4, seq_len=8)


# ---- tokens and the cache ---------------------------------------------------------------


def test_prepare_encodes_each_document_followed_by_eos(tmp_path):
    path = write_tinystories(tmp_path / "stories.txt", STORIES)
    prepared = prepare(config(tmp_path, path), CHAR)
    splits = load_documents(config(tmp_path, path))
    tokenizer = prepared.tokenizer
    assert tokenizer.kind == "char"
    assert prepared.documents == {"train": 27, "validation": 3}
    for name, docs in splits.items():
        expected = [i for doc in docs for i in [*tokenizer.encode(doc), tokenizer.eos_id]]
        tokens = prepared.splits[name]
        assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == expected
    meta = json.loads((prepared.cache_path / "meta.json").read_text())
    assert meta["tokens"] == {name: len(t) for name, t in prepared.splits.items()}
    assert prepared.cache_path.parent == tmp_path / "cache"


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path):
    path = write(tmp_path / "a.txt", "a" * 90 + "z" * 10)
    prepared = prepare(config(tmp_path, path), CHAR)
    tokenizer = prepared.tokenizer
    assert tokenizer.token_to_id("a") is not None and tokenizer.token_to_id("z") is None
    assert set(prepared.splits["validation"].tolist()) == {tokenizer.unk_id, tokenizer.eos_id}


def test_cache_hit_reads_nothing_and_tokenizes_nothing(tmp_path, monkeypatch):
    path = write_tinystories(tmp_path / "stories.txt", STORIES)
    first = prepare(config(tmp_path, path), CHAR)
    assert not first.from_cache

    def fail(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(Tokenizer, "encode_batch", fail)
    monkeypatch.setattr(data_module, "_read", fail)  # so a hit is proven, not timed
    second = prepare(config(tmp_path, path), CHAR)
    assert second.from_cache and second.cache_path == first.cache_path
    assert second.documents == first.documents
    for name in first.splits:
        np.testing.assert_array_equal(second.splits[name], first.splits[name])
    assert second.tokenizer.backend.to_str() == first.tokenizer.backend.to_str()
    # max_seq_len, offline and where the cache lives do not change the tokens
    assert prepare(config(tmp_path, path, max_seq_len=64), CHAR).from_cache


def test_cache_is_invalidated_by_the_file_and_the_tokenizer(tmp_path):
    path = write(tmp_path / "a.txt", "the cat sat on the mat. " * 20)
    keys = {prepare(config(tmp_path, path), CHAR).cache_path}
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
    keys.add(prepare(config(tmp_path, path), CHAR).cache_path)
    write(path, "a dog sat on the log. " * 20)
    changed = prepare(config(tmp_path, path), CHAR)
    assert not changed.from_cache and changed.tokenizer.token_to_id("d") is not None
    keys.add(changed.cache_path)
    keys.add(prepare(config(tmp_path, path), TokenizerConfig("word")).cache_path)
    keys.add(prepare(config(tmp_path, path), TokenizerConfig("word", {"min_freq": 2})).cache_path)
    keys.add(prepare(config(tmp_path, path, split=[0.8, 0.2]), CHAR).cache_path)
    assert len(keys) == 6
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(k.name for k in keys)


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    path = write(tmp_path / "a.txt", "some text to tokenize")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module, "_write_tokens", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tmp_path, path), CHAR)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    assert not prepare(config(tmp_path, path), CHAR).from_cache


def test_token_dtype_fits_the_vocabulary(tmp_path):
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    # a character vocabulary of ~68,000 code points (surrogates cannot be text), written
    # twice so that the train split (the first 90 %) holds them all
    text = "".join(chr(c) for c in range(0x100, 0x100 + 70_100) if not 0xD800 <= c <= 0xDFFF) * 2
    prepared = prepare(config(tmp_path, write(tmp_path / "wide.txt", text)), CHAR)
    assert prepared.tokenizer.vocab_size > 65536
    assert prepared.splits["train"].dtype == np.uint32
    assert prepared.splits["train"].max() >= 65536


# ---- batches ----------------------------------------------------------------------------


def test_random_batch_is_seeded_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    generator = torch.Generator().manual_seed(0)
    x, y = random_batch(tokens, 8, 16, generator)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # consecutive tokens: y is x shifted by one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    state = generator.get_state()
    after = random_batch(tokens, 8, 16, generator)
    generator.set_state(state)  # a resumed run draws the same batch
    assert all(torch.equal(a, b) for a, b in zip(after, random_batch(tokens, 8, 16, generator)))
    again = random_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)
    # every offset is possible, the last window ends at the last token
    x, y = random_batch(np.arange(5, dtype=np.uint32), 64, 4, torch.Generator().manual_seed(1))
    assert set(x[:, 0].tolist()) == {0} and y[0].tolist() == [1, 2, 3, 4]
    with pytest.raises(DataError, match="too few"):
        random_batch(np.arange(4, dtype=np.uint16), 1, 4, generator)


def test_sequential_batches_walk_contiguous_rows_in_order():
    tokens = np.arange(103, dtype=np.uint16)
    batches = SequentialBatches(tokens, batch_size=4, seq_len=5)
    rows = torch.arange(100).reshape(4, 25)  # the 3 trailing tokens are dropped
    assert len(batches) == 5  # 24 inputs per row: 4 windows of 5 and one of 4
    windows = list(batches)
    assert [x.shape[1] for x, _ in windows] == [5, 5, 5, 5, 4]
    assert torch.equal(torch.cat([x for x, _ in windows], dim=1), rows[:, :-1])
    assert torch.equal(torch.cat([y for _, y in windows], dim=1), rows[:, 1:])
    assert all(torch.equal(a, b) for a, b in zip(batches[3], windows[3]))  # resume at window 3
    assert windows[0][0].dtype == torch.int64
    with pytest.raises(IndexError):
        batches[5]
    with pytest.raises(DataError, match="too few"):
        SequentialBatches(np.arange(7, dtype=np.uint16), batch_size=4, seq_len=5)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 200),
    seq_len=st.integers(1, 40),
    stride_fraction=st.floats(0, 1),
    use_default_stride=st.booleans(),
)
@example(n=10, seq_len=4, stride_fraction=0.5, use_default_stride=False)
@example(n=9, seq_len=8, stride_fraction=1.0, use_default_stride=True)
def test_eval_windows_score_every_token_exactly_once(
    n, seq_len, stride_fraction, use_default_stride
):
    stride = None if use_default_stride else max(1, round(stride_fraction * seq_len))
    tokens = np.arange(n, dtype=np.uint32)  # each token is its own position
    scored = []
    for x, y in eval_windows(tokens, seq_len, stride):
        assert x.shape == y.shape and x.shape[0] == 1 and 1 <= x.shape[1] <= seq_len
        assert x.shape[1] == min(seq_len, n - 1)  # full windows unless the split is shorter
        assert torch.equal(x[0, 1:], x[0, :-1] + 1)
        for j, target in enumerate(y[0].tolist()):
            if target == IGNORE_INDEX:
                continue
            assert target == x[0, j] + 1  # y is x shifted by one
            context = j + 1
            assert context >= min(target, seq_len - (stride or seq_len) + 1)
            scored.append(target)
        assert scored == sorted(scored)
    assert scored == list(range(1, n))


def test_eval_windows_reject_a_stride_longer_than_the_window():
    with pytest.raises(ValueError, match="stride"):
        list(eval_windows(np.arange(10), 4, stride=5))
