"""A checkpoint folder read as untrusted input (issue 34, items 5-7): links and special
files under the names the app reads, files over their caps, and config.json sizes the
weights do not hold. Each is refused with a message while the other models serve; nothing
behind a link is ever shown; a refusal costs well under a second and no memory; a folder
that failed is not tried again until its files change; a stuck load times out.
In-process through the app, and once through a real gunicorn (the worker's memory)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.app_support import TEXT, save_endless

SECRET = "hostile-probe-secret-0123456789"
GOOD = ["tiny-gpt", "tiny-lstm"]
#: Each hostile checkpoint (built by build_hostile) and what its refusal says.
REFUSALS = {
    "card-link": "README.md: a symbolic link, refused",
    "card-environ": "README.md: a symbolic link, refused",
    "card-fifo": "README.md: a FIFO, refused",
    "health-zero": "health.json: a symbolic link, refused",
    "shard-link": ".safetensors: a symbolic link, refused",  # its first shard
    "tokenizer-link": "tokenizer.json: a symbolic link, refused",
    "folder-link": "folder-link: a symbolic link",
    "vocab-absurd": "wte.weight: shape (",  # ... in the file, (1000000, 768) expected
    "deep": "n_layer = 20,000, but the weights hold only",
}
MB = 1024 * 1024


# ---- building hostile folders -------------------------------------------------------------

def set_model_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    config["model"].update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def link_outside(path: Path, name: str, outside: Path) -> None:
    """Move ``path/name`` out of the folder and leave a link to it in its place."""
    outside.mkdir(exist_ok=True)
    target = outside / f"{path.name}-{name}"
    shutil.move(path / name, target)
    (path / name).symlink_to(target)


def save_sharded(path: Path, shard_bytes: int = 20_000) -> str:
    """tiny-gpt's shape, written in shards; the name of the first."""
    from models_src import ModelConfig, build_model
    from models_src.checkpoint import save_checkpoint
    from models_src.tokenization import Tokenizer

    tokenizer = Tokenizer.train_char([TEXT])
    config = ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32,
                         n_head=4, block_size=64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("models_src.checkpoint.MAX_SHARD_BYTES", shard_bytes)
        save_checkpoint(path, build_model(config), tokenizer)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1
    return shards[0]


def build_hostile(root: Path, checkpoint_dir: Path) -> Path:
    """``root/checkpoints``: tiny-gpt and tiny-lstm, and a copy of tiny-gpt for each of
    REFUSALS; secrets and moved files wait in ``root/outside``."""
    folder, outside = root / "checkpoints", root / "outside"
    outside.mkdir(parents=True)
    (outside / "secret.md").write_text(f"FABLE_ADMIN_TOKEN={SECRET}\n")

    def copy(name: str) -> Path:
        return shutil.copytree(checkpoint_dir / "tiny-gpt", folder / name)

    for name in GOOD:
        shutil.copytree(checkpoint_dir / name, folder / name)
    (copy("card-link") / "README.md").symlink_to(outside / "secret.md")
    (copy("card-environ") / "README.md").symlink_to("/proc/self/environ")
    os.mkfifo(copy("card-fifo") / "README.md")
    (copy("health-zero") / "health.json").symlink_to("/dev/zero")
    link_outside(folder / "shard-link", save_sharded(folder / "shard-link"), outside)
    link_outside(copy("tokenizer-link"), "tokenizer.json", outside)
    shutil.copytree(checkpoint_dir / "tiny-gpt", outside / "elsewhere")
    (folder / "folder-link").symlink_to(outside / "elsewhere", target_is_directory=True)
    set_model_config(copy("vocab-absurd"), vocab_size=1_000_000, n_embd=768)
    set_model_config(copy("deep"), n_layer=20_000)
    return folder


@pytest.fixture
def hostile(tmp_path, checkpoint_dir, monkeypatch) -> Path:
    monkeypatch.setenv("HOSTILE_PROBE", SECRET)  # in /proc/self/environ, behind card-environ
    return build_hostile(tmp_path, checkpoint_dir)


def within(seconds: float, call):
    """``call()``'s result, or a failure if it is still running after ``seconds`` (a
    FIFO opened for reading blocks until a writer comes: for ever)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # noqa: BLE001 - raised again below
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds:g} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def rss_bytes() -> int:
    """This process's resident memory now (/proc/self/statm: pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


# ---- each hostile checkpoint is refused; the others serve --------------------------------

def test_every_hostile_checkpoint_is_refused_with_a_message_and_the_others_serve(make_app,
                                                                                  hostile):
    app = within(60, lambda: make_app(FABLE_CHECKPOINT_DIR=str(hostile)))
    registry = app.extensions["fable.registry"]
    assert registry.names() == GOOD
    assert set(registry.errors) == set(REFUSALS)
    for name, refusal in REFUSALS.items():
        assert refusal in registry.errors[name], (name, registry.errors[name])
        assert str(hostile) not in registry.errors[name]  # no server paths
    assert "(1000000, 768) expected" in registry.errors["vocab-absurd"]
    client = app.test_client()
    generated = client.post("/api/generate", json={"model": "tiny-gpt", "prompt": "Once",
                                                   "stream": False, "options": {"num_predict": 3}})
    assert generated.status_code == 200
    assert set(client.get("/api/models").json["errors"]) == set(REFUSALS)
    admin = client.get("/admin").get_data(as_text=True)
    assert all(name in admin for name in REFUSALS)
    for path in ("/", "/models", "/admin", "/api/models", "/api/tags", "/models/tiny-gpt",
                 *(f"/models/{name}" for name in REFUSALS)):
        answer = client.get(path)
        assert SECRET not in answer.get_data(as_text=True), path
        assert answer.status_code == (404 if path.removeprefix("/models/") in REFUSALS
                                      else 200), path


def test_a_card_that_becomes_a_link_or_a_fifo_after_loading_is_never_opened(make_app, hostile):
    folder = hostile.parent / "served"
    card = shutil.copytree(hostile / "tiny-gpt", folder / "x") / "README.md"
    card.write_text("# x\n\nAn honest card.\n")
    client = make_app(FABLE_CHECKPOINT_DIR=str(folder)).test_client()
    assert "An honest card." in client.get("/models/x").get_data(as_text=True)

    card.unlink()
    card.symlink_to(hostile.parent / "outside" / "secret.md")  # swapped in after loading
    html = client.get("/models/x").get_data(as_text=True)
    assert SECRET not in html and "its README.md is not a regular file" in html
    assert "/models/x/files/README.md" not in html  # not offered for download ...
    download = client.get("/models/x/files/README.md")
    assert download.status_code == 404 and SECRET not in download.get_data(as_text=True)

    card.unlink()
    os.mkfifo(card)  # ... and a FIFO does not hold the page
    page = within(10, lambda: client.get("/models/x"))
    assert page.status_code == 200 and "not a regular file" in page.get_data(as_text=True)


def test_the_loader_refuses_links_out_of_the_folder_whatever_file_they_stand_for(hostile):
    from models_src.checkpoint import CheckpointError, load_checkpoint

    for name in ("shard-link", "tokenizer-link", "card-link", "health-zero", "folder-link"):
        with pytest.raises(CheckpointError, match="a symbolic link"):
            load_checkpoint(hostile / name)


def test_the_loader_refuses_absurd_sizes_in_well_under_a_second(hostile):
    """vocab 1,000,000 x 768 would be 3 GB of float32 and n_layer 20,000 a minute of
    building: the claims are checked against the weights' header before anything exists."""
    from models_src.checkpoint import CheckpointError, load_checkpoint

    load_checkpoint(hostile / "tiny-gpt")  # imports and caches warm
    peak = peak_rss_bytes()
    for name in ("vocab-absurd", "deep"):
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint(hostile / name)
        assert time.perf_counter() - start < 0.5, name
        assert REFUSALS[name] in str(refused.value) and name in str(refused.value)
    assert peak_rss_bytes() - peak < 100 * MB  # nothing of the claimed size was allocated


def test_files_over_their_caps_are_refused_naming_the_file_and_the_cap(make_app, hostile):
    from models_src.checkpoint import CheckpointError, load_checkpoint
    from models_src.safe_files import MAX_JSON_BYTES

    config = hostile / "tiny-gpt" / "config.json"
    config.write_text(config.read_text() + " " * MAX_JSON_BYTES)  # still valid JSON
    with pytest.raises(CheckpointError, match=r"config.json: [\d,]+ bytes, over the limit "
                                              r"of 4 MiB for this file"):
        load_checkpoint(hostile / "tiny-gpt")
    (hostile / "tiny-lstm" / "health.json").write_text(
        json.dumps({"problems": ["x" * MAX_JSON_BYTES]}))
    registry = make_app(FABLE_CHECKPOINT_DIR=str(hostile)).extensions["fable.registry"]
    assert registry.names() == []
    for name, file in (("tiny-gpt", "config.json"), ("tiny-lstm", "health.json")):
        assert f"{name}/{file}: " in registry.errors[name]
        assert "bytes, over the limit of 4 MiB for this file" in registry.errors[name]


# ---- time limit, no retries, memory ---------------------------------------------------------

def test_a_stuck_load_fails_after_the_time_limit_and_the_others_load(tmp_path, checkpoint_dir,
                                                                       monkeypatch):
    import app.serving.registry
    from app.serving.registry import ModelRegistry

    real, release = app.serving.registry.load_checkpoint, threading.Event()

    def stuck(path, **kwargs):
        if Path(path).name == "tiny-lstm":
            release.wait(30)  # stands for a read that never returns
        return real(path, **kwargs)
    monkeypatch.setattr(app.serving.registry, "load_checkpoint", stuck)
    for name in GOOD:
        shutil.copytree(checkpoint_dir / name, tmp_path / name)
    start = time.monotonic()
    registry = ModelRegistry.load(tmp_path, load_timeout_s=0.5)
    release.set()
    assert time.monotonic() - start < 5
    assert registry.names() == ["tiny-gpt"]
    assert "not loaded within 0.5 s (FABLE_LOAD_TIMEOUT_S)" in registry.errors["tiny-lstm"]


def test_the_load_time_limit_is_a_setting(make_app, tmp_path):
    from app.serving.registry import ModelRegistry
    from app.platform.settings import Settings, SettingsError

    assert Settings.load({}).load_timeout_s == 60.0
    assert ModelRegistry.load(tmp_path).load_timeout_s == 60.0  # the setting's default
    app = make_app(FABLE_LOAD_TIMEOUT_S=2.5)
    assert app.extensions["fable.registry"].load_timeout_s == 2.5  # create_app passes it
    with pytest.raises(SettingsError, match="FABLE_LOAD_TIMEOUT_S must be a finite number"):
        Settings.load({"FABLE_LOAD_TIMEOUT_S": "0"})


def test_a_failed_checkpoint_is_not_tried_again_until_its_files_change(hostile, monkeypatch):
    import app.serving.registry
    from app.serving.registry import ModelRegistry

    tries, real = [], app.serving.registry.load_checkpoint

    def counted(path, **kwargs):
        tries.append(Path(path).name)
        return real(path, **kwargs)
    monkeypatch.setattr(app.serving.registry, "load_checkpoint", counted)
    registry = within(60, lambda: ModelRegistry.load(hostile))
    first = dict(registry.errors)
    for _ in range(3):
        report = registry.refresh()
        assert sorted(report["failed"]) == sorted(REFUSALS) and registry.errors == first
    assert sorted(tries) == sorted([*GOOD, *REFUSALS])  # each tried once
    shutil.rmtree(hostile / "vocab-absurd")
    save_endless(hostile / "vocab-absurd", "v")  # its files change: tried again, and loads
    assert registry.refresh()["added"] == ["vocab-absurd"]
    assert tries.count("vocab-absurd") == 2


MEMORY_AFTER_FAILED_LOADS = """
import json, os, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2]]
from app.serving.registry import ModelRegistry
from tests.app_support import TEXT
from models_src import ModelConfig, build_model
from models_src.checkpoint import save_checkpoint
from models_src.safe_files import MAX_JSON_BYTES
from models_src.tokenization import Tokenizer

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

tokenizer = Tokenizer.train_char([TEXT])
model = build_model(ModelConfig(arch="gpt", vocab_size=tokenizer.vocab_size, n_layer=4,
                                n_embd=512, n_head=8, block_size=64))  # 50 MB of float32
path = save_checkpoint(Path(sys.argv[1]) / "checkpoints" / "big", model, tokenizer)
del model
health = path / "health.json"
health.write_text(json.dumps({"problems": [], "padding": "x" * MAX_JSON_BYTES}))
registry = ModelRegistry.load(path.parent)
assert "over the limit" in registry.errors["big"], registry.errors
before = rss()
for i in range(10):
    os.utime(health, ns=(i * 10**9, i * 10**9))  # changed files: tried again
    assert registry.refresh()["failed"] == ["big"]
print(before, rss())
"""


@pytest.mark.subprocess
def test_memory_from_ten_failed_loads_is_given_back(tmp_path):
    """A checkpoint refused after its model was built (its health report is over the cap,
    read last) and retried on every reload, its files touched each time: a fresh process,
    as a worker is, whose memory is not the test suite's history."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", MEMORY_AFTER_FAILED_LOADS, str(tmp_path),
                           str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = map(int, done.stdout.split()[-2:])
    assert after - before < 50 * MB, (before / MB, after / MB)


# ---- a real gunicorn worker -----------------------------------------------------------------

@pytest.mark.server
def test_a_real_worker_starts_past_a_fifo_never_shows_its_environment_and_keeps_its_memory(
        hostile):
    """The probe's own steps: a FIFO card at start-up, a card linked to /proc/self/environ
    (where the admin token is), and ten reloads of the vocab 1,000,000 x 768 config."""
    from tests.gunicorn_server import GunicornServer

    token = "admin-" + SECRET
    env = {"FABLE_ADMIN_TOKEN": token, "FABLE_WORKERS": "1", "FABLE_TORCH_THREADS": "1",
           "HOSTILE_PROBE": SECRET}
    admin = {"Authorization": f"Bearer {token}"}
    server = GunicornServer(hostile, env=env).start(timeout=60)  # the FIFO blocks no worker
    try:
        listed = httpx.get(server.url + "/api/models", headers=admin, timeout=10).json()
        assert [m["name"] for m in listed["models"]] == GOOD
        assert set(listed["errors"]) == set(REFUSALS)
        for path in ("/models", "/models/tiny-gpt", "/models/card-environ", "/admin"):
            answer = httpx.get(server.url + path, auth=("admin", token), timeout=10)
            assert SECRET not in answer.text, path
        (pid, memory), = server.worker_memory().items()
        for i in range(10):  # a changed config.json each time: each reload tries it again
            set_model_config(hostile / "vocab-absurd", vocab_size=1_000_000 + i, n_embd=768)
            start = time.monotonic()
            report = httpx.post(server.url + "/api/models/reload", headers=admin, timeout=30)
            assert report.status_code == 200 and "vocab-absurd" in report.json()["failed"]
            assert time.monotonic() - start < 5
        after = server.worker_memory()[pid]
        assert (after.rss_kib - memory.rss_kib) * 1024 < 50 * MB, (memory, after)
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.stop()
