"""A saved program folder is validated as a whole at load: corrupt or edited folders raise
ProgramFormatError naming the field, even when their sha256 digests were recomputed; nothing a
corrupt folder contains reaches a kernel as garbage (no KeyError/IndexError/huge allocation)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from e2e_models import GOLDEN, random_feeds
from test_emit import run_program

from npudispatch.dispatch.compile import compile_model
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import ModelError, NpuDispatchError, ProgramFormatError
from npudispatch.txn import Transaction


@pytest.fixture(scope="module")
def program() -> FusedProgram:
    (program,) = compile_model(GOLDEN["G11"]()).programs.values()
    return program


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return random_feeds(GOLDEN["G11"]())


def _rewrite(d: Path, name: str, data: bytes) -> None:
    """Replace one binary file and re-sign it, as a careful attacker (or a buggy tool) would."""
    (d / name).write_bytes(data)
    doc = json.loads((d / "program.json").read_text())
    doc["sha256"][name] = hashlib.sha256(data).hexdigest()
    (d / "program.json").write_text(json.dumps(doc))


def _edit(d: Path, change) -> None:
    doc = json.loads((d / "program.json").read_text())
    change(doc)
    (d / "program.json").write_text(json.dumps(doc))


def test_program_format_error_is_a_model_error():
    assert issubclass(ProgramFormatError, ModelError)
    assert issubclass(ProgramFormatError, NpuDispatchError)


def test_the_fixture_zoo_loads(tmp_path):
    """Every program of the e2e models (padded or not, bf16 or float32 storage) passes the
    validation it gets at load (float32 weights are stored as bf16: fewer bytes than the tensor
    the params table describes)."""
    for name, build in GOLDEN.items():
        for pad, bf16 in ((True, True), (False, True), (True, False)):
            for key, prog in compile_model(build(), pad=pad, bf16=bf16).programs.items():
                FusedProgram.load(prog.save(tmp_path / f"{name}_{pad}_{bf16}_{key}"))


def test_no_op_transaction_is_refused(tmp_path, program):
    d = program.save(tmp_path / "p")
    empty = Transaction(dataclasses.replace(program.txn.header, num_ops=0), [])
    _rewrite(d, "txn.bin", empty.to_bytes())
    with pytest.raises(ProgramFormatError, match=r"outputs\[0\] 'C'.*never fully written"):
        FusedProgram.load(d)


def test_transaction_that_skips_an_output_is_refused(tmp_path, program):
    """Drop the ops of the last launch (the Cast writing output C): C is never written."""
    d = program.save(tmp_path / "p")
    keep = program.txn.num_ops - program.ops[-1].txn_ops
    short = Transaction(program.txn.header, program.txn.ops[:keep])
    _rewrite(d, "txn.bin", short.to_bytes())
    with pytest.raises(ProgramFormatError, match="never fully written"):
        FusedProgram.load(d)


@pytest.mark.parametrize("dtype", ["bfloat16", "int32", "float64", "bfloat1v", ""])
def test_edited_output_dtype_is_refused(tmp_path, program, dtype):
    d = program.save(tmp_path / "p")
    _edit(d, lambda doc: doc["outputs"][0].update(dtype=dtype))
    with pytest.raises(ProgramFormatError, match=r"'outputs\[0\]\.(dtype|nbytes)'"):
        FusedProgram.load(d)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("outputs", 0, "offset"), 1 << 40, r"outputs\[0\]\.offset"),
        (("outputs", 0, "shape"), [2, -1], r"outputs\[0\]\.shape\[1\]"),
        (("inputs", 0, "buffer"), 2, r"inputs\[0\]\.buffer"),
        (("ops",), [], "'ops'"),
        (("num_cols",), 0, "'num_cols'"),
        (("ops", 1, "in_args"), "X", r"ops\[1\]\.in_args"),
        (("sha256", "txn.bin"), "zz", r"sha256\['txn\.bin'\]"),
    ],
)
def test_edited_fields_are_named(tmp_path, program, path, value, field):
    d = program.save(tmp_path / "p")

    def change(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    _edit(d, change)
    with pytest.raises(ProgramFormatError, match=field):
        FusedProgram.load(d)


def test_params_image_of_the_wrong_size_is_refused(tmp_path, program):
    d = program.save(tmp_path / "p")
    _rewrite(d, "params.bin", program.params_image + bytes(64))
    with pytest.raises(ProgramFormatError, match=r"params\.bin has"):
        FusedProgram.load(d)


def _load_and_run(d: Path, feeds) -> None:
    """Load, then run: both may refuse with an error of ours, nothing else; memory stays small."""
    tracemalloc.start()
    try:
        with contextlib.suppress(NpuDispatchError):
            run_program(FusedProgram.load(d), feeds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20, f"{peak / 2**20:.0f} MiB peak"


def test_bit_flips_in_params_are_refused_or_contained(tmp_path, program, feeds):
    """64 seeded single-bit flips in params.bin (re-signed): each one is refused at load, or
    the run raises an error of ours, or it runs; never a KeyError/IndexError/huge allocation."""
    d = program.save(tmp_path / "p")
    rng = np.random.default_rng(15)
    refused = 0
    for bit in rng.choice(len(program.params_image) * 8, size=64, replace=False):
        data = bytearray(program.params_image)
        data[bit // 8] ^= 1 << (bit % 8)
        _rewrite(d, "params.bin", bytes(data))
        try:
            FusedProgram.load(d)
        except ProgramFormatError:
            refused += 1
            continue
        _load_and_run(d, feeds)
    assert refused >= 16, f"only {refused} of 64 flips refused at load"


def test_flipped_characters_in_program_json_are_refused_or_harmless(tmp_path, program, feeds):
    """Flip one character at 100 seeded positions of program.json: load raises
    ProgramFormatError (JSON, schema, digest or consistency) or the program still runs."""
    d = program.save(tmp_path / "p")
    text = (d / "program.json").read_text()
    rng = np.random.default_rng(16)
    for pos in rng.choice(len(text), size=100, replace=False):
        flipped = text[:pos] + chr(ord(text[pos]) ^ 1) + text[pos + 1 :]
        (d / "program.json").write_text(flipped)
        try:
            FusedProgram.load(d)
        except ProgramFormatError:
            continue
        _load_and_run(d, feeds)


def test_a_huge_scratch_buffer_is_refused_before_allocation(tmp_path, program):
    """A plan asking for a 1 PiB scratch buffer: refused at load, nothing allocated."""
    d = program.save(tmp_path / "p")
    _edit(d, lambda doc: doc["plan"].update(scratch_bytes=1 << 50))
    with pytest.raises(ProgramFormatError, match="limit per program"):
        FusedProgram.load(d)


def _matmul_model(w: np.ndarray, rows: int) -> onnx.ModelProto:
    """``y = x @ w`` with ``x [rows, K]`` and the constant ``w [K, N]``."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_float32_storage_program_with_a_large_weight_loads(tmp_path):
    """A float32 weight held as bf16 in the const image is larger as a tensor than the program's
    memory: the record check bounds elements, not float32 bytes. (Float32 storage with bf16
    compute: no rewrites; ``bf16=False`` would format the weights in float32.)"""
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    (prog,) = compile_model(_matmul_model(w, 1), rewrite=False).programs.values()
    assert prog.plan.buffer_sizes and sum(prog.plan.buffer_sizes) < w.nbytes
    FusedProgram.load(prog.save(tmp_path / "p"))


def test_a_folder_of_an_older_program_format_is_refused(program, tmp_path):
    """Format 1 folders hold the QDQ ops' shorter params records: re-compile, never misread."""
    program.save(tmp_path)
    _edit(tmp_path, lambda doc: doc.update(format=1))
    with pytest.raises(ProgramFormatError, match=r"format 1, expected one of \[2, 3\]"):
        FusedProgram.load(tmp_path)


def test_only_mixed_programs_are_written_as_format_3(tmp_path):
    """A format-2 reader would run a mixed record in bf16: mixed programs say format 3, which it
    refuses, while bf16 and fp32 programs stay format 2 (readable by both)."""
    model = _matmul_model(np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32), 4)
    for precision, fmt in (("bf16", 2), ("fp32", 2), ("mixed", 3)):
        (prog,) = compile_model(model, precision=precision).programs.values()
        folder = prog.save(tmp_path / precision)
        assert json.loads((folder / "program.json").read_text())["format"] == fmt
        assert FusedProgram.load(folder).params_image == prog.params_image
