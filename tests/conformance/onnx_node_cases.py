"""The ONNX backend node tests of the installed ``onnx`` package, materialized in memory.

``onnx`` wheels up to 1.18 ship them as files (``onnx/backend/test/data/node/<case>/model.onnx``
plus ``test_data_set_0/{input,output}_N.pb``); newer wheels ship only the generators in
``onnx.backend.test.case.node``, which build the same models and arrays (what onnx's own
``backend-test-tools generate-data`` writes to disk). Nothing is written or committed here.

Comparison mirrors ``onnx.backend.test.runner.Runner.assert_similar_outputs`` (same shapes and
dtypes, strings and integers exact, floats with the case's ``rtol``/``atol``); floats that went
through the NPU use the bf16 policy of :mod:`npudispatch.rewrites.precision` instead.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "NodeCase",
    "assert_outputs_match",
    "cases_from_files",
    "node_cases",
    "onnxruntime_verdict",
]


@dataclass(frozen=True)
class NodeCase:
    """One node test: a single-node (or expanded-function) model, its inputs and outputs."""

    name: str
    model: onnx.ModelProto
    inputs: dict[str, Any]  # graph input name -> array (or list / None for sequences, optionals)
    outputs: list[Any]
    rtol: float
    atol: float


def _as_value(item: Any) -> Any:
    if isinstance(item, onnx.TensorProto):
        return numpy_helper.to_array(item)
    if isinstance(item, list):
        return [_as_value(x) for x in item]
    if isinstance(item, np.generic):  # generators give rank-0 data as numpy scalars
        return np.asarray(item)
    return item


def _feeds(model: onnx.ModelProto, inputs: Sequence[Any]) -> dict[str, Any]:
    initializers = {t.name for t in model.graph.initializer}
    names = [v.name for v in model.graph.input if v.name not in initializers]
    return {n: _as_value(x) for n, x in zip(names, inputs, strict=True)}


def _read_value(path: Path, type_proto: onnx.TypeProto) -> Any:
    data = path.read_bytes()
    if type_proto.HasField("sequence_type"):
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if type_proto.HasField("optional_type"):
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    if type_proto.HasField("map_type"):
        mp = onnx.MapProto()
        mp.ParseFromString(data)
        return numpy_helper.to_dict(mp)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def cases_from_files(root: Path) -> list[NodeCase]:
    """Cases shipped as files (onnx <= 1.18): the runner's default tolerances, as onnx uses."""
    cases = []
    for case_dir in sorted(p for p in root.iterdir() if (p / "model.onnx").exists()):
        model = onnx.load(case_dir / "model.onnx")
        data_dir = case_dir / "test_data_set_0"
        graph_inputs = list(model.graph.input)
        ins = [
            _read_value(data_dir / f"input_{i}.pb", v.type)
            for i, v in enumerate(graph_inputs)
            if (data_dir / f"input_{i}.pb").exists()
        ]
        outs = [
            _read_value(data_dir / f"output_{i}.pb", v.type)
            for i, v in enumerate(model.graph.output)
        ]
        cases.append(NodeCase(case_dir.name, model, _feeds(model, ins), outs, 1e-3, 1e-7))
    return cases


def _from_generators() -> list[NodeCase]:
    from onnx.backend.test.case.node import collect_testcases

    cases = []
    with warnings.catch_warnings():  # the generators overflow casts on purpose
        warnings.simplefilter("ignore")
        for tc in collect_testcases():
            assert tc.model is not None and tc.data_sets is not None
            (inputs, outputs), *more = tc.data_sets
            assert not more, f"{tc.name}: several data sets"  # none in onnx <= 1.23
            outs = [_as_value(x) for x in outputs]
            cases.append(
                NodeCase(tc.name, tc.model, _feeds(tc.model, inputs), outs, tc.rtol, tc.atol)
            )
    return cases


@functools.cache
def node_cases() -> dict[str, NodeCase]:
    """Every node test case of the installed onnx, by name (built once per process)."""
    shipped = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    cases = cases_from_files(shipped) if shipped.is_dir() else _from_generators()
    return {c.name: c for c in cases}


#: The backend's model tests shipped beside the node tests: models converted from PyTorch
#: (``pytorch-converted``, ``pytorch-operator``) and small multi-node graphs (``simple``).
MODEL_SUITES = ("pytorch-converted", "pytorch-operator", "simple")


@functools.cache
def model_cases() -> dict[str, NodeCase]:
    """Every model test case of the installed onnx, by ``suite/name`` (built once per process)."""
    data = Path(onnx.__file__).parent / "backend" / "test" / "data"
    return {
        f"{suite}/{case.name}": case
        for suite in MODEL_SUITES
        if (data / suite).is_dir()
        for case in cases_from_files(data / suite)
    }


# --- comparison ------------------------------------------------------------------------------


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes floats (bfloat16, float8*, float4) have kind "V"; so do int4/uint4 (exact).
    return dtype.kind in "fc" or (dtype.kind == "V" and "float" in dtype.name)


def assert_outputs_match(
    expected: Sequence[Any],
    actual: Sequence[Any],
    tolerance: Callable[[int, np.ndarray], tuple[float, float]],
    names: Sequence[str] | None = None,
) -> None:
    """Raise ``AssertionError`` unless ``actual`` matches ``expected`` output by output.

    ``tolerance(i, expected_i)`` gives ``(rtol, atol)`` for float output ``i``; strings, integers
    and bools must be equal, and every output must have the expected shape and dtype.
    """
    assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
    for i, (exp, act) in enumerate(zip(expected, actual)):
        what = f"output {i}" + (f" ({names[i]!r})" if names else "")
        if isinstance(exp, list):
            assert isinstance(act, list), f"{what}: got {type(act).__name__}, expected a sequence"

            def item_tolerance(_: int, x: np.ndarray, i: int = i) -> tuple[float, float]:
                return tolerance(i, x)

            for e, a in zip(exp, act, strict=True):
                assert_outputs_match([e], [a], item_tolerance, [what])
            continue
        if exp is None:
            assert act is None, f"{what}: expected an empty optional"
            continue
        act = np.asarray(act)
        assert act.shape == exp.shape, (
            f"{what}: shape {list(act.shape)}, expected {list(exp.shape)}"
        )
        if exp.dtype == object:
            np.testing.assert_array_equal(act, exp, err_msg=what)
            continue
        assert act.dtype == exp.dtype, f"{what}: dtype {act.dtype}, expected {exp.dtype}"
        if not _is_float(exp.dtype):
            np.testing.assert_array_equal(act, exp, err_msg=f"{what} (compared exactly)")
            continue
        rtol, atol = tolerance(i, exp)
        if exp.dtype.name == "bfloat16":
            rtol = max(rtol, 2**-6)  # two bf16 ulps, as onnx's own runner allows
        cast = np.complex128 if exp.dtype.kind == "c" else np.float64
        np.testing.assert_allclose(
            act.astype(cast), exp.astype(cast), rtol=rtol, atol=atol, err_msg=what
        )


def onnxruntime_verdict(case: NodeCase) -> str | None:
    """``None`` when onnxruntime passes ``case`` with the case's own tolerances, else why not."""
    import onnxruntime as ort

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sess = ort.InferenceSession(
            case.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        got = sess.run(None, case.inputs)
        assert_outputs_match(case.outputs, got, lambda *_: (case.rtol, case.atol))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first[:160]}"
    return None
