"""DD's golden graphs (standard-ONNX versions) through Session, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_models import GOLDEN, assert_close, onnxruntime_run, random_feeds

from npudispatch import Session, compile_model


def run_both(model, session=None, seed=0):
    session = session or Session(model)
    feeds = random_feeds(model, seed)
    outs = session.run(None, feeds)
    ref = onnxruntime_run(model, feeds)
    names = [o.name for o in session.get_outputs()]
    assert names == list(ref)
    for name, out in zip(names, outs):
        assert out.shape == ref[name].shape and out.dtype == ref[name].dtype
        assert_close(out, ref[name])
    return session, dict(zip(names, outs))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_matches_onnxruntime(name):
    session, _ = run_both(GOLDEN[name]())
    stats = session.last_run_stats
    assert stats.kernel_calls == len(session.programs) >= 1
    assert stats.bytes_to_device > 0 and stats.bytes_from_device > 0
    for program in session.programs:
        program.plan.validate()
        assert program.plan.scratch_intermediate_bytes >= program.plan.scratch_lower_bound_bytes


@pytest.mark.parametrize("name", ["G6", "G7", "G8", "G9", "G10", "G11", "G3", "G12", "G15"])
def test_fully_supported_graphs_are_one_kernel_call(name):
    compiled = compile_model(GOLDEN[name]())
    assert [p.kind for p in compiled.partitions] == ["npu"]
    assert compiled.kernel_calls_per_run == 1 and compiled.npu_node_fraction == 1.0


def test_mlp_ladder_reuses_scratch():
    """G11: five ops, intermediates Y0, Y1, Z0, A; at most three are live at once."""
    program = compile_model(GOLDEN["G11"]()).programs[0]
    plan = program.plan
    inter = [n for n, p in plan.placements.items() if p.buffer.name == "SCRATCH"]
    assert len(inter) >= 4
    naive = sum(plan.placements[n].nbytes for n in inter)
    assert plan.scratch_intermediate_bytes < naive
    assert plan.scratch_intermediate_bytes == plan.scratch_lower_bound_bytes


def test_g14_unsupported_middle_op_splits_npu_cpu_npu():
    model = GOLDEN["G14"]()
    session, _ = run_both(model)
    assert [p.kind for p in session.compiled.partitions] == ["npu", "cpu", "npu"]
    assert session.last_run_stats.kernel_calls == 2
    assert session.last_run_stats.cpu_segments == 1
    assert [u.op_type for u in session.compiled.report.unsupported] == ["Atan"]


def test_g14_reference_fallback():
    model = GOLDEN["G14"]()
    run_both(model, Session(model, fallback="reference"))


def test_g4_identity_chain_is_zero_copy_without_rewrites():
    model = GOLDEN["G4"]()
    compiled = compile_model(model, rewrite=False)
    (program,) = compiled.programs.values()
    assert [op.op_type for op in program.ops] == ["MatMul", "MatMul"]  # no txn for the views
    aliases = program.plan.aliases
    assert aliases["id1_out"] == ("X", 0) and aliases["id2_out"] == ("X", 0)
    assert aliases["id3_out"] == aliases["id4_out"] == ("mul1_out", 0)
    # The graph output is the root: mul2 writes straight into the output buffer.
    assert aliases["mul2_out"] == ("Y", 0) and aliases["id5_out"] == ("Y", 0)
    run_both(model, Session(compiled))


@pytest.mark.parametrize("bf16", [True, False])
def test_g4_views_alias_through_reshape_squeeze_unsqueeze(bf16):
    model = GOLDEN["G4-views"]()
    session, _ = run_both(model, Session(model, bf16=bf16))
    (program,) = session.programs
    assert all(op.op_type not in ("Reshape", "Squeeze", "Unsqueeze") for op in program.ops)
    aliases = program.plan.aliases
    assert aliases["m1u"] == ("m1", 0) and aliases["s2"] == ("s", 0)
    if bf16:
        # Views stay inside the bf16 region (no casts around them): the input view aliases the
        # bf16 twin of X, and the last Reshape's output is Y's bf16 twin, a view of m2 that the
        # boundary cast turns into the float32 graph output Y.
        assert [op.op_type for op in program.ops] == ["Cast", "MatMul", "Sigmoid", "MatMul", "Cast"]
        assert aliases["x2"] == ("X__bf16", 0) and aliases["Y__bf16"] == ("m2", 0)
    else:
        # The graph input/output are the roots: mul2 writes straight into the output buffer.
        assert aliases["x2"] == ("X", 0) and aliases["m2"] == ("Y", 0)


def test_g15_fork_two_outputs_and_output_reused_inside():
    session, outs = run_both(GOLDEN["G15"]())
    x = random_feeds(GOLDEN["G15"]())["X"]
    np.testing.assert_allclose(outs["Y"], x**3, rtol=3e-2, atol=3e-2)
    (program,) = session.programs
    assert [b.name for b in program.outputs] == ["Y", "Y1"]


def test_output_names_subset_and_order():
    model = GOLDEN["G12"]()
    session = Session(model)
    feeds = random_feeds(model)
    y1, y0 = session.run(["Y1", "Y0"], feeds)
    ref = onnxruntime_run(model, feeds)
    assert_close(y1, ref["Y1"])
    assert_close(y0, ref["Y0"])
