"""One tokenizer class for every kind of vocabulary Fable trains or borrows.

Every kind (characters, words, trained byte-level BPE, GPT-2's BPE, any Hugging Face
tokenizer) is a Hugging Face ``tokenizers.Tokenizer`` (the Rust library) underneath, so
every kind saves as one self-contained ``tokenizer.json`` that ``transformers`` can load
too, and batch encoding runs in parallel.

Special-token strings typed in user text are encoded as plain text, never as control
tokens: callers build control sequences by concatenating ids, e.g. the infilling format
``encode(first) + [blank_id] + encode(last) + [sep_id] + encode(middle) + [eos_id]``.
``encode`` never adds bos/eos by itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

#: Role -> token string. Trained kinds give them ids 0..5 in this order. ``blank`` and
#: ``sep`` are the story-infilling markers: ``first <blank> last <sep> middle <eos>``.
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<bos>",
    "eos": "<eos>",
    "blank": "<blank>",
    "sep": "<sep>",
}
_SPECIAL_SET = frozenset(SPECIAL_TOKENS.values())
KINDS = ("char", "word", "bpe", "gpt2", "hf")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GPT2_END_OF_TEXT = "<|endoftext|>"
_NO_MAX_LENGTH = int(1e30)  # what transformers writes for "no length limit"

# torchtext's `basic_english` rules, verbatim: applied in order after lower-casing.
_BASIC_ENGLISH_RULES = [
    (r"\'", " '  "),
    (r"\"", ""),
    (r"\.", " . "),
    (r"<br \/>", " "),
    (r",", " , "),
    (r"\(", " ( "),
    (r"\)", " ) "),
    (r"\!", " ! "),
    (r"\?", " ? "),
    (r"\;", " "),
    (r"\:", " "),
    (r"\s+", " "),
]
_BASIC_ENGLISH_RE = [(re.compile(pattern), repl) for pattern, repl in _BASIC_ENGLISH_RULES]

# Python's `\s` (used by torchtext's `\s+` and by str.split) also matches U+001C..U+001F;
# Oniguruma's `\s` (Unicode White_Space) does not.
_ONIG_PY_WHITESPACE = r"[\s\x1c-\x1f]+"
# str.lower() turns a word-final capital sigma into "ς"; the tokenizers Lowercase
# normalizer maps characters one by one (always "σ"), so the word pipeline first rewrites
# final sigmas itself. This is Unicode's Final_Sigma context, as CPython tests it: the
# nearest character on each side that is not case-ignorable must be cased before the Σ
# and must not be cased after it. `\K` keeps the left context out of the replacement.
_CASED = r"[\p{Cased}&&\P{Case_Ignorable}]"
_FINAL_SIGMA = _CASED + r"\p{Case_Ignorable}*\KΣ(?!\p{Case_Ignorable}*" + _CASED + ")"


def basic_english(text: str) -> list[str]:
    """torchtext's ``basic_english`` tokenizer: the reference the word kind reproduces."""
    text = text.lower()
    for pattern, repl in _BASIC_ENGLISH_RE:
        text = pattern.sub(repl, text)
    return text.split()


class Tokenizer:
    """A ``tokenizers.Tokenizer`` (``backend``) plus the roles of Fable's special tokens.

    Build one with a ``train_*`` / ``from_*`` classmethod, ``load`` or ``build_tokenizer``.
    ``special_tokens`` maps each role in ``SPECIAL_TOKENS`` to a token of the vocabulary;
    only ``unk`` may be None (byte-level vocabularies can spell any text without it).
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, kind: str, special_tokens: dict[str, str | None]
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
        if set(special_tokens) != set(SPECIAL_TOKENS):
            raise ValueError(f"special_tokens must have exactly the roles {list(SPECIAL_TOKENS)}")
        self.backend = backend
        self.kind = kind
        self.special_tokens = dict(special_tokens)
        self.chat_template: str | None = None  # Jinja, as in HF tokenizer configs (models_src.chat)
        # Whether a prompt starts with bos: Fable's models learned every text after one; a
        # model trained elsewhere (imported) gets one only where its own tokenizer adds it.
        self.adds_bos = True
        # Typed "<eos>" must stay text. The flag is not saved in tokenizer.json, so it is
        # set here, on every way in.
        backend.encode_special_tokens = True
        self._ids: dict[str, int | None] = {}
        for role, token in special_tokens.items():
            if token is None and role != "unk":
                raise ValueError(f"the {role!r} special token is required")
            self._ids[role] = None if token is None else backend.token_to_id(token)
            if token is not None and self._ids[role] is None:
                raise ValueError(f"special token {token!r} ({role}) is not in the vocabulary")

    # ---- constructors -------------------------------------------------------------

    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """One token per Unicode code point: the specials, then every character seen,
        sorted (so the vocabulary depends only on the set of characters). Characters not
        seen encode to ``unk_id``."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        backend = _word_level(sorted(chars))
        # `[\s\S]` rather than `.`, which does not match "\n"
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return cls(backend, "char", SPECIAL_TOKENS)

    @classmethod
    def train_word(
        cls, texts: Iterable[str], min_freq: int = 1, max_size: int | None = None
    ) -> Tokenizer:
        """torchtext's ``basic_english`` + ``build_vocab_from_iterator(min_freq, specials)``:
        the specials, then the words seen at least ``min_freq`` times, most frequent first
        (ties alphabetical); other words encode to ``unk_id``. ``max_size`` caps the whole
        vocabulary, specials included. ``decode`` joins the words as prose (``_detokenize``)."""
        if max_size is not None and max_size < len(SPECIAL_TOKENS):
            raise ValueError(f"max_size={max_size} leaves no room for the special tokens")
        normalizer, pre_tokenizer = _basic_english_pipeline()
        # Count words with the trainer (fast, Rust) on a throwaway tokenizer, but give it no
        # special tokens: it would count a typed "<unk>" as a word again and give that
        # string two ids, leaving a hole in the vocabulary. The final vocabulary is built
        # like torchtext's, which also drops the specials from the counts.
        counter = tokenizers.Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk"]))
        counter.normalizer, counter.pre_tokenizer = normalizer, pre_tokenizer
        trainer = trainers.WordLevelTrainer(
            vocab_size=2**63 - 1, min_frequency=min_freq, special_tokens=[], show_progress=False
        )
        counter.train_from_iterator(texts, trainer)
        counts_order = counter.get_vocab()  # word -> rank by (count desc, word)
        words = [w for w in sorted(counts_order, key=counts_order.get) if w not in _SPECIAL_SET]
        if max_size is not None:
            words = words[: max_size - len(SPECIAL_TOKENS)]
        backend = _word_level(words)
        backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
        # no decoder: tokenizers joins tokens with single spaces by default
        return cls(backend, "word", SPECIAL_TOKENS)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Byte-level BPE (GPT-2 style): all 256 bytes are in the vocabulary, so any text
        round-trips exactly and nothing is ever unknown."""
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, "bpe", SPECIAL_TOKENS)

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """GPT-2's byte-level BPE from its ``vocab.json`` and ``merges.txt``. Its
        ``<|endoftext|>`` (id 50256) is both bos and eos; pad, blank and sep are added
        after it (ids 50257..)."""
        for path in (vocab_json, merges_txt):
            if not Path(path).is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        special_tokens = {
            **SPECIAL_TOKENS,
            "unk": None,
            "bos": GPT2_END_OF_TEXT,
            "eos": GPT2_END_OF_TEXT,
        }
        backend.add_special_tokens(_unique_tokens(special_tokens))
        return cls(backend, "gpt2", special_tokens)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, cache_dir: str | Path | None = None, *,
        fixed_vocab: bool = False,
    ) -> Tokenizer:
        """Any Hugging Face (fast) tokenizer: a directory, or a hub name found in an offline
        cache (``models--org--name/snapshots/<rev>/``); nothing is downloaded. Its bos, eos,
        unk and pad are kept; missing roles get Fable's tokens (bos falls back to eos,
        as for GPT-2; unk stays None, since a vocabulary without one never produces it).

        ``fixed_vocab``: the tokenizer of a model trained elsewhere, whose embedding has no
        row for a new token. Nothing is added; eos plays the roles the vocabulary lacks
        (pad, as usual for GPT-2, and the infilling markers, which such a model never
        learned: it is never offered infilling)."""
        # slow imports, needed only here
        from huggingface_hub import snapshot_download
        from transformers import AutoTokenizer

        try:
            directory = Path(name_or_path)
            if not directory.is_dir():
                # Resolve the snapshot ourselves: AutoTokenizer given a hub name also wants
                # the model's config.json, which a tokenizer-only copy does not have.
                directory = Path(
                    snapshot_download(str(name_or_path), cache_dir=cache_dir, local_files_only=True)
                )
            hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as err:
            raise OSError(
                f"could not load a Hugging Face tokenizer from {str(name_or_path)!r}"
                f" (cache_dir={cache_dir!r}). Nothing is downloaded at run time: give a local"
                f" tokenizer directory, or a hub name already in the offline cache. ({err})"
            ) from err
        if not hf.is_fast:
            raise ValueError(
                f"{name_or_path!r} has no fast (tokenizers) backend; only fast tokenizers work"
            )
        backend = hf.backend_tokenizer
        # Padding and truncation saved with some tokenizers would change what encode returns.
        backend.no_padding()
        backend.no_truncation()
        special_tokens = {
            **SPECIAL_TOKENS,
            "pad": hf.pad_token or SPECIAL_TOKENS["pad"],
            "unk": hf.unk_token,
            "bos": hf.bos_token or hf.eos_token or SPECIAL_TOKENS["bos"],
            "eos": hf.eos_token or SPECIAL_TOKENS["eos"],
        }
        if fixed_vocab:
            if not backend.get_vocab(with_added_tokens=False):  # special tokens alone spell nothing
                raise ValueError(f"{name_or_path}: the tokenizer has no tokens to write text with")
            vocab = backend.get_vocab(with_added_tokens=True)
            eos = special_tokens["eos"]
            special_tokens = {role: token if token is None or token in vocab else eos
                              for role, token in special_tokens.items()}
        else:
            backend.add_special_tokens(_unique_tokens(special_tokens))
        tokenizer = cls(backend, "hf", special_tokens)
        if fixed_vocab:  # as the model was trained: bos only where its tokenizer puts one
            added = hf("a")["input_ids"]
            tokenizer.adds_bos = len(added) > len(hf("a", add_special_tokens=False)["input_ids"]) \
                and added[0] == hf.bos_token_id
        return tokenizer

    # ---- persistence ----------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``
        (created if needed); ``load`` and ``transformers.AutoTokenizer`` both read them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        tokens = self.special_tokens
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "fable_kind": self.kind,
            "bos_token": tokens["bos"],
            "eos_token": tokens["eos"],
            "unk_token": tokens["unk"],
            "pad_token": tokens["pad"],
            "additional_special_tokens": [tokens["blank"], tokens["sep"]],
            "model_max_length": _NO_MAX_LENGTH,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / CONFIG_FILE).write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer written by ``save``."""
        directory = Path(directory)
        config_path, tokenizer_path = directory / CONFIG_FILE, directory / TOKENIZER_FILE
        for path in (config_path, tokenizer_path):
            if not path.is_file():
                raise FileNotFoundError(f"no saved tokenizer here: {path} does not exist")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            kind = config["fable_kind"]
            blank, sep = config["additional_special_tokens"]
            special_tokens = {
                "pad": config["pad_token"],
                "unk": config.get("unk_token"),
                "bos": config["bos_token"],
                "eos": config["eos_token"],
                "blank": blank,
                "sep": sep,
            }
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{config_path} is not a Fable tokenizer config: {err!r}") from err
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as err:  # the Rust side raises a bare Exception
            raise ValueError(f"{tokenizer_path} is not a valid tokenizer file: {err}") from err
        try:
            tokenizer = cls(backend, kind, special_tokens)
        except ValueError as err:
            raise ValueError(f"{directory}: {err}") from err
        template = config.get("chat_template")
        tokenizer.chat_template = template if isinstance(template, str) and template.strip() else None
        return tokenizer

    # ---- encoding ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: a borrowed tokenizer's post-processor must not add its
        # own bos/cls/eos; Fable's callers place special ids themselves.
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Like ``encode`` for each text, in parallel."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def splits_like_gpt2(self) -> bool:
        """Whether text is pre-tokenized with GPT-2's byte-level regex split (the "bpe" and
        "gpt2" kinds, and borrowed tokenizers built that way): what GPT-2's exporters and
        llama.cpp's "gpt-2" pre-tokenizer assume."""
        pre = json.loads(self.backend.to_str()).get("pre_tokenizer") or {}
        return (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
                and not pre.get("add_prefix_space"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _detokenize(text) if self.kind == "word" else text

    def decode_batch(
        self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        texts = self.backend.decode_batch(
            [list(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )
        return [_detokenize(text) for text in texts] if self.kind == "word" else texts

    # ---- vocabulary -------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Every id the model must embed, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos"]

    @property
    def blank_id(self) -> int:
        return self._ids["blank"]

    @property
    def sep_id(self) -> int:
        return self._ids["sep"]

    @property
    def special_ids(self) -> set[int]:
        return {i for i in self._ids.values() if i is not None}

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


# The word kind's text as prose: its words come back joined by spaces and lowercased
# ("mr . holmes , i said"). Only the spaces basic_english itself puts around . , ! ? ( )
# and ' are taken out, so the prose encodes back to the same words (a continued text, a
# pasted one). Each rule looks at two neighbouring words at most, so a stream that decodes
# each new word with the one before it (models_src.sampling) writes the same text as
# decoding the whole: "mr. holmes, I said".
_DETOKENIZE = [
    (re.compile(r" (?=[.,!?)'])"), ""),  # no space before closing punctuation
    (re.compile(r"(?<=[(']) "), ""),  # nor after "(" (and "don ' t" is one word again)
    (re.compile(r"(?<=[.,!?)']) (?=”)"), ""),  # a closing quote after the punctuation it closes
    (re.compile(r"(?<![^ “(])i(?![^ .,!?’”)'])"), "I"),  # the pronoun
]


def _detokenize(text: str) -> str:
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


def _unique_tokens(special_tokens: dict[str, str | None]) -> list[str]:
    """The distinct tokens among the roles, in role order (bos may equal eos)."""
    return list(dict.fromkeys(t for t in special_tokens.values() if t is not None))


def _word_level(tokens: list[str]) -> tokenizers.Tokenizer:
    """A WordLevel tokenizer whose ids are the specials (0..5) then ``tokens``."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *tokens])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return backend


def _basic_english_pipeline() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    """``basic_english`` as a tokenizers normalizer + pre-tokenizer (same words out)."""
    rules = [(Regex(p), r) for p, r in _BASIC_ENGLISH_RULES[:-1]]
    rules.append((Regex(_ONIG_PY_WHITESPACE), " "))
    # The vocabulary holds the specials' strings, so a typed "<eos>" word would map to
    # eos_id: such words become "<unk>", i.e. an unknown word.
    specials = "|".join(re.escape(token) for token in SPECIAL_TOKENS.values())
    rules.append((Regex(f"(?<![^ ])(?:{specials})(?![^ ])"), SPECIAL_TOKENS["unk"]))
    normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(_FINAL_SIGMA), "ς"), normalizers.Lowercase()]
        + [normalizers.Replace(pattern, repl) for pattern, repl in rules]
    )
    return normalizer, pre_tokenizers.WhitespaceSplit()


def build_tokenizer(kind: str, texts: Iterable[str] | None = None, **options: Any) -> Tokenizer:
    """Build the tokenizer a config describes.

    - ``char`` / ``word`` / ``bpe``: trained on ``texts``; options are the ``train_*``
      keyword arguments (``bpe`` needs ``vocab_size``).
    - ``gpt2``: ``vocab_file`` and ``merges_file``, or ``path``: a directory holding
      ``vocab.json`` and ``merges.txt``.
    - ``hf``: ``path`` (a directory or an offline-cached hub name), optional ``cache_dir``.
    """
    trainers_by_kind = {
        "char": Tokenizer.train_char,
        "word": Tokenizer.train_word,
        "bpe": Tokenizer.train_bpe,
    }
    if kind in trainers_by_kind:
        if texts is None:
            raise ValueError(f"a {kind!r} tokenizer is trained from texts, and none were given")
        return trainers_by_kind[kind](texts, **options)
    if kind == "gpt2":
        return _gpt2_from_options(**options)
    if kind == "hf":
        if "path" not in options:
            raise ValueError("tokenizer kind 'hf' needs path: a directory or a cached hub name")
        return Tokenizer.from_pretrained(options.pop("path"), **options)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")


def _gpt2_from_options(
    path: str | Path | None = None,
    vocab_file: str | Path | None = None,
    merges_file: str | Path | None = None,
) -> Tokenizer:
    if path is not None:
        vocab_file = vocab_file or Path(path) / "vocab.json"
        merges_file = merges_file or Path(path) / "merges.txt"
    if vocab_file is None or merges_file is None:
        raise ValueError(
            "tokenizer kind 'gpt2' needs vocab_file and merges_file, or path: a directory"
            " holding vocab.json and merges.txt"
        )
    return Tokenizer.from_gpt2_files(vocab_file, merges_file)
