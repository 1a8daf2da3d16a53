"""The training page (/train) with the app's test client and a stand-in for the training
command (tests/pages/fake_trainer.py): starting, refusing, following, cancelling,
finishing, deleting and settling runs. The real command trains in
tests/pages/test_browser_train.py and tests/pages/test_train_restart.py."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest

from app.pages import training_runs
from app.pages.training_runs import TrainingRuns
from tests.app_support import wait_until
from tests.pages.page_helpers import parse_sse

FAKE = Path(__file__).with_name("fake_trainer.py")
TOKEN = "a-training-admin-token"
TEXT = ("The quick brown fox jumps over the lazy dog. " * 40).encode()
SHAKESPEARE = "tinyshakespeare/input.txt"

pytestmark = pytest.mark.subprocess  # each run is a process, as the page starts them


@pytest.fixture
def studio(make_app, checkpoint_dir, tmp_path, monkeypatch):
    """An app whose training page runs the stand-in trainer: (app, its runs)."""
    models = tmp_path / "models"
    shutil.copytree(checkpoint_dir / "tiny-gpt", models / "tiny-gpt")
    app = make_app(FABLE_CHECKPOINT_DIR=str(models), FABLE_TRAIN_DIR=str(tmp_path / "runs"),
                   FABLE_EXPERIMENTS_DIR=str(tmp_path / "experiments"))
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    runs = TrainingRuns(tmp_path / "runs", models, tmp_path / "experiments", threads=1,
                        quota_bytes=64 * 2**20, python=str(python))
    app.extensions["fable.training"] = runs
    app.extensions["fable.training.bundled"] = (float("inf"),
                                                {SHAKESPEARE: ("Tiny Shakespeare", 1_115_394)})
    monkeypatch.setenv("FAKE_MODEL", str(checkpoint_dir / "tiny-gpt"))
    monkeypatch.setenv("FAKE_TRAINER", "finish")
    yield app, runs
    training_runs.stop_running(runs.root)  # a test that failed half-way leaves nothing running


def upload(client, name: str, data: bytes = TEXT, **fields):
    form = {"text": "upload", "preset": "char-gpt", "minutes": "1", "name": name,
            "upload": (_file(data), "story.txt"), **fields}
    return client.post("/train", data=form, content_type="multipart/form-data")


def _file(data: bytes):
    import io
    return io.BytesIO(data)


# The command runs at nice 10 (serving first): on a machine busy with other tests it may
# wait seconds for a core, so the waits are long; they end as soon as the state is there.
def wait_for(runs: TrainingRuns, name: str, state: str, timeout: float = 60) -> None:
    assert wait_until(lambda: runs.status(name).state == state, timeout), \
        (runs.status(name), runs.log_path(name).read_text())


def wait_served(app, name: str, served: bool = True, timeout: float = 60) -> None:
    """The run's thread reloads the models just after it records the end."""
    assert wait_until(lambda: (name in app.extensions["fable.registry"]) == served, timeout)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


# ---- access --------------------------------------------------------------------------------

def test_the_page_needs_the_admin_token_when_one_is_set(make_app):
    app = make_app(FABLE_ADMIN_TOKEN=TOKEN)
    client = app.test_client()
    assert client.get("/train").status_code == 401
    assert client.post("/train", data={"name": "x"}).status_code == 401
    assert client.get("/train/x/events").status_code == 401
    assert client.get("/train", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    basic = base64.b64encode(f"any:{TOKEN}".encode()).decode()
    page = client.get("/train", headers={"Authorization": f"Basic {basic}"})
    assert page.status_code == 200 and "Start training" in page.text


# ---- a whole run ---------------------------------------------------------------------------

def test_a_run_trains_streams_its_records_and_is_served(studio):
    app, runs = studio
    client = app.test_client()
    response = upload(client, "my-fox")
    assert response.status_code == 303 and response.location.endswith("/train/my-fox")
    wait_for(runs, "my-fox", "done")
    events = parse_sse(client.get("/train/my-fox/events").text)
    records = [r for e in events if e["event"] == "records" for r in json.loads(e["data"])]
    assert [r["group"] for r in records if "group" in r] == ["train"] * 5 + ["validation", "sample"]
    assert events[-1]["event"] == "end"
    assert json.loads(events[-1]["data"]) == {"state": "done", "message": None,
                                              "model": "/models/my-fox"}
    # the reload that followed: served here, and linked from the page
    wait_served(app, "my-fox")
    page = client.get("/train/my-fox").text
    assert 'href="/?model=my-fox"' in page and 'id="train-done"' in page
    assert "To be, or not" in page and "3.600" in page  # the latest sample and figures
    listing = client.get("/train").text
    assert "my-fox" in listing and "train-done" in listing
    # the run's own text stays; its working checkpoints do not
    assert runs.folder("my-fox").joinpath("text.txt").read_bytes() == TEXT
    assert not any((runs.work("my-fox") / part).exists() for part in ("last", "best", "final"))


def test_a_bundled_corpus_is_given_to_the_command_by_reference(studio):
    app, runs = studio
    response = app.test_client().post("/train", data={
        "text": SHAKESPEARE, "preset": "char-lstm", "minutes": "30", "name": "bard"})
    assert response.status_code == 303
    asked = runs.status("bard").asked
    assert asked["text"] == SHAKESPEARE and asked["preset"] == "char-lstm" and asked["minutes"] == 30
    command = runs.command("bard", "char-lstm", 30, None, SHAKESPEARE)
    assert command[command.index("--corpus") + 1] == SHAKESPEARE
    assert "training.num_threads=1" in command and "output.loggers=[jsonl]" in command
    wait_for(runs, "bard", "done")


def test_the_stream_resumes_where_the_browser_left_it(studio):
    app, runs = studio
    upload(app.test_client(), "resumed")
    wait_for(runs, "resumed", "done")
    client = app.test_client()
    first = parse_sse(client.get("/train/resumed/events").text)
    offset = first[0]["id"]
    again = parse_sse(client.get("/train/resumed/events", headers={"Last-Event-ID": offset}).text)
    assert [e["event"] for e in again] == ["end"]  # nothing twice
    assert again[0]["id"] == offset


def test_without_javascript_a_running_page_refreshes_itself(studio, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    app, runs = studio
    client = app.test_client()
    upload(client, "slow")
    assert wait_until(lambda: "To be, or not" in client.get("/train/slow").text, 60)
    page = client.get("/train/slow").text
    assert '<meta http-equiv="refresh" content="10">' in page
    assert 'id="train-cancel"' in page and "<progress" in page
    assert client.post("/train/slow/cancel").status_code == 303


# ---- one at a time, cancel, failures ---------------------------------------------------------

def test_a_second_run_is_refused_while_one_trains_and_cancel_stops_it(studio, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    app, runs = studio
    client = app.test_client()
    assert upload(client, "first").status_code == 303
    pid = runs.status("first").asked["pid"]
    second = upload(client, "second")
    assert second.status_code == 409
    assert "first is training; one run at a time" in second.text
    assert not runs.folder("second").exists()
    assert "first</a> is training now" in client.get("/train").text

    assert client.post("/train/first/cancel").status_code == 303
    wait_for(runs, "first", "cancelled")
    assert not pid_alive(pid)
    assert training_runs.running_name(runs.root) is None
    assert upload(client, "second").status_code == 303  # the lock is free again
    training_runs.stop_running(runs.root)


def test_finish_now_keeps_the_model_as_it_is(studio, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    app, runs = studio
    client = app.test_client()
    upload(client, "early")
    # its Ctrl-C handler is in place
    assert wait_until(lambda: "hanging" in _text(runs.metrics_path("early")), 60)
    assert client.post("/train/early/finish").status_code == 303
    wait_for(runs, "early", "done")
    assert runs.status("early").message == "Finished early, as asked."
    wait_served(app, "early")  # reloaded, as at the end of a run
    assert client.post("/train/early/finish").status_code == 303  # not running: nothing to do


def test_a_failed_run_says_why_in_the_commands_words(studio, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER", "fail")
    app, runs = studio
    upload(app.test_client(), "broken")
    wait_for(runs, "broken", "failed")
    assert runs.status("broken").message == "the fake training failed on purpose"
    events = parse_sse(app.test_client().get("/train/broken/events").text)
    assert json.loads(events[-1]["data"])["state"] == "failed"
    assert "broken" not in app.extensions["fable.registry"]


# ---- what is refused before a run exists -------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    (b"", "The file is empty"),
    (b"text\0more", "This is a binary file (a NUL byte at offset 4"),
    ("café".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 3)"),
    (b" \n\t\n", "only white space"),
    (b"too short", "Your text is too short for char-gpt's 128-token context"),
])
def test_each_bad_upload_gets_its_own_message_and_leaves_nothing(studio, data, message):
    app, runs = studio
    response = upload(app.test_client(), "bad", data)
    assert response.status_code == 400
    assert message in response.text.replace("&#39;", "'")
    assert not runs.root.joinpath("bad").exists()


def test_an_upload_over_the_limit_is_413(studio, make_app, tmp_path):
    app = make_app(FABLE_TRAIN_UPLOAD_BYTES=4096, FABLE_TRAIN_DIR=str(tmp_path / "runs"))
    response = upload(app.test_client(), "big", b"x" * 8192)
    assert response.status_code == 413
    assert not (tmp_path / "runs" / "big").exists()


@pytest.mark.parametrize("fields, field, message", [
    ({"name": "../escape"}, "name", "Use up to 64 letters"),
    ({"name": ".hidden"}, "name", "Use up to 64 letters"),
    ({"name": "tiny-gpt"}, "name", "A model named tiny-gpt is already served"),
    ({"minutes": "0"}, "minutes", "Give 1 to 30 minutes"),
    ({"minutes": "31"}, "minutes", "Give 1 to 30 minutes"),
    ({"minutes": "ten"}, "minutes", "Give a whole number of minutes"),
    ({"preset": "gpt-4"}, "preset", "Choose one of the presets"),
    ({"text": "../../etc/passwd"}, "text", "Choose a bundled text or upload one"),
])
def test_fields_are_checked(studio, fields, field, message):
    app, runs = studio
    response = upload(app.test_client(), fields.pop("name", "ok-name"), **fields)
    assert response.status_code == 400, response.text
    assert message in response.text
    assert f'id="error-{field}"' in response.text
    assert not runs.root.exists() or not any(p.is_dir() for p in runs.root.iterdir())


def test_every_field_in_error_is_said_at_once(studio):
    app, _ = studio
    response = upload(app.test_client(), "../x", b"\0", preset="nope", minutes="99")
    assert response.status_code == 400
    for field in ("name", "preset", "minutes", "upload"):
        assert f'id="error-{field}"' in response.text


def test_the_disk_quota_refuses_a_run_until_a_model_is_deleted(studio):
    app, runs = studio
    client = app.test_client()
    upload(client, "kept")
    wait_for(runs, "kept", "done")
    wait_served(app, "kept")
    runs.quota_bytes = runs.used_bytes()
    refused = upload(client, "more")
    assert refused.status_code == 409 and "delete one to train another" in refused.text
    assert client.post("/train/kept/delete").status_code == 303
    assert not (runs.models / "kept").exists() and not runs.folder("kept").exists()
    assert "kept" not in app.extensions["fable.registry"]
    assert upload(client, "more").status_code == 303
    wait_for(runs, "more", "done")


def test_unknown_runs_are_404(studio):
    app, _ = studio
    client = app.test_client()
    for url in ("/train/nope", "/train/nope/events", "/train/..%2Fx"):
        assert client.get(url).status_code == 404
    assert client.post("/train/nope/cancel").status_code == 404


# ---- the server stopping and starting ------------------------------------------------------------

def test_stopping_the_server_stops_the_run_and_a_new_server_settles_the_rest(studio, monkeypatch):
    monkeypatch.setenv("FAKE_TRAINER", "hang")
    app, runs = studio
    upload(app.test_client(), "interrupted")
    pid = runs.status("interrupted").asked["pid"]
    assert training_runs.stop_running(runs.root) == "interrupted"
    assert not pid_alive(pid)
    status = runs.status("interrupted")
    assert status.state == "stopped" and "server stopped" in status.message
    # a run whose process died with nobody to record it
    (runs.root / "orphan").mkdir()
    (runs.root / "orphan" / "run.json").write_text(json.dumps({"name": "orphan", "started": 1}))
    assert training_runs.settle(runs.root) == ["orphan"]
    assert runs.status("orphan").state == "stopped"
    assert training_runs.settle(runs.root) == []


def test_the_bundled_texts_are_the_text_files_the_data_command_finds(make_app, monkeypatch):
    """``fable data list --json`` is asked (in a child process: the app imports no training
    code); present text files within the size limit are offered, tokenizer files never."""
    import subprocess
    from types import SimpleNamespace

    from app.pages import train

    listing = [
        {"name": "tinyshakespeare", "about": "Tiny Shakespeare", "text": True, "files": [
            {"reference": SHAKESPEARE, "path": "/data/tinyshakespeare/input.txt", "bytes": 1_115_394}]},
        {"name": "books", "about": "four novels", "text": True, "files": [
            {"reference": "books/alice.txt", "path": None, "bytes": None},
            {"reference": "books/huge.txt", "path": "/data/books/huge.txt",
             "bytes": train.BUNDLED_MAX_BYTES + 1}]},
        {"name": "gpt2", "about": "GPT-2's tokenizer", "text": False, "files": [
            {"reference": "gpt2/merges.txt", "path": "/data/gpt2/merges.txt", "bytes": 456_318}]},
    ]
    asked = []

    def run(command, **kwargs):
        asked.append(command)
        return SimpleNamespace(returncode=0, stdout=json.dumps(listing).encode())
    monkeypatch.setattr(subprocess, "run", run)
    app = make_app()
    with app.test_request_context("/train"):
        assert train.bundled_texts() == {SHAKESPEARE: ("Tiny Shakespeare", 1_115_394)}
        train.bundled_texts()
    assert len(asked) == 1 and asked[0][1:] == ["-m", "training.corpora", "list", "--json"]
    page = app.test_client().get("/train").text
    assert "tinyshakespeare/input.txt" in page and "merges.txt" not in page


def test_on_a_space_the_page_says_its_disk_is_not_kept(make_app, monkeypatch):
    assert 'id="space-note"' not in make_app().test_client().get("/train").text
    monkeypatch.setenv("SPACE_ID", "someone/fable")
    page = make_app().test_client().get("/train").text
    assert 'id="space-note"' in page and "not kept across restarts" in page


def test_the_training_command_is_found_from_any_working_directory(tmp_path):
    """A checkout's server may run elsewhere than the checkout: the command's environment
    puts the folder holding the ``training`` package on PYTHONPATH."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "training.corpora", "list", "--json"],
                          cwd=tmp_path, env=training_runs.training_environment(),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert {corpus["name"] for corpus in json.loads(done.stdout)} >= {"tinyshakespeare"}
    env = training_runs.training_environment()
    assert "FABLE_ADMIN_TOKEN" not in env and "FABLE_SECRET_KEY" not in env
