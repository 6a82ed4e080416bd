"""Peak memory of compile, load and run of the 72 MB llama2 MLP, each in a fresh process.

The model (``build_example("llama2-mlp")``, 4-bit 4096x11008 weights) is saved to a temporary
folder; each scenario then runs in its own subprocess, which imports everything and warms up on
the small MLP before it records its baseline, so import and first-call costs are not counted:

* ``compile``: ``compile_model(model.onnx)`` and ``save`` to a program folder (``npudispatch
  compile -o``);
* ``load``: ``Session(program_dir)`` on the emulator;
* ``run``: ``Session(program_dir)`` and two ``Session.run`` (peaks after the first and the second
  run, and the transient of the second run alone: peak during it minus the RSS before it);
* ``model_run``: ``Session(model.onnx, cache=False)`` and one run (``npudispatch run model.onnx``);
* ``onnxruntime``: ``InferenceSession(model.onnx)`` and one run, the control.

Peaks are the kernel's high-water mark of this address space (``VmHWM``; reset with
``/proc/self/clear_refs`` for the per-run transient when the kernel allows it). The ratio is the
largest *growth over the baseline* divided by the model file's size: the baseline (interpreter,
numpy, onnx, onnxruntime and npudispatch imported, ~200 MB) is a fixed cost that does not scale
with the model, so only the growth says how many copies of the weights a step keeps. Absolute
peaks are reported beside it. Target: <= 3x for every step.

Run: ``python -m benchmarks.memory_bench [--json] [--quick]`` (quick: the small MLP, ``run`` and
``onnxruntime`` only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx

from benchmarks.standalone import json_quick_main
from npudispatch.dispatch import compile_model
from npudispatch.examples import build_example
from npudispatch.progress import progress

SCENARIOS = ("compile", "load", "run", "model_run", "onnxruntime")
QUICK = ("run", "onnxruntime")

_CHILD = r"""
import json, os, sys
import numpy as np
import onnxruntime as ort
import npudispatch
from npudispatch.dispatch import Session, compile_model

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

scenario, warm_model, warm_dir, model, program_dir = sys.argv[1:6]
feeds = lambda sess: {"X": np.random.default_rng(0).standard_normal(
    sess.get_inputs()[0].shape).astype(np.float32)}
# warm-up on the small MLP: every import and code path loaded before the baseline
if scenario == "onnxruntime":
    s = ort.InferenceSession(warm_model, providers=["CPUExecutionProvider"])
    s.run(None, {"X": np.zeros([d for d in s.get_inputs()[0].shape], np.float32)})
else:
    compile_model(warm_model).save(warm_dir + "_" + scenario)
    s = Session(warm_dir + "_" + scenario, backend="emulator")
    s.run(None, feeds(s))
del s
out = {"baseline_bytes": hwm(), "baseline_rss_bytes": rss()}
if scenario == "compile":
    compile_model(model).save(program_dir + "_compiled")
elif scenario == "load":
    sess = Session(program_dir, backend="emulator")
elif scenario == "run":
    sess = Session(program_dir, backend="emulator")
    x = feeds(sess)
    out["after_load_bytes"] = hwm()
    sess.run(None, x)
    out["after_run1_bytes"] = hwm()
    before = rss()
    can_reset = reset_hwm()
    sess.run(None, x)
    if can_reset:
        out["run2_transient_bytes"] = hwm() - before
        out["peak_bytes"] = max(out["after_run1_bytes"], hwm())
elif scenario == "model_run":
    sess = Session(model, backend="emulator", cache=False)
    sess.run(None, feeds(sess))
elif scenario == "onnxruntime":
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    sess.run(None, feeds(sess))
out.setdefault("peak_bytes", hwm())
print(json.dumps(out))
"""


def measure(scenario: str, paths: list[str]) -> dict[str, Any]:
    """Run one scenario in a fresh interpreter; its peak and baseline bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, scenario, *paths],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NPUDISPATCH_CACHE": "0"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory scenario {scenario!r} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["growth_bytes"] = out["peak_bytes"] - out["baseline_bytes"]
    return out


def run(json: bool = False, quick: bool = False) -> dict[str, Any]:
    """Measure every scenario; print a table (or nothing with ``json``); return the numbers."""
    name = "llama2-mlp-small" if quick else "llama2-mlp"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm_model, model = root / "warm.onnx", root / "model.onnx"
        onnx.save(build_example("llama2-mlp-small"), warm_model)
        onnx.save(build_example(name), model)
        model_bytes = model.stat().st_size
        paths = [str(warm_model), str(root / "warm_prog"), str(model), str(root / "prog")]
        compile_model(model).save(root / "prog")  # what load and run start from (not measured)
        scenarios = {}
        # quick (tests): two processes only, the numbers of a 0.3 MB model mean nothing anyway
        for scenario in progress(QUICK if quick else SCENARIOS, desc="memory", leave=False):
            scenarios[scenario] = measure(scenario, paths)
    ours = {k: v for k, v in scenarios.items() if k != "onnxruntime"}
    worst = max(ours, key=lambda k: ours[k]["growth_bytes"])
    result: dict[str, Any] = {
        "model": name,
        "model_bytes": model_bytes,
        "scenarios": scenarios,
        "worst": worst,
        "growth_over_model": {k: v["growth_bytes"] / model_bytes for k, v in scenarios.items()},
        "peak_over_model": {k: v["peak_bytes"] / model_bytes for k, v in scenarios.items()},
        "ratio": ours[worst]["growth_bytes"] / model_bytes,
    }
    run2 = scenarios["run"].get("run2_transient_bytes")
    result["run2_transient_bytes"] = run2
    if not json:
        print(f"{name}: model file {model_bytes / 1e6:.1f} MB (growth over baseline, peak)")
        for k, v in scenarios.items():
            print(
                f"  {k:<12} +{v['growth_bytes'] / 1e6:7.1f} MB "
                f"({result['growth_over_model'][k]:.2f}x)  peak {v['peak_bytes'] / 1e6:7.1f} MB"
            )
        if run2 is not None:
            print(f"  second Session.run transient: {run2 / 1e6:.1f} MB")
    return result


def main() -> None:
    json_quick_main(run, __doc__)


if __name__ == "__main__":
    main()
