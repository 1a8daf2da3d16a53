"""`fable data fetch`: the corpora from their publishers' addresses, here a local HTTP server
on 127.0.0.1 laid out as a mirror (FABLE_DATA_MIRROR), serving the real files where
../shared/data has them. A wrong checksum, a download cut short, an unreachable source and
a corpus not fetched yet each stop with their own message and leave no file behind.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import httpx
import pytest
from tests.gunicorn_server import GunicornServer, free_port

from training import corpora
from training.config import load_config
from training.corpora import CORPORA, CorpusError, fetch
from training.data import DataError, load_documents

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = corpora.SHARED / "tinyshakespeare" / "input.txt"
needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="no ../shared/data/tinyshakespeare")


def mirror_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"/{parts.netloc}{parts.path}"


class Mirror:
    """A local HTTP server holding files under their original addresses. ``cut`` files
    announce their whole length and send half."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if self.path in mirror.cut else body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, download, body: bytes, *, cut: bool = False) -> None:
        self.files[mirror_path(download.url)] = body
        if cut:
            self.cut.add(mirror_path(download.url))

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    server = Mirror()
    monkeypatch.setenv("FABLE_DATA_MIRROR", server.url + "/")
    monkeypatch.setenv("FABLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(corpora, "SHARED", tmp_path / "no-shared")
    yield server
    server.close()


def stories(count: int, tag: str = "") -> str:
    return "".join(f"Once upon a time there was a cat {tag}{i}.\nThe end.\n<|endoftext|>\n" for i in range(count))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


# ---- pinned files ------------------------------------------------------------------------------


@needs_shakespeare
def test_fetch_downloads_the_pinned_file_and_a_second_fetch_does_no_work(mirror, tmp_path, capsys):
    download = CORPORA["tinyshakespeare"].downloads[0]
    mirror.put(download, SHAKESPEARE.read_bytes())
    folder = fetch("tinyshakespeare")
    assert folder == tmp_path / "data" / "tinyshakespeare"
    assert (folder / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()
    record = json.loads((folder / corpora.RECORD).read_text())
    assert record["files"]["input.txt"] == {"url": download.url, "sha256": download.sha256}
    assert mirror.requests == [mirror_path(download.url)]
    assert "fetched into" in capsys.readouterr().out

    fetch("tinyshakespeare")
    assert len(mirror.requests) == 1
    assert "already in" in capsys.readouterr().out
    # and a config that names the corpus reads it from there
    config = load_config(ROOT / "training/configs/char_gpt_shakespeare.yaml")
    assert sum(map(len, load_documents(config.data)["train"])) == int(0.9 * 1_115_394)


def test_a_wrong_checksum_is_refused_and_nothing_is_kept(mirror, tmp_path):
    download = CORPORA["gpt2"].downloads[0]  # vocab.json: the right size, other bytes
    mirror.put(download, b"x" * download.size)
    with pytest.raises(CorpusError, match=r"checksum mismatch for http://127\.0\.0\.1:\d+/huggingface\.co/"
                                          r"openai-community/gpt2/.*vocab\.json: SHA-256 \w+, not the "
                                          + download.sha256 + " pinned; the file was not kept"):
        fetch("gpt2")
    assert leftovers(tmp_path / "data" / "gpt2") == []


def test_a_file_of_the_wrong_size_is_refused(mirror, tmp_path):
    download = CORPORA["wikitext-2"].downloads[0]
    mirror.put(download, b"= Heading =\n")
    with pytest.raises(CorpusError, match=r"is 12 bytes, not the 1121681 Fable pins: a truncated or different file"):
        fetch("wikitext-2")
    assert leftovers(tmp_path / "data" / "wikitext-2") == []


def test_a_download_cut_short_is_refused_and_its_part_removed(mirror, tmp_path):
    download = CORPORA["tinyshakespeare"].downloads[0]
    mirror.put(download, b"First Citizen:\n" * 1000, cut=True)
    with pytest.raises(CorpusError, match=r"the download of http://127\.0\.0\.1:\d+/raw\.githubusercontent\.com/"
                                          r"karpathy/char-rnn/\w+/data/tinyshakespeare/input\.txt stopped after "):
        fetch("tinyshakespeare")
    assert leftovers(tmp_path / "data" / "tinyshakespeare") == []


def test_a_missing_file_names_its_address(mirror):
    with pytest.raises(CorpusError, match=r"http://127\.0\.0\.1:\d+/raw\.githubusercontent\.com/.*input\.txt "
                                          r"answered 404"):
        fetch("tinyshakespeare")


def test_offline_the_error_names_the_url_and_how_to_use_a_local_copy(monkeypatch, tmp_path):
    monkeypatch.setenv("FABLE_DATA_MIRROR", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("FABLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(corpora, "SHARED", tmp_path / "no-shared")
    with pytest.raises(CorpusError) as caught:
        fetch("tinyshakespeare", quiet=True)
    message = str(caught.value)
    assert message.startswith("cannot reach http://127.0.0.1:")
    assert "/raw.githubusercontent.com/karpathy/char-rnn/" in message
    assert "--from" in message and "FABLE_DATA_MIRROR" in message
    assert leftovers(tmp_path / "data" / "tinyshakespeare") == []


def test_from_takes_a_local_copy_checked_like_a_download(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "SHARED", tmp_path / "no-shared")
    wrong = tmp_path / "input.txt"
    wrong.write_text("not Shakespeare\n")
    with pytest.raises(CorpusError, match="not the 1115394 Fable pins"):
        fetch("tinyshakespeare", into=tmp_path / "data", source=wrong, quiet=True)
    if SHAKESPEARE.is_file():
        folder = fetch("tinyshakespeare", into=tmp_path / "data", source=SHAKESPEARE, quiet=True)
        assert (folder / "input.txt").read_bytes() == SHAKESPEARE.read_bytes()
    with pytest.raises(CorpusError, match=r"--from .*nope: not found; gpt2 wants a folder holding "
                                          r"vocab\.json, merges\.txt"):
        fetch("gpt2", into=tmp_path / "data", source=tmp_path / "nope", quiet=True)


# ---- files without revisions, and a corpus built from its download ------------------------------


def test_tinystories_is_split_into_training_and_400_validation_stories(mirror, tmp_path):
    download = CORPORA["tinystories"].downloads[0]
    mirror.put(download, stories(1000).encode())
    folder = fetch("tinystories", quiet=True)
    train = (folder / "train.txt").read_text()
    valid = (folder / "valid.txt").read_text()
    assert train + valid == stories(1000)
    assert valid.count("<|endoftext|>") == 400 and valid.startswith("Once upon a time there was a cat 600.")
    record = json.loads((folder / corpora.RECORD).read_text())
    assert record["files"][download.file]["sha256"] == hashlib.sha256(stories(1000).encode()).hexdigest()
    config = load_config(ROOT / "training/configs/tinystories_gpt.yaml")
    documents = load_documents(config.data)
    assert (len(documents["train"]), len(documents["validation"])) == (600, 400)

    # fetched again: no work; the publisher's file changed since: refused against the record
    fetch("tinystories", quiet=True)
    assert len(mirror.requests) == 1
    mirror.put(download, stories(1000, tag="changed ").encode())
    (folder / download.file).unlink()
    with pytest.raises(CorpusError, match="not the [0-9a-f]{64} recorded at its first fetch"):
        fetch("tinystories", quiet=True)
    assert (folder / "valid.txt").read_text() == valid  # what was there is untouched


def test_a_file_too_short_for_tinystories_is_refused(mirror):
    mirror.put(CORPORA["tinystories"].downloads[0], stories(300).encode())
    with pytest.raises(CorpusError, match="holds 300 stories, not enough for 400 validation stories"):
        fetch("tinystories", quiet=True)


# ---- configs and the command ------------------------------------------------------------------------


def test_a_config_whose_corpus_is_not_fetched_says_which_command_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FABLE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(corpora, "SHARED", tmp_path / "no-shared")
    config = load_config(ROOT / "training/configs/tinystories_gpt.yaml")
    with pytest.raises(DataError, match=r"corpus tinystories is not here yet \(looked in .*no-shared/tinystories "
                                        r"and .*data/tinystories\): `fable data fetch tinystories` \(or `make data`\)"):
        load_documents(config.data)
    with pytest.raises(DataError, match="unknown corpus 'tinystory'"):
        load_documents(load_config(ROOT / "training/configs/tinystories_gpt.yaml", ["data.corpus=tinystory"]).data)


def test_data_path_on_the_command_line_replaces_the_configs_corpus(tmp_path):
    config = load_config(ROOT / "training/configs/char_gpt_shakespeare.yaml", [f"data.path={tmp_path}/my.txt"])
    assert (config.data.path, config.data.corpus) == (f"{tmp_path}/my.txt", None)


def test_every_shipped_config_names_a_corpus_fable_fetches():
    for path in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        config = load_config(path)
        assert config.data.corpus and config.data.corpus.split("/")[0] in CORPORA, path.name


def test_the_command_names_what_is_wrong(capsys):
    for argv, message in ((["fetch"], "name a corpus"), (["fetch", "nope"], "unknown corpus nope"),
                          (["fetch", "books", "gpt2", "--from", "x"], "--from gives the files of one corpus")):
        with pytest.raises(SystemExit) as stopped:
            corpora.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


# ---- from a fresh clone: fetch, train, serve -------------------------------------------------------


def fresh_clone(target: Path) -> Path:
    """What `git clone` of this working tree holds (tracked and new files, nothing ignored),
    with no ../shared beside it."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@needs_shakespeare
@pytest.mark.train
@pytest.mark.server
def test_from_a_fresh_clone_the_readmes_commands_fetch_train_and_serve_a_model(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = fresh_clone(tmp_path / "somewhere" / "fable")
    assert not (clone.parent / "shared").exists()
    server = Mirror()
    server.put(CORPORA["tinyshakespeare"].downloads[0], SHAKESPEARE.read_bytes())
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FABLE_")}
    environment.update(FABLE_DATA_DIR=str(tmp_path / "empty-cache"), FABLE_DATA_MIRROR=server.url,
                       PYTHONPATH=str(clone))
    readme = (ROOT / "README.md").read_text()
    fable = [sys.executable, "-m", "training.cli"]  # what `fable` runs
    try:
        for command in ("fable data fetch tinyshakespeare",
                        "fable train --config training/configs/char_gpt_shakespeare.yaml"):
            assert command in readme
        done = subprocess.run([*fable, "data", "fetch", "tinyshakespeare"], cwd=clone, env=environment,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "empty-cache" / "tinyshakespeare" / "input.txt").is_file()
        done = subprocess.run([*fable, "train", "--config", "training/configs/char_gpt_shakespeare.yaml",
                               "name=my-shakespeare", "training.max_steps=20", "training.eval_every=20",
                               "training.eval_batches=2", "--quiet"],
                              cwd=clone, env=environment, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert (clone / "checkpoints" / "my-shakespeare" / "model.safetensors").is_file()
    finally:
        server.close()
    with GunicornServer(command=[*fable, "serve"], cwd=clone) as served:
        answer = httpx.post(f"{served.url}/api/generate", timeout=60, json={
            "model": "my-shakespeare", "prompt": "ROMEO:", "stream": False,
            "options": {"num_predict": 16, "temperature": 0}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["response"] and answer.json()["model"] == "my-shakespeare"
