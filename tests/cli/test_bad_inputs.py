"""Bad input never reaches the user as a traceback: the CLI exits 2 with one clear line, and the
API raises an npudispatch error naming the file / tensor / option at fault."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import npudispatch
from npudispatch import graph
from npudispatch.cli import main
from npudispatch.errors import BackendUnavailableError, ModelError, NpuDispatchError


def _add_model(path: Path, batch: int | str = 2) -> Path:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 8])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, 8])
    w = helper.make_tensor("W", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    node = helper.make_node("Add", ["X", "W"], ["Y"], name="add0")
    g = helper.make_graph([node], "g", [x], [y], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def add_onnx(tmp_path: Path) -> Path:
    return _add_model(tmp_path / "add.onnx")


@pytest.fixture
def sym_onnx(tmp_path: Path) -> Path:
    return _add_model(tmp_path / "sym.onnx", batch="batch")


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run the CLI, require exit 2 and one stderr line containing every needle."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- model files -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "plan", "run", "compile"])
def test_directory_as_model_says_directory(command, tmp_path, capsys):
    argv = [command, tmp_path] + (["-o", tmp_path / "out"] if command == "compile" else [])
    cli_error(capsys, argv, "is a directory")


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_empty_model_file_is_refused(command, tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    cli_error(capsys, [command, empty], "empty.onnx", "no ONNX graph")


def test_truncated_model_says_truncated(add_onnx, capsys):
    data = add_onnx.read_bytes()
    add_onnx.write_bytes(data[: len(data) // 2])
    cli_error(capsys, ["inspect", add_onnx], "add.onnx", "truncated")


# --- --dims ----------------------------------------------------------------------------------


def test_dims_too_large_is_an_error_not_a_traceback(sym_onnx, capsys):
    cli_error(capsys, ["inspect", sym_onnx, "--dims", "batch=99999999999999999999"], "batch")


def test_dims_zero_runs_empty_tensors_on_the_cpu(sym_onnx, capsys):
    # Zero-size dims are legal ONNX (an empty KV cache at prefill): nothing to compute on the NPU.
    capsys.readouterr()
    assert main(["run", str(sym_onnx), "--dims", "batch=0", "--check", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kernel_calls"] == 0
    assert all(o["shape"][0] == 0 and o["ok"] for o in out["outputs"].values())


def test_negative_dims_are_refused(sym_onnx, capsys):
    cli_error(capsys, ["run", sym_onnx, "--dims", "batch=-1"], "batch=-1", "non-negative")


def test_dims_given_twice_with_different_values(sym_onnx, capsys):
    cli_error(capsys, ["inspect", sym_onnx, "--dims", "batch=2", "--dims", "batch=3"], "twice")


def test_dims_unknown_name_lists_the_models_dims(sym_onnx, capsys):
    line = cli_error(capsys, ["inspect", sym_onnx, "--dims", "batch=2,seq=3"], "['seq']")
    assert "['batch']" in line  # the model's dims, not "none" after binding batch


# --- run --inputs / --backend / -o -----------------------------------------------------------


def test_inputs_not_an_npz(add_onnx, tmp_path, capsys):
    for name, data in (("empty.npz", b""), ("text.npz", b"hello\n")):
        (tmp_path / name).write_bytes(data)
        cli_error(capsys, ["run", add_onnx, "--inputs", tmp_path / name], name, "numpy.savez")
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float32))
    cli_error(capsys, ["run", add_onnx, "--inputs", tmp_path / "x.npy"], "not an .npz")


def test_inputs_missing_array_is_named_with_the_file(add_onnx, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", Q=np.zeros((2, 8), np.float32))
    cli_error(capsys, ["run", add_onnx, "--inputs", tmp_path / "in.npz"], "in.npz", "['X']")


def test_inputs_wrong_shape_says_what_to_do(add_onnx, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", X=np.zeros((3, 8), np.float32))
    cli_error(capsys, ["run", add_onnx, "--inputs", tmp_path / "in.npz"], "'X'", "reshape")


def test_unknown_backend_is_one_line(add_onnx, capsys):
    cli_error(capsys, ["run", add_onnx, "--backend", "nonsense"], "nonsense", "--help")


def test_xrt_without_xclbin(add_onnx, capsys):
    cli_error(capsys, ["run", add_onnx, "--backend", "xrt"], "--xclbin")


def test_xclbin_with_emulator(add_onnx, tmp_path, capsys):
    cli_error(capsys, ["run", add_onnx, "--xclbin", tmp_path / "x.xclbin"], "--backend xrt")


def test_negative_seed_and_tolerance(add_onnx, capsys):
    cli_error(capsys, ["run", add_onnx, "--seed", "-1"], "--seed")
    cli_error(capsys, ["run", add_onnx, "--check", "--rtol", "-1"], "--rtol")


def test_run_outputs_into_unwritable_paths(add_onnx, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli_error(capsys, ["run", add_onnx, "-o", blocker / "out.npz"], "out.npz", "writable")
    cli_error(capsys, ["run", add_onnx, "-o", tmp_path], "is a directory")


def test_compile_onto_existing_file(add_onnx, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli_error(capsys, ["compile", add_onnx, "-o", blocker], "existing file")
    cli_error(capsys, ["compile", add_onnx, "-o", blocker / "sub"], "writable")
    assert blocker.read_text() == "x"


def test_example_into_directory_or_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli_error(capsys, ["example", "G6", "-o", tmp_path], "is a directory")
    cli_error(capsys, ["example", "G6", "-o", blocker / "g6.onnx"], "g6.onnx", "writable")


# --- txn -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["dump", "stats", "explain", "trace"])
def test_txn_directory(sub, tmp_path, capsys):
    cli_error(capsys, ["txn", sub, tmp_path], "is a directory")


@pytest.mark.parametrize("sub", ["dump", "stats", "explain", "trace"])
def test_txn_wrapped_with_wrong_frame_says_frame(sub, tmp_path, capsys, corpus_dir):
    data = (corpus_dir / "silu" / "silu_v1_a16_1_11008.bin").read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(struct.pack("<II", 0, len(data) + 100) + data)  # wrong total size
    cli_error(capsys, ["txn", sub, bad], "bad.bin", "frame", "txn.wrap()")


def test_txn_trace_bad_argv(tmp_path, capsys, corpus_dir):
    path = corpus_dir / "silu" / "silu_v1_a16_1_11008.bin"
    cli_error(capsys, ["txn", "trace", path, "--argv", "1,2,3,4,5"], "--argv", "aligned")


# --- Python API ------------------------------------------------------------------------------


def test_session_reports_unknown_and_missing_feeds_together(add_onnx):
    sess = npudispatch.Session(add_onnx)
    with pytest.raises(ModelError, match=r"unknown input name\(s\) \['Q'\] and missing.*\['X'\]"):
        sess.run(None, {"Q": np.zeros((2, 8), np.float32)})


def test_session_feeds_must_be_a_mapping(add_onnx):
    sess = npudispatch.Session(add_onnx)
    with pytest.raises(ModelError, match="feeds must be a dict"):
        sess.run(None, [np.zeros((2, 8), np.float32)])


def test_session_output_names_string_is_refused(add_onnx):
    sess = npudispatch.Session(add_onnx)
    with pytest.raises(ModelError, match=r"use \['Y'\]"):
        sess.run("Y", {"X": np.zeros((2, 8), np.float32)})


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"backend": "nonsense"}, "unknown backend"),
        ({"backend": "xrt"}, "xclbin"),
        ({"foo": 1}, "foo"),
    ],
)
def test_session_backend_errors_are_npudispatch_errors(add_onnx, kwargs, needle):
    with pytest.raises(BackendUnavailableError, match=needle):
        npudispatch.Session(add_onnx, **kwargs)


def test_session_bad_fallback_is_a_model_error(add_onnx):
    with pytest.raises(ModelError, match="fallback"):
        npudispatch.Session(add_onnx, fallback="cuda")


def test_graph_load_huge_dim_is_a_model_error(sym_onnx):
    with pytest.raises(ModelError, match="int64"):
        graph.load(sym_onnx, dims={"batch": 2**70})


def test_graph_load_directory_and_empty_file(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        graph.load(tmp_path)
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(NpuDispatchError, match="no ONNX graph"):
        graph.load(tmp_path / "e.onnx")


def test_run_refuses_dd_golden_graphs_and_says_what_they_are_for(tmp_path, capsys):
    import onnx

    from npudispatch.cli import main
    from npudispatch.examples import build_example
    from npudispatch.examples.golden import is_dd_golden

    path = tmp_path / "g6.onnx"
    onnx.save(build_example("G6"), path)
    assert is_dd_golden(onnx.load(path)) and not is_dd_golden(build_example("llama2-mlp-small"))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "golden graphs" in err and "plan and meta fidelity" in err and "0 % NPU" in err
    assert main(["example", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "plan and meta fidelity" in listing and "``" not in listing


def test_version_flag(capsys):
    from npudispatch import __version__
    from npudispatch.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"npudispatch {__version__}"
