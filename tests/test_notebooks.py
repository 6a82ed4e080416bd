"""The notebooks: committed without outputs, and each one runs top to bottom (nbclient).

Each notebook runs in a fresh kernel with a temporary working directory, ``NPUD_PROGRESS=0`` and
``NPUD_CORPUS`` pointing at the AMD corpus when it is present (03 skips its cells otherwise).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from corpus_util import CORPUS_DIR, MODELS_DIR, corpus_available

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = [
    "01_quickstart",
    "02_rewrites",
    "03_transactions",
    "04_memory",
    "05_generate",
    "06_profile",
]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120

#: What each notebook's text claims, as it prints it: the run must print every line.
CLAIMS = {
    "02_rewrites": [
        "partitions before: ['npu0', 'cpu0', 'npu1']",  # Softsign has no NPU operator
        "partitions after: ['npu0']",  # the rule makes it NPU ops: one partition
        "kernel calls per run: 1",  # "one kernel call per run instead of two"
        "CPU segments per run: 0",  # "no CPU segment in between"
    ],
    "06_profile": [
        "bound on strix: memory",  # "the call is memory-bound on both devices"
        "bound on phoenix: memory",
    ],
}
SHARED_QWEN = MODELS_DIR / "qwen2_tiny_int4"
if (SHARED_QWEN / "genai_config.json").is_file():  # 05 skips its cells without the model folder
    CLAIMS["05_generate"] = [
        # "a decode step moves one 384-byte row, not the whole table"
        "decode step reads 384 B of a 147,456 B embedding table",
    ]


def test_every_expected_notebook_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_are_stripped(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} keep outputs or execution counts; clear them "
        "(Jupyter: Edit > Clear All Outputs) before committing"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the notebook metadata"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("NPUD_PROGRESS", "0")
    if corpus_available():
        monkeypatch.setenv("NPUD_CORPUS", str(CORPUS_DIR))
    else:
        monkeypatch.delenv("NPUD_CORPUS", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any exception
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a code cell did not run"
    printed = {
        line.strip()
        for cell in code
        for out in cell.outputs
        if out.output_type == "stream"
        for line in out.text.splitlines()
    }
    missing = [claim for claim in CLAIMS.get(path.stem, []) if claim not in printed]
    assert not missing, f"{path.name} no longer prints what its text claims: {missing}"
