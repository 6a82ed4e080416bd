"""CLI start-up stays light: ``npudispatch --help`` and ``txn stats`` import none of the heavy
libraries (onnx, onnxruntime, ml_dtypes, matplotlib...); commands import them where they use them.
The time itself is a benchmark row (benchmarks/cli_start_bench.py), not a timed test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from npudispatch.txn import TxnBuilder

HEAVY = ("onnx", "onnxruntime", "onnx_ir", "onnxscript", "ml_dtypes", "matplotlib", "sympy")

_PROBE = """
import contextlib, io, json, sys
from npudispatch.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[2:])
    except SystemExit as exc:
        code = exc.code
heavy = [m for m in sys.argv[1].split(",") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _heavy_modules_after(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def txn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    b = TxnBuilder(num_cols=4)
    b.write(0x1D004, 7)
    path = tmp_path_factory.mktemp("txn") / "t.bin"
    path.write_bytes(b.build().to_bytes())
    return path


@pytest.mark.parametrize("command", [["--help"], ["txn", "stats"], ["txn", "explain"]])
def test_light_commands_do_not_import_heavy_libraries(command, txn_file):
    argv = command + ([str(txn_file)] if command[0] == "txn" else [])
    result = _heavy_modules_after(argv)
    assert result["code"] == 0
    assert result["heavy"] == [], f"`npudispatch {' '.join(command)}` imported {result['heavy']}"
