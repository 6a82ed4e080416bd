"""README stays true: its two set-up commands, CI's use of the test command, its Python snippets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks() -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)]


def test_readme_has_install_and_test_commands():
    blocks = _bash_blocks()
    assert any("pip install -e ." in b and "npudispatch run" in b for b in blocks), blocks
    assert any('pip install -e ".[dev]"' in b and "pytest" in b for b in blocks), blocks


def test_ci_runs_exactly_the_readme_test_command():
    test_block = next(b for b in _bash_blocks() if "pytest" in b)
    after_venv = test_block.split(". .venv/bin/activate && ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert after_venv in ci, f"{after_venv!r} not a line of .ci/run"


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README))))
def test_readme_python_snippets_run(index, tmp_path, monkeypatch):
    snippet = re.findall(r"```python\n(.*?)```", README, flags=re.S)[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, f"README.md python block {index}", "exec"), {})
