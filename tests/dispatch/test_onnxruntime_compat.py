"""npudispatch.onnxruntime: onnxruntime's session API on npudispatch, and patch() for apps.
Every answer is compared with onnxruntime itself on the same model."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from e2e_models import GOLDEN, assert_close, random_feeds
from test_dynamic_shapes import D, gated_mlp

import npudispatch.onnxruntime as nort
from npudispatch.errors import ModelError


@pytest.fixture
def model_path(tmp_path):
    model = gated_mlp()
    onnx.helper.set_model_props(model, {"character": "a\nb\nc", "version": "4"})
    model.producer_name = "tests"
    path = tmp_path / "gated.onnx"
    onnx.save(model, path)
    return path


def _options() -> ort.SessionOptions:
    so = ort.SessionOptions()  # as RapidOCR sets them up
    so.log_severity_level = 4
    so.enable_cpu_mem_arena = False
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def test_session_api_matches_onnxruntime(model_path, tmp_path):
    providers = [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    so = _options()
    ref = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
    ours = nort.InferenceSession(
        str(model_path), sess_options=so, providers=providers, provider_options=None
    )
    for a, b in zip(
        [*ours.get_inputs(), *ours.get_outputs()], [*ref.get_inputs(), *ref.get_outputs()]
    ):
        assert (a.name, a.shape, a.type) == (b.name, b.shape, b.type)
    meta, ref_meta = ours.get_modelmeta(), ref.get_modelmeta()
    for attr in ("producer_name", "graph_name", "domain", "description", "version"):
        assert getattr(meta, attr) == getattr(ref_meta, attr), attr
    assert meta.custom_metadata_map == ref_meta.custom_metadata_map
    assert ours.get_providers() == [nort.NPU_PROVIDER, "CPUExecutionProvider"]
    assert nort.get_available_providers()[0] == nort.NPU_PROVIDER
    assert ours.get_session_options() is so
    x = np.random.default_rng(0).standard_normal((2, 3, D)).astype(np.float32)
    (got,) = ours.run(None, {"x": x})
    assert_close(got, ref.run(None, {"x": x})[0])
    (by_name,) = ours.run(["y"], {"x": x})
    np.testing.assert_array_equal(by_name, got)
    (ov,) = ours.run_with_ort_values(None, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    np.testing.assert_array_equal(ov.numpy(), got)
    ours.set_providers(["CUDAExecutionProvider"])
    assert ours.get_providers()[0] == nort.NPU_PROVIDER
    assert ours.end_profiling() == ""
    assert ours.npudispatch_session.last_run_stats.kernel_calls == 1


def test_inapplicable_options_are_one_debug_line(model_path, caplog):
    so = _options()
    so.intra_op_num_threads = 1
    with caplog.at_level(logging.DEBUG, logger="npudispatch.onnxruntime"):
        nort.InferenceSession(
            model_path.read_bytes(), so, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "npudispatch.onnxruntime"]
    assert len(lines) == 1
    assert "intra_op_num_threads=1" in lines[0] and "CUDAExecutionProvider" in lines[0]


def test_free_dimension_override_binds_dims(model_path):
    so = nort.SessionOptions()
    so.add_free_dimension_override_by_name("batch", 1)
    sess = nort.InferenceSession(str(model_path), so)
    assert sess.get_inputs()[0].shape == [1, None, D]


@pytest.mark.parametrize(
    ("outputs", "feed"),
    [
        (None, np.zeros((2, D), np.float32)),  # rank change
        (None, np.zeros((1, 2, D), np.float64)),  # dtype the model does not take
        (None, np.zeros((1, 2, 8), np.float32)),  # a fixed dim differs
        (["nope"], np.zeros((1, 2, D), np.float32)),  # unknown output
    ],
)
def test_bad_input_reads_like_onnxruntime(model_path, outputs, feed):
    ref = ort.InferenceSession(str(model_path))
    with pytest.raises(Exception) as theirs:
        ref.run(outputs, {"x": feed})
    ours = nort.InferenceSession(str(model_path))
    with pytest.raises(nort.InvalidArgument) as info:
        ours.run(outputs, {"x": feed})
    assert isinstance(info.value, ModelError)
    assert isinstance(info.value, type(theirs.value))  # onnxruntime's handlers catch it
    # onnxruntime's own sentence (before its "Please fix ...") starts our message.
    core = str(theirs.value).split(" : ")[-1].split(" Please fix")[0].split("\n")[0]
    assert core.replace(" , ", ", ").split(" for the following")[0] in str(info.value).replace(
        " , ", ", "
    )


def test_patch_redirects_onnxruntime_even_for_early_imports(tmp_path):
    model = GOLDEN["G14"]()  # NPU, CPU segment, NPU: the CPU part must reach real onnxruntime
    path = tmp_path / "g14.onnx"
    onnx.save(model, path)
    app = types.ModuleType("fake_app")
    exec("from onnxruntime import InferenceSession, get_available_providers", app.__dict__)
    sys.modules["fake_app"] = app
    feeds = random_feeds(model)
    try:
        expected = ort.InferenceSession(str(path)).run(None, feeds)
        with nort.patch(cache=False) as p:
            assert issubclass(ort.InferenceSession, nort.InferenceSession)
            assert app.InferenceSession is ort.InferenceSession
            assert app.get_available_providers()[0] == nort.NPU_PROVIDER
            sess = app.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (got,) = sess.run(None, feeds)
        assert_close(got, expected[0])
        assert p.sessions == [sess]
        stats = sess.npudispatch_session.last_run_stats
        assert stats.kernel_calls == 2 and stats.cpu_segments == 1
        assert ort.InferenceSession is nort._ORIGINAL_SESSION
        assert app.InferenceSession is nort._ORIGINAL_SESSION
    finally:
        del sys.modules["fake_app"]


def test_provider_options_given_as_strings(model_path):
    """onnxruntime's provider options are strings: "0"/"false" turn a switch off (a non-empty
    string is not true), "mixed" selects the precision, anything else is refused by name."""
    from npudispatch.overlay_abi import FLAG_FP32_COMPUTE, FLAG_MIXED_COMPUTE, ParamsRecord

    def flags(opts):
        sess = nort.InferenceSession(model_path.read_bytes(), providers=[(nort.NPU_PROVIDER, opts)])
        x = np.zeros((2, 3, D), np.float32)
        sess.run(None, {"x": x})
        inner = sess.npudispatch_session
        return {
            ParamsRecord.decode(p.params_image[o : o + n]).flags
            for p in inner.compiled.programs.values()
            for o, n in p.plan.params_regions.values()
        }

    assert flags({"bf16": "False", "cache": "0"}) == {FLAG_FP32_COMPUTE}
    assert flags({"bf16": "1", "cache": "false", "max_specialisations": "2"}) == {0}
    assert flags({"precision": "MIXED", "cache": "off"}) == {FLAG_MIXED_COMPUTE}
    assert not any(Path(name).exists() for name in ("0", "false", "off"))  # no cache folders
    with pytest.raises(nort.InvalidArgument, match="precision 'fp16'"):
        nort.InferenceSession(
            model_path.read_bytes(),
            providers=[(nort.NPU_PROVIDER, {"precision": "fp16", "cache": "0"})],
        )
    with pytest.raises(nort.InvalidArgument, match="num_cols='two'"):
        nort.InferenceSession(
            model_path.read_bytes(), providers=[(nort.NPU_PROVIDER, {"num_cols": "two"})]
        )
    with pytest.raises(nort.InvalidArgument, match="bf16='nope'"):
        nort.InferenceSession(
            model_path.read_bytes(), providers=[(nort.NPU_PROVIDER, {"bf16": "nope"})]
        )
