"""Corpora -> tokenizer -> cached token arrays -> batches.

``prepare`` turns the YAML ``data:`` and ``tokenizer:`` sections into one memory-mapped
token stream per split, cached under ``cache_dir``; the batch helpers cut those streams
into model inputs. The reading, splitting and caching: docs/training.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models_src.tokenization import KINDS, Tokenizer, build_tokenizer

from .corpora import STORY_SEPARATOR, CorpusError, locate
from .lossy import dropped_bits

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FORMATS = ("auto", "text", "tinystories", "jsonl", "csv", "parquet", "hf_disk", "hf_hub")
IGNORE_INDEX = -100  # target value that cross-entropy skips (PyTorch's default ignore_index)
CACHE_VERSION = 3  # bump when the cache layout or the tokenization recipe changes

# Corpora with fewer documents are split inside each document (by characters): a handful
# of books cannot be dealt out by whole documents. Larger ones are shuffled and dealt out.
MIN_DOCUMENTS_TO_SHUFFLE = 20
_ENCODE_CHUNK = 1024  # documents per encode_batch call: parallel, yet bounded memory

# File formats by extension (format "auto"), and the files each format reads in a folder.
_FORMAT_OF_EXTENSION = {
    ".txt": "text", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"
}
_EXTENSIONS = {
    "auto": set(_FORMAT_OF_EXTENSION),
    "text": {".txt"},
    "tinystories": {".txt"},
    "jsonl": {".jsonl", ".json"},
    "csv": {".csv"},
    "parquet": {".parquet"},
}
# File stems and `datasets` split names that are a corpus's own splits.
_SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation",
                "val": "validation", "test": "test"}
# Options each tokenizer kind accepts: the keyword arguments of `build_tokenizer`.
_TOKENIZER_OPTIONS = {
    "char": set(),
    "word": {"min_freq", "max_size"},
    "bpe": {"vocab_size", "min_frequency"},
    "gpt2": {"path", "vocab_file", "merges_file"},
    "hf": {"path", "cache_dir"},
}
_TRAINED_KINDS = ("char", "word", "bpe")


class DataError(ValueError):
    """A corpus or data setting that cannot be used, with a message naming the culprit."""


# ---- configuration ----------------------------------------------------------------------


@dataclass
class DataConfig:
    """The YAML ``data:`` section. Exactly one of ``path``, ``corpus`` and ``hub_name`` names
    the corpus."""

    path: str | None = None  # a file, a folder, or a `datasets` save_to_disk directory
    corpus: str | None = None  # one `fable data fetch` gets, and a path in it: tinyshakespeare/input.txt
    hub_name: str | None = None  # e.g. "roneneldan/TinyStories", from the local HF cache
    format: str = "auto"
    text_column: str = "text"
    split: list[float] = field(default_factory=lambda: [0.9, 0.1])  # train/validation[/test]
    use_subset: bool = False
    subset_size: int = 1000  # documents per split (characters for a one-document split)
    max_seq_len: int | None = None  # training window; the trainer fills it from block_size
    cache_dir: str = ".cache/fable"
    offline: bool = True
    seed: int = 1234  # document shuffle
    task: str = "lm"  # lm (a token stream) | infill | infill+lm (whole examples: training.examples)
    infill_fraction: float = 0.5  # infill+lm: share of stories that also give an infilling example
    middle_only: bool = False  # infilling examples train on their middle (and eos) only
    infill_spans: int = 0  # extra infilling examples per training story, cut from runs of its sentences

    def __post_init__(self) -> None:
        self.split = [float(f) for f in self.split]
        if sum(x is not None for x in (self.path, self.corpus, self.hub_name)) != 1:
            raise DataError("data: give exactly one of `path`, `corpus` and `hub_name`")
        if self.format not in FORMATS:
            raise DataError(f"data: unknown format {self.format!r}; expected one of {FORMATS}")
        if self.hub_name is not None and self.format not in ("auto", "hf_hub"):
            raise DataError(f"data: hub_name is loaded with `datasets`, not as {self.format!r}")
        if self.hub_name is None and self.format == "hf_hub":
            raise DataError("data: format 'hf_hub' needs hub_name, not a path or corpus")
        if len(self.split) not in (2, 3) or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise DataError(
                f"data: split must be 2 or 3 positive fractions (train, validation[, test])"
                f" summing to 1, got {self.split}"
            )
        if self.task not in ("lm", "infill", "infill+lm"):
            raise DataError(f"data: task must be lm, infill or infill+lm, not {self.task!r}")
        if not 0.0 <= self.infill_fraction <= 1.0:
            raise DataError(f"data: infill_fraction must be in [0, 1], got {self.infill_fraction}")
        if self.infill_spans < 0:
            raise DataError(f"data: infill_spans must be 0 or more, got {self.infill_spans}")
        if self.infill_spans and self.task == "lm":
            raise DataError("data: infill_spans needs task infill or infill+lm")
        if self.subset_size < 1:
            raise DataError(f"data: subset_size must be positive, got {self.subset_size}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise DataError(f"data: max_seq_len must be positive, got {self.max_seq_len}")

    @property
    def source(self) -> str:
        """The corpus as the config names it, for messages and records."""
        return self.path or self.corpus or self.hub_name

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"unknown data config keys: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class TokenizerConfig:
    """The YAML ``tokenizer:`` section: ``kind`` plus the options of that kind."""

    kind: str = "char"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"tokenizer: unknown kind {self.kind!r}; expected one of {KINDS}")
        allowed = _TOKENIZER_OPTIONS[self.kind]
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise DataError(
                f"tokenizer: kind {self.kind!r} has no option(s) {', '.join(unknown)}"
                f" (it accepts: {', '.join(sorted(allowed)) or 'none'})"
            )
        if self.kind == "bpe" and "vocab_size" not in self.options:
            raise DataError("tokenizer: kind 'bpe' needs vocab_size")

    @classmethod
    def from_dict(cls, data: dict) -> TokenizerConfig:
        # An option set to null is left out: `tokenizer.kind=bpe tokenizer.min_freq=null`
        # switches a word config to BPE from the command line.
        options = {key: value for key, value in data.items() if value is not None}
        return cls(kind=options.pop("kind", "char"), options=options)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form: ``kind`` and the options side by side."""
        return {"kind": self.kind, **self.options}

    def build(self, train_texts: list[str]) -> Tokenizer:
        """Train on ``train_texts`` (char/word/bpe) or load the configured vocabulary."""
        texts = train_texts if self.kind in _TRAINED_KINDS else None
        return build_tokenizer(self.kind, texts, **self.options)


# ---- locating and reading a corpus ------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A corpus located but not read yet: enough to key the cache."""

    kind: str  # "files", "hf_disk" or "hf_hub"
    location: str  # the path or hub name, for messages
    files: dict[str, list[Path]]  # "files": split ("all" if no own splits) -> files
    stamp: list[Path]  # the files read; their sizes and mtimes key the cache


def _locate(data: DataConfig) -> _Source:
    if data.hub_name is not None:
        return _Source("hf_hub", data.hub_name, {}, [])
    try:
        path = locate(data.corpus) if data.corpus else Path(data.path).expanduser()
    except CorpusError as e:
        raise DataError(str(e)) from None
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    if path.is_file():
        if data.format == "hf_disk":
            raise DataError(f"{path}: format 'hf_disk' needs a `datasets` save_to_disk folder")
        return _Source("files", str(path), {"all": [path]}, [path])
    if data.format == "hf_disk" or (data.format == "auto" and _is_saved_dataset(path)):
        stamp = sorted(p for p in path.rglob("*") if p.is_file())
        return _Source("hf_disk", str(path), {}, stamp)
    files = _split_files(path, data.format) or {"all": _corpus_files(path, data.format)}
    return _Source("files", str(path), files, sorted(chain.from_iterable(files.values())))


def _is_saved_dataset(folder: Path) -> bool:
    """What `save_to_disk` writes: dataset_dict.json (DatasetDict) or state.json (Dataset)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _split_files(folder: Path, fmt: str) -> dict[str, list[Path]]:
    """The folder's own split files (train.txt, valid.txt, ...); empty without a train file."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        split = _SPLIT_NAMES.get(path.stem.lower())
        if split and path.is_file() and path.suffix.lower() in _EXTENSIONS[fmt]:
            found.setdefault(split, []).append(path)
    return found if "train" in found else {}


def _corpus_files(folder: Path, fmt: str) -> list[Path]:
    """Every readable file under ``folder``, sorted, skipping hidden files and folders."""
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in _EXTENSIONS[fmt]
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"no {'/'.join(sorted(_EXTENSIONS[fmt]))} files in {folder}")
    return files


def _read(source: _Source, data: DataConfig) -> dict[str, list[str]]:
    """Split name ("all" when the corpus has no own splits) -> documents."""
    if source.kind == "files":
        return {split: [doc for path in paths for doc in _read_file(path, data)]
                for split, paths in source.files.items()}
    if source.kind == "hf_disk":
        import datasets  # slow import, needed only here

        try:
            dataset = datasets.load_from_disk(source.location)
        except (OSError, ValueError) as err:
            raise DataError(f"{source.location}: not a readable `datasets` folder ({err})") from err
        return _dataset_splits(dataset, source.location, data.text_column)
    return _dataset_splits(_load_hub(data), source.location, data.text_column)


def _read_file(path: Path, data: DataConfig) -> list[str]:
    fmt = _FORMAT_OF_EXTENSION.get(path.suffix.lower()) if data.format == "auto" else data.format
    if fmt is None:
        raise DataError(
            f"{path}: unknown format (extension {path.suffix!r}); set data.format to one of"
            f" {FORMATS[1:6]}"
        )
    if fmt == "jsonl":
        return _read_jsonl(path, data.text_column)
    if fmt in ("csv", "parquet"):
        return _read_table(path, fmt, data.text_column)
    text = _read_text(path)
    if fmt == "tinystories" or (data.format == "auto" and STORY_SEPARATOR.search(text)):
        return [story.strip() for story in STORY_SEPARATOR.split(text) if story.strip()]
    return [text] if text.strip() else []


def _read_text(path: Path) -> str:
    return _decode(path, path.read_bytes())


def _decode(path: Path, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start}"
            f" (line {line}); convert it to UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a byte-order mark is not text


def _read_jsonl(path: Path, column: str) -> list[str]:
    """JSON Lines (one object per line); a ``.json`` file may also be one array of objects."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        rows = enumerate(_parse_json(text, path, None), 1)
    else:  # split on "\n" only: JSON strings may hold U+2028, which splitlines() breaks on
        rows = ((n, _parse_json(line, path, n)) for n, line in enumerate(text.split("\n"), 1)
                if line.strip())
    values = []
    for number, row in rows:
        if not isinstance(row, dict) or column not in row:
            available = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(
                f"{path}: row {number} has no {column!r} text column (found: {available});"
                f" set data.text_column"
            )
        values.append(row[column])
    return _documents(values, str(path))


def _parse_json(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {line}" if line else f"line {err.lineno}"
        raise DataError(f"{path}: invalid JSON at {where}: {err.msg}") from None


def _read_table(path: Path, fmt: str, column: str) -> list[str]:
    """CSV or Parquet, through pyarrow (fast; no limit on field length)."""
    import pyarrow as pa  # slow imports, needed only here
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if fmt == "parquet":
            names = pyarrow.parquet.read_schema(path).names
            table = pyarrow.parquet.read_table(path, columns=[column]) if column in names else None
        else:
            raw = path.read_bytes()
            _decode(path, raw)  # a clear message, with the position, for text that is not UTF-8
            table = pyarrow.csv.read_csv(
                pa.py_buffer(raw),
                parse_options=pyarrow.csv.ParseOptions(newlines_in_values=True),
                convert_options=pyarrow.csv.ConvertOptions(column_types={column: pa.string()}),
            )
            names = table.column_names
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: cannot be read as {fmt} ({err})") from err
    if column not in names:
        raise DataError(
            f"{path} has no {column!r} text column (columns: {names}); set data.text_column"
        )
    return _documents(table.column(column).to_pylist(), str(path))


def _dataset_splits(dataset: Any, where: str, column: str) -> dict[str, list[str]]:
    """A ``datasets`` Dataset ("all") or DatasetDict (its train/validation/test splits)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return {"all": _dataset_column(dataset, column, where)}
    splits: dict[str, list[str]] = {}
    for name, part in dataset.items():
        split = _SPLIT_NAMES.get(name.lower())  # other splits (e.g. "unsupervised") are unused
        if split:
            splits.setdefault(split, []).extend(_dataset_column(part, column, f"{where}[{name}]"))
    if "train" not in splits:
        raise DataError(f"{where} has no train split (splits: {list(dataset)})")
    return splits


def _dataset_column(dataset: Any, column: str, where: str) -> list[str]:
    if column not in dataset.column_names:
        raise DataError(
            f"{where} has no {column!r} text column (columns: {dataset.column_names});"
            f" set data.text_column"
        )
    return _documents(dataset.with_format("arrow")[column].to_pylist(), where)


def _load_hub(data: DataConfig) -> Any:
    if data.offline:
        # datasets and huggingface_hub read these variables when imported; if they already
        # are, their module-level copies must be set too, or they would still go online.
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    if data.offline:
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    cache = Path(data.cache_dir) / "hf_datasets"
    try:
        return datasets.load_dataset(data.hub_name, cache_dir=str(cache))
    except (OSError, ValueError) as err:
        if data.offline:
            raise DataError(
                f"dataset {data.hub_name!r} is not in the offline cache {cache}: run once with"
                f" data.offline: false to download it there, or check the name ({err})"
            ) from err
        raise DataError(f"could not load dataset {data.hub_name!r}: {err}") from err


def _documents(values: Iterable[Any], where: str) -> list[str]:
    """The non-blank texts of a text column; missing values (None) are skipped."""
    docs = []
    for row, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: row {row} of the text column is a "
                            f"{type(value).__name__}, not text")
        if value and value.strip():
            docs.append(value)
    return docs


# ---- splitting --------------------------------------------------------------------------


def load_documents(data: DataConfig) -> dict[str, list[str]]:
    """Split name ("train", "validation"[, "test"]) -> documents, subset applied."""
    source = _locate(data)
    return _split_corpus(_read(source, data), data, source.location)


def read_all_documents(data: DataConfig) -> list[str]:
    """Every document of the corpus, whatever split it belongs to (for scoring a whole file)."""
    source = _locate(data)
    return [doc for docs in _read(source, data).values() for doc in docs]


def _split_corpus(
    corpus: dict[str, list[str]], data: DataConfig, where: str
) -> dict[str, list[str]]:
    """The corpus's own splits if it has them, else a deterministic split by fractions."""
    if not any(corpus.values()):
        raise DataError(f"no text in {where}: the corpus is empty")
    if "all" in corpus:
        splits = _split_documents(corpus["all"], data.split, data.seed)
    else:
        splits = dict(corpus)
        if "validation" not in splits:  # carve it out of train, in the configured ratio
            train, validation = data.split[:2]
            ratio = [train / (train + validation), validation / (train + validation)]
            splits.update(_split_documents(splits.pop("train"), ratio, data.seed))
    if not splits["train"]:
        raise DataError(f"no training text in {where}")
    if data.use_subset:
        splits = {name: _subset(docs, data.subset_size) for name, docs in splits.items()}
    return {name: splits[name] for name in SPLITS if name in splits}


def _split_documents(docs: list[str], fractions: list[float], seed: int) -> dict[str, list[str]]:
    names = SPLITS[: len(fractions)]
    if len(docs) < MIN_DOCUMENTS_TO_SHUFFLE:
        # nanoGPT's Tiny Shakespeare split, per document: the first 90 % trains, the rest
        # validates. Empty pieces (of very short documents) are dropped.
        pieces = [[doc[a:b] for a, b in _ranges(len(doc), fractions)] for doc in docs]
        return {name: [p[i] for p in pieces if p[i]] for i, name in enumerate(names)}
    shuffled = docs.copy()
    random.Random(seed).shuffle(shuffled)
    return {name: shuffled[a:b] for name, (a, b) in zip(names, _ranges(len(docs), fractions))}


def _ranges(n: int, fractions: list[float]) -> list[tuple[int, int]]:
    """[start, end) of each part of ``n`` items: part i ends at int(n * (f0 + ... + fi))."""
    # fsum: 0.7 + 0.15 is 0.8499999999999999 in floats, but fsum([0.7, 0.15]) is 0.85
    ends = [int(n * math.fsum(fractions[: i + 1])) for i in range(len(fractions) - 1)] + [n]
    return list(zip([0, *ends[:-1]], ends))


def _subset(docs: list[str], size: int) -> list[str]:
    """The first ``size`` documents; a one-document split keeps its first ``size`` characters."""
    return [docs[0][:size]] if len(docs) == 1 else docs[:size]


# ---- tokenizing and caching -------------------------------------------------------------


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]  # split -> read-only token stream (memory-mapped)
    cache_path: Path
    from_cache: bool
    documents: dict[str, int]  # split -> number of documents
    source: str  # the corpus's path or hub name, for messages
    characters: dict[str, int]  # split -> characters of text (for bits per character)
    dropped_bits: dict[str, float]  # split -> bits its tokens leave out (case, spacing, <unk>)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare(data: DataConfig, tok: TokenizerConfig) -> PreparedData:
    """Token streams for every split, from the cache when the inputs are unchanged.

    The cache key is computed from file sizes and mtimes alone, so a cache hit reads no
    corpus file and tokenizes nothing.
    """
    source = _locate(data)
    directory = Path(data.cache_dir) / _cache_key(source, data, tok)
    from_cache = directory.is_dir()  # complete whenever present: it appears by one rename
    if not from_cache:
        _build_cache(data, tok, directory)
    return _load_cache(directory, from_cache)


def _cache_key(source: _Source, data: DataConfig, tok: TokenizerConfig) -> str:
    stats = [(p, p.stat()) for p in source.stamp]
    files = [[str(p.resolve()), st.st_size, st.st_mtime_ns] for p, st in stats]
    # path and corpus are covered by the resolved files; the rest does not change the tokens
    unused = ("path", "corpus", "max_seq_len", "cache_dir", "offline", "task", "infill_fraction", "middle_only",
              "infill_spans")
    settings = {k: v for k, v in asdict(data).items() if k not in unused}
    payload = {"version": CACHE_VERSION, "source": files or source.location,
               "data": settings, "tokenizer": tok.to_dict()}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _build_cache(data: DataConfig, tok: TokenizerConfig, directory: Path) -> None:
    """Read, split, train the tokenizer, encode; written to a temporary folder renamed into
    place at the end, so an interrupted run never leaves a half-written cache."""
    log.info("preparing %s (cache %s)", data.source, directory)
    splits = load_documents(data)
    tokenizer = tok.build(splits["train"])
    dtype = token_dtype(tokenizer.vocab_size)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tokenizer.save(tmp / "tokenizer")
        tokens = {name: _write_tokens(tmp / f"{name}.bin", docs, tokenizer, dtype)
                  for name, docs in splits.items()}
        meta = {
            "version": CACHE_VERSION,
            "source": data.source,
            "dtype": dtype.name,
            "tokens": tokens,
            "documents": {name: len(docs) for name, docs in splits.items()},
            # bits per character divide a split's total loss by its characters
            "characters": {name: sum(map(len, docs)) for name, docs in splits.items()},
            # ... plus what the tokens leave out, coded by side models primed on train (the
            # trainer reports bits per character on validation only)
            "dropped_bits": {"validation": sum(dropped_bits(tokenizer, splits["validation"],
                                                            splits["train"]).values())},
            "tokenizer": {**tok.to_dict(), "vocab_size": tokenizer.vocab_size},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        try:
            os.replace(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise  # otherwise a concurrent run finished first: keep its identical copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encoded_chunks(docs: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``encode(doc) + [eos]`` for every document, a batch of documents at a time."""
    for start in range(0, len(docs), _ENCODE_CHUNK):
        encoded = tokenizer.encode_batch(docs[start : start + _ENCODE_CHUNK])
        yield np.fromiter(chain.from_iterable((*seq, tokenizer.eos_id) for seq in encoded), dtype=dtype)


def encode_documents(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """One token stream for ``docs`` in the training layout (each document ends in eos)."""
    dtype = token_dtype(tokenizer.vocab_size)
    return np.concatenate([np.zeros(0, dtype), *_encoded_chunks(docs, tokenizer, dtype)])


def _write_tokens(path: Path, docs: list[str], tokenizer: Tokenizer, dtype: np.dtype) -> int:
    """Write the token stream of ``docs`` to ``path``; returns the count."""
    count = 0
    with open(path, "wb") as f:
        for chunk in _encoded_chunks(docs, tokenizer, dtype):
            chunk.tofile(f)
            count += len(chunk)
    return count


def _load_cache(directory: Path, from_cache: bool) -> PreparedData:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {name: _map_tokens(directory / f"{name}.bin", dtype, n)
                  for name, n in meta["tokens"].items()}
        tokenizer = Tokenizer.load(directory / "tokenizer")
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"the token cache {directory} is damaged ({err}); delete it") from err
    return PreparedData(tokenizer, splits, directory, from_cache, meta["documents"],
                        meta["source"], meta["characters"], meta["dropped_bits"])


def _map_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # mmap cannot map an empty file
        empty = np.zeros(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def check_enough_tokens(prepared: PreparedData, batch_size: int, seq_len: int) -> None:
    """Fail early, naming the corpus, when train or validation cannot fill one window."""
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    for split in ("train", "validation"):
        n = len(prepared.splits.get(split, ()))
        if n < seq_len + 1:
            raise DataError(
                f"{prepared.source}: the {split} split has {n} tokens, too short for one"
                f" batch (a window of seq_len={seq_len} needs {seq_len + 1}); use more text,"
                f" a shorter seq_len (block_size) or another split"
            )


# ---- batches ----------------------------------------------------------------------------


def _int64(array: np.ndarray) -> torch.Tensor:
    """A fresh int64 tensor: a copy, so no reference to the memmap outlives the batch
    (holding memmap-backed tensors makes resident memory grow, nanoGPT issue #287)."""
    return torch.from_numpy(np.array(array, dtype=np.int64))


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows at random offsets (nanoGPT's get_batch): x is (B, T), and
    y is x shifted by one. Offsets come from ``generator``, so saving its state resumes
    the exact batch sequence."""
    if len(tokens) <= seq_len:
        raise DataError(f"{len(tokens)} tokens are too few for a window of seq_len={seq_len}")
    offsets = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)
    windows = _int64(tokens[offsets.numpy()[:, None] + np.arange(seq_len + 1)])
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class SequentialBatches:
    """Windows for truncated back-propagation through time: the stream is cut into
    ``batch_size`` contiguous rows (pytorch/examples' ``batchify``) and window i is columns
    [i * seq_len, (i + 1) * seq_len) of every row, so row b of window i + 1 continues row b
    of window i and an RNN can carry its hidden state across. The last window may be
    shorter. Indexable, so a trainer can resume at a saved window."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
        row_len = len(tokens) // batch_size
        if row_len < 2:
            raise DataError(f"{len(tokens)} tokens are too few for {batch_size} rows")
        self.rows = tokens[: batch_size * row_len].reshape(batch_size, row_len)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return math.ceil((self.rows.shape[1] - 1) / self.seq_len)  # the last token is no input

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range (0..{len(self) - 1})")
        start = i * self.seq_len
        end = min(start + self.seq_len, self.rows.shape[1] - 1)
        window = _int64(self.rows[:, start : end + 1])
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[i] for i in range(len(self)))


def eval_windows(
    tokens: np.ndarray, seq_len: int, stride: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pairs of shape (1, L) that score every token from position 1 to N - 1 exactly
    once with a model of context ``seq_len``.

    Windows start every ``stride`` tokens (default ``seq_len``: no overlap); targets a
    previous window already scored are ``IGNORE_INDEX``, so with ``stride < seq_len`` each
    token is scored with at least ``seq_len - stride + 1`` tokens of context (the strided
    method of the Hugging Face perplexity guide). The last window is moved back to end at
    the last token, so all windows are ``seq_len`` long unless the split is shorter.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    last = len(tokens) - 1  # the last target position
    begin = scored = 0  # first input position; targets up to `scored` are done
    while scored < last:
        begin = min(begin, max(0, last - seq_len))
        end = min(begin + seq_len, last)
        window = _int64(tokens[begin : end + 1])
        x, y = window[:-1], window[1:].clone()
        y[: scored - begin] = IGNORE_INDEX  # targets at positions begin+1 .. scored
        yield x[None], y[None]
        scored = end
        begin += stride
