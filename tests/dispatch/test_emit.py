"""FusedProgram: re-basing onto the plan, images, save/load round trip, DD meta JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from e2e_models import GOLDEN, random_feeds

from npudispatch import compile_model
from npudispatch.dispatch.backends import get_backend
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.dispatch.meta import to_dd_meta
from npudispatch.dispatch.plan import BufferKind
from npudispatch.errors import ModelError
from npudispatch.txn import patches, unwrap


@pytest.fixture(scope="module")
def g11() -> FusedProgram:
    (program,) = compile_model(GOLDEN["G11"]()).programs.values()
    return program


def run_program(program: FusedProgram, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a program alone on the emulator backend, packing inputs with its bindings."""
    backend = get_backend("emulator")
    prepared = backend.prepare(program.to_program_image())
    image = np.zeros(program.plan.input_bytes, np.uint8)
    for b in program.inputs:
        b.view(image)[...] = feeds[b.name]
    out = np.zeros(program.plan.output_bytes, np.uint8)
    backend.execute(prepared, image, out)
    return {b.name: b.view(out).copy() for b in program.outputs}


def test_every_patch_lands_inside_its_fused_buffer(g11):
    sizes = g11.plan.buffer_sizes
    found = patches(g11.txn)
    assert found, "a fused program must patch DDR addresses"
    for op_index, offset, argidx, argplus in found:
        assert argidx < 5, (op_index, offset)
        assert argplus < sizes[argidx], (op_index, offset, argidx, argplus)


def test_patches_hit_the_planned_tensors(g11):
    """Each op's operands/outputs are patched at the plan's placements (G11: X, Y0, Y1, Z0, A, C)."""
    starts = {(int(p.buffer), p.offset) for p in g11.plan.placements.values()}
    io_patches = {(a, p) for _, _, a, p in patches(g11.txn) if a in (0, 1, 2)}
    for name in ("X", "C"):
        pl = g11.plan.placements[name]
        assert (int(pl.buffer), pl.offset) in io_patches
    assert io_patches & starts


def test_images_hold_consts_and_params_at_their_regions(g11):
    plan = g11.plan
    assert len(g11.const_image) == plan.const_bytes
    assert len(g11.params_image) == plan.params_bytes
    assert set(plan.params_regions) == {op.name for op in g11.ops}
    for op, (off, size) in plan.const_regions.items():
        assert any(g11.const_image[off : off + size]), f"const region of {op} is empty"
    # bf16 by default: the float32 input and output are cast at the partition border, inside it.
    mlp = ["MatMul", "MatMul", "Silu", "Mul", "MatMul"]
    assert [op.op_type for op in g11.ops] == ["Cast", *mlp, "Cast"]
    assert [op.out_args for op in g11.ops[:1]] == [["X__bf16"]]
    assert [op.out_args for op in g11.ops[-1:]] == [["C"]]
    (fp32,) = compile_model(GOLDEN["G11"](), bf16=False).programs.values()
    assert [op.op_type for op in fp32.ops] == mlp
    assert g11.instructions[8:] == g11.txn.to_bytes()
    assert unwrap(g11.instructions) == g11.txn


def test_save_load_round_trip_runs_identically(tmp_path, g11):
    feeds = random_feeds(GOLDEN["G11"]())
    before = run_program(g11, feeds)
    g11.save(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "const.bin",
        "meta.json",
        "params.bin",
        "program.json",
        "txn.bin",
    ]
    loaded = FusedProgram.load(tmp_path / "p")
    assert loaded.txn == g11.txn and loaded.plan == g11.plan
    assert loaded.inputs == g11.inputs and loaded.outputs == g11.outputs
    after = run_program(loaded, feeds)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


def test_load_rejects_corrupt_or_incomplete_dirs(tmp_path, g11):
    d = g11.save(tmp_path / "p")
    (d / "const.bin").write_bytes(b"\0" + g11.const_image[1:])
    with pytest.raises(ModelError, match="sha256"):
        FusedProgram.load(d)
    g11.save(d)
    doc = json.loads((d / "program.json").read_text())
    doc["ops"][0]["kernel_id"] = 99999
    (d / "program.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="kernel id 99999"):
        FusedProgram.load(d)
    g11.save(d)
    (d / "program.json").write_text('{"format": ')
    with pytest.raises(ModelError, match=r"program\.json is corrupt"):
        FusedProgram.load(d)
    g11.save(d)
    doc = json.loads((d / "program.json").read_text())
    del doc["plan"]
    (d / "program.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=r"incomplete or inconsistent.*'plan'"):
        FusedProgram.load(d)
    (d / "txn.bin").unlink()
    with pytest.raises(ModelError, match=r"missing txn\.bin"):
        FusedProgram.load(d)


def test_dd_meta_json_keys(g11):
    meta = json.loads(json.dumps(to_dd_meta(g11)))
    assert list(meta) == [
        "dd_meta_major_version",
        "dd_meta_minor_version",
        "op_list",
        "fused_tensors",
        "tensor_map",
        "aux_info",
    ]
    assert meta["dd_meta_major_version"] == 1 and meta["dd_meta_minor_version"] == 1
    assert set(meta["fused_tensors"]) == {"in", "out", "scratch", "const", "super_instr"}
    ids = {k: v["xrt_arg_id"] for k, v in meta["fused_tensors"].items()}
    assert ids == {"in": 0, "out": 1, "scratch": 2, "const": 3, "super_instr": 4}
    for v in meta["fused_tensors"].values():
        assert set(v) == {"buffer_size", "xrt_arg_id", "packed_tensors"}
    assert meta["fused_tensors"]["in"]["packed_tensors"] == ["X"]
    assert meta["fused_tensors"]["out"]["packed_tensors"] == ["C"]
    cast, op = meta["op_list"][:2]
    assert set(op) == {"name", "type", "in_args", "const_args", "out_args", "attrs"}
    # The boundary cast feeds the bf16 twin of X; the weights are bf16 copies (no Cast node).
    assert cast["type"] == "Cast" and cast["in_args"] == ["X"] and cast["out_args"] == ["X__bf16"]
    assert op["type"] == "MatMul" and op["const_args"] == ["W1__bf16"]
    assert op["in_args"] == ["X__bf16"]
    assert "Silu" in [o["type"] for o in meta["op_list"]]  # npudispatch domain dropped
    x = meta["tensor_map"]["X"]
    assert x == {
        "packed_buffer_label": "in",
        "xrt_arg_id": 0,
        "dtype": "float",
        "shape": [1, 2, 64],
        "size_in_bytes": x["size_in_bytes"],
        "offset": 0,
    }
    assert x["size_in_bytes"] >= 2 * 64 * 4
    w1 = meta["tensor_map"]["W1__bf16"]
    assert w1["packed_buffer_label"] == "const" and w1["dtype"] == "bfloat16"
    y0 = meta["tensor_map"]["Y0"]
    assert y0["packed_buffer_label"] == "scratch" and y0["dtype"] == "bfloat16"
    assert meta["tensor_map"]["X__bf16"]["size_in_bytes"] == 2 * 64 * 2  # half of X's bytes
    assert set(meta["aux_info"]) == {"original_inputs", "original_outputs"}


def test_attrs_use_dd_string_form():
    import onnx_ir as ir
    from onnx import helper

    from npudispatch.dispatch.emit import _dd_attrs

    node = ir.from_proto(helper.make_node("Softmax", ["x"], ["y"], axis=-1, name="s"))
    assert _dd_attrs(node) == {"axis": {"type": "int", "value": ["-1"]}}


def test_repr_html_and_summary(g11):
    html = g11._repr_html_()
    assert "FusedProgram" in html and "down_proj" in html
    summary = g11.summary()
    assert summary["txn"] == {"num_ops": g11.txn.num_ops, "bytes": g11.txn.nbytes}
    assert summary["plan"]["scratch_bytes"] == g11.plan.size(BufferKind.SCRATCH)


def test_rebase_failure_names_the_op():
    """A patch outside an op's argument map is reported with the op's name, not just a byte offset."""
    from types import SimpleNamespace

    from npudispatch.dispatch.emit import _fuse_rebased
    from npudispatch.errors import ModelError
    from npudispatch.txn import ArgRange, TxnBuilder
    from npudispatch.txn.shim import ShimBd

    def one_patch(argplus: int):
        b = TxnBuilder()
        b.shim_bd(0, 0, ShimBd(length_words=4), argidx=0, argplus=argplus)
        return b.build()

    ok = (one_patch(0x10), [ArgRange(0, 0, 0x100, 2, 0)])
    bad = (one_patch(0x200), [ArgRange(0, 0, 0x100, 2, 0)])
    launches = [SimpleNamespace(node=SimpleNamespace(name=n)) for n in ("good_op", "bad_op")]
    with pytest.raises(ModelError, match=r"op 'bad_op': re-basing failed.*lies in no ArgRange"):
        _fuse_rebased("npu0", launches, [ok, bad])
    assert _fuse_rebased("npu0", launches[:1], [ok]).num_ops == 2
