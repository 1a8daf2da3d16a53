"""The `fable` command and the one command that trains a model from a user's text file.

    fable train --preset char-gpt --data my_text.txt --name my-model --minutes 10

Bad input (a binary file, text that is not UTF-8, an empty file, a text too short for the
context, a name that is taken or unusable) stops it with one line and exit status 2 before
anything is written, through `fable train` and `python -m training.train` alike. A model
it trains is served by a running gunicorn after a reload; `pip install .` gives a `fable`
that serves the bundled models from any folder, and asks for no test tool.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import httpx
import pytest
from tests.gunicorn_server import GunicornServer

from training import cli
from training import train as train_module
from training.config import DEFAULT_MINUTES, RECIPES, load_config, recipe_config

ROOT = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ("serve", "train", "evaluate", "generate", "export", "data")
BUNDLED = sorted(p.name for p in (ROOT / "checkpoints").iterdir() if p.is_dir())
# What `pip install .` needs of a checkout (copied, so that building writes nothing here).
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "gunicorn.conf.py",
                   "app", "models_src", "training", "templates", "static")


def some_text(characters: int, seed: int = 0) -> str:
    """Plain English-like text, ``characters`` long or a little more."""
    rng = random.Random(seed)
    words = "the cat sat on a mat and saw a dog who ran to the red ball in the park".split()
    lines = []
    while sum(map(len, lines)) < characters:
        lines.append(" ".join(rng.choice(words) for _ in range(10)).capitalize() + ".\n")
    return "".join(lines)


def listed_commands(help_text: str) -> list[str]:
    """The subcommands `fable --help` lists under "commands:"."""
    return re.findall(r"^  (\w+) ", help_text.partition("\ncommands:\n")[2], flags=re.M)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- the fable command ----------------------------------------------------------------------


def test_fable_help_lists_its_six_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert listed_commands(capsys.readouterr().out) == list(SUBCOMMANDS)


def test_a_subcommand_is_the_module_entry_point_with_the_same_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m training.train")
    for flag in ("--preset", "--data", "--name", "--minutes", "--steps", "--overwrite"):
        assert flag in usage
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--checkpoint", "no-such-folder", "--prompt", "x"])
    assert exit_.value.code == 2
    assert "no-such-folder: not a checkpoint" in capsys.readouterr().err


def test_fable_data_is_training_corpora(capsys):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tinyshakespeare", "tinystories", "wikitext-2", "books", "gpt2"))


def test_fable_serve_refuses_a_missing_folder_of_models(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FABLE_CHECKPOINT_DIR", raising=False)
    assert cli.main(["serve"]) == 2
    assert "no folder of models at checkpoints" in capsys.readouterr().err


@pytest.mark.server
def test_gunicorn_listens_on_this_machine_unless_fable_host_says_otherwise(tmp_path):
    def bind(**env) -> str:
        environment = {k: v for k, v in os.environ.items()
                       if not k.startswith(("FABLE_", "PORT", "PROMETHEUS"))}
        environment.update(env, TMPDIR=str(tmp_path))  # the settings file makes a runtime folder
        code = "import runpy; print(runpy.run_path('gunicorn.conf.py')['bind'])"
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment,
                              capture_output=True, text=True, check=True).stdout.strip()

    assert bind() == "127.0.0.1:7860"
    assert bind(FABLE_HOST="0.0.0.0", PORT="8000") == "0.0.0.0:8000"
    # the Space image listens on every address, as its router reaches it from outside
    assert re.search(r"^ENV [^#]*FABLE_HOST=0\.0\.0\.0", (ROOT / "Dockerfile").read_text(),
                     flags=re.M)


# ---- the one command: presets and bad input -----------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_preset_is_a_config_the_trainer_takes(recipe):
    import torch

    from models_src import build_model

    raw = recipe_config(recipe, data="my_text.txt", name="my-model", publish_dir="served/my-model")
    cfg = load_config(raw=raw)
    assert cfg.name == "my-model" and cfg.data.path == "my_text.txt"
    assert str(cfg.publish_dir) == "served/my-model"
    assert (cfg.training.max_time_s, cfg.training.max_steps) == (DEFAULT_MINUTES * 60, None)
    with torch.device("meta"):
        build_model(cfg.model.build(vocab_size=100, pad_id=0, sep_id=5))
    steps = load_config(raw=recipe_config(recipe, data="t", name="n", publish_dir="p", steps=20))
    assert (steps.training.max_time_s, steps.training.max_steps) == (None, 20)


GOOD = some_text(3000).encode()
BAD_INPUTS = {
    # case: (the file's bytes, extra arguments, the one line it gets)
    "binary": (b"hello\0world" * 300, [],
               ("my_text.txt is a binary file (a NUL byte at offset 5), not text: "
                "give a plain UTF-8 text file")),
    "not UTF-8": ("café au lait\n".encode("latin-1") * 300, [],
                  "my_text.txt is not UTF-8 text (byte 0xe9 at offset 3): save it as UTF-8"),
    "empty": (b"", [], "my_text.txt is empty: there is no text to train on"),
    "white space": (b"\n  \n\t\n", [],
                    "my_text.txt holds only white space: there is no text to train on"),
    "too short": (b"Hello there.\n" * 40, [],
                  ("my_text.txt is too short for char-gpt's 128-token context: its validation "
                   "part (10% of it) has 52 characters and needs 128; give at least 1,280 "
                   "characters of text")),
    "no file": (None, [], "my_text.txt: no such file"),
    "name taken": (GOOD, ["--name", "taken"],
                   ("the name 'taken' is taken: served/taken holds a checkpoint of that name; "
                    "choose another --name, or add --overwrite to replace it")),
    "run taken": (GOOD, ["--name", "old-run"],
                  ("the name 'old-run' is taken: runs/old-run holds an earlier run of that "
                   "name; choose another --name, or add --overwrite to replace it")),
    "bad name": (GOOD, ["--name", "../escape"],
                 ("--name '../escape': use up to 64 letters, digits, '.', '_' or '-', "
                  "starting with a letter or digit")),
}


@pytest.mark.parametrize("entry", ["fable train", "python -m training.train"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_its_message_and_nothing_is_written(case, entry, tmp_path, monkeypatch,
                                                            capsys):
    content, extra, message = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FABLE_CHECKPOINT_DIR", raising=False)
    (tmp_path / "served" / "taken").mkdir(parents=True)
    (tmp_path / "served" / "taken" / "config.json").write_text("{}")
    (tmp_path / "runs" / "old-run" / "final").mkdir(parents=True)
    if content is not None:
        (tmp_path / "my_text.txt").write_bytes(content)
    before = files_under(tmp_path)
    args = ["--preset", "char-gpt", "--data", "my_text.txt", "--name", "my-model", "--steps", "5",
            "--checkpoint-dir", "served", *extra]
    status = cli.main(["train", *args]) if entry == "fable train" else train_module.main(args)
    assert status == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert files_under(tmp_path) == before  # no checkpoint, run, record or token cache
    assert (tmp_path / "served" / "taken" / "config.json").read_text() == "{}"


# ---- the one command, end to end ----------------------------------------------------------


@pytest.mark.train
@pytest.mark.server
def test_a_model_trained_from_a_text_file_is_served_after_a_reload(checkpoint_dir, tmp_path):
    from models_src.checkpoint import load_checkpoint
    from models_src.generation import generate
    from models_src.sampling import SamplingParams

    served = tmp_path / "served"
    shutil.copytree(checkpoint_dir / "tiny-gpt", served / "tiny-gpt")  # a server needs one model
    (tmp_path / "my_text.txt").write_text(some_text(5000))
    with GunicornServer(served) as server:
        def ask(model: str) -> httpx.Response:
            return httpx.post(f"{server.url}/api/generate", timeout=30, json={
                "model": model, "prompt": "The", "stream": False,
                "options": {"num_predict": 12, "temperature": 0}})

        assert ask("my-model").status_code == 404
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        environment.pop("FABLE_CHECKPOINT_DIR", None)
        done = subprocess.run(
            [sys.executable, "-m", "training.cli", "train", "--preset", "char-gpt",
             "--data", "my_text.txt", "--name", "my-model", "--steps", "10",
             "--checkpoint-dir", str(served), "--quiet", "training.batch_size=4"],
            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"my-model is ready in {served / 'my-model'}" in done.stdout
        assert "/api/models/reload" in done.stdout and "SIGHUP" in done.stdout
        model = served / "my-model"
        for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md"):
            assert (model / name).is_file(), name
        card = (model / "README.md").read_text()
        assert "# my-model" in card and "--preset char-gpt --data my_text.txt" in card
        assert (tmp_path / "runs" / "my-model" / "final").is_dir()

        assert ask("my-model").status_code == 404  # not until the server is asked to reload
        reload = httpx.post(f"{server.url}/api/models/reload", timeout=60)
        assert reload.status_code == 200 and reload.json()["added"] == ["my-model"]
        answer = ask("my-model")
        assert answer.status_code == 200
        checkpoint = load_checkpoint(model)  # the server's text is this model's own greedy text
        params = SamplingParams(max_new_tokens=12, temperature=0)
        assert answer.json()["response"] == generate(checkpoint.model, checkpoint.tokenizer,
                                                     "The", params)[0].text


# ---- serving ---------------------------------------------------------------------------------


@pytest.mark.server
def test_fable_serve_starts_the_app_on_the_bundled_models():
    command = [sys.executable, "-m", "training.cli", "serve"]  # in the checkout: ./checkpoints
    with GunicornServer(command=command, cwd=ROOT) as server:
        models = httpx.get(f"{server.url}/api/models").json()["models"]
        assert sorted(m["name"] for m in models) == BUNDLED
        assert "Listening at: http://127.0.0.1:" in server.log_text()


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[=<>!~ \[;]", line)[0].lower().replace("_", "-"))
    return names


@pytest.mark.server
def test_pip_install_gives_a_fable_command_that_serves_the_bundled_models(tmp_path):
    """The wheel `pip install .` builds: the runtime requirements and no test tool; installed
    in a fresh virtual environment, `fable serve` runs from any folder. (The dependencies
    come from this environment's site-packages through a .pth file: tests never download.)"""
    # building without isolation (no download) takes this environment's setuptools, which
    # must be as recent as pyproject.toml's build-system asks
    pytest.importorskip("setuptools", minversion="77")
    source = tmp_path / "source"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("fable-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith("/METADATA"))).decode()
    requires = {re.split(r"[=<>!~ ;]", line.split(": ", 1)[1])[0].lower().replace("_", "-")
                for line in metadata.splitlines() if line.startswith("Requires-Dist: ")}
    runtime = requirement_names(ROOT / "requirements.txt")
    assert requires == runtime
    assert not requires & {"pytest", "pytest-xdist", "hypothesis", "playwright", "schemathesis"}
    assert requirement_names(ROOT / "requirements-dev.txt") - runtime >= {"pytest", "hypothesis"}

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True)
    assert (Path(site) / "app" / "templates" / "base.html").is_file()
    assert not (Path(site) / "templates").exists()  # nothing top-level but the packages
    assert (env_dir / "share" / "fable" / "gunicorn.conf.py").is_file()

    fable = str(env_dir / "bin" / "fable")
    elsewhere = tmp_path / "elsewhere"  # no checkout here: the installed app must serve
    elsewhere.mkdir()
    listing = subprocess.run([fable, "--help"], cwd=elsewhere, capture_output=True, text=True,
                             check=True).stdout
    assert listed_commands(listing) == list(SUBCOMMANDS)
    with GunicornServer(ROOT / "checkpoints", command=[fable, "serve"], cwd=elsewhere) as server:
        models = httpx.get(f"{server.url}/api/models").json()["models"]
        assert sorted(m["name"] for m in models) == BUNDLED
        assert httpx.get(f"{server.url}/").status_code == 200  # the installed templates
        assert httpx.get(f"{server.url}/static/style.css").status_code == 200
    code = "import app, training; print(app.__file__, training.__file__)"
    imported = subprocess.run([python, "-c", code], cwd=elsewhere, check=True,
                              capture_output=True, text=True).stdout.split()
    assert all(path.startswith(site) for path in imported)  # the installed packages, not ROOT's
