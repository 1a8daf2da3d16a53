"""The README's Python examples run as written (in a scratch directory)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.bundled  # the README's examples load them

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show the Python API"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "total:" in out and "parameters" in out
    assert (tmp_path / "checkpoints/tiny-lstm/model.safetensors").is_file()
