"""Terminal padding + bf16 storage (the compile defaults) end to end, against onnxruntime.

The model needs padding everywhere: hidden 100 and N = 37 are not multiples of the 8-lane bf16
vectors, a graph input (the mask ``M``) and both graph outputs are padded, and the softmax runs
over 37 real lanes of a 40-lane row. Outputs are compared with the documented bf16 tolerance
policy (:func:`npudispatch.rewrites.precision.tolerance_for_model`).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from e2e_models import Builder, onnxruntime_run, random_feeds

from npudispatch import Session, compile_model
from npudispatch.cli import main
from npudispatch.dispatch.check import ULPS
from npudispatch.examples import build_example
from npudispatch.rewrites.padding import real_shape
from npudispatch.rewrites.precision import tolerance_for_model

SEQ, D, HIDDEN, N = 5, 64, 100, 37


def padded_model() -> onnx.ModelProto:
    """SwiGLU MLP (hidden 100) -> head (N 37) -> + mask -> Softmax; outputs declared (L2, P)."""
    b = Builder(37)
    x = b.inp("X", [1, SEQ, D])
    mask = b.inp("M", [1, SEQ, N])
    b.node("MatMul", [x, b.weight("Wg", [D, HIDDEN])], ["g"], "gate")
    b.node("MatMul", [x, b.weight("Wu", [D, HIDDEN])], ["u"], "up")
    b.silu("g", "s", "act")
    b.node("Mul", ["s", "u"], ["h"], "mul")
    b.node("MatMul", ["h", b.weight("Wd", [HIDDEN, D])], ["Z"], "down")
    b.node("MatMul", ["Z", b.weight("Wo", [D, N])], ["logits"], "head")
    b.node("Add", ["logits", mask], ["masked"], "add_mask")
    b.node("Softmax", ["masked"], [b.out("P", [1, SEQ, N])], "softmax", axis=-1)
    b.node("Add", ["logits", "logits"], [b.out("L2", [1, SEQ, N])], "double")
    b.outputs.reverse()  # declared order L2, P differs from the order the nodes produce them
    return b.model("padded_mlp")


@pytest.fixture(scope="module")
def session() -> Session:
    return Session(padded_model())


def test_outputs_at_user_shapes_in_declared_order_within_policy(session):
    model = padded_model()
    feeds = random_feeds(model, seed=3)
    outs = session.run(None, feeds)
    ref = onnxruntime_run(model, feeds)
    assert [o.name for o in session.get_outputs()] == ["L2", "P"] == list(ref)
    assert [a.shape for a in session.get_outputs()] == [[1, SEQ, N]] * 2
    assert [a.shape for a in session.get_inputs()] == [[1, SEQ, D], [1, SEQ, N]]
    tol = tolerance_for_model(session.compiled.model)
    assert 1e-2 < tol.rtol < 0.1  # bf16: a few units of 2**-8, not float32 exactness
    for (name, expected), actual in zip(ref.items(), outs):
        assert actual.shape == expected.shape == (1, SEQ, N), name
        assert actual.dtype == np.float32, name
        tol.assert_close(actual, expected, name)
    # Padded lanes never leak into the softmax: the 37 real lanes of every row sum to 1.
    np.testing.assert_allclose(outs[1].sum(-1), 1.0, atol=1e-2)
    # A subset, in the caller's order.
    p, l2 = session.run(["P", "L2"], feeds)
    np.testing.assert_array_equal(p, outs[1])
    np.testing.assert_array_equal(l2, outs[0])


def test_padding_and_bf16_really_happen(session):
    """Intermediates, the mask input and both outputs are padded; the NPU stores them in bf16."""
    graph = session.compiled.model.graph
    values = {v.name: v for n in graph for v in n.outputs}
    assert real_shape(values["g"]) == (1, SEQ, HIDDEN) and values["g"].shape[-1] == 104
    assert values["g"].dtype.name == "BFLOAT16"
    (program,) = session.programs
    bindings = {b.name: b for b in [*program.inputs, *program.outputs]}
    assert [b.name for b in program.outputs] == ["L2", "P"]
    for name in ("M", "L2", "P"):
        b = bindings[name]
        assert b.shape == (1, SEQ, N) and b.padded_shape == (1, SEQ, 40) and b.is_padded, name
        assert b.dtype == "float32", name  # the host moves float32; casts run on the NPU
    assert not bindings["X"].is_padded  # a MatMul activation takes any K


def test_copy_in_zero_fills_the_padded_lanes(session):
    """Padded input lanes must be zero on the device whatever the previous run left there."""
    model = padded_model()
    ref_feeds = random_feeds(model, seed=5)
    first = session.run(None, random_feeds(model, seed=4))
    second = session.run(None, ref_feeds)
    ref = onnxruntime_run(model, ref_feeds)
    tol = tolerance_for_model(session.compiled.model)
    for (name, expected), actual in zip(ref.items(), second):
        tol.assert_close(actual, expected, name)
    assert not np.allclose(first[0], second[0])


def test_no_pad_fp32_options_give_unpadded_float32_program():
    model = padded_model()
    session = Session(model, pad=False, bf16=False)
    (program,) = session.programs
    assert not any(b.is_padded for b in [*program.inputs, *program.outputs])
    assert {p.dtype for p in program.plan.placements.values()} == {"float32"}
    assert "Cast" not in [op.op_type for op in program.ops]
    feeds = random_feeds(model, seed=3)
    ref = onnxruntime_run(model, feeds)
    tol = tolerance_for_model(session.compiled.model)
    for (name, expected), actual in zip(ref.items(), session.run(None, feeds)):
        tol.assert_close(actual, expected, name)


def test_session_refuses_compile_options_for_a_compiled_model():
    compiled = compile_model(padded_model())
    with pytest.raises(ValueError, match="already compiled"):
        Session(compiled, bf16=False)


def test_bf16_halves_scratch_on_llama2_mlp_small():
    plans = {
        bf16: next(
            iter(compile_model(build_example("llama2-mlp-small"), bf16=bf16).programs.values())
        )
        for bf16 in (True, False)
    }
    bf16, fp32 = plans[True].plan, plans[False].plan
    assert bf16.scratch_bytes * 2 == fp32.scratch_bytes
    assert bf16.scratch_intermediate_bytes == bf16.scratch_lower_bound_bytes
    assert bf16.input_bytes == fp32.input_bytes and bf16.output_bytes == fp32.output_bytes


def test_cli_run_check_uses_the_policy_and_compile_options(tmp_path, capsys):
    path = tmp_path / "padded.onnx"
    onnx.save(padded_model(), path)
    assert main(["run", str(path), "--check", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and list(doc["outputs"]) == ["L2", "P"]
    assert doc["outputs"]["P"]["shape"] == [1, SEQ, N]
    for name in ("L2", "P"):
        # Per output: bf16 ulps against the rounding-aware reference (dispatch.check).
        assert doc["tolerance"][name] == {"ulps": ULPS, "reference": "rounding-aware"}
        assert doc["outputs"][name]["tolerance"] == doc["tolerance"][name]
        assert doc["outputs"][name]["check"]["worst_ulps"] <= ULPS
    # --rtol/--atol: the float32 comparison with the policy filling the other one.
    assert main(["run", str(path), "--check", "--json", "--rtol", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for name in ("L2", "P"):
        assert doc["tolerance"][name]["rtol"] == 1.0 and doc["tolerance"][name]["atol"] > 0
    assert main(["run", str(path), "--check", "--json", "--rtol", "0", "--atol", "0"]) == 1
    capsys.readouterr()
    assert main(["plan", str(path), "--json", "--fp32", "--no-pad"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    (plan,) = plans.values()
    assert {p["dtype"] for p in plan["placements"].values()} == {"float32"}
    out = tmp_path / "out"
    assert main(["compile", str(path), "-o", str(out), "--no-pad"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kernel_calls_per_run"] == 1
