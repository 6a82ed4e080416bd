"""The ONNX backend node tests for LRN take the NPU path, not the CPU fallback.

``test_onnx_node_conformance.py`` runs every case through ``Session`` but would pass just as well
if the LRN node fell back to onnxruntime; here the node must be in an NPU partition (one kernel
call, no CPU segment) and its output must match onnx's expected values within the bf16 policy.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx_node_cases import node_cases

import npudispatch
from npudispatch.rewrites.precision import tolerance_for

LRN_CASES = ["test_lrn", "test_lrn_default"]


def test_the_installed_onnx_has_the_lrn_cases() -> None:
    names = {n for n in node_cases() if n.startswith("test_lrn")}
    assert names == set(LRN_CASES), f"onnx's LRN node cases changed: {sorted(names)}"


@pytest.mark.parametrize("name", LRN_CASES)
def test_lrn_node_case_runs_on_the_npu(name: str) -> None:
    case = node_cases()[name]
    session = npudispatch.Session(case.model, cache=False)
    (got,) = session.run(None, case.inputs)
    npu_ops = [n.op_type for p in session.compiled.partitions if p.kind == "npu" for n in p.nodes]
    assert "LRN" in npu_ops
    assert [p.kind for p in session.compiled.partitions] == ["npu"]
    assert session.last_run_stats.kernel_calls == 1
    assert session.last_run_stats.cpu_segments == 0
    (expected,) = case.outputs
    rms = float(np.sqrt(np.mean(np.square(expected, dtype=np.float64))))
    tolerance_for(["Cast", "LRN", "Cast"]).scaled(rms).assert_close(got, expected, name)
