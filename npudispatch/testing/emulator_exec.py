"""Fake-``pyxrt`` executor that runs the instruction buffer on the functional emulator.

It decodes the call the way the NPU firmware would (docs/architecture.md §7): arg 0 opcode (3 = raw TXN,
2 = legacy 8-byte-wrapped TXN with a one-time deprecation warning, anything else -> ERROR), arg 1 the
cacheable instruction BO, arg 2 its size in 32-bit words (bytes tolerated, as the firmware reads
the TXN size), args 3..7 the five host_only data BOs. The emulator works on the BOs' *device*
memory, so data the host did not sync is simply not there.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from npudispatch.errors import DeviceHang
from npudispatch.testing.fake_pyxrt import CommandError, KernelCall, bo, ert_cmd_state

WRAPPER = struct.Struct("<II")  # docs/txn_format.md §7: {u32 type = 0, u32 TxnSize + 8}
TXN_HEADER_BYTES = 16
DEPRECATION = (
    "Legacy TXN flow is deprecated. Please migrate to the TXN flow with upgraded xclbin/ELF."
)


class EmulatorExecutor:
    """Callable executor; ``last_stats`` holds the emulator statistics of the latest command."""

    def __init__(self, kernels: Mapping[int, Callable[..., Any]]) -> None:
        self.kernels = kernels
        self.last_stats: dict[str, Any] = {}
        self.commands = 0
        self._warned_legacy = False

    def decode_instructions(self, call: KernelCall) -> bytes:
        """The plain transaction the firmware would execute for ``call`` (raises CommandError)."""
        opcode = call.scalar(0)
        if opcode not in (2, 3):
            raise CommandError(f"opcode {opcode} is not a TXN opcode (3 raw TXN, 2 legacy wrapped)")
        ib = call.buffer(1)
        if ib is None or ib.bo._flags is not bo.flags.cacheable:
            raise CommandError("arg 1 must be the cacheable instruction BO (group_id(1))")
        instr = bytes(ib.view)
        if opcode == 2:
            if not self._warned_legacy:
                warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)
                self._warned_legacy = True
            kind, total = WRAPPER.unpack_from(instr) if len(instr) >= 8 else (-1, 0)
            if kind != 0 or not 8 + TXN_HEADER_BYTES <= total <= len(instr):
                raise CommandError(
                    f"opcode 2 expects an 8-byte TRANSACTION_OP wrapper; got type {kind}, size {total}"
                )
            instr = instr[8:total]
        if len(instr) < TXN_HEADER_BYTES:
            raise CommandError("instruction BO is shorter than a TXN header")
        major, minor = instr[0], instr[1]
        (txn_size,) = struct.unpack_from("<I", instr, 12)
        if (major, minor) not in ((0, 1), (1, 0)) or not TXN_HEADER_BYTES <= txn_size <= len(instr):
            raise CommandError(
                f"instruction BO holds no valid TXN header (version {major}.{minor}, size "
                f"{txn_size}, BO {len(instr)} B): was it written and synced TO_DEVICE?"
            )
        ninstr = call.scalar(2)
        if ninstr * 4 < txn_size and ninstr < txn_size:
            raise CommandError(f"ninstr {ninstr} is smaller than the TXN ({txn_size} bytes)")
        return instr[:txn_size]

    def __call__(self, call: KernelCall) -> ert_cmd_state | None:
        from npudispatch.dispatch.backends.emulator import run_on_emulator

        txn = self.decode_instructions(call)
        buffers, argv, views = [], [], []
        for i in range(5):
            arg = call.buffer(3 + i)
            if arg is None:  # slot left 0: any DMA to this buffer faults
                buffers.append(np.zeros(0, dtype=np.uint8))
                argv.append((i + 1) << 40)
                views.append(None)
                continue
            if arg.bo._flags is not bo.flags.host_only:
                raise CommandError(f"data BO at arg {3 + i} is not host_only")
            view = np.frombuffer(arg.view, dtype=np.uint8)
            buffers.append(view.copy())
            argv.append(arg.bo.address())
            views.append(view)
        try:
            self.last_stats = run_on_emulator(txn, buffers, self.kernels, argv=argv)
        except DeviceHang as exc:
            raise CommandError(str(exc), ert_cmd_state.ERT_CMD_STATE_TIMEOUT) from exc
        for view, data in zip(views, buffers):
            if view is not None:
                view[:] = data  # the device wrote its memory
        self.commands += 1
        return None


def emulator_executor(kernels: Mapping[int, Callable[..., Any]]) -> EmulatorExecutor:
    """An executor running commands on :mod:`npudispatch.emulator` with overlay ``kernels``."""
    return EmulatorExecutor(kernels)
