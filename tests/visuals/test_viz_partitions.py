"""npudispatch.viz: partition view layout, matplotlib drawing, DOT text and HTML tables."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from npudispatch import compile_model, graph, viz
from npudispatch.errors import ModelError

matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is the optional 'viz' extra")
matplotlib.use("Agg")


def tanh_sandwich() -> onnx.ModelProto:
    """MatMul -> Atan (no NPU operator) -> MatMul: NPU, CPU, NPU partitions."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"),
            helper.make_node("Atan", ["h"], ["t"], name='act "<tanh>"'),
            helper.make_node("MatMul", ["t", "W2"], ["Y"], name="fc2"),
        ],
        "sandwich",
        [helper.make_tensor_value_info("X", f32, [1, 4, 32])],
        [helper.make_tensor_value_info("Y", f32, [1, 4, 32])],
        [
            numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), n)
            for n in ("W1", "W2")
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


@pytest.fixture(scope="module")
def compiled():
    return compile_model(tanh_sandwich(), rewrite=False)


def test_layout_follows_edges_and_partitions(compiled):
    view = viz.partition_view(compiled)
    assert view.labels == ["npu0", "cpu0", "npu1"]
    nodes = [n for p in view.partitions for n in p.nodes]
    assert set(view.position) == set(nodes)
    for u, v in view.digraph.edges:
        assert view.position[u][0] < view.position[v][0]  # left to right in topological order
    tanh = next(n for n in nodes if n.op_type == "Atan")
    assert view.owner[tanh] == 1 and "Atan" in view.unsupported[tanh]
    assert view.color(0) != view.color(2)  # two NPU partitions, two shades
    assert view.color(1) in viz._CPU_COLORS and view.color(0) in viz._NPU_COLORS


def test_every_source_kind_gives_the_same_partitions(compiled):
    from npudispatch.rewrites.support import npu_support

    model = graph.load(tanh_sandwich())
    sources = [compiled, compiled.report, model, tanh_sandwich()]
    kinds = [[p.kind for p in viz.partition_view(s).partitions] for s in sources]
    assert kinds == [["npu", "cpu", "npu"]] * 4
    everything = viz.partition_view(model, supported=lambda node: None)  # all NPU
    assert [p.kind for p in everything.partitions] == ["npu"]
    assert npu_support(next(iter(model.graph))) is None  # the default query


def test_plot_draws_one_box_per_node_and_a_legend(compiled):
    ax = viz.plot_partitions(compiled)
    labelled = [t for t in ax.texts if t.get_bbox_patch() is not None]  # not the arrows
    boxes = {t.get_text(): t for t in labelled}
    assert set(boxes) == {"MatMul", "Atan"} and len(labelled) == 3
    edge = boxes["Atan"].get_bbox_patch().get_edgecolor()
    assert tuple(edge[:3]) == (0.0, 0.0, 0.0)  # unsupported node outlined in black
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["npu0 (1 nodes)", "cpu0 (1 nodes)", "npu1 (1 nodes)"]
    assert "2/3 nodes on the NPU" in ax.get_title()
    matplotlib.pyplot.close(ax.figure)


def test_plot_reuses_given_axes_and_short_labels(compiled):
    fig, ax = matplotlib.pyplot.subplots()
    assert viz.plot_partitions(compiled, ax=ax, title="mine", labels=False) is ax
    assert ax.get_title() == "mine" and all(t.get_text() == "" for t in ax.texts)
    assert viz.short_op("SkipSimplifiedLayerNormalization") == "SkipSimpLayerNorm"
    matplotlib.pyplot.close(fig)


def test_dot_has_clusters_edges_and_escapes(compiled):
    dot = viz.to_dot(compiled)
    assert dot.startswith("digraph partitions {") and dot.endswith("}")
    assert dot.count("subgraph cluster_") == 3
    assert dot.count(" -> ") == 2
    assert 'label="Atan"' in dot
    assert '\\"<tanh>\\"' in dot  # the quoted node name stays inside one DOT string


def test_graphviz_missing_says_what_to_do(compiled, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "graphviz", None)  # import graphviz -> ImportError
    with pytest.raises(ImportError, match="pip install graphviz"):
        viz.to_graphviz(compiled)


def test_partition_html_lists_partitions_and_reasons(compiled):
    out = viz.partition_html(compiled)
    for label in ("npu0", "cpu0", "npu1"):
        assert f"<td>{label}</td>" in out
    assert "not on the NPU" in out and "ai.onnx.Atan" in out
    assert "&lt;tanh&gt;" in out and "<tanh>" not in out


def test_empty_report_is_refused():
    empty = ir.Model(ir.Graph([], [], nodes=[], name="empty"), ir_version=10)
    with pytest.raises(ModelError, match="nothing to draw"):
        viz.partition_view(graph.report(empty, lambda n: None))


def test_core_types_get_rich_views_without_importing_their_renderers(compiled):
    import subprocess
    import sys

    # Importing the core modules must not pull in the presentation side...
    code = (
        "import sys; import npudispatch.dispatch.compile, npudispatch.txn.transaction; "
        "print('npudispatch.viz' in sys.modules, 'npudispatch.txn.html' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    # ...yet a notebook still gets every rich view (registered by viz on first display).
    program = next(iter(compiled.programs.values()))
    assert "FusedProgram" in program._repr_html_() and "<table>" in program.plan._repr_html_()
    assert "npu0" in compiled._repr_html_() and "DDR" in program.txn._repr_html_()


def test_deep_graphs_wrap_into_bands():
    """A 100-node chain is drawn as 3 bands of at most 40 columns, not one unreadable strip."""
    import matplotlib

    matplotlib.use("Agg")
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu" if i % 2 else "Neg", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}")
        for i in range(100)
    ]
    g = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("t100", TensorProto.FLOAT, [8])],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ax = viz.plot_partitions(model, wrap=40)
    boxes = [t for t in ax.texts if t.get_text()]  # arrows are empty annotations
    xs = [t.get_position()[0] for t in boxes]
    ys = {round(t.get_position()[1], 3) for t in boxes}
    assert len(xs) == 100 and max(xs) <= 39 and len(ys) == 3
    assert "bands of 40" in ax.get_xlabel()
    default = [t for t in viz.plot_partitions(model).texts if t.get_text()]
    assert len({round(t.get_position()[1], 3) for t in default}) == 3
    with pytest.raises(ValueError, match="wrap"):
        viz.plot_partitions(model, wrap=0)
