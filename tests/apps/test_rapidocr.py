"""An unmodified onnxruntime application on npudispatch: RapidOCR (detector, direction
classifier, recognizer) reads a rendered text image with ``npudispatch.onnxruntime.patch()``.

Needs the ``apps`` extra (``pip install -e ".[apps]"``); skipped with that reason otherwise. The
reference is the same application on plain onnxruntime.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("cv2", reason="RapidOCR needs OpenCV: pip install -e '.[apps]'")
rapidocr = pytest.importorskip(
    "rapidocr_onnxruntime", reason="RapidOCR is not installed: pip install -e '.[apps]'"
)
PIL = pytest.importorskip("PIL", reason="Pillow draws the test image: pip install -e '.[apps]'")
matplotlib = pytest.importorskip("matplotlib", reason="the font ships with matplotlib")

import npudispatch.onnxruntime as nort  # noqa: E402

TEXT = "NPU 2026"
# Detector input of 64 px minimum side (RapidOCR's default is 736): the emulator runs every
# convolution in numpy, so the test keeps the page small.
SMALL = {"det_limit_side_len": 64, "det_limit_type": "min"}

pytestmark = pytest.mark.slow


def text_image() -> np.ndarray:
    """``TEXT`` in DejaVu Sans (shipped with matplotlib), black on white, as OpenCV's BGR."""
    from PIL import Image, ImageDraw, ImageFont

    font_path = os.path.join(
        os.path.dirname(matplotlib.__file__), "mpl-data/fonts/ttf/DejaVuSans.ttf"
    )
    font = ImageFont.truetype(font_path, 28)
    image = Image.new("RGB", (200, 56), "white")
    ImageDraw.Draw(image).text((10, 12), TEXT, font=font, fill="black")
    return np.asarray(image)[:, :, ::-1].copy()


def read(image: np.ndarray) -> list[str]:
    result, _ = rapidocr.RapidOCR(**SMALL)(image)
    return [line[1] for line in result or []]


def test_rapidocr_reads_the_same_text_through_npudispatch(tmp_path):
    image = text_image()
    expected = read(image)
    assert expected, "plain onnxruntime read nothing: the test image is broken"
    cache = tmp_path / "cache"
    with nort.patch(cache=cache) as first:
        got = read(image)
    assert got == expected
    # detector, direction classifier, recognizer: each ran through npudispatch, compiled once
    assert len(first.sessions) == 3
    for sess in first.sessions:
        ns = sess.npudispatch_session
        assert ns.last_run_stats is not None and ns.last_run_stats.kernel_calls >= 1
        assert {e.source for e in ns.compile_log} == {"compiled"}
    with nort.patch(cache=cache) as second:  # a new app start: programs come from the disk cache
        assert read(image) == expected
    for sess in second.sessions:
        ns = sess.npudispatch_session
        assert ns.last_run_stats.kernel_calls >= 1
        assert {e.source for e in ns.compile_log} == {"disk cache"}
