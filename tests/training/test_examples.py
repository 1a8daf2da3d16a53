"""The worked examples (examples/*.py and the walkthrough notebook) run on tiny settings
and print what they promise.

Each script runs as a user would run it (``python examples/<name>.py``, from the
repository root) with the shared corpora hidden, as on CI, and with the Hugging Face hub
switched off: an example that needed either would fail here.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
NOTEBOOK = EXAMPLES / "walkthrough.ipynb"
SETTINGS = ("greedy", "temperature 0.5", "temperature 1.5", "top-k 10", "top-p 0.9",
            "greedy + repetition penalty 1.3")
TESTED = {"train_tiny.py", "sampling_settings.py", "infill_story.py", "export_to_transformers.py",
          "inspect_model.py"}


@pytest.fixture
def offline(tmp_path) -> dict[str, str]:
    """No hub, and no ../shared/data: the examples must work on what they write themselves."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "FABLE_DATA_DIR": str(tmp_path / "no-shared-data")}


def run_example(name: str, *args: str, env: dict[str, str], ok: bool = True) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert (result.returncode == 0) == ok, (
        f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}")
    return result.stdout if ok else result.stderr


def test_every_example_is_tested_and_documented():
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts - TESTED == set(), "add a test for each new example to tests/training/test_examples.py"
    readme = (ROOT / "README.md").read_text()
    for name in sorted(scripts) + [NOTEBOOK.name]:
        assert f"examples/{name}" in readme, f"README's Worked examples should list {name}"
    for name in scripts:  # each says what it shows and how to run it
        source = (EXAMPLES / name).read_text()
        assert source.startswith('"""') and f"python examples/{name}" in source, name


@pytest.mark.train
def test_train_tiny_reports_a_finite_loss_and_a_sample(tmp_path, offline):
    out = tmp_path / "tiny"
    stdout = run_example("train_tiny.py", "--steps", "20", "--out", str(out), env=offline)
    assert f"on {out / 'fables.txt'} for 20 steps" in stdout  # the embedded text, not a corpus
    loss, perplexity, vocab = re.search(
        r"validation loss (\S+) nats/token, perplexity (\S+) \(guessing uniformly over the (\d+)",
        stdout).groups()
    loss, perplexity = float(loss), float(perplexity)
    assert math.isfinite(loss) and 0 < loss < math.log(int(vocab))  # it learned something
    assert perplexity == pytest.approx(math.exp(loss), rel=1e-3)
    sample = stdout.split("sample:\n", 1)[1].split("\n\ncheckpoint:")[0]
    assert sample.startswith("The ") and len(sample) > len("The ")
    assert (out / "run" / "final" / "model.safetensors").is_file()
    assert (out / "tiny.yaml").is_file()  # the command it prints can be run


def table_rows(stdout: str) -> dict[str, str]:
    rows = [line.split(" | ", 1) for line in stdout.splitlines() if " | " in line]
    return {name.strip(): text for name, text in rows if name.strip() != "setting"}


def test_sampling_settings_prints_every_setting_reproducibly(offline):
    args = ("--max-tokens", "8")
    first = run_example("sampling_settings.py", *args, env=offline)
    rows = table_rows(first)
    assert list(rows) == list(SETTINGS)
    assert all(text.strip() for text in rows.values()), rows
    assert len(set(rows.values())) > 1, "the settings should change the text"
    assert table_rows(run_example("sampling_settings.py", *args, env=offline)) == rows  # seeded


def test_infill_story_writes_a_middle(offline):
    stdout = run_example("infill_story.py", "--max-tokens", "16", env=offline)
    lines = stdout.splitlines()
    assert lines[0] == "first:  Tom had a red ball."
    assert lines[1].startswith("middle: ") and lines[1].removeprefix("middle: ").strip()
    middle = stdout.split("middle: ", 1)[1].split("\nlast:")[0]
    assert "Tom was happy again." not in middle  # the last sentence is a stop string
    assert "last:   Tom was happy again." in lines
    tokens = int(re.search(r"\((\d+) tokens, ", stdout).group(1))
    assert 0 < tokens <= 16


def test_infill_story_refuses_a_model_not_trained_to_infill(offline):
    output = run_example("infill_story.py", "--checkpoint", "checkpoints/char-gpt-shakespeare",
                         env=offline, ok=False)
    assert "was not trained to infill" in output


def test_export_to_transformers_generates_identical_text(tmp_path, offline):
    out = tmp_path / "hf"
    stdout = run_example("export_to_transformers.py", "--max-tokens", "12", "--out", str(out),
                         env=offline)
    assert "identical: yes (12 tokens)" in stdout
    ours = re.search(r"^Fable: +(.+)$", stdout, re.M).group(1)
    theirs = re.search(r"^transformers: +(.+)$", stdout, re.M).group(1)
    assert ours == theirs and len(ours) > 2
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name


def test_inspect_model_reports_layers_problems_and_heads(offline):
    stdout = run_example("inspect_model.py", env=offline)
    assert stdout.startswith("char-gpt-shakespeare: 8 x 128 tokens of ")
    assert "blocks.0.mlp.c_fc" in stdout and "min head bits" in stdout
    assert "No problems found" in stdout  # a bundled model is healthy
    heads = re.findall(r"^  blocks\.(\d)\.attn((?:\s+\d+\.\d\d){4})$", stdout, re.M)
    assert [layer for layer, _ in heads] == ["0", "1", "2", "3"]  # 4 layers x 4 heads


def test_notebook_is_committed_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.train
def test_notebook_runs_on_tiny_settings(tmp_path, offline, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # The kernel inherits this environment: the notebook's first cell reads the settings.
    for key, value in {**offline, "FABLE_WALKTHROUGH_STEPS": "20",
                       "FABLE_WALKTHROUGH_TOKENS": "12",
                       "FABLE_WALKTHROUGH_OUT": str(tmp_path / "out"),
                       "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),  # connection files
                       "JUPYTER_PLATFORM_DIRS": "1"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # A cell that raises (the export's `assert` included) fails the test here.
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    printed = "".join(output.get("text", "") for cell in notebook.cells
                      for output in cell.get("outputs", []) if output.get("name") == "stdout")
    assert "steps 20, new tokens 12" in printed
    loss = float(re.search(r"validation loss (\S+) nats/token", printed).group(1))
    assert math.isfinite(loss)
    for name in SETTINGS:
        assert re.search(rf"^{re.escape(name)} +\| \S", printed, re.M), name
    assert "Tom had a red ball.\n" in printed
    assert printed.rstrip().endswith("identical")
