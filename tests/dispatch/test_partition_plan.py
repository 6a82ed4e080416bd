"""plan_partition returns one typed PartitionPlan; emit consumes its re-basing ranges as they are."""

from __future__ import annotations

import dataclasses

import pytest

from npudispatch import compile_model
from npudispatch.dispatch.emit import emit
from npudispatch.dispatch.partition_plan import PartitionPlan, plan_partition
from npudispatch.errors import ModelError
from npudispatch.examples import build_example
from npudispatch.overlay_abi import BufferKind


@pytest.fixture(scope="module")
def planned() -> PartitionPlan:
    compiled = compile_model(build_example("llama2-mlp-small"))
    (part,) = [p for p in compiled.partitions if p.kind == "npu"]
    return plan_partition(part)


def test_every_op_buffer_has_one_range_inside_the_plan(planned):
    plan = planned.plan
    assert len(planned.ranges) == len(planned.launches) > 1
    for launch, ranges in zip(planned.launches, planned.ranges):
        assert [r.local_argidx for r in ranges] == [a.local_argidx for a in launch.args]
        for r in ranges:
            assert (
                r.fused_offset >= 0 and r.fused_offset + r.size <= plan.buffer_sizes[r.fused_argidx]
            )
            if r.fused_argidx == BufferKind.PARAMS:
                base, size = plan.params_regions[launch.node.name]
                assert base <= r.fused_offset and r.fused_offset + r.size <= base + size


def test_emit_uses_the_planned_ranges(planned):
    program = emit("npu0", planned)
    assert program.inputs[0].name == planned.io.inputs[0].name
    # A range that points outside every buffer must surface when the transactions are re-based.
    bad = [list(r) for r in planned.ranges]
    first = bad[0][0]
    bad[0][0] = dataclasses.replace(first, local_argidx=first.local_argidx + 40)
    with pytest.raises(ModelError, match="re-basing failed"):
        emit("npu0", dataclasses.replace(planned, ranges=bad))


def test_planned_lifetimes_are_the_graph_lifetimes_over_the_launch_order(planned):
    """One definition of a lifetime: the planner's intervals are ``graph.lifetimes`` over its ops."""
    from npudispatch import graph

    order = [launch.node for launch in planned.launches]
    owner = order[0].graph
    assert len(order) == len(owner)  # one partition, no views: the launch order is a graph order
    expected = graph.lifetimes(owner, order)
    placed = planned.plan.placements
    checked = 0
    for value, life in expected.items():
        if life.is_constant:
            continue
        assert (placed[value.name].first, placed[value.name].last) == (life.first, life.last)
        checked += 1
    assert checked == len(placed) > 3
