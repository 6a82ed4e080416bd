"""Emulator and xrt backends (the latter on the fake pyxrt) run the same hand-built program."""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import pytest

from npudispatch.dispatch.backends import ProgramImage, get_backend
from npudispatch.dispatch.backends.xrt import XrtBackend
from npudispatch.errors import BackendUnavailableError, DeviceError, DeviceHang
from npudispatch.overlay_abi import ParamsRecord
from npudispatch.testing import CommandError, emulator_executor, install_fake_pyxrt
from npudispatch.txn import TxnBuilder
from npudispatch.txn.registers import Direction
from npudispatch.txn.shim import ShimBd

N = 256  # bytes per tensor
ADD_KERNEL = 7


def add_kernel(record, operands):
    """Overlay kernel: out = a + b (uint8, wrapping)."""
    a, b = operands
    return [a + b]


def make_program() -> ProgramImage:
    """One launch: params (buf 4) on col0 MM2S0, input (buf 0) on col0 MM2S1, const (buf 3) on
    col1 MM2S0, output to buf 1 on col0 S2MM0. Output = input + const."""
    params = ParamsRecord(ADD_KERNEL, [N, N], [N]).encode()
    b = TxnBuilder(num_cols=2)
    streams = [
        (0, Direction.MM2S, 0, 4, len(params)),
        (0, Direction.MM2S, 1, 0, N),
        (1, Direction.MM2S, 0, 3, N),
        (0, Direction.S2MM, 0, 1, N),
    ]
    for bd_id, (col, direction, ch, argidx, nbytes) in enumerate(streams):
        b.shim_bd(col, bd_id, ShimBd(length_words=nbytes // 4), argidx=argidx, argplus=0)
        b.push_task(col, direction, ch, bd_id)
    b.wait_channel_idle(0, Direction.S2MM, 0)
    const = (np.arange(N) * 3 % 251).astype(np.uint8)
    return ProgramImage(
        txn=b.build().to_bytes(),
        buffer_sizes=(N, N, 0, N, len(params)),
        const_image=const.tobytes(),
        params_image=params,
        kernels={ADD_KERNEL: add_kernel},
        name="add_const",
    )


def expected(program: ProgramImage, x: np.ndarray) -> np.ndarray:
    return x + np.frombuffer(program.const_image, np.uint8)


@pytest.fixture
def program() -> ProgramImage:
    return make_program()


@pytest.fixture
def xrt_env(xclbin_path, program):
    """The fake pyxrt with an emulator-backed device."""
    with install_fake_pyxrt(emulator_executor(program.kernels)) as mod:
        yield mod


def run_once(backend, program, x):
    prepared = backend.prepare(program)
    out = np.zeros(program.buffer_sizes[1], np.uint8)
    stats = backend.execute(prepared, x, out)
    return out, stats


def test_emulator_backend_runs_program(program):
    x = np.random.default_rng(0).integers(0, 256, N, dtype=np.uint8)
    out, stats = run_once(get_backend(), program, x)
    np.testing.assert_array_equal(out, expected(program, x))
    assert stats.kernel_calls == 1 and stats.device["kernel_launches"] == 1
    assert stats.bytes_to_device == N and stats.total_seconds > 0


@pytest.mark.parametrize("convention", ["mlir-aie", "dynamic-dispatch"])
def test_xrt_backend_on_fake_matches_emulator(xrt_env, xclbin_path, program, convention):
    x = np.random.default_rng(1).integers(0, 256, N, dtype=np.uint8)
    ref, _ = run_once(get_backend("emulator"), program, x)
    backend = get_backend("xrt", xclbin=xclbin_path, convention=convention)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, stats = run_once(backend, program, x)
    np.testing.assert_array_equal(out, ref)
    assert set(stats.stage_seconds) >= {"write_input", "sync_input", "run", "sync_output"}
    legacy = [w for w in caught if "Legacy TXN flow" in str(w.message)]
    assert bool(legacy) == (convention == "dynamic-dispatch")


def test_xrt_backend_reruns_with_new_inputs(xrt_env, xclbin_path, program):
    backend = get_backend("xrt", xclbin=xclbin_path)
    prepared = backend.prepare(program)
    for seed in range(3):
        x = np.random.default_rng(seed).integers(0, 256, N, dtype=np.uint8)
        out = np.zeros(N, np.uint8)
        backend.execute(prepared, x.tobytes(), out)
        np.testing.assert_array_equal(out, expected(program, x))


def test_skipping_the_output_sync_gives_stale_data(xrt_env, xclbin_path, program):
    class NoOutputSync(XrtBackend):
        def sync_output(self, prepared):
            pass

    x = np.full(N, 5, np.uint8)
    out, _ = run_once(NoOutputSync(xclbin_path), program, x)
    assert not out.any()  # host memory of the output BO was never refreshed
    out, _ = run_once(XrtBackend(xclbin_path), program, x)
    np.testing.assert_array_equal(out, expected(program, x))


def test_xrt_backend_without_pyxrt(monkeypatch, xclbin_path):
    monkeypatch.setitem(sys.modules, "pyxrt", None)  # makes `import pyxrt` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"setup\.sh"):
        get_backend("xrt", xclbin=xclbin_path)


def test_xrt_backend_lists_kernels_when_name_is_wrong(xrt_env, xclbin_path):
    with pytest.raises(DeviceError, match="has no kernel 'DPU'; it has 'MLIR_AIE'"):
        get_backend("xrt", xclbin=xclbin_path, kernel_name="DPU")


def test_backends_share_one_context(xclbin_path, program):
    with install_fake_pyxrt(emulator_executor(program.kernels), context_limit=1):
        a = get_backend("xrt", xclbin=xclbin_path)
        b = get_backend("xrt", xclbin=xclbin_path)  # would exceed the limit with a new context
        assert a.context is b.context
        x = np.arange(N, dtype=np.uint8)
        np.testing.assert_array_equal(run_once(b, program, x)[0], expected(program, x))


def test_failed_command_raises_device_error_with_state(xclbin_path, program):
    def firmware_rejects(call):
        raise CommandError("bad instructions")

    with install_fake_pyxrt(firmware_rejects):
        backend = get_backend("xrt", xclbin=xclbin_path)
        with pytest.raises(DeviceError, match="ERT_CMD_STATE_ERROR: the firmware rejected"):
            run_once(backend, program, np.zeros(N, np.uint8))


def test_timeout_raises_device_hang(xclbin_path, program):
    with install_fake_pyxrt(emulator_executor(program.kernels), latency_s=0.5):
        backend = get_backend("xrt", xclbin=xclbin_path, timeout_ms=20)
        with pytest.raises(DeviceHang, match="did not finish within 20 ms"):
            run_once(backend, program, np.zeros(N, np.uint8))


def test_emulator_hang_surfaces_as_timeout_on_the_fake(xclbin_path, program):
    broken = ProgramImage(
        txn=program.txn,
        buffer_sizes=program.buffer_sizes,
        const_image=program.const_image,
        params_image=program.params_image,
        kernels={},  # unknown kernel id: the overlay hangs
    )
    with install_fake_pyxrt(emulator_executor(broken.kernels)):
        backend = get_backend("xrt", xclbin=xclbin_path)
        with pytest.raises(DeviceHang, match="ERT_CMD_STATE_TIMEOUT"):
            run_once(backend, broken, np.zeros(N, np.uint8))
    with pytest.raises(DeviceHang):
        run_once(get_backend("emulator"), broken, np.zeros(N, np.uint8))


@pytest.mark.parametrize("name", ["emulator", "xrt"])
def test_execute_is_thread_safe(xrt_env, xclbin_path, program, name):
    options = {"xclbin": xclbin_path} if name == "xrt" else {}
    backend = get_backend(name, **options)
    prepared = backend.prepare(program)
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        out = np.zeros(N, np.uint8)
        for _ in range(10):
            x = rng.integers(0, 256, N, dtype=np.uint8)
            backend.execute(prepared, x, out)
            if not np.array_equal(out, expected(program, x)):
                errors.append(f"thread {seed}: wrong output")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_io_and_bad_programs_are_rejected(program):
    backend = get_backend()
    prepared = backend.prepare(program)
    with pytest.raises(DeviceError, match="input image has 3 bytes, the input buffer is 256"):
        backend.execute(prepared, b"abc", np.zeros(N, np.uint8))
    with pytest.raises(DeviceError, match="writable contiguous uint8"):
        backend.execute(prepared, bytes(N), np.zeros(N, np.float32))
    with pytest.raises(ValueError, match="const image has 512 bytes"):
        ProgramImage(txn=program.txn, buffer_sizes=(N, N, 0, N, 64), const_image=bytes(512))
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        get_backend("tpu")


def test_noop_device_measures_host_overhead(xclbin_path, program):
    with install_fake_pyxrt():  # default executor: the no-op device
        backend = get_backend("xrt", xclbin=xclbin_path)
        out, stats = run_once(backend, program, np.full(N, 1, np.uint8))
    assert not out.any()  # nothing computed, but the whole host path ran
    assert stats.bytes_to_device == N and stats.stage_seconds["run"] >= 0


def raw_call(pyxrt, xclbin_path, program, *, opcode=3, sync_instr=True):
    """Drive the fake directly, mlir-aie style, and return the final state."""
    dev = pyxrt.device(0)
    ctx = pyxrt.hw_context(dev, dev.register_xclbin(pyxrt.xclbin(str(xclbin_path))))
    k = pyxrt.kernel(ctx, "MLIR_AIE")
    ib = pyxrt.bo(dev, len(program.txn), pyxrt.bo.cacheable, k.group_id(1))
    ib.write(np.frombuffer(program.txn, np.uint8), 0)
    if sync_instr:
        ib.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
    bos = []
    for i, size in enumerate(program.buffer_sizes):
        b = pyxrt.bo(dev, max(size, 4), pyxrt.bo.host_only, k.group_id(3 + i))
        b.write(program.initial_buffer(i), 0)
        b.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
        bos.append(b)
    return k(opcode, ib, len(program.txn) // 4, *bos).wait()


def test_emulator_executor_checks_the_call_convention(xrt_env, xclbin_path, program):
    st = xrt_env.ert_cmd_state
    assert raw_call(xrt_env, xclbin_path, program) == st.ERT_CMD_STATE_COMPLETED
    assert raw_call(xrt_env, xclbin_path, program, opcode=1) == st.ERT_CMD_STATE_ERROR
    # Raw TXN sent with the legacy opcode: no 8-byte wrapper where the firmware expects one.
    with pytest.warns(DeprecationWarning, match="Legacy TXN flow"):
        assert raw_call(xrt_env, xclbin_path, program, opcode=2) == st.ERT_CMD_STATE_ERROR
    # Instructions written but never synced: the device sees zeros, not a TXN.
    assert raw_call(xrt_env, xclbin_path, program, sync_instr=False) == st.ERT_CMD_STATE_ERROR
