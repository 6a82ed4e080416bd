"""``python -m benchmarks --quick --json``: one JSON object, a key per benchmark, real ratios."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder of the checkout, not installed
    sys.path.insert(0, str(REPO))

from benchmarks.run import Row, to_json, to_table  # noqa: E402

KEYS = {
    "compile",
    "plan_llama2_mlp",
    "plan_synthetic",
    "txn",
    "session",
    "weights_q4_4096x11008_g128",
    "weights_q4_11008x4096_g128",
    "emulator_llama2_mlp",
    "emulator_ppocr_det",
    "external_data_rss",
    "memory_llama2_mlp",
    "generate_decode_step",
    "start_llama2_mlp",
    "cli_start",
}
SKIPPABLE = {"txn", "emulator_ppocr_det", "generate_decode_step"}  # ../shared, genai extra


@pytest.fixture(scope="module")
def quick_json() -> dict:
    env = {**os.environ, "NPUD_PROGRESS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"benchmarks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)  # stdout is exactly one JSON object


@pytest.mark.slow
def test_every_benchmark_has_a_key(quick_json: dict):
    assert set(quick_json) == KEYS | {"machine"}
    assert quick_json["machine"]["quick"] is True
    assert quick_json["machine"]["cores"] >= 1


@pytest.mark.slow
def test_ratios_are_measured(quick_json: dict):
    for key in KEYS:
        entry = quick_json[key]
        assert entry.get("error") is None, f"{key}: {entry.get('error')}"
        if entry.get("skipped"):
            assert key in SKIPPABLE, f"only benchmarks reading ../shared may skip, {key} did"
            continue
        assert isinstance(entry["ratio"], float) and math.isfinite(entry["ratio"]), key
        # Memory growth may be exactly zero (weights mapped, never copied); times never are.
        floor = 0 if key in ("external_data_rss", "memory_llama2_mlp") else 1e-12
        assert entry["ratio"] >= floor and entry["ratio_of"] and entry["measured"], key


@pytest.mark.slow
def test_values_are_consistent(quick_json: dict):
    plan = quick_json["plan_llama2_mlp"]["measured"]
    assert plan["lower_bound_bytes"] <= plan["intermediate_bytes"] <= plan["dd_no_reuse_bytes"]
    assert quick_json["plan_llama2_mlp"]["ratio"] == pytest.approx(
        plan["intermediate_bytes"] / plan["lower_bound_bytes"]
    )
    synth = quick_json["plan_synthetic"]["measured"]
    assert synth["lower_bound_bytes"] <= synth["packed_bytes"] <= synth["dd_no_reuse_bytes"]
    emu = quick_json["emulator_llama2_mlp"]["measured"]
    assert emu["input_shape"][1] == 1  # M = 1
    assert emu["kernel_calls"] >= 1
    assert emu["max_abs_diff"] <= 0.05 * emu["max_abs_ref"]  # bf16 vs float32 onnxruntime
    assert quick_json["session"]["measured"]["kernel_calls_per_run"] == 1
    for key in ("weights_q4_4096x11008_g128", "weights_q4_11008x4096_g128"):
        w = quick_json[key]["measured"]
        assert quick_json[key]["ratio"] == pytest.approx(w["seconds"] / w["memcpy_s"])
        assert w["output_bytes"] > 11008 * 4096 // 2  # 4-bit codes plus scales
    ext = quick_json["external_data_rss"]["measured"]
    assert ext["output_correct"] and ext["cpu_segments"] == 1
    mem = quick_json["memory_llama2_mlp"]["measured"]
    for scenario in mem["scenarios"].values():
        assert scenario["peak_bytes"] >= scenario["baseline_bytes"] > 0
    assert {"run", "onnxruntime"} <= set(mem["scenarios"])
    assert mem["run2_transient_bytes"] is None or mem["run2_transient_bytes"] >= 0


def test_table_and_json_report_failures_and_skips():
    rows = [
        Row("a", 2.0, "x / y", "two", {"x": 2, "y": 1}),
        Row("b", None, "p / q", "no corpus", {}, skipped="no corpus"),
        Row("c", None, "", "FAILED: boom", error="RuntimeError: boom"),
    ]
    table = to_table(rows)
    lines = table.splitlines()
    assert "2.00x" in lines[2] and "skipped" in lines[3] and "ERROR" in lines[4]
    doc = to_json(rows, quick=True)
    assert doc["a"] == {"measured": {"x": 2, "y": 1}, "ratio": 2.0, "ratio_of": "x / y"}
    assert doc["b"]["skipped"] == "no corpus" and doc["c"]["error"] == "RuntimeError: boom"
    json.dumps(doc)  # serialisable
