"""PP-OCRv4 text detector (../shared/models/ppocr_det.onnx) on the emulator vs onnxruntime.

Run: ``.venv/bin/python benchmarks/cnn_bench.py [--quick]``. Compiles the detector at
1x3x160x160 (1x3x64x64 with ``--quick``), runs it through ``Session`` on the emulator and through
onnxruntime on the CPU, interleaved, best of N, and prints the ratio (issue 12's target: <= 20x).
Reported as skipped when the model folder is absent.

The emulator's kernels call numpy/BLAS on small matrices; on a loaded machine a multi-threaded
BLAS can spend far more time synchronising threads than computing. ``blas_threads`` in the result
records ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` as set for the run.
"""

from __future__ import annotations

import argparse
import json as json_module
import os
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "ppocr_det.onnx"


def text_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A light image with dark stroke bars, normalised like PaddleOCR's detector input."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235.0) + rng.normal(0, 5, (h, w, 3))
    for _ in range(4):
        y0, x0 = int(rng.integers(2, h - 12)), int(rng.integers(2, w // 3))
        length = int(rng.integers(w // 4, w // 2))
        img[y0 : y0 + 8, x0 : x0 + length][:, (np.arange(length) % 6) < 3] = rng.uniform(0, 60)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((img / 255.0 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def run(json: bool = False, quick: bool = False, repeat: int | None = None) -> dict:
    """Compile and time the detector; ``{"skipped": reason}`` when the model is absent. Prints
    the numbers as one JSON object with ``json``, as ``key: value`` lines otherwise."""
    result = _measure(quick, repeat)
    if json:
        print(json_module.dumps(result, indent=1))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def _measure(quick: bool, repeat: int | None) -> dict:
    if not MODEL.exists():
        return {"skipped": f"{MODEL} not found (../shared/models beside the checkout)"}
    import onnxruntime as ort

    from npudispatch import Session

    side = 64 if quick else 160
    repeat = repeat or (1 if quick else 5)
    shape = (1, 3, side, side)
    x = text_image(side, side)
    t0 = time.perf_counter()
    sess = Session(MODEL, input_shapes={"x": shape}, cache=False)
    (y,) = sess.run(None, {"x": x})  # compiles for this shape, then runs once
    first_run_s = time.perf_counter() - t0
    ref = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    (y_ref,) = ref.run(None, {"x": x})
    best_npu = best_ort = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        t1 = time.perf_counter()
        ref.run(None, {"x": x})
        t2 = time.perf_counter()
        best_npu, best_ort = min(best_npu, t1 - t0), min(best_ort, t2 - t1)
    compiled = sess.compiled
    return {
        "model": MODEL.name,
        "input_shape": list(shape),
        "compile_and_first_run_s": first_run_s,
        "emulator_run_s": best_npu,
        "onnxruntime_run_s": best_ort,
        "ratio_to_onnxruntime": best_npu / best_ort,
        "kernel_calls": sess.last_run_stats.kernel_calls,
        "npu_node_fraction": compiled.npu_node_fraction,
        "max_abs_diff": float(np.abs(y - y_ref).max()),
        "mean_abs_diff": float(np.abs(y - y_ref).mean()),
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    run(json=args.json, quick=args.quick, repeat=args.repeat)


if __name__ == "__main__":
    main()
