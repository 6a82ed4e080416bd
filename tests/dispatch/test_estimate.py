"""The cost model (dispatch/estimate.py): exact bytes and MACs on hand-computed programs, the
time arithmetic, agreement with the emulator's DMAs, and the ``profile`` command."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from corpus_util import MODELS_DIR
from onnx import TensorProto, helper, numpy_helper

from npudispatch import compile_model
from npudispatch.cli import main
from npudispatch.dispatch.backends import get_backend
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.dispatch.estimate import DEVICES, LABEL, Device, device, estimate_program
from npudispatch.emulator import trace_transaction
from npudispatch.errors import ModelError
from npudispatch.examples import build_example
from npudispatch.overlay_abi import BufferKind, ParamsRecord

SHARED_QWEN = MODELS_DIR / "qwen2_tiny_int4"
QWEN_DECODE_DIMS = (
    "batch_size=1,sequence_length=1,past_sequence_length=8,total_sequence_length=9,kv_cache_dim=32"
)


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _only_program(model) -> FusedProgram:
    (program,) = compile_model(model, bf16=False, pad=False).programs.values()
    return program


def _record_bytes(program: FusedProgram, op: str) -> int:
    off, size = program.plan.params_regions[op]
    return len(ParamsRecord.decode(program.params_image[off : off + size]).encode())


@pytest.fixture(scope="module")
def slice_program() -> FusedProgram:
    """A copy op: rows 1..2 of a float32 [4, 64] input."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 64])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 64])
    consts = [
        numpy_helper.from_array(np.array([v], np.int64), n)
        for n, v in (("starts", 1), ("ends", 3), ("axes", 0))
    ]
    node = helper.make_node("Slice", ["X", "starts", "ends", "axes"], ["Y"], name="copy")
    return _only_program(_model([node], [x], [y], consts))


@pytest.fixture(scope="module")
def matmul_program() -> FusedProgram:
    """float32 A [1, 128] @ const B [128, 128]: a bf16 weight image of exactly 128 x 128 x 2 B
    (float32 storage, bf16 compute: no rewrites; ``bf16=False`` would compute in float32)."""
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, 128])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 128])
    b = numpy_helper.from_array(np.random.default_rng(0).random((128, 128), np.float32), "B")
    node = helper.make_node("MatMul", ["A", "B"], ["Y"], name="mm")
    (program,) = compile_model(_model([node], [a], [y], [b]), rewrite=False).programs.values()
    return program


def test_copy_op_moves_exactly_the_slice_and_its_record(slice_program):
    (op,) = slice_program.estimate("strix").ops
    record = _record_bytes(slice_program, "copy")
    # Only the two sliced rows are read (the BD's access pattern, not the input's shape).
    assert op.bytes_by_buffer == {
        "input": {"read": 2 * 64 * 4, "written": 0},
        "output": {"read": 0, "written": 2 * 64 * 4},
        "params": {"read": record, "written": 0},
    }
    assert (op.read_bytes, op.written_bytes, op.macs) == (512 + record, 512, 0)
    assert op.memory_s == pytest.approx((1024 + record) / 60e9, rel=1e-12)
    assert op.compute_s == 0.0 and op.bound == "memory"


def test_matmul_bytes_macs_and_time(matmul_program):
    est = matmul_program.estimate("strix")
    (op,) = est.ops
    record = _record_bytes(matmul_program, "mm")
    assert op.bytes_by_buffer["const"] == {"read": 128 * 128 * 2, "written": 0}
    assert op.bytes_by_buffer["input"] == {"read": 128 * 4, "written": 0}
    assert op.bytes_by_buffer["output"] == {"read": 0, "written": 128 * 4}
    assert op.read_bytes == 32768 + 512 + record and op.written_bytes == 512
    assert op.macs == 1 * 128 * 128
    assert op.compute_dtype == "float32"
    # bf16 rate: 25 TOPS = 12.5e12 MAC/s; memory at 60 GB/s.
    assert op.compute_s == pytest.approx(16384 / 12.5e12, rel=1e-12)
    assert op.memory_s == pytest.approx((33280 + record + 512) / 60e9, rel=1e-12)
    # One call: 52 us + max(memory, compute); the latency dominates such a tiny program.
    assert est.time_s == pytest.approx(52e-6 + op.memory_s, rel=1e-12)
    assert est.bound == "launch" and est.calls_per_s == pytest.approx(1 / est.time_s)
    assert est.min_bytes == {"const": 32768, "inputs": 512, "outputs": 512}
    assert est.traffic_ratio == pytest.approx((33792 + record) / 33792)


@pytest.mark.parametrize(
    ("op_type", "w_shape", "y_shape", "attrs", "macs"),
    [
        # every output element: C/G x 3 x 3 MACs
        ("Conv", (8, 4, 3, 3), (1, 8, 8, 8), {"pads": [1, 1, 1, 1]}, 8 * 8 * 8 * 4 * 9),
        # every input element scatters into M/G x 3 x 3 outputs
        ("ConvTranspose", (4, 2, 3, 3), (1, 2, 17, 17), {"strides": [2, 2]}, 4 * 8 * 8 * 2 * 9),
    ],
)
def test_conv_macs(op_type, w_shape, y_shape, attrs, macs):
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(y_shape))
    w = numpy_helper.from_array(np.random.default_rng(0).random(w_shape, np.float32), "W")
    node = helper.make_node(op_type, ["X", "W"], ["Y"], name="conv", **attrs)
    (op,) = _only_program(_model([node], [x], [y], [w])).estimate().ops
    assert op.op_type == op_type and op.macs == macs
    assert op.bytes_by_buffer["input"]["read"] == 4 * 8 * 8 * 4  # the whole float32 input


def test_compute_bound_and_int8_rate_on_a_custom_device(matmul_program):
    slow = Device("slow", "slow", 4, 4, 2, 2, 1e15, 2e9, 1e9, 0.0)
    est = estimate_program(matmul_program, slow)
    (op,) = est.ops
    assert op.compute_s == pytest.approx(16384 / 0.5e9) and op.bound == "compute"
    assert est.bound == "compute" and est.time_s == pytest.approx(op.compute_s)
    assert slow.macs_per_s(np.dtype(np.int8)) == 1e9  # 8-bit activations: the int8 peak


def test_devices_table_and_errors(matmul_program):
    strix, phoenix = DEVICES["strix"], DEVICES["phoenix"]
    assert (strix.columns, strix.compute_rows) == (8, 4) and (
        phoenix.columns,
        phoenix.compute_rows,
    ) == (4, 4)
    assert strix.shim_mm2s_per_column == strix.shim_s2mm_per_column == 2
    for dev in DEVICES.values():
        assert {"ddr_bytes_per_s", "int8_ops_per_s", "call_latency_s"} <= set(dev.sources)
    assert device("Phoenix") is phoenix
    with pytest.raises(ModelError, match=r"unknown device 'npu9'.*phoenix, strix"):
        device("npu9")
    narrow = Device("narrow", "a 2-column part", 2, 4, 2, 2, 1e9, 1e12, 1e12, 0.0)
    with pytest.raises(ModelError, match=r"uses 4 columns.*--num-cols 2"):
        estimate_program(matmul_program, narrow)


def _emulated_totals(program: FusedProgram) -> Counter:
    """Bytes per (buffer, direction) the emulator's DMAs moved in one real run of ``program``."""
    backend = get_backend("emulator")
    prepared = backend.prepare(program.to_program_image())
    rng = np.random.default_rng(0)
    image = np.zeros(program.plan.input_bytes, np.uint8)
    for b in program.inputs:
        b.view(image)[...] = rng.standard_normal(b.shape).astype(b.np_dtype)
    backend.execute(prepared, image, np.zeros(program.plan.output_bytes, np.uint8))
    out: Counter = Counter()
    for t in prepared.npu.transfers:
        out[(BufferKind(t.argidx).label, t.direction.name)] += t.nbytes
    return out


def _estimated_totals(program: FusedProgram) -> Counter:
    out: Counter = Counter()
    for op in program.estimate().ops:
        for label, moved in op.bytes_by_buffer.items():
            for way, direction in (("read", "MM2S"), ("written", "S2MM")):
                if moved[way]:
                    out[(label, direction)] += moved[way]
    return out


@pytest.mark.parametrize("example", ["llama2-mlp-small"])
def test_byte_counts_equal_what_the_emulator_moves(example, slice_program, matmul_program):
    programs = list(compile_model(build_example(example)).programs.values())
    for program in [slice_program, matmul_program, *programs]:
        estimated = _estimated_totals(program)
        assert estimated == _emulated_totals(program), program.name
        traced = trace_transaction(program.txn).totals()
        assert estimated == Counter(
            {(BufferKind(a).label, d.name): n for (a, d), n in traced.items()}
        )
        assert sum(estimated.values()) == program.estimate().ddr_bytes


def test_estimate_survives_save_and_load(tmp_path):
    """MACs come from the params records, so a loaded program is estimated the same way."""
    (program,) = compile_model(build_example("llama2-mlp-small")).programs.values()
    again = FusedProgram.load(program.save(tmp_path / "p"))
    assert again.estimate().to_json() == program.estimate().to_json()
    assert again.estimate().macs > 0


def test_profile_command_text_and_json(tmp_path, capsys):
    path = tmp_path / "mlp.onnx"
    path.write_bytes(build_example("llama2-mlp-small").SerializeToString())
    assert main(["profile", str(path)]) == 0
    text = capsys.readouterr().out
    assert LABEL in text and "MatMulNBits" in text and "runs/s" in text
    assert main(["profile", str(path), "--device", "phoenix", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["label"] == LABEL and doc["device"]["name"] == "phoenix"
    (prog,) = doc["programs"]
    assert prog["bound"] in {"memory", "compute", "launch"}
    assert doc["runs_per_s"] == pytest.approx(1 / prog["time_s"])
    assert prog["read_bytes"] == sum(op["read_bytes"] for op in prog["ops"])


@pytest.mark.skipif(not SHARED_QWEN.is_dir(), reason="../shared/models/qwen2_tiny_int4 is absent")
def test_qwen2_decode_step_profile(capsys):
    args = ["profile", str(SHARED_QWEN / "model.onnx"), "--dims", QWEN_DECODE_DIMS, "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kernel_calls_per_run"] == 1 and doc["cpu_segments"] == 0
    (prog,) = doc["programs"]
    # The whole 2-layer decode step's weights are read once per token: ~770 KB.
    assert prog["min_bytes"]["const"] <= prog["read_bytes"] <= 1.2 * prog["min_ddr_bytes"]
    # The token embedding is a DMA gather: one bf16 row of the 384 x 192 table per step, not the
    # whole table (147,456 B) as the row-copy kernel read it.
    (embed,) = [op for op in prog["ops"] if op["op_type"] == "Gather"]
    assert embed["bytes_by_buffer"]["const"]["read"] == 192 * 2
    attention = [op for op in prog["ops"] if op["op_type"] == "GroupQueryAttention"]
    # 6 query heads x head 32 = 192; one new token attends to 9 positions: 2 x 9 x 192 MACs.
    assert [op["macs"] for op in attention] == [2 * 1 * 9 * 192] * 2
