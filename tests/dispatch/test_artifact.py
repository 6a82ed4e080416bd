"""Whole compiled models as folders: compile -o, Session(DIR), run DIR, no stale partitions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from e2e_models import GOLDEN, assert_close, onnxruntime_run, random_feeds

from npudispatch import Session
from npudispatch.cli import main
from npudispatch.dispatch import compile_model
from npudispatch.dispatch.artifact import CompiledArtifact
from npudispatch.dispatch.emit import FusedProgram
from npudispatch.errors import ModelError


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


@pytest.fixture
def mixed(tmp_path):
    """G14: NPU, CPU (Atan), NPU partitions, saved as a file."""
    model = GOLDEN["G14"]()
    path = tmp_path / "mixed.onnx"
    onnx.save(model, path)
    return model, path


def test_compile_dir_runs_without_the_model(mixed, tmp_path, capsys):
    model, path = mixed
    out = tmp_path / "prog"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    doc = json.loads((out / "compiled.json").read_text())
    kinds = [s["kind"] for s in doc["segments"]]
    assert "npu" in kinds and "cpu" in kinds  # both kinds are in the folder
    path.unlink()  # no model any more
    feeds = random_feeds(model, seed=3)
    expected = onnxruntime_run(model, feeds)
    session = Session(out)
    assert session.compiled is None and session.compile_log[0].source == "program"
    for got, ref in zip(session.run(None, feeds), expected.values()):
        assert_close(got, ref)
    assert session.last_run_stats.kernel_calls == 2 and session.last_run_stats.cpu_segments == 1
    np.savez(tmp_path / "in.npz", **feeds)
    capsys.readouterr()
    assert main(["run", str(out), "--inputs", str(tmp_path / "in.npz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kernel_calls"] == 2 and summary["cpu_segments"] == 1


def test_moved_program_folder_stands_alone(mixed, tmp_path):
    """CPU-segment weights are copied into the folder; moving it elsewhere keeps it runnable."""
    model, path = mixed
    CompiledArtifact.from_compiled(compile_model(path)).save(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    feeds = random_feeds(model)
    for got, ref in zip(
        Session(tmp_path / "b").run(None, feeds), onnxruntime_run(model, feeds).values()
    ):
        assert_close(got, ref)


def test_compile_into_existing_folder_leaves_no_stale_partitions(mixed, tmp_path):
    _, path = mixed
    out = tmp_path / "prog"
    assert main(["compile", str(path), "-o", str(out)]) == 0
    assert (out / "cpu0").is_dir()
    (out / "notes.txt").write_text("user file")  # not ours: kept
    g11 = tmp_path / "g11.onnx"
    onnx.save(GOLDEN["G11"](), g11)
    assert main(["compile", str(g11), "-o", str(out)]) == 0
    assert not (out / "cpu0").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "compiled.json",
        "notes.txt",
        "npu0",
        "report.json",
    ]
    feeds = random_feeds(GOLDEN["G11"]())
    (got,) = Session(out).run(None, feeds)
    (ref,) = onnxruntime_run(GOLDEN["G11"](), feeds).values()
    assert_close(got, ref)


def test_save_writes_the_same_files_as_compile(mixed, tmp_path):
    _, path = mixed
    assert main(["compile", str(path), "-o", str(tmp_path / "cli")]) == 0
    compile_model(path).save(tmp_path / "api")  # the Python spelling of compile -o
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")
    for name in ("npu0/program.json", "npu0/meta.json", "npu0/txn.bin", "cpu0/model.onnx"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()


@pytest.mark.parametrize("victim", ["cpu0/model.onnx", "npu0/const.bin", "compiled.json"])
def test_corrupt_folder_is_refused_before_running(mixed, tmp_path, victim):
    _, path = mixed
    out = tmp_path / "prog"
    CompiledArtifact.from_compiled(compile_model(path)).save(out)
    f = out / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        Session(out)


def test_program_folder_refuses_compile_options_and_check(mixed, tmp_path, capsys):
    _, path = mixed
    out = tmp_path / "prog"
    CompiledArtifact.from_compiled(compile_model(path)).save(out)
    with pytest.raises(ModelError, match="already compiled"):
        Session(out, input_shapes={"X": (4, 64)})
    capsys.readouterr()
    assert main(["run", str(out), "--check"]) == 2
    assert "original model" in capsys.readouterr().err


def test_single_fused_program_folder_runs(tmp_path):
    """A folder written by FusedProgram.save (one NPU partition) runs on its own too."""
    model = GOLDEN["G11"]()
    (program,) = compile_model(model).programs.values()
    program.save(tmp_path / "p")
    assert _files(tmp_path / "p") == [
        "const.bin",
        "meta.json",
        "params.bin",
        "program.json",
        "txn.bin",
    ]  # what compile -o writes per NPU partition
    feeds = random_feeds(model)
    (got,) = Session(tmp_path / "p").run(None, feeds)
    (ref,) = onnxruntime_run(model, feeds).values()
    assert_close(got, ref)
    (again,) = Session(FusedProgram.load(tmp_path / "p")).run(None, feeds)
    np.testing.assert_array_equal(again, got)
