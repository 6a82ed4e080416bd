"""Second start with a warm compile cache vs the cold first start.

A start is what an application pays before its first result: ``Session(model.onnx)`` plus the
first ``run``. Cold: an empty cache folder, so the model is compiled (and the cache filled).
Warm: a new ``Session`` on the same file and cache folder, as a second process would do: the
model file is hashed and the compiled programs are loaded from disk instead of compiled.

Both are timed on the xrt backend with the fake pyxrt and a no-op device, so the numbers are
npudispatch's own start cost (the device's compute is the same in both starts), and on the
emulator (whose numpy kernels dominate once compiling is gone). Best of ``repeat`` interleaved.
Models: the example llama2 MLP (72 MB of weights, compiles in well under a second) and, when
``../shared/models`` is present, PP-OCR's text-direction classifier (566 nodes, 0.6 MB).
Run: ``python -m benchmarks.start_bench [--json] [--quick]`` (quick: the small MLP only).
"""

from __future__ import annotations

import json as jsonlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from npudispatch.dispatch import Session
from npudispatch.examples import build_example
from npudispatch.progress import progress
from npudispatch.testing import install_fake_pyxrt, noop_executor, write_fake_xclbin


def _start(
    path: Path, cache: Path, feeds: dict[str, np.ndarray], **backend: Any
) -> tuple[float, str]:
    t0 = time.perf_counter()
    sess = Session(path, cache=cache, **backend)
    sess.run(None, feeds)
    return time.perf_counter() - t0, sess.compile_log[0].source


SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
PPOCR_CLS = SHARED_MODELS / "ppocr_cls.onnx"


def _models(root: Path, quick: bool) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    """The example llama2 MLP (big weights, quick compile) and, when ``../shared/models`` is
    there, PP-OCR's text-direction classifier (a real CNN: small weights, long compile; its
    input dims are free and bound from the first feed)."""
    rng = np.random.default_rng(0)
    name = "llama2-mlp-small" if quick else "llama2-mlp"
    model = build_example(name)
    path = root / f"{name}.onnx"
    onnx.save(model, path)
    shapes = {
        i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    models = {
        name: (path, {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})
    }
    if PPOCR_CLS.is_file() and not quick:
        models["ppocr_cls"] = (PPOCR_CLS, {"x": rng.random((1, 3, 48, 192), np.float32)})
    return models


def run(json: bool = False, quick: bool = False, repeat: int | None = None) -> dict:
    """Time cold and warm starts; print a summary (or one JSON object); return the numbers."""
    repeat = repeat or (1 if quick else 3)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, install_fake_pyxrt(noop_executor):
        root = Path(tmp)
        backends = {
            "noop_device": {"backend": "xrt", "xclbin": write_fake_xclbin(root / "o.xclbin")},
            "emulator": {"backend": "emulator"},
        }
        for name, (path, feeds) in _models(root, quick).items():
            entry: dict[str, Any] = {"model_mb": path.stat().st_size / 1e6}
            for label, backend in backends.items():
                cold = warm = float("inf")
                for i in progress(range(repeat), desc=f"start {name} ({label})", leave=False):
                    cache = root / f"cache-{name}-{label}-{i}"
                    seconds, how = _start(path, cache, feeds, **backend)
                    assert how == "compiled", how
                    cold = min(cold, seconds)
                    seconds, how = _start(path, cache, feeds, **backend)
                    assert how == "disk cache", how
                    warm = min(warm, seconds)
                    shutil.rmtree(cache)
                entry[label] = {"cold_s": cold, "warm_s": warm, "ratio": warm / cold}
            entry["ratio_warm_to_cold"] = entry["noop_device"]["ratio"]
            result[name] = entry
    if json:
        print(jsonlib.dumps(result))
    else:
        for name, entry in result.items():
            for label in ("noop_device", "emulator"):
                r = entry[label]
                print(
                    f"start {name} ({entry['model_mb']:.1f} MB), {label}: cold "
                    f"{r['cold_s'] * 1e3:.1f} ms, warm {r['warm_s'] * 1e3:.1f} ms, "
                    f"ratio {r['ratio']:.3f}"
                )
    return result


if __name__ == "__main__":
    run(json="--json" in sys.argv[1:], quick="--quick" in sys.argv[1:])
