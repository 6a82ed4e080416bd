"""ONNX backend node tests through ``npudispatch.Session`` (emulator + onnxruntime fallback).

Every case of the installed ``onnx`` package runs (``onnx_node_cases.py``), and so do its model
tests (models converted from PyTorch, small multi-node graphs). onnxruntime is the
control: a case it fails itself is skipped with its error. A case in ``expected_failures.py``
is a strict xfail: it must fail with the stated error type, and passing fails the suite so the
list can only shrink.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import onnx_ir as ir
import pytest
from expected_failures import EXPECTED_FAILURES
from onnx_node_cases import (
    NodeCase,
    assert_outputs_match,
    model_cases,
    node_cases,
    onnxruntime_verdict,
)

import npudispatch
from npudispatch import graph
from npudispatch.rewrites.precision import tolerance_for_output


def _params() -> list:
    params = []
    for name in node_cases():
        marks = []
        if (known := EXPECTED_FAILURES.get(name)) is not None:
            marks.append(pytest.mark.xfail(reason=known.reason, raises=known.raises, strict=True))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _npu_nodes(session: npudispatch.Session) -> set[ir.Node]:
    return {n for p in session.compiled.partitions if p.kind == "npu" for n in p.nodes}


def _tolerances(session: npudispatch.Session, case: NodeCase):
    """The case's own tolerance, or the bf16 policy for outputs computed on the NPU."""
    model = session.compiled.model
    npu = _npu_nodes(session)
    digraph = graph.to_networkx(model) if npu else None
    names = [o.name for o in session.get_outputs()]

    def tolerance(i: int, expected: np.ndarray) -> tuple[float, float]:
        value = next(v for v in model.graph.outputs if v.name == names[i])
        producer = value.producer()
        if digraph is None or producer is None:
            return case.rtol, case.atol
        if not {producer, *nx.ancestors(digraph, producer)} & npu:
            return case.rtol, case.atol
        policy = tolerance_for_output(model, names[i], lambda n: None if n in npu else "cpu")
        finite = np.asarray(expected, np.float64)
        finite = finite[np.isfinite(finite)]
        rms = float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0
        scaled = policy.scaled(rms if rms > 0 else 1.0)
        return max(scaled.rtol, case.rtol), max(scaled.atol, case.atol)

    return tolerance, names


@pytest.mark.parametrize("name", _params())
def test_node_case(name: str) -> None:
    _run_case(node_cases()[name])


@pytest.mark.parametrize("name", sorted(model_cases()))
def test_model_case(name: str) -> None:
    _run_case(model_cases()[name])


def _run_case(case: NodeCase) -> None:
    if (why := onnxruntime_verdict(case)) is not None:
        pytest.skip(f"onnxruntime fails this case itself: {why}")
    session = npudispatch.Session(case.model, cache=False)
    got = session.run(None, case.inputs)
    tolerance, names = _tolerances(session, case)
    assert_outputs_match(case.outputs, got, tolerance, names)


def test_expected_failures_name_real_cases_onnxruntime_passes() -> None:
    """A stale entry (renamed or removed upstream) must be deleted, not silently ignored; an entry
    whose case onnxruntime fails would only ever be skipped, so it does not belong in the list."""
    cases = node_cases()
    unknown = sorted(set(EXPECTED_FAILURES) - set(cases))
    assert not unknown, f"expected_failures.py names cases the installed onnx lacks: {unknown}"
    controls = {name: onnxruntime_verdict(cases[name]) for name in EXPECTED_FAILURES}
    failing = {name: why for name, why in controls.items() if why is not None}
    assert not failing, f"onnxruntime fails these listed cases itself (delete them): {failing}"


def test_cases_shipped_as_files_load_like_generated_ones(tmp_path) -> None:
    """onnx <= 1.18 ships the cases as model.onnx + test_data_set_0/*.pb: that layout is read
    back into the same NodeCase (here one case written the way onnx's generate-data writes it)."""
    import onnx
    from onnx import numpy_helper
    from onnx_node_cases import cases_from_files

    generated = node_cases()["test_relu"]
    case_dir = tmp_path / generated.name
    (case_dir / "test_data_set_0").mkdir(parents=True)
    onnx.save(generated.model, case_dir / "model.onnx")
    for i, (name, value) in enumerate(generated.inputs.items()):
        tensor = numpy_helper.from_array(value, name)
        (case_dir / "test_data_set_0" / f"input_{i}.pb").write_bytes(tensor.SerializeToString())
    for i, value in enumerate(generated.outputs):
        tensor = numpy_helper.from_array(value, generated.model.graph.output[i].name)
        (case_dir / "test_data_set_0" / f"output_{i}.pb").write_bytes(tensor.SerializeToString())
    (loaded,) = cases_from_files(tmp_path)
    assert loaded.name == generated.name and loaded.model == generated.model
    assert list(loaded.inputs) == list(generated.inputs)
    for got, want in zip(
        [*loaded.inputs.values(), *loaded.outputs], [*generated.inputs.values(), *generated.outputs]
    ):
        np.testing.assert_array_equal(got, want)
