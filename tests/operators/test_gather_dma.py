"""Gather on a constant table as a DMA gather (issue 14): when the indices are an input of the
NPU partition, only the selected rows leave DDR, read by buffer descriptors whose addresses the
host patches from the index values before every run. Checked against onnxruntime on the emulator
and the fake XRT device, through save/load, with the byte counts the cost model reports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from npudispatch import Session
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import ModelError, ProgramFormatError
from npudispatch.operators.dma_gather import MAX_ROWS

F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
ROWS, WIDTH = 40, 24  # the table; stored in bf16 on the device: 48 B rows


def _table(rows: int = ROWS, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((rows, width)).astype(np.float32)


def _gather_model(ids_shape, ids_type=I64, *, matmul: bool = False, shift: bool = False):
    """``Gather(table, ids)`` (then ``@ W`` with ``matmul``); ``shift``: the ids go through an
    int Add on the NPU first, so the Gather's indices are produced on the device."""
    nodes, inits = [], [numpy_helper.from_array(_table(), "table")]
    ids = "ids"
    if shift:
        one = np.asarray(1, np.int64 if ids_type == I64 else np.int32)
        inits.append(numpy_helper.from_array(one, "one"))
        nodes.append(helper.make_node("Add", ["ids", "one"], ["ids1"], name="shift"))
        ids = "ids1"
    nodes.append(helper.make_node("Gather", ["table", ids], ["emb"], name="embed"))
    out, width = "emb", WIDTH
    if matmul:
        w = np.random.default_rng(4).standard_normal((WIDTH, 16)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("MatMul", ["emb", "w"], ["y"], name="proj"))
        out, width = "y", 16
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", ids_type, list(ids_shape))],
        [helper.make_tensor_value_info(out, F32, [*ids_shape, width])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _ort(model: onnx.ModelProto, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _assert_bf16_close(got, want):
    """The table is stored in bf16 (docs/numerics.md): relative 2^-8 plus a small atol."""
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * max(1.0, np.abs(want).max()))


def _const_reads(program: FusedProgram, op_name: str) -> int:
    est = program.estimate()
    (op,) = [o for o in est.ops if o.name == op_name]
    return op.bytes_by_buffer.get("const", {}).get("read", 0)


@pytest.mark.parametrize(
    ("ids", "ids_type"),
    [
        (np.asarray([[1, 17, 39, 0, 5, -1, 7]], np.int64), I64),
        (np.asarray([[3, -40, 3, 3], [39, -1, 0, 0]], np.int32), I32),  # repeated, negative
        (np.asarray([[[5, 6], [7, 8]], [[-2, 2], [9, 9]]], np.int64), I64),  # batch x seq x k
        (np.asarray(11, np.int64), I64),  # one scalar index: one row out
    ],
)
def test_one_node_gather_reads_only_the_selected_rows(ids, ids_type):
    model = _gather_model(ids.shape, ids_type)
    sess = Session(model, cache=False)
    got = sess.run(None, {"ids": ids})[0]
    _assert_bf16_close(got, _ort(model, {"ids": ids}))
    (program,) = sess.programs
    assert program.gathers()["embed"].startswith("dma: ")
    row_bytes = WIDTH * 2  # bf16 table
    assert _const_reads(program, "embed") == ids.size * row_bytes  # not ROWS * row_bytes
    # new index values on the same program: the patches follow every run
    other = np.asarray((ids.astype(np.int64) * 7 + 3) % ROWS - ROWS // 2, ids.dtype)
    _assert_bf16_close(sess.run(None, {"ids": other})[0], _ort(model, {"ids": other}))


@pytest.mark.parametrize("ids_type", [I32, I64])
def test_embedding_then_matmul_follows_onnxruntime(ids_type):
    dtype = np.int32 if ids_type == I32 else np.int64
    ids = np.asarray([[2, 9, -3, 9, 0], [39, 1, 1, -40, 20]], dtype)
    model = _gather_model(ids.shape, ids_type, matmul=True)
    sess = Session(model, cache=False)
    _assert_bf16_close(sess.run(None, {"ids": ids})[0], _ort(model, {"ids": ids}))
    assert sess.compiled.kernel_calls_per_run == 1
    assert sess.programs[0].gathers()["embed"].startswith("dma: ")


def test_more_indices_than_shim_buffer_descriptors_go_in_rounds():
    ids = np.random.default_rng(5).integers(-ROWS, ROWS, size=(3, 70)).astype(np.int64)
    model = _gather_model(ids.shape)
    sess = Session(model, cache=False)
    _assert_bf16_close(sess.run(None, {"ids": ids})[0], _ort(model, {"ids": ids}))
    assert _const_reads(sess.programs[0], "embed") == ids.size * WIDTH * 2


def test_indices_computed_on_the_device_keep_the_row_copy():
    ids = np.asarray([[0, 4, -2, 38]], np.int64)
    model = _gather_model(ids.shape, shift=True)
    sess = Session(model, cache=False)
    _assert_bf16_close(sess.run(None, {"ids": ids})[0], _ort(model, {"ids": ids}))
    (program,) = sess.programs
    assert program.gathers()["embed"].startswith("row copy")
    assert not program.patch_sites
    assert _const_reads(program, "embed") >= ROWS * WIDTH * 2  # the whole table, every run
    report = sess.compiled.to_report()
    assert report["partitions"][0]["gathers"]["embed"].startswith("row copy")


@pytest.mark.parametrize(
    ("bad", "position", "value"),
    [([[1, 40, 2]], [0, 1], 40), ([[1, 2, -41]], [0, 2], -41)],
)
def test_out_of_range_index_is_an_error_like_onnxruntime(bad, position, value):
    model = _gather_model((1, 3))
    sess = Session(model, cache=False)
    feeds = {"ids": np.asarray(bad, np.int64)}
    with pytest.raises(Exception, match="out of"):  # onnxruntime refuses it too
        _ort(model, feeds)
    with pytest.raises(ModelError) as err:
        sess.run(None, feeds)
    text = str(err.value)
    assert f"index {value} at position {position} of input 'ids'" in text
    assert f"table of {ROWS} rows" in text
    # the failed run left nothing behind: the next good run is right
    good = {"ids": np.asarray([[0, 39, -40]], np.int64)}
    _assert_bf16_close(sess.run(None, good)[0], _ort(model, good))


def test_saved_program_keeps_its_patch_sites(tmp_path):
    ids = np.asarray([[4, 4, -1, 30, 12]], np.int64)
    model = _gather_model(ids.shape, matmul=True)
    (program,) = Session(model, cache=False).programs
    program.save(tmp_path / "p")
    doc = json.loads((tmp_path / "p" / "program.json").read_text())
    assert len(doc["patch_sites"]) == ids.size
    assert {s["input"] for s in doc["patch_sites"]} == {"ids"}
    loaded = FusedProgram.load(tmp_path / "p")
    assert loaded.patch_sites == program.patch_sites
    sess = Session(tmp_path / "p")
    for feed in (ids, np.asarray([[0, 1, 2, 3, -5]], np.int64)):
        _assert_bf16_close(sess.run(None, {"ids": feed})[0], _ort(model, {"ids": feed}))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s, doc: s.update(field=s["field"] + 8), "field"),
        (lambda s, doc: s.update(input="nope"), "input"),
        (lambda s, doc: s.update(element=10_000), "element"),
        (lambda s, doc: s.update(rows=s["rows"] * 1000), "rows"),
        (lambda s, doc: s.update(extra=1), "patch_sites[0]"),
        (lambda s, doc: s.update(row_bytes="48"), "row_bytes"),
    ],
)
def test_load_refuses_bad_patch_sites(tmp_path, edit, field):
    (program,) = Session(_gather_model((1, 3)), cache=False).programs
    program.save(tmp_path / "p")
    path = tmp_path / "p" / "program.json"
    doc = json.loads(path.read_text())
    edit(doc["patch_sites"][0], doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(
        ProgramFormatError, match=r"patch_sites\[0\]" + (f".*{field}" if "[" not in field else "")
    ):
        FusedProgram.load(tmp_path / "p")


def test_load_refuses_a_site_reading_a_float_input(tmp_path):
    """A site whose input is not integer indices (hand-edited to another program input)."""
    model = _gather_model((1, 3))
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("x", F32, [1, 3, WIDTH]))
    graph.node.append(helper.make_node("Add", ["emb", "x"], ["z"], name="add"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("z", F32, [1, 3, WIDTH]))
    (program,) = Session(model, cache=False).programs
    program.save(tmp_path / "p")
    path = tmp_path / "p" / "program.json"
    doc = json.loads(path.read_text())
    doc["patch_sites"][0]["input"] = "x"
    path.write_text(json.dumps(doc))
    with pytest.raises(ProgramFormatError, match="not int32/int64 indices"):
        FusedProgram.load(tmp_path / "p")


@pytest.mark.parametrize("convention", ["mlir-aie", "dynamic-dispatch"])
def test_fake_xrt_patches_the_instruction_buffer(tmp_path, convention):
    """The fake device runs only what was synced: a stale instruction BO would read row 0."""
    from npudispatch.operators import registry
    from npudispatch.testing import emulator_executor, install_fake_pyxrt, write_fake_xclbin

    model = _gather_model((2, 3), matmul=True)
    runs = [np.asarray([[5, 5, -1], [0, 39, 12]], np.int64), np.asarray([[1, 2, 3], [-4, 7, 7]], np.int64)]  # fmt: skip
    with install_fake_pyxrt(emulator_executor(registry.kernels())):
        xclbin = write_fake_xclbin(tmp_path / "fake.xclbin")
        sess = Session(model, backend="xrt", xclbin=str(xclbin), convention=convention, cache=False)
        for ids in runs:
            _assert_bf16_close(sess.run(None, {"ids": ids})[0], _ort(model, {"ids": ids}))
        with pytest.raises(ModelError, match="out of range"):
            sess.run(None, {"ids": np.asarray([[0, 0, 99], [0, 0, 0]], np.int64)})


def test_too_many_indices_keep_the_row_copy():
    ids = np.zeros((1, MAX_ROWS + 1), np.int64)
    model = _gather_model(ids.shape)
    sess = Session(model, cache=False)
    assert sess.programs[0].gathers()["embed"].startswith("row copy")
    _assert_bf16_close(sess.run(None, {"ids": ids})[0], _ort(model, {"ids": ids}))


def test_indices_through_a_view_and_the_compile_cache(tmp_path):
    """``ids -> Reshape -> Gather`` (int32: an NPU view; int64 views are shape arithmetic on
    the CPU): the view shares the input's bytes, so the sites read the program input; a second
    session loads the program from the disk cache and still patches."""
    model = _gather_model((2, 3), I32)
    graph = model.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("flat", I32, [6]))
    graph.initializer.append(numpy_helper.from_array(np.asarray([2, 3], np.int64), "shape"))
    graph.node.insert(0, helper.make_node("Reshape", ["flat", "shape"], ["ids"], name="view"))
    feeds = {"flat": np.asarray([3, -1, 0, 39, 3, 12], np.int32)}
    first = Session(model, cache=tmp_path / "cache")
    assert {s.input for s in first.programs[0].patch_sites} == {"flat"}
    second = Session(model, cache=tmp_path / "cache")
    assert [e.source for e in second.compile_log] == ["disk cache"]
    for sess in (first, second):
        _assert_bf16_close(sess.run(None, feeds)[0], _ort(model, feeds))


def test_patch_table_reads_indices_from_a_padded_binding():
    from npudispatch.dispatch.emit import TensorBinding
    from npudispatch.dispatch.patch_sites import PatchSite, PatchTable

    ids = TensorBinding("ids", "int32", (2, 3), (2, 4), 0, 64, 32)
    sites = [PatchSite(0, "g", "ids", e, 1024, 8, 10) for e in range(6)]
    image = np.zeros(96, np.uint8)
    padded = np.asarray([[1, 2, -3, 99], [4, 5, 9, 99]], np.int32)  # lane 3: padding
    image[64:96] = padded.view(np.uint8).reshape(-1)
    table = PatchTable("p", sites, [ids])
    np.testing.assert_array_equal(table.indices(image), [1, 2, -3, 4, 5, 9])
    np.testing.assert_array_equal(table.argplus(image), 1024 + 8 * np.asarray([1, 2, 7, 4, 5, 9]))
    image[64:68] = np.asarray([10], np.int32).view(np.uint8)
    with pytest.raises(ModelError, match=r"index 10 at position \[0, 0\] of input 'ids'"):
        table.argplus(image)
