"""Shape folding (exporter Reshape targets become constants) and view marking."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import RemoveUnusedNodesPass
from rw_helpers import model, ops

from npudispatch.errors import RewriteError
from npudispatch.examples.exporter import llama_decoder_layer
from npudispatch.rewrites import (
    ALIAS_KEY,
    BindDimsPass,
    FoldShapesPass,
    MarkViewsPass,
    PassManager,
    is_view,
    unbound_dims,
)

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat"}


def test_exporter_shape_chains_fold_once_dims_are_bound():
    m = ir.from_proto(llama_decoder_layer(hidden=64, heads=4))
    assert unbound_dims(m) == ["batch", "sequence"]
    PassManager(
        [BindDimsPass({"batch": 1, "sequence": 8}), FoldShapesPass(), RemoveUnusedNodesPass()]
    )(m)
    assert not SHAPE_OPS & set(ops(m))
    targets = [n.inputs[1].const_value.numpy().tolist() for n in m.graph if n.op_type == "Reshape"]
    assert targets == [[1, 8, 4, 16]] * 3 + [[1, 8, 64]]


def test_symbolic_dims_are_not_folded():
    m = ir.from_proto(llama_decoder_layer())
    PassManager([FoldShapesPass(), RemoveUnusedNodesPass()])(m)
    assert "Shape" in ops(m)  # batch/sequence unknown: nothing to compute


def test_bind_dims_typo_is_an_error():
    m = ir.from_proto(llama_decoder_layer())
    with pytest.raises(RewriteError, match="seq_len"):
        BindDimsPass({"seq_len": 8})(m)


def test_big_and_float_tensors_are_not_folded():
    text = """agraph (float[16] x, float[2000] w) => (float[16] y, float[2000] z) <float[16] a = {1,2,3,4,1,2,3,4,1,2,3,4,1,2,3,4}, float[16] b = {1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1}> {
      ab = Add(a, b)
      y = Mul(x, ab)
      s = Constant <value = int64[1] {2000}> ()
      c = ConstantOfShape <value = float[1] {1.0}> (s)
      z = Mul(w, c)
    }"""
    m = model(text)
    FoldShapesPass(size_limit=1024)(m)
    assert "Add" in ops(m)  # float arithmetic beyond a few elements is left to the fusions
    assert "ConstantOfShape" in ops(m)  # 2000 elements > size limit
    small = model(text.replace("2000", "16"))
    FoldShapesPass(size_limit=1024)(small)
    assert "ConstantOfShape" not in ops(small)


def test_scalar_float_shape_maths_is_folded():
    # floor(n / 2) as exporters write it: Cast -> Div -> Floor -> Cast back to int64.
    text = """agraph (float[N] x) => (float[M] y) <int64[1] n = {10}, float[1] two = {2.0}> {
      f = Cast <to = 1> (n)
      h = Div(f, two)
      fl = Floor(h)
      k = Cast <to = 7> (fl)
      y = Slice(x, k, n)
    }"""
    m = model(text)
    FoldShapesPass()(m)
    assert ops(m) == ["Slice"]


VIEWS = """agraph (float[2,3,4] x, float[N,12] d) => (float[6,4] y, float[N,3,4] e) <int64[2] s = {6, 4}, int64[3] t = {-1, 3, 4}> {
  r = Reshape(x, s)
  y = Identity(r)
  e = Reshape(d, t)
}"""


def test_views_marked_only_with_static_shapes():
    m = model(VIEWS)
    m.graph.node(0).outputs[0].shape = ir.Shape([6, 4])
    result = MarkViewsPass()(m)
    assert result.modified
    assert [is_view(n) for n in m.graph] == [True, True, False]
    assert not MarkViewsPass()(m).modified  # honest: nothing new to mark
    # Marks survive serialization (metadata_props), so later stages see them.
    again = ir.from_proto(ir.to_proto(m))
    assert [n.metadata_props.get(ALIAS_KEY) for n in again.graph] == ["view", "view", None]
    # A shape that became dynamic loses the mark.
    m.graph.node(0).outputs[0].shape = ir.Shape(["M", 4])
    assert MarkViewsPass()(m).modified
    assert not is_view(m.graph.node(0))


def test_fold_then_views_on_bound_exporter_model():
    m = ir.from_proto(llama_decoder_layer())
    PassManager([BindDimsPass({"batch": 1, "sequence": 8}), FoldShapesPass(), MarkViewsPass()])(m)
    reshapes = [n for n in m.graph if n.op_type == "Reshape"]
    assert reshapes and all(is_view(n) for n in reshapes)
    assert np.all([not is_view(n) for n in m.graph if n.op_type == "Transpose"])
