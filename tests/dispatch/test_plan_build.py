"""build_plan / BufferPlan: DD layout, aliases, validation, serialisation, text views."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npudispatch.dispatch.plan import (
    BufferKind,
    BufferPlan,
    Placement,
    TensorRequest,
    build_plan,
)
from npudispatch.errors import PlanError

BF16 = "bfloat16"


def t(name, nbytes, kind, first, last, shape=(1,), dtype=BF16, padded=None) -> TensorRequest:
    return TensorRequest(name, nbytes, kind, first, last, tuple(shape), dtype, padded)


def mlp_plan(alignment: int = 4) -> BufferPlan:
    """llama2-MLP (G11, docs/architecture.md §6): gate 0, up 1, silu 2, elwmul 3, down 4."""
    act = (1, 1, 11008)
    tensors = [
        t("X", 8192, "input", 0, 1, (1, 1, 4096)),
        t("Y0", 131_072, "intermediate", 0, 2, act, padded=(1, 1, 65536)),
        t("Y1", 131_072, "intermediate", 1, 3, act, padded=(1, 1, 65536)),
        t("Z0", 131_072, "intermediate", 2, 3, act, padded=(1, 1, 65536)),
        t("A", 131_072, "intermediate", 3, 4, act, padded=(1, 1, 65536)),
        t("C", 8192, "output", 4, 4, (1, 1, 4096)),
    ]
    ops = ["gate_proj", "up_proj", "silu", "elwmul", "down_proj"]
    return build_plan(
        tensors,
        op_scratch={"down_proj": 16_384},
        op_consts={"gate_proj": 1000, "up_proj": 1000, "silu": 0, "elwmul": 0, "down_proj": 999},
        op_params={op: 22 for op in ops},
        alignment=alignment,
    )


def test_buffer_kind_matches_ddr_patch_argidx():
    assert [k.value for k in BufferKind] == [0, 1, 2, 3, 4]
    assert [k.name for k in BufferKind] == ["INPUT", "OUTPUT", "SCRATCH", "CONST", "PARAMS"]


def test_llama_mlp_scratch_is_optimal_and_beats_dd():
    plan = mlp_plan()
    assert plan.scratch_lower_bound_bytes == 393_216
    assert plan.scratch_intermediate_bytes == 393_216 < 401_408  # DD v3
    assert plan.dd_no_reuse_bytes == 524_288
    # one shared 16 KiB pad after the intermediates: 409,600 B vs DD's 417,792 B
    assert plan.op_scratch_offset == 393_216
    assert plan.op_scratch_bytes == 16_384
    assert plan.scratch_bytes == 409_600 < 417_792
    assert plan.input_bytes == plan.output_bytes == 8192
    assert plan.placements["X"] == Placement(
        BufferKind.INPUT, 0, 8192, (1, 1, 4096), BF16, None, 0, 1
    )
    assert plan.placements["C"].buffer == BufferKind.OUTPUT
    assert plan.placements["Y0"].padded_shape == (1, 1, 65536)
    assert {plan.placements[n].buffer for n in ("Y0", "Y1", "Z0", "A")} == {BufferKind.SCRATCH}


def test_const_and_params_regions_follow_op_order_aligned():
    plan = mlp_plan(alignment=64)
    assert plan.const_regions == {
        "gate_proj": (0, 1000),
        "up_proj": (1024, 1000),
        "down_proj": (2048, 999),
    }  # ops without consts get no region (DD gave them offset 0, overwriting op 0)
    assert plan.const_bytes == 3072
    assert list(plan.params_regions) == ["gate_proj", "up_proj", "silu", "elwmul", "down_proj"]
    assert [o for o, _ in plan.params_regions.values()] == [0, 64, 128, 192, 256]
    assert plan.params_bytes == 320


def test_inputs_and_outputs_packed_in_given_order():
    plan = build_plan(
        [
            t("b", 10, "input", 0, 0),
            t("a", 100, "input", 0, 0),
            t("y", 5, "output", 0, 0),
            t("x", 7, "output", 0, 0),
        ],
        alignment=64,
    )
    assert [plan.placements[n].offset for n in "bayx"] == [0, 64, 0, 64]
    assert plan.input_bytes == 192 and plan.output_bytes == 128
    assert plan.scratch_bytes == 0


def test_identity_chain_like_g4_takes_no_scratch():
    # G4: X -> id1 -> id2 -> mul1 -> id3 -> id4 -> mul2 -> id5 -> id6 -> Y (ops 0..7).
    n = 196_608
    tensors = [
        t("X", n, "input", 0, 0),
        t("id1_out", n, "intermediate", 0, 1),
        t("id2_out", n, "intermediate", 1, 2),
        t("mul1_out", n, "intermediate", 2, 3),
        t("id3_out", n, "intermediate", 3, 4),
        t("id4_out", n, "intermediate", 4, 5),
        t("mul2_out", n, "intermediate", 5, 6),
        t("id5_out", n, "intermediate", 6, 7),
        t("Y", n, "output", 7, 7),
    ]
    aliases = {
        "id1_out": ("X", 0),
        "id2_out": ("id1_out", 0),
        "id3_out": ("mul1_out", 0),
        "id4_out": ("id3_out", 0),
        # id6 writes the graph output: the intermediates before it view Y (reversed direction).
        "mul2_out": ("Y", 0),
        "id5_out": ("mul2_out", 0),
    }
    plan = build_plan(tensors, aliases, alignment=4)
    assert plan.aliases["id2_out"] == ("X", 0)
    assert plan.aliases["id4_out"] == ("mul1_out", 0)
    assert plan.aliases["id5_out"] == ("Y", 0)
    assert plan.placements["id2_out"].buffer == BufferKind.INPUT
    assert plan.placements["id5_out"].buffer == BufferKind.OUTPUT
    assert plan.placements["id2_out"].alias_of == "X"
    assert plan.scratch_intermediate_bytes == n  # only mul1_out owns scratch
    assert plan.placements["mul1_out"].last == 5  # extended over id3/id4 uses
    assert plan.dd_no_reuse_bytes == n


def test_view_with_offset_and_view_used_after_base_dies():
    # base T lives [0, 1]; its view V (second half) is used up to op 3; U lives [2, 3].
    # Without extending T's lifetime U could reuse T's bytes under V.
    tensors = [
        t("T", 1024, "intermediate", 0, 1),
        t("V", 512, "intermediate", 1, 3),
        t("U", 1024, "intermediate", 2, 3),
    ]
    plan = build_plan(tensors, {"V": ("T", 512)}, alignment=64)
    T, V, U = (plan.placements[n] for n in "TVU")
    assert (T.first, T.last) == (0, 3)
    assert V.offset == T.offset + 512 and V.buffer == BufferKind.SCRATCH
    assert U.end <= T.offset or T.end <= U.offset
    assert plan.scratch_intermediate_bytes == 2048


def test_alias_of_graph_input_lives_in_input_buffer():
    tensors = [t("X", 256, "input", 0, 2), t("Xr", 256, "intermediate", 0, 2)]
    plan = build_plan(tensors, {"Xr": ("X", 0)})
    assert plan.placements["Xr"].buffer == BufferKind.INPUT
    assert plan.placements["Xr"].offset == plan.placements["X"].offset
    assert plan.scratch_bytes == 0


@pytest.mark.parametrize(
    ("aliases", "match"),
    [
        ({"V": ("nowhere", 0)}, "not among the planned tensors"),
        ({"ghost": ("T", 0)}, "alias 'ghost' is not among"),
        ({"V": ("T", 1000)}, "does not fit inside its base"),
        ({"V": ("W", 0), "W": ("V", 0)}, "cycle"),
        ({"Y": ("T", 0)}, "graph output"),
    ],
)
def test_bad_aliases_raise(aliases, match):
    tensors = [
        t("T", 1024, "intermediate", 0, 1),
        t("V", 512, "intermediate", 1, 3),
        t("W", 512, "intermediate", 1, 3),
        t("Y", 512, "output", 3, 3),
    ]
    with pytest.raises(PlanError, match=match):
        build_plan(tensors, aliases)


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ([t("a", 1, "input", 0, 0), t("a", 1, "output", 0, 0)], {}, "listed twice"),
        ([t("a", 1, "weight", 0, 0)], {}, "kind 'weight'"),
        ([t("a", 1, "intermediate", 2, 1)], {}, "first <= last"),
        ([t("a", 1, "input", 0, 0)], {"op_consts": {"mm": -4}}, "negative const"),
        ([t("a", 1, "input", 0, 0)], {"op_scratch": {"mm": -4}}, "negative scratch"),
    ],
)
def test_bad_requests_raise(tensors, kwargs, match):
    with pytest.raises(PlanError, match=match):
        build_plan(tensors, **kwargs)


def _move(plan: BufferPlan, name: str, **changes) -> BufferPlan:
    placements = dict(plan.placements)
    placements[name] = dataclasses.replace(placements[name], **changes)
    return dataclasses.replace(plan, placements=placements)


def test_validate_catches_overlap_of_live_tensors():
    plan = mlp_plan()
    y0 = plan.placements["Y0"]
    bad = _move(plan, "Y1", offset=y0.offset)  # Y0 [0,2] and Y1 [1,3] are live together
    with pytest.raises(PlanError, match=r"'Y0'.*'Y1'|'Y1'.*'Y0'"):
        bad.validate()


def test_validate_allows_sharing_between_disjoint_lifetimes():
    plan = mlp_plan()
    a = plan.placements["A"]
    _move(plan, "Y0", offset=a.offset).validate()  # Y0 [0,2] and A [3,4] never meet


def test_validate_catches_out_of_bounds_and_pad_overlap():
    plan = mlp_plan()
    with pytest.raises(PlanError, match=r"'Z0'.*out of bounds"):
        _move(plan, "Z0", offset=plan.scratch_bytes - 100).validate()
    with pytest.raises(PlanError, match=r"'C'.*out of bounds"):
        _move(plan, "C", offset=4).validate()


def test_validate_catches_tensor_inside_op_scratch_pad():
    plan = build_plan([t("T", 64, "intermediate", 0, 1)], op_scratch={"mm": 256})
    assert (plan.op_scratch_offset, plan.scratch_bytes) == (64, 320)
    with pytest.raises(PlanError, match=r"'T'.*shared op scratch pad|shared op scratch pad.*'T'"):
        _move(plan, "T", offset=128).validate()


def test_validate_catches_io_overlap_and_const_overlap():
    plan = build_plan([t("a", 64, "input", 0, 0), t("b", 64, "input", 5, 5)])
    with pytest.raises(PlanError, match=r"'a'.*'b'.*INPUT"):
        _move(plan, "b", offset=0).validate()  # host writes both before the run
    plan = mlp_plan()
    regions = dict(plan.const_regions, up_proj=(0, 1000))
    with pytest.raises(PlanError, match="const region"):
        dataclasses.replace(plan, const_regions=regions).validate()


def test_validate_catches_dangling_and_short_lived_aliases():
    tensors = [t("T", 1024, "intermediate", 0, 1), t("V", 512, "intermediate", 1, 3)]
    plan = build_plan(tensors, {"V": ("T", 0)})
    with pytest.raises(PlanError, match="points nowhere"):
        dataclasses.replace(plan, aliases={"V": ("gone", 0)}).validate()
    with pytest.raises(PlanError, match="only kept live"):
        _move(plan, "T", last=1).validate()


def test_to_dict_is_json_and_round_trips():
    plan = mlp_plan()
    data = json.loads(json.dumps(plan.to_dict()))
    for key in (
        "scratch_bytes",
        "scratch_lower_bound_bytes",
        "input_bytes",
        "output_bytes",
        "const_bytes",
        "params_bytes",
        "placements",
    ):
        assert key in data
    assert data["scratch_bytes"] == 409_600
    assert BufferPlan.from_dict(data) == plan


def test_from_dict_rejects_bad_documents():
    data = mlp_plan().to_dict()
    with pytest.raises(PlanError, match="lacks key 'placements'"):
        BufferPlan.from_dict({k: v for k, v in data.items() if k != "placements"})
    with pytest.raises(PlanError, match="format"):
        BufferPlan.from_dict({**data, "format": 99})
    bad = json.loads(json.dumps(data))
    bad["placements"]["Y1"]["offset"] = bad["placements"]["Y0"]["offset"]
    with pytest.raises(PlanError, match="overlap"):
        BufferPlan.from_dict(bad)


def test_summary_and_html_mention_every_tensor():
    plan = mlp_plan()
    text = plan.summary()
    html = plan._repr_html_()
    for name in plan.placements:
        assert name in text and name in html
    assert "393,216" in text and "lower bound" in text
    assert "<table>" in html


@st.composite
def subgraphs(draw):
    n = draw(st.integers(1, 25))
    tensors = []
    for i in range(n):
        kind = draw(st.sampled_from(["input", "output", "intermediate", "intermediate"]))
        first = draw(st.integers(0, 15))
        last = first + draw(st.integers(0, 6))
        tensors.append(t(f"t{i}", draw(st.integers(0, 3000)), kind, first, last))
    aliases = {}
    for i, view in enumerate(tensors):
        if view.kind == "intermediate" and i and draw(st.booleans()):
            base = tensors[draw(st.integers(0, i - 1))]
            if base.nbytes >= view.nbytes:
                aliases[view.name] = (base.name, draw(st.integers(0, base.nbytes - view.nbytes)))
    ops = {f"op{i}": draw(st.integers(0, 500)) for i in range(draw(st.integers(0, 5)))}
    return tensors, aliases, ops


@settings(max_examples=100, deadline=None)
@given(case=subgraphs(), alignment=st.sampled_from([4, 64]))
def test_random_subgraphs_plan_valid_and_round_trip(case, alignment):
    tensors, aliases, ops = case
    plan = build_plan(tensors, aliases, ops, ops, ops, alignment=alignment)
    assert plan.scratch_intermediate_bytes >= plan.scratch_lower_bound_bytes
    assert plan.scratch_intermediate_bytes <= plan.dd_no_reuse_bytes + 64 * len(tensors)
    for name, (root, off) in plan.aliases.items():
        assert plan.placements[name].offset == plan.placements[root].offset + off
        view, base = plan.placements[name], plan.placements[root]
        if base.buffer == BufferKind.SCRATCH:
            assert base.first <= view.first and view.last <= base.last
    assert BufferPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
