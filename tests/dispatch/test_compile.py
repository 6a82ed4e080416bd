"""compile_model: partitions, view handling, tensor requests, report, random DAGs (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_models import GOLDEN, Builder, assert_close, onnxruntime_run, random_feeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npudispatch import Session, compile_model
from npudispatch.dispatch.emit import numpy_dtype
from npudispatch.rewrites.support import npu_support, support_query


def test_report_document():
    compiled = compile_model(GOLDEN["G14"]())
    report = compiled.to_report()
    assert {"partitions", "npu_node_fraction", "kernel_calls_per_run", "unsupported"} <= set(report)
    assert report["kernel_calls_per_run"] == 2
    # Three MatMuls plus four bf16 boundary casts (X in, Y2 out to the CPU Atan, T back in, Y3
    # out) run on the NPU, Atan on the CPU: 7 of 8 nodes. Without bf16 it is 3 of 4.
    casts = [n for p in report["partitions"] if p["kind"] == "npu" for n in p["nodes"]]
    assert sum("__to_" in n for n in casts) == 4
    assert report["npu_node_fraction"] == pytest.approx(7 / 8)
    assert compile_model(GOLDEN["G14"](), bf16=False).npu_node_fraction == pytest.approx(3 / 4)
    npu = [p for p in report["partitions"] if p["kind"] == "npu"]
    for p in report["partitions"]:
        assert {"kind", "nodes", "inputs", "outputs"} <= set(p)
    for p in npu:
        assert set(p["plan"]) == {
            "scratch_bytes",
            "scratch_lower_bound_bytes",
            "input_bytes",
            "output_bytes",
            "const_bytes",
            "params_bytes",
        }
        assert p["txn"]["num_ops"] > 0 and p["txn"]["bytes"] > 16
    assert report["partitions"][1] == {
        "name": "cpu0",
        "kind": "cpu",
        "nodes": ["cpu_atan"],
        "inputs": ["Y2"],
        "outputs": ["T"],
    }
    assert set(compiled.timings) == {"load", "rewrite", "partition", "plan", "emit"}


def test_supported_narrows_the_npu_set():
    compiled = compile_model(GOLDEN["G11"](), supported={"MatMul"})
    kinds = [p.kind for p in compiled.partitions]
    assert kinds.count("cpu") >= 1
    assert all(op.op_type == "MatMul" for p in compiled.programs.values() for op in p.ops)


def test_view_between_two_host_tensors_goes_to_cpu():
    """X -> Identity -> Y with X and Y both host-visible cannot be zero-copy."""
    b = Builder()
    b.inp("X", [1, 8])
    b.node("Identity", ["X"], [b.out("Y", [1, 8])], "copy")
    b.node("Sigmoid", ["X"], [b.out("S", [1, 8])], "sig")
    model = b.model("io_view")
    compiled = compile_model(model, rewrite=False)
    reasons = {u.name: u.reason for u in compiled.report.unsupported}
    assert "copy" in reasons and "share memory" in reasons["copy"]
    feeds = random_feeds(model)
    y, s = Session(compiled).run(None, feeds)
    np.testing.assert_array_equal(y, feeds["X"])
    assert_close(s, onnxruntime_run(model, feeds)["S"])


def test_npu_support_query():
    from npudispatch.graph import load

    model = load(GOLDEN["G14"]())
    query = npu_support
    by_name = {n.name: query(n) for n in model.graph}
    assert by_name["matmul1"] is None
    assert "Atan" in by_name["cpu_atan"]
    # Narrowing keeps the registry's answer for what it allows and refuses the rest.
    narrowed = support_query({"Atan"})
    assert support_query() is npu_support
    assert "Atan" in narrowed(model.graph.node("cpu_atan"))  # allowed by the user, no operator
    assert "not in the supported set" in narrowed(model.graph.node("matmul1"))


@pytest.mark.parametrize("bf16", [True, False])
def test_tensor_requests_are_the_max_over_ops(bf16):
    (program,) = compile_model(GOLDEN["G10"](), bf16=bf16).programs.values()
    dtypes = set()
    for name, pl in program.plan.placements.items():
        itemsize = np.dtype(numpy_dtype(pl.dtype)).itemsize
        dtypes.add(pl.dtype)
        assert pl.nbytes >= int(np.prod(pl.padded_shape or pl.shape)) * itemsize, name
        assert pl.nbytes % 4 == 0
    # bf16: the graph input/output stay float32, every intermediate is bf16.
    assert dtypes == ({"float32", "bfloat16"} if bf16 else {"float32"})


UNARY = ("Sigmoid",)
BINARY = ("Add", "Mul", "Sub")


@st.composite
def random_dag(draw):
    """A random DAG of elementwise ops and MatMuls over [1, 4, 32] float tensors."""
    n_ops = draw(st.integers(2, 7))
    b = Builder(draw(st.integers(0, 1000)))
    values = [b.inp("X0", [1, 4, 32]), b.inp("X1", [1, 4, 32])]
    for i in range(n_ops):
        kind = draw(st.sampled_from(["unary", "binary", "matmul"]))
        a = draw(st.sampled_from(values))
        out = f"t{i}"
        if kind == "unary":
            b.node("Sigmoid", [a], [out], f"op{i}")
        elif kind == "binary":
            c = draw(st.sampled_from(values))
            b.node(draw(st.sampled_from(BINARY)), [a, c], [out], f"op{i}")
        else:
            b.node("MatMul", [a, b.weight(f"W{i}", [32, 32])], [out], f"op{i}")
        values.append(out)
    produced = values[2:]
    consumed = {i for n in b.nodes for i in n.input}
    outs = [v for v in produced if v not in consumed] or [produced[-1]]
    extra = draw(st.lists(st.sampled_from(produced), max_size=2, unique=True))
    for v in dict.fromkeys([*outs, *extra]):
        b.out(v, [1, 4, 32])
    return b.model("random_dag")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dag())
def test_random_dags_plan_and_run(model):
    session = Session(model)
    for program in session.programs:
        plan = program.plan
        plan.validate()
        assert plan.scratch_intermediate_bytes >= plan.scratch_lower_bound_bytes
        for pl in plan.placements.values():
            assert pl.offset >= 0 and pl.end <= plan.size(pl.buffer)
    feeds = random_feeds(model)
    used = {a.name for a in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in used}
    ref = onnxruntime_run(model, feeds)
    for out, name in zip(session.run(None, feeds), [o.name for o in session.get_outputs()]):
        assert_close(out, ref[name], rtol=5e-2, atol=5e-2)


def test_fused_skip_rmsnorm_runs_on_the_npu():
    """The residual skip-RMSNorm fusion types its unread statistics outputs, so it stays on the NPU."""
    from npudispatch.examples.exporter import llama_decoder_layer

    compiled = compile_model(llama_decoder_layer(), dims={"batch": 1, "sequence": 8})
    declined = {u["op_type"] for u in compiled.to_report()["unsupported"]}
    assert "SkipSimplifiedLayerNormalization" not in declined
    npu_ops = {n.op_type for p in compiled.partitions if p.kind == "npu" for n in p.nodes}
    assert "SkipSimplifiedLayerNormalization" in npu_ops


def test_views_of_shape_arithmetic_stay_on_the_cpu():
    """Unsqueeze/Reshape of int64 shape tensors is CPU work, not an NPU view."""
    import onnx_ir as ir

    def unsqueeze(dtype: ir.DataType) -> ir.Node:
        data = ir.val("s", dtype, [])
        axes = ir.val("axes", const_value=ir.tensor(np.array([0], np.int64), name="axes"))
        node = ir.node("Unsqueeze", [data, axes])
        node.outputs[0].dtype, node.outputs[0].shape = dtype, ir.Shape([1])
        return node

    reason = npu_support(unsqueeze(ir.DataType.INT64))
    assert reason is not None and "INT64" in reason and "shape arithmetic" in reason
    assert npu_support(unsqueeze(ir.DataType.FLOAT)) is None


def test_num_cols_and_zero_dims_are_refused_up_front():
    """Configuration errors surface at compile time with the fix, not as a device hang later."""
    from npudispatch.errors import ModelError, PlanError
    from npudispatch.examples.exporter import llama_decoder_layer

    with pytest.raises(PlanError, match="1 to 8 columns"):
        compile_model(GOLDEN["G7"](), num_cols=9)
    with pytest.raises(ModelError, match="between 0 and"):
        compile_model(llama_decoder_layer(), dims={"batch": -1, "sequence": 8})
    # Zero-size dims are legal ONNX (an empty KV cache at prefill): empty tensors stay on the CPU.
    empty = compile_model(llama_decoder_layer(), dims={"batch": 0, "sequence": 8})
    assert empty.kernel_calls_per_run == 0
    assert any("is empty" in u.reason for u in empty.report.unsupported)


def test_compiled_model_repr_fits_one_screen():
    from npudispatch.examples import build_example

    text = repr(compile_model(build_example("llama2-mlp-small")))
    lines = text.splitlines()
    assert len(lines) <= 12 and all(len(line) <= 200 for line in lines)
    assert "nodes on the NPU (100%)" in lines[0] and "1 kernel calls per run" in lines[0]
    assert lines[1].strip().startswith("npu0:") and "txn" in lines[1]
