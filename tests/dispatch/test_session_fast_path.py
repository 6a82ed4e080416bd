"""Session.run's prepared fast path: the same checks and results as the full path, reused
per-thread input images whose padding lanes stay zero, one pyxrt run object per program."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from e2e_models import GOLDEN, assert_close, onnxruntime_run, random_feeds

from npudispatch import Session
from npudispatch.dispatch.segments import NpuSegment
from npudispatch.errors import DeviceError, ModelError
from npudispatch.testing import install_fake_pyxrt, noop_executor, write_fake_xclbin
from npudispatch.testing.fake_pyxrt_types import MLIR_AIE_ARGS


def _padding_is_zero(segment: NpuSegment) -> bool:
    """Every byte of this thread's input image outside the inputs' logical corners is zero."""
    image, _ = segment._input_image()
    marks = np.zeros(image.size, np.uint8)
    for b in segment.program.inputs:
        b.view(marks).view(np.uint8)[...] = 1  # the corner's bytes (last axis is contiguous)
    return not image[marks == 0].any()


@pytest.mark.parametrize("name", ["G6", "G7"])
def test_padded_inputs_stay_zero_padded_across_runs_and_threads(name):
    """The input image is reused: padding lanes must never see a feed's bytes (G6/G7 pad
    1100 lanes to 1104), results must match onnxruntime on every run, in every thread."""
    model = GOLDEN[name]()
    session = Session(model, fallback=None)
    (segment,) = session._segments
    assert isinstance(segment, NpuSegment)
    assert any(b.is_padded for b in segment.program.inputs)
    feeds = [random_feeds(model, seed=s) for s in range(3)]
    first = None
    for f in feeds:
        got = session.run(None, f)
        want = onnxruntime_run(model, f)
        for out, value in zip(session.get_outputs(), got):
            assert_close(value, want[out.name])
        first = first if first is not None else got[0].copy()
        assert _padding_is_zero(segment)
    # outputs are fresh arrays: later runs do not overwrite what an earlier run returned
    np.testing.assert_array_equal(session.run(None, feeds[0])[0], first)

    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            f = feeds[i % len(feeds)]
            want = onnxruntime_run(model, f)
            for _ in range(3):
                assert_close(session.run(None, f)[0], want[model.graph.output[0].name])
            assert _padding_is_zero(segment)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_after_a_hot_run_every_check_still_applies():
    """Once the fast path is warm, each kind of bad call still gets the full path's error."""
    model = GOLDEN["G11"]()
    session = Session(model)
    good = random_feeds(model)
    session.run(None, good)
    (x,) = good
    bad_calls = [
        ({x: good[x].astype(np.float64)}, None, "dtype float64, the model expects float32"),
        ({x: good[x][..., :32].copy()}, None, r"the model expects \[1, 2, 64\]"),
        ({**good, "Q": np.zeros(1)}, None, r"unknown input name\(s\) \['Q'\]"),
        ({"Q": good[x]}, None, r"missing input\(s\) \['X'\]"),
        (good, ["nope"], "unknown output"),
        (good, "Y", "must be a list of names"),
    ]
    for feeds, names, match in bad_calls:
        with pytest.raises(ModelError, match=match):
            session.run(names, feeds)
    # a read-only array and a float32 array subclass are accepted like onnxruntime does
    ro = good[x].copy()
    ro.flags.writeable = False
    want = session.run(None, good)[0]
    np.testing.assert_array_equal(session.run(None, {x: ro})[0], want)
    masked = np.ma.masked_array(good[x])
    np.testing.assert_array_equal(session.run(None, {x: masked})[0], want)
    assert session.last_run_stats.input_shapes == {x: good[x].shape}
    assert {"validate", "copy_in", "npu", "copy_out", "total"} <= set(
        session.last_run_stats.stage_seconds
    )


def test_xrt_kernel_that_rejects_an_argument_fails_at_prepare(tmp_path):
    """The run object's arguments are set once in prepare: a kernel whose signature does not
    match the call convention (here the opcode declared as a buffer) is reported there."""
    args = [
        {**a.__dict__, "kind": "global", "bank": 0} if a.name == "opcode" else a.__dict__
        for a in MLIR_AIE_ARGS
    ]
    xclbin = write_fake_xclbin(tmp_path / "odd.xclbin", {"MLIR_AIE": args})
    with install_fake_pyxrt(noop_executor), pytest.raises(DeviceError, match="rejects argument 0"):
        Session(GOLDEN["G11"](), backend="xrt", fallback=None, xclbin=xclbin)
