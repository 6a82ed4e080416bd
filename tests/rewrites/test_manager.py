"""PassManager: records, fixpoint, invariant checks, pre/postconditions, dumps, user rules, analysis."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from rw_helpers import model, ops

from npudispatch.errors import RewriteError
from npudispatch.rewrites import GraphAnalysis, PassManager, default_pipeline, rules_pass

CHAIN = "agraph (float[4] x) => (float[4] y) { a = Neg(x)\n b = Neg(a)\n c = Relu(b)\n y = Abs(c) }"


def _neg_neg(op, x):
    return op.Neg(op.Neg(x))


def _ident(op, x):
    return op.Identity(x)


class CountingPass(ir.passes.InPlacePass):
    """Removes one Identity per run (so a fixpoint needs several rounds)."""

    def call(self, model):
        for n in model.graph:
            if n.op_type == "Identity" and not n.outputs[0].is_graph_output():
                n.outputs[0].replace_all_uses_with(n.inputs[0])
                model.graph.remove(n, safe=True)
                return ir.passes.PassResult(model, True)
        return ir.passes.PassResult(model, False)


class LiarPass(ir.passes.InPlacePass):
    def call(self, model):
        return ir.passes.PassResult(model, True)


class BreakerPass(ir.passes.InPlacePass):
    """Removes a producer without rewiring its users: a dangling input."""

    def call(self, model):
        first = next(iter(model.graph))
        model.graph.remove(first)
        return ir.passes.PassResult(model, True)


class NeedsNoRelu(ir.passes.InPlacePass):
    def requires(self, model):
        if any(n.op_type == "Relu" for n in model.graph):
            raise ir.passes.PreconditionError("graph still has Relu")

    def call(self, model):
        return ir.passes.PassResult(model, False)


def test_user_rule_records_and_summary():
    m = model(CHAIN)
    pm = PassManager([rules_pass([pattern.RewriteRule(_neg_neg, _ident)], "NegNeg")])
    pm.add(RemoveUnusedNodesPass())
    result = pm(m)
    assert result.modified
    assert ops(m) == ["Identity", "Relu", "Abs"]
    rec = pm.records[0]
    assert (rec.name, rec.added, rec.removed, rec.nodes_before, rec.nodes_after) == (
        "NegNeg",
        1,
        2,
        4,
        3,
    )
    assert "NegNeg" in pm.summary() and "RemoveUnusedNodesPass" in pm.summary()


def test_fixpoint_repeats_until_nothing_changes():
    text = "agraph (float[4] x) => (float[4] y) { a = Identity(x)\n b = Identity(a)\n c = Identity(b)\n y = Relu(c) }"
    m = model(text)
    pm = PassManager([CountingPass()], fixpoint=True, max_steps=10)
    pm(m)
    assert ops(m) == ["Relu"]
    assert [r.modified for r in pm.records] == [True, True, True, False]
    once = model(text)
    PassManager([CountingPass()])(once)
    assert ops(once) == ["Identity", "Identity", "Relu"]


def test_fixpoint_not_reached_raises():
    with pytest.raises(RewriteError, match="LiarPass"):
        PassManager([LiarPass()], fixpoint=True, max_steps=3)(model(CHAIN))


def test_invariant_violation_names_pass():
    with pytest.raises(RewriteError, match=r"(?s)BreakerPass.*dangling"):
        PassManager([BreakerPass()])(model(CHAIN))
    PassManager([BreakerPass()], check=False)(model(CHAIN))  # unchecked: no error


def test_precondition_failure_names_pass():
    with pytest.raises(RewriteError, match=r"NeedsNoRelu.*Relu"):
        PassManager([NeedsNoRelu()])(model(CHAIN))


def test_add_before_and_rejects_non_passes():
    from npudispatch.rewrites import MarkViewsPass, PrecisionPass

    pm = default_pipeline()
    pm.add(LiarPass(), before=MarkViewsPass)  # by class: no string to misspell
    assert pm.names.index("LiarPass") == pm.names.index("MarkViewsPass") - 1
    by_name = default_pipeline().add(LiarPass(), before="MarkViewsPass")
    assert by_name.names == pm.names
    with pytest.raises(RewriteError):
        pm.add(lambda m: m)  # type: ignore[arg-type]
    with pytest.raises(RewriteError, match="no pass 'Nope'"):
        pm.add(LiarPass(), before="Nope")
    with pytest.raises(RewriteError, match="no pass 'PrecisionPass'"):
        default_pipeline(bf16=False).add(LiarPass(), before=PrecisionPass)


def test_dumps(tmp_path):
    m = model(CHAIN)
    pm = PassManager(
        [rules_pass([pattern.RewriteRule(_neg_neg, _ident)], "NegNeg"), RemoveUnusedNodesPass()],
        dump_dir=tmp_path,
        dump_after={"NegNeg"},
    )
    pm(m)
    stems = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert stems == {"000_r0_NegNeg"}  # only the pass named in dump_after
    dumped = ir.load(tmp_path / "000_r0_NegNeg.onnx")
    # Dumped right after NegNeg, before DCE: the dead Neg pair is still there.
    assert [n.op_type for n in dumped.graph][-2:] == ["Relu", "Abs"]
    assert "Identity" in [n.op_type for n in dumped.graph]
    assert "Identity" in (tmp_path / "000_r0_NegNeg.txt").read_text()


def test_analysis_is_lazy_and_tracks_changes():
    m = model(CHAIN)
    an = GraphAnalysis(m)
    order = an.topological_order()
    assert [n.op_type for n in order] == ["Neg", "Neg", "Relu", "Abs"]
    assert an.reachable(order[0], order[3]) and not an.reachable(order[3], order[0])
    life = an.lifetimes()
    assert life[order[0].outputs[0]].first == 0 and life[order[0].outputs[0]].last == 1
    an.topological_order()
    assert an.rebuilds == 1  # unchanged graph: cached
    RemoveUnusedNodesPass()(m)
    assert an.rebuilds == 1
    PassManager([rules_pass([pattern.RewriteRule(_neg_neg, _ident)], "NegNeg")])(m)
    assert [n.op_type for n in an.topological_order()] == ["Identity", "Relu", "Abs"]
    assert an.rebuilds == 2
