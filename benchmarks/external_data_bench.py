"""Peak memory of a model whose weights live in external data: are big weights ever copied?

Builds (in a temporary folder) a ~330 MB model whose table sits in ``model.onnx.data`` and is
read by a CPU segment (a float64 Gather: the NPU does not compute float64), then, in a fresh
subprocess started from *another* working directory, creates a ``Session``, runs it and records
the peak RSS. The ratio is the RSS growth over the process baseline divided by the data file's
size: about 0 when the weights are memory-mapped and shared with onnxruntime, >= 1 when they are
copied once.

Run: ``python -m benchmarks.external_data_bench [--json] [--quick]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.standalone import json_quick_main

_CHILD = r"""
import json, resource, sys
import numpy as np
import npudispatch
def peak():
    # VmHWM belongs to this address space; ru_maxrss would also count the parent's size at fork.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def run(path):
    sess = npudispatch.Session(path)
    (out,) = sess.run(None, {"ids": np.arange(0, 64, dtype=np.int64) * 7})
    return sess, out
run(sys.argv[1])  # the same graph with a tiny table: every import and code path warmed up
base = peak()
sess, out = run(sys.argv[2])
print(json.dumps({"baseline_bytes": base, "peak_bytes": peak(), "out_sum": float(out.sum()),
                  "cpu_segments": sess.last_run_stats.cpu_segments}))
"""


def build(folder: Path, table: np.ndarray) -> Path:
    """A Gather from a float64 table stored externally; returns the model path."""
    cols = table.shape[1]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["out"], name="lookup", axis=0)]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [64])],
        [helper.make_tensor_value_info("out", TensorProto.DOUBLE, [64, cols])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = folder / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
    return path


def run(json: bool = False, quick: bool = False) -> dict[str, Any]:
    rows, cols = (2_000, 256) if quick else (40_000, 1_024)  # 4 MB quick, 328 MB full
    table = np.random.default_rng(0).standard_normal((rows, cols))
    expected = float(table[np.arange(64) * 7].sum())
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, data in (("warmup", table[:448, :cols]), ("model", table)):
            folder = Path(tmp) / name
            folder.mkdir()
            paths.append(str(build(folder, data)))
        data_bytes = (Path(tmp) / "model" / "model.onnx.data").stat().st_size
        del table
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, *paths],
            cwd=tmp,  # not the models' folders
            capture_output=True,
            text=True,
            check=True,
        )
    child = _json_loads(proc.stdout.strip().splitlines()[-1])
    growth = child["peak_bytes"] - child["baseline_bytes"]
    result = {
        "data_bytes": data_bytes,
        **child,
        "growth_bytes": growth,
        "growth_over_data": growth / data_bytes,
        "output_correct": abs(child["out_sum"] - expected) <= 1e-9 * max(1.0, abs(expected)),
    }
    if not json:
        print(
            f"external data {data_bytes / 1e6:.0f} MB: peak RSS grew {growth / 1e6:.0f} MB "
            f"({result['growth_over_data']:.2f}x the data file)"
        )
    return result


def _json_loads(text: str) -> dict[str, Any]:
    return json.loads(text)


def main() -> None:
    json_quick_main(run, __doc__)


if __name__ == "__main__":
    main()
