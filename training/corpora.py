"""The corpora the shipped configs train on, fetched from where they are published.

    fable data fetch tinyshakespeare [NAME ...]   # `--all` (or `make data`) for every one
    fable data fetch tinyshakespeare --from ~/Downloads/input.txt   # a copy you already have
    fable data list                               # what there is, what it costs, where it is
    fable data list --json                        # the same for programs, file by file (below)

A config names a corpus as ``data.corpus: tinyshakespeare/input.txt`` (the corpus, then a
path inside it). Corpora are looked for in ``../shared/data`` beside the checkout first,
then in ``$FABLE_DATA_DIR`` (default ``~/.cache/fable/data``), where ``fetch`` writes.

Each file is downloaded from its publisher at a fixed revision (in the URL) and checked
against the SHA-256 pinned here, into a ``.part`` file renamed into place only when whole
and right. ``FABLE_DATA_MIRROR=http://host/prefix`` moves every source URL to
``http://host/prefix/<original host>/<original path>``: a mirror (or a test's local server)
holds the files under their original addresses. Nothing is downloaded but by this command.

``list --json`` is what the app reads to offer the corpora present on the machine: a list
of ``{"name", "about", "licence", "size_mb", "text", "files": [{"reference", "path",
"bytes"}]}`` (``text``: false for a corpus of tokenizer files, not text to train on),
one object per corpus and one file entry per file a config reads (``reference`` is what
``data.corpus`` and ``--corpus`` take; ``path``, absolute, and ``bytes`` are null when the
file is not here). Its fields are a stable format: add fields, never rename or drop one.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

# the shared read-only corpora of a development checkout; absent anywhere else
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MIRROR_VARIABLE = "FABLE_DATA_MIRROR"
RECORD = "fable-corpus.json"  # what was fetched into a corpus folder, from where, with which checksums
CHUNK = 1 << 20
TIMEOUT_S = 60
# TinyStoriesV2 raw text: stories separated by lines that are exactly "<|endoftext|>"
STORY_SEPARATOR = re.compile(r"^<\|endoftext\|>\r?$", re.MULTILINE)
TINYSTORIES_VALIDATION = 400  # the last 400 stories of the source file are the validation split


class CorpusError(RuntimeError):
    """A corpus that cannot be fetched or found, with the message a user acts on."""


@dataclass(frozen=True)
class Download:
    """One published file: where it lives, and its SHA-256 where the publisher keeps
    revisions (None: a publisher without revisions; the first fetch records what it got)."""

    file: str  # the name it gets in the corpus folder
    url: str
    sha256: str | None
    size: int | None = None


@dataclass(frozen=True)
class Corpus:
    name: str
    about: str
    licence: str
    downloads: tuple[Download, ...]
    size_mb: float  # about what a fetch downloads
    # makes the files the configs read (``built``) from the downloads; none: they are the downloads
    build: Callable[[Path], None] | None = field(default=None, compare=False)
    built: tuple[str, ...] = ()
    text: bool = True  # text to train on (False: gpt2's tokenizer files)

    def files(self) -> list[str]:
        """The files a config reads, once fetched."""
        return list(self.built or (d.file for d in self.downloads))


def split_tinystories(folder: Path) -> None:
    """TinyStoriesV2's validation file -> train.txt + valid.txt (its last 400 stories),
    each story followed by its ``<|endoftext|>`` line as in the source."""
    source = folder / CORPORA["tinystories"].downloads[0].file
    stories = [s.strip("\n") for s in STORY_SEPARATOR.split(source.read_text(encoding="utf-8"))]
    stories = [s for s in stories if s.strip()]
    if len(stories) <= TINYSTORIES_VALIDATION:
        raise CorpusError(f"{source} holds {len(stories)} stories, not enough for {TINYSTORIES_VALIDATION} "
                          "validation stories and a training split: not TinyStoriesV2's file")
    cut = len(stories) - TINYSTORIES_VALIDATION
    for name, part in (("train.txt", stories[:cut]), ("valid.txt", stories[cut:])):
        write_atomically(folder / name, "".join(f"{s}\n<|endoftext|>\n" for s in part))

_HF = "https://huggingface.co"
_GUTENBERG = "https://www.gutenberg.org/cache/epub/{n}/pg{n}.txt"
CORPORA = {c.name: c for c in (
    Corpus("tinyshakespeare", "Tiny Shakespeare, the char-rnn corpus (40,000 lines)", "public domain",
           (Download("input.txt", "https://raw.githubusercontent.com/karpathy/char-rnn/"
                     "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
                     "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),),
           1.1),
    Corpus("tinystories", "TinyStoriesV2's GPT-4 validation stories: the last 400 for validation, "
           "the rest (about 27,000) for training", "CDLA-Sharing-1.0",
           # the Hub serves the file at a revision; its checksum is recorded on the first fetch
           (Download("TinyStoriesV2-GPT4-valid.txt", f"{_HF}/datasets/roneneldan/TinyStories/resolve/"
                     "main/TinyStoriesV2-GPT4-valid.txt", None, 22_502_601),),
           22.5, build=split_tinystories, built=("train.txt", "valid.txt")),
    Corpus("wikitext-2", "WikiText-2's validation split, tokenized with <unk> (pytorch/examples' copy)",
           "CC BY-SA 3.0",
           (Download("valid.txt", "https://raw.githubusercontent.com/pytorch/examples/"
                     "77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/wikitext-2/valid.txt",
                     "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1_121_681),),
           1.1),
    Corpus("books", "four Project Gutenberg novels: The Adventures of Sherlock Holmes, Alice in "
           "Wonderland, The Wonderful Wizard of Oz, The Count of Monte Cristo", "public domain",
           # Project Gutenberg keeps no revisions of its texts: checksums are recorded on first fetch
           tuple(Download(f"{name}.txt", _GUTENBERG.format(n=n), None) for name, n in
                 (("sherlock", 1661), ("alice", 11), ("oz", 55), ("monte_cristo", 1184))),
           3.9),
    Corpus("gpt2", "GPT-2's byte-level BPE tokenizer files (50,257 tokens)", "MIT",
           tuple(Download(name, f"{_HF}/openai-community/gpt2/resolve/"
                          f"607a30d783dfa663caf39e06633721c8d4cfcd7e/{name}", sha, size)
                 for name, sha, size in (
                     ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                      1_042_301),
                     ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                      456_318))),
           1.5, text=False),
)}


# ---- where corpora are ----------------------------------------------------------------------


def data_dir() -> Path:
    """Where ``fetch`` writes: $FABLE_DATA_DIR, else the per-user cache."""
    if os.environ.get("FABLE_DATA_DIR"):
        return Path(os.environ["FABLE_DATA_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "fable" / "data"


def search_path() -> list[Path]:
    return list(dict.fromkeys([SHARED, data_dir()]))


def locate(reference: str) -> Path:
    """``tinyshakespeare/input.txt`` -> the first place that has it; a missing corpus is a
    CorpusError that names the command that fetches it."""
    corpus = Path(reference).parts[0] if reference else ""
    if corpus not in CORPORA:
        raise CorpusError(f"data.corpus: unknown corpus {corpus!r} in {reference!r}; Fable fetches "
                          f"{', '.join(CORPORA)} (for a file of your own, use data.path)")
    for root in search_path():
        if (root / reference).exists():
            return root / reference
    looked = " and ".join(str(root / reference) for root in search_path())
    raise CorpusError(f"corpus {corpus} is not here yet (looked in {looked}): "
                      f"`fable data fetch {corpus}` (or `make data`) downloads it")


def source_url(url: str) -> str:
    """The URL, moved under $FABLE_DATA_MIRROR when that is set."""
    mirror = os.environ.get(MIRROR_VARIABLE, "").rstrip("/")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{mirror}/{parts.netloc}{parts.path}"


# ---- fetching -------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    os.replace(part, path)


def read_record(folder: Path) -> dict:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _expected(download: Download, record: dict) -> str | None:
    """The pinned checksum, else the one the first fetch recorded."""
    return download.sha256 or record.get("files", {}).get(download.file, {}).get("sha256")


def _download(url: str, part: Path, expected_size: int | None, quiet: bool) -> None:
    """``url`` into ``part``, with a progress bar; a download that ends early is an error."""
    request = urllib.request.Request(url, headers={"User-Agent": "fable-data-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else expected_size
            with tqdm(total=total, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                      disable=quiet, file=sys.stderr) as bar:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            got = out.tell()
    except urllib.error.HTTPError as e:
        raise CorpusError(f"{url} answered {e.code} {e.reason}") from None
    except http.client.IncompleteRead as e:
        raise CorpusError(f"the download of {url} stopped after {len(e.partial)} bytes "
                          f"({e.expected} more were due)") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CorpusError(f"cannot reach {url} ({reason}). Without a network, copy the file "
                          f"from a machine that has one and give it with --from, or point "
                          f"{MIRROR_VARIABLE} at a mirror of it") from None
    due = int(length) if length and length.isdigit() else expected_size
    if due is not None and got < due:
        raise CorpusError(f"the download of {url} stopped after {got} of {due} bytes")


def fetch_file(download: Download, folder: Path, record: dict, *, source: Path | None,
               quiet: bool) -> tuple[str, bool]:
    """One file into ``folder``: (its sha256, whether any work was done). A file already
    there with the right checksum is kept; a wrong one is refused and never kept."""
    target = folder / download.file
    expected = _expected(download, record)
    if target.is_file() and expected and sha256_of(target) == expected:
        return expected, False
    part = target.with_name(target.name + ".part")
    origin = str(source) if source else source_url(download.url)
    try:
        if source:
            shutil.copyfile(source, part)
        else:
            _download(origin, part, download.size, quiet)
        if download.size is not None and part.stat().st_size != download.size and download.sha256:
            raise CorpusError(f"{origin} is {part.stat().st_size} bytes, not the {download.size} "
                              "Fable pins: a truncated or different file")
        got = sha256_of(part)
        if expected and got != expected:
            pinned = "pinned" if download.sha256 else "recorded at its first fetch"
            raise CorpusError(f"checksum mismatch for {origin}: SHA-256 {got}, not the {expected} "
                              f"{pinned}; the file was not kept (a changed upstream file or a bad "
                              f"mirror; `fable data fetch --from FILE` takes a copy you trust)")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    if not expected and not quiet:
        print(f"  {download.file}: its publisher keeps no revisions; recorded SHA-256 {got}",
              file=sys.stderr)
    return got, True


def fetch(name: str, *, into: Path | None = None, source: Path | None = None,
          quiet: bool = False) -> Path:
    """Fetch one corpus (no work when it is already there and whole); its folder."""
    corpus = CORPORA[name]
    if into is None and source is None and all((SHARED / name / f).is_file() for f in corpus.files()):
        if not quiet:
            print(f"{name}: already in {SHARED / name}")
        return SHARED / name
    folder = (into or data_dir()) / name
    folder.mkdir(parents=True, exist_ok=True)
    record = read_record(folder)
    sources = _sources(corpus, source)
    files, worked = {}, False
    for download in corpus.downloads:
        digest, did = fetch_file(download, folder, record, source=sources.get(download.file), quiet=quiet)
        files[download.file] = {"url": download.url, "sha256": digest}
        worked |= did
    if corpus.build and (worked or not all((folder / f).is_file() for f in corpus.files())):
        corpus.build(folder)
        worked = True
    if worked:
        text = json.dumps({"corpus": name, "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "files": files}, indent=2) + "\n"
        write_atomically(folder / RECORD, text)
    if not quiet:
        print(f"{name}: {'fetched into' if worked else 'already in'} {folder}")
    return folder


def _sources(corpus: Corpus, given: Path | None) -> dict[str, Path]:
    """--from: a file (for a corpus of one download) or a folder that holds the files by name."""
    if given is None:
        return {}
    given = given.expanduser()
    if given.is_file() and len(corpus.downloads) == 1:
        return {corpus.downloads[0].file: given}
    if given.is_dir():
        missing = [d.file for d in corpus.downloads if not (given / d.file).is_file()]
        if missing:
            raise CorpusError(f"--from {given}: no {', '.join(missing)} there")
        return {d.file: given / d.file for d in corpus.downloads}
    wanted = corpus.downloads[0].file if len(corpus.downloads) == 1 else \
        f"a folder holding {', '.join(d.file for d in corpus.downloads)}"
    raise CorpusError(f"--from {given}: not found; {corpus.name} wants {wanted}")


# ---- the command ----------------------------------------------------------------------------


def file_entry(reference: str) -> dict:
    """Where ``reference`` is, found as a config finds it, and its size; nulls when absent."""
    try:
        path = locate(reference).resolve()
    except CorpusError:
        path = None
    if path is None or not path.is_file():
        return {"reference": reference, "path": None, "bytes": None}
    return {"reference": reference, "path": str(path), "bytes": path.stat().st_size}


def corpus_entries() -> list[dict]:
    """``list --json``'s objects (the module docstring): every corpus, present or not."""
    return [{"name": c.name, "about": c.about, "licence": c.licence, "size_mb": c.size_mb,
             "text": c.text, "files": [file_entry(f"{c.name}/{name}") for name in c.files()]}
            for c in CORPORA.values()]


def list_corpora(as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(corpus_entries(), indent=2))
        return
    print(f"{'corpus':16} {'download':>9}  {'where':40} about")
    for corpus in CORPORA.values():
        try:
            where = str(locate(corpus.name))
        except CorpusError:
            where = "not fetched"
        print(f"{corpus.name:16} {corpus.size_mb:>6.1f} MB  {where:40} {corpus.about} ({corpus.licence})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fable data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    get = commands.add_parser("fetch", help="download corpora, checked against their pinned checksums")
    get.add_argument("names", nargs="*", metavar="NAME", help=f"one or more of {', '.join(CORPORA)}")
    get.add_argument("--all", action="store_true", help="every corpus")
    get.add_argument("--from", dest="source", type=Path, metavar="PATH",
                     help="a local copy (a file, or a folder of the files by name) instead of the network")
    get.add_argument("--dir", type=Path, help=f"where to put it (default $FABLE_DATA_DIR, here {data_dir()})")
    get.add_argument("--quiet", action="store_true", help="no progress bars")
    listing = commands.add_parser("list", help="the corpora, their size and where they are")
    listing.add_argument("--json", action="store_true",
                         help="a JSON list with each file a config reads: its path (null when absent) and size")
    args = parser.parse_args(argv)
    if args.command == "list":
        list_corpora(args.json)
        return 0
    names = list(CORPORA) if args.all else args.names
    unknown = [n for n in names if n not in CORPORA]
    if not names or unknown:
        parser.error(f"{'unknown corpus ' + ', '.join(unknown) if unknown else 'name a corpus'}; "
                     f"choose from {', '.join(CORPORA)} (or --all)")
    if args.source and len(names) != 1:
        parser.error("--from gives the files of one corpus")
    try:
        for name in names:
            fetch(name, into=args.dir, source=args.source, quiet=args.quiet)
    except CorpusError as e:
        print(f"fable data fetch: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
