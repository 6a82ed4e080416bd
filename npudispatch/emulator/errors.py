"""Located device errors: :class:`DeviceHang` / :class:`DeviceFault` with the place they happened.

The emulator raises these subclasses so callers can read *where* a program went wrong (op index,
channel, BD, address) as fields, while ``except DeviceHang`` / ``except DeviceFault`` keep working.
"""

from __future__ import annotations

from npudispatch.errors import DeviceError, DeviceFault, DeviceHang
from npudispatch.txn.registers import ShimChannel


class _Located:
    """Mixin: fields naming where the problem surfaced, and a message prefix built from them.

    Listed before the :class:`DeviceError` subclass so its ``__init__`` runs first and hands the
    prefixed message on to the exception.
    """

    op_index: int | None
    channel: ShimChannel | None
    bd: int | None
    address: int | None

    def __init__(
        self,
        message: str,
        *,
        op_index: int | None = None,
        opname: str | None = None,
        channel: ShimChannel | None = None,
        bd: int | None = None,
        address: int | None = None,
    ) -> None:
        self.op_index, self.channel, self.bd, self.address = op_index, channel, bd, address
        parts = []
        if op_index is not None:
            parts.append(f"op #{op_index}" + (f" ({opname})" if opname else ""))
        elif opname:
            parts.append(opname)
        if channel is not None:
            parts.append(str(channel))
        if bd is not None:
            parts.append(f"BD {bd}")
        if address is not None:
            parts.append(f"address {address:#x}")
        super().__init__((", ".join(parts) + ": " if parts else "") + message)


class EmulatorHang(_Located, DeviceHang):
    """A wait that can never complete on the virtual NPU; ``op_index``/``channel``/``bd`` say where."""


class EmulatorFault(_Located, DeviceFault):
    """A DMA or patch touched an address outside every argument buffer (or an invalid argidx)."""


class KernelContractError(DeviceError):
    """An overlay kernel returned outputs that do not match its params record."""


class KernelError(_Located, DeviceError):
    """An overlay kernel raised while running a launch (e.g. on a corrupt params record).

    The original exception is chained (``__cause__``); the virtual NPU is reset afterwards.
    ``launch`` is the launch's number within the run (the program's op index, None when not
    known) and ``operands_refused`` says the kernel refused its operand values
    (:class:`~npudispatch.overlay_abi.KernelOperandError`): the model's inputs are at fault.
    """

    launch: int | None = None
    operands_refused: bool = False


class EmulatorLimitError(_Located, DeviceError):
    """A program would make the emulator exceed one of its documented resource limits
    (e.g. :data:`npudispatch.emulator.device.MAX_TRANSFERS` recorded BD executions)."""
