"""Decode step of the resident Qwen2 int4 decoder: emulator vs onnxruntime-genai on the same folder.

Run: ``.venv/bin/python benchmarks/generate_bench.py [--json] [--quick]``. Needs
``../shared/models/qwen2_tiny_int4`` and the ``genai`` extra (onnxruntime-genai); reports the
median decode-step time of both, their ratio and the bytes copied per decode step (which must not
grow with the context: first and last step are both reported).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.standalone import json_quick_main

MODEL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "qwen2_tiny_int4"
PROMPT = [1, 17, 200, 33, 5, 99, 150, 7]


class Unavailable(RuntimeError):
    """The benchmark cannot run here (model folder or onnxruntime-genai missing)."""


def _genai_steps(steps: int) -> list[float]:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise Unavailable(
            "onnxruntime-genai is not installed (pip install -e '.[genai]')"
        ) from None
    model = og.Model(str(MODEL_DIR))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(PROMPT, np.int32))  # prefill
    times = []
    while not gen.is_done():
        t0 = time.perf_counter()
        gen.generate_next_token()
        times.append(time.perf_counter() - t0)
    return times


def run(*, json: bool = False, quick: bool = False) -> dict[str, Any]:
    if not MODEL_DIR.is_dir():
        raise Unavailable(f"{MODEL_DIR} is absent")
    from npudispatch.generate import Generator

    steps = 4 if quick else 32
    genai = _genai_steps(steps)
    gen = Generator(MODEL_DIR, max_length=len(PROMPT) + steps + 2, prefill_length=len(PROMPT))
    result = gen.generate(PROMPT, max_new_tokens=steps + 1, show_progress=False)
    emu = result.decode_seconds
    out = {
        "model": MODEL_DIR.name,
        "decode_steps": len(emu),
        "emulator_decode_step_s": statistics.median(emu),
        "genai_decode_step_s": statistics.median(genai),
        "bytes_first_step": result.bytes_per_step[0],
        "bytes_last_step": result.bytes_per_step[-1],
        "kernel_calls_per_step": max(result.kernel_calls_per_step),
        "const_bytes_shared": gen.device.const_bytes,
        "compile_s": gen.compile_seconds,
    }
    out["ratio_to_genai"] = out["emulator_decode_step_s"] / out["genai_decode_step_s"]
    if not json:
        print(
            f"decode step: emulator {out['emulator_decode_step_s'] * 1e3:.1f} ms, "
            f"onnxruntime-genai {out['genai_decode_step_s'] * 1e3:.2f} ms "
            f"({out['ratio_to_genai']:.0f}x); {out['bytes_last_step']:,} B copied per step"
        )
    return out


def main() -> None:
    json_quick_main(run, __doc__)


if __name__ == "__main__":
    main()
