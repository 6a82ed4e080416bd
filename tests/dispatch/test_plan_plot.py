"""viz.plot_plan(): a matplotlib picture of the scratch buffer (Agg backend, no display)."""

from __future__ import annotations

import sys

import pytest

from npudispatch import viz
from npudispatch.dispatch.plan import TensorRequest, build_plan

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def small_plan():
    tensors = [
        TensorRequest("X", 8192, "input", 0, 1, (1, 4096), "bfloat16"),
        TensorRequest("Y0", 131_072, "intermediate", 0, 2, (1, 11008), "bfloat16"),
        TensorRequest("Y1", 131_072, "intermediate", 1, 3, (1, 11008), "bfloat16"),
        TensorRequest("Z0", 131_072, "intermediate", 2, 3, (1, 11008), "bfloat16"),
        TensorRequest("A", 131_072, "intermediate", 3, 4, (1, 11008), "bfloat16"),
        TensorRequest("Ar", 131_072, "intermediate", 4, 4, (11008,), "bfloat16"),
        TensorRequest("C", 8192, "output", 4, 4, (1, 4096), "bfloat16"),
    ]
    return build_plan(tensors, {"Ar": ("A", 0)}, op_scratch={"down_proj": 16_384}, alignment=4)


def test_plot_draws_one_rectangle_per_intermediate_and_lower_bound_line():
    import matplotlib.pyplot as plt

    plan = small_plan()
    ax = viz.plot_plan(plan)
    try:
        labels = [p.get_label() for p in ax.patches]
        assert sorted(labels) == sorted(["Y0", "Y1", "Z0", "A", "<shared op scratch pad>"])
        rect = next(p for p in ax.patches if p.get_label() == "Y1")
        y1 = plan.placements["Y1"]
        assert (rect.get_x(), rect.get_y()) == (y1.first, y1.offset)
        assert (rect.get_width(), rect.get_height()) == (y1.last - y1.first + 1, y1.nbytes)
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "lower bound"]
        assert set(line.get_ydata()) == {plan.scratch_lower_bound_bytes}
        assert {txt.get_text() for txt in ax.texts} >= {"Y0", "Y1", "Z0", "A"}
        ax.figure.canvas.draw()  # renders without error
    finally:
        plt.close(ax.figure)


def test_plot_on_given_axes():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    try:
        assert viz.plot_plan(small_plan(), ax) is ax
    finally:
        plt.close(fig)


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        viz.plot_plan(small_plan())
