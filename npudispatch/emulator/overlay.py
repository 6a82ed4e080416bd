"""The overlay: the virtual AIE array that runs one kernel per launch (overlay_abi.py protocol).

The shim MM2S channels feed the overlay's input FIFOs; when a launch *fires* (see
:class:`Overlay`), the params record is decoded from the params channel, operands are cut from the
operand channels in ABI channel order, the registered kernel runs, and its outputs become one
pending output stream that S2MM tasks drain in output-channel order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import pairwise
from typing import Any

import numpy as np

from npudispatch.emulator.errors import EmulatorHang, KernelContractError, KernelError
from npudispatch.errors import DeviceError, DeviceHang
from npudispatch.overlay_abi import (
    HEADER_BYTES,
    PARAMS_CHANNEL,
    Kernel,
    KernelOperandError,
    ParamsRecord,
    operand_channels,
    output_channels,
    record_size,
)
from npudispatch.txn.registers import Direction, ShimChannel


class KernelRegistry:
    """Kernel id -> callable, the plug-in point through which operators give the overlay kernels."""

    def __init__(self, kernels: dict[int, Kernel] | None = None) -> None:
        self._kernels: dict[int, Kernel] = {}
        for kid, fn in (kernels or {}).items():
            self.register(kid, fn)

    def register(self, kernel_id: int, kernel: Kernel, *, replace: bool = False) -> None:
        """Register ``kernel`` under ``kernel_id`` (a u16); refuses silent replacement."""
        if not 0 <= kernel_id < 1 << 16:
            raise ValueError(f"kernel id {kernel_id} does not fit the record's u16 field")
        if kernel_id in self._kernels and not replace:
            raise ValueError(f"kernel id {kernel_id} is already registered; pass replace=True")
        self._kernels[kernel_id] = kernel

    def get(self, kernel_id: int) -> Kernel | None:
        """The kernel for ``kernel_id`` or None."""
        return self._kernels.get(kernel_id)

    def __contains__(self, kernel_id: object) -> bool:
        return kernel_id in self._kernels

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._kernels))

    def __len__(self) -> int:
        return len(self._kernels)


_RECORD_CACHE_SIZE = 4096  # distinct params records remembered per overlay (a few per op)


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """The chunks as one array: the chunk itself when there is one (no copy)."""
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)


def _as_bytes(out: Any) -> np.ndarray:
    if isinstance(out, np.ndarray):
        return np.ascontiguousarray(out).reshape(-1).view(np.uint8)
    return np.frombuffer(bytes(out), dtype=np.uint8)


class Overlay:
    """Launch state of the virtual array: input FIFOs, the current record and pending outputs.

    Protocol decisions (documented in the package docstring):

    * MM2S tasks on the params/operand channels deliver their bytes into per-channel FIFOs.
    * A launch fires when a wait needs output bytes (or the program ends with inputs pending);
      at that moment the params FIFO must hold exactly one record and the operand FIFOs exactly
      ``sum(operand_bytes)`` bytes, otherwise :class:`DeviceHang`.
    * Outputs are served to queued S2MM tasks in output-channel order, whole tasks at a time; a
      task asking for more than remains is a short-output hang; bytes no task ever asks for are a
      surplus-output hang when the next launch fires or the program ends.
    """

    def __init__(
        self,
        num_cols: int,
        kernels: KernelRegistry,
        channels: Mapping[tuple[int, Direction, int], ShimChannel] | None = None,
    ) -> None:
        """``channels``: the caller's canonical channel objects by (col, direction, channel), so
        the two sides' lookups hit by identity (equal objects are created otherwise)."""
        self.kernels = kernels

        def own(ch: ShimChannel) -> ShimChannel:
            return ch if channels is None else channels[ch.col, ch.direction, ch.channel]

        self.inputs = [own(ch) for ch in (PARAMS_CHANNEL, *operand_channels(num_cols))]
        self.outputs = [own(ch) for ch in output_channels(num_cols)]
        self.fifos: dict[ShimChannel, list[np.ndarray]] = {ch: [] for ch in self.inputs}
        self.pending: np.ndarray | None = None
        self.pos = 0
        self.record: ParamsRecord | None = None
        self.launches = 0
        self._records: dict[bytes, ParamsRecord] = {}
        # Operand bytes land where the joined stream needs them, in one buffer kept across runs:
        # a program launches the same kernels with the same per-channel byte counts every run,
        # so the layout of launch i (channel -> (offset, size) in ABI channel order) is learnt on
        # the first run and reused; a launch that does not match it is joined as before.
        self._operand_buf = np.empty(0, dtype=np.uint8)
        self._layouts: dict[int, dict[ShimChannel, tuple[int, int]]] = {}
        self._ordinal = 0  # launch number within the current run
        self._placed: dict[ShimChannel, int] = {}
        # A launch without a learnt layout places its operand bytes in arrival order once its
        # record (hence its operand total) is known: in ABI channel order already, they need no join.
        self._arrived = 0
        self._need: int | None = None

    def start_run(self) -> None:
        """A new run begins: launch layouts are looked up from launch 0 again."""
        self._ordinal = 0
        self._placed.clear()
        self._arrived, self._need = 0, None

    def _operand_need(self) -> int | None:
        """Total operand bytes of the record waiting on the params channel (None: not complete)."""
        if self._need is None:
            params = self._stream(PARAMS_CHANNEL)
            try:
                if params.size >= HEADER_BYTES and params.size == record_size(
                    params[:HEADER_BYTES].tobytes()
                ):
                    self._need = sum(self._record(params).operand_bytes)
            except DeviceHang:
                return None  # fire() reports the bad record
        return self._need

    def slot(self, channel: ShimChannel, nbytes: int) -> np.ndarray:
        """Where an MM2S task should put its next ``nbytes`` for ``channel`` (then :meth:`feed`).

        A view into the persistent operand stream when this launch's layout is known and the
        bytes fit it, else a new array: the DMA moves every byte either way, but a repeated run
        allocates nothing proportional to the operands.
        """
        layout = self._layouts.get(self._ordinal)
        if layout is not None and channel in layout:
            offset, size = layout[channel]
            placed = self._placed.get(channel, 0)
            if placed + nbytes <= size:
                self._placed[channel] = placed + nbytes
                start = offset + placed
                return self._operand_buf[start : start + nbytes]
        elif layout is None and channel != self.inputs[0]:
            need = self._operand_need()
            if need is not None and self._arrived + nbytes <= need:
                if self._arrived == 0 and self._operand_buf.size < need:
                    self._operand_buf = np.empty(need, dtype=np.uint8)
                start, self._arrived = self._arrived, self._arrived + nbytes
                return self._operand_buf[start : start + nbytes]
        return np.empty(nbytes, dtype=np.uint8)

    def feed(self, channel: ShimChannel, data: np.ndarray) -> None:
        """Accept bytes an MM2S task streamed on ``channel``."""
        self.fifos[channel].append(data)

    def _operand_stream(self) -> np.ndarray:
        """Every operand chunk in ABI channel order, joined: in place when the launch followed
        its learnt layout, else one copy (and the layout is learnt for the next run)."""
        channels = [ch for ch in self.inputs[1:] if self.fifos[ch]]
        sizes = {ch: sum(c.size for c in self.fifos[ch]) for ch in channels}
        total = sum(sizes.values())
        offsets = np.cumsum([0, *sizes.values()]).tolist()
        self._layouts[self._ordinal] = {ch: (off, sizes[ch]) for ch, off in zip(channels, offsets)}
        if self._in_place([c for ch in channels for c in self.fifos[ch]], total):
            return self._operand_buf[:total]
        stream = _joined([c for ch in channels for c in self.fifos[ch]])
        if self._operand_buf.size < total:
            # the joined stream is a new array of exactly this size: it becomes the buffer
            fresh = stream.flags.writeable and not np.may_share_memory(stream, self._operand_buf)
            self._operand_buf = stream if fresh else np.empty(total, dtype=np.uint8)
        return stream

    def _in_place(self, chunks: list[np.ndarray], total: int) -> bool:
        """True when ``chunks`` (in ABI order) already sit end to end at the operand buffer's start,
        i.e. the buffer's first ``total`` bytes are the joined stream."""
        buf = self._operand_buf
        if total == 0 or buf.size < total:
            return False
        address = buf.ctypes.data
        for chunk in chunks:
            if chunk.base is None or chunk.ctypes.data != address:
                return False
            address += chunk.size
        return np.may_share_memory(chunks[0], buf) and address == buf.ctypes.data + total

    def has_input(self) -> bool:
        """True when some input FIFO holds bytes (a launch is waiting to fire)."""
        return any(chunks for chunks in self.fifos.values())

    @property
    def remaining(self) -> int:
        """Output bytes of the current launch not yet taken by an S2MM task."""
        return 0 if self.pending is None else self.pending.size - self.pos

    def _stream(self, channel: ShimChannel) -> np.ndarray:
        return _joined(self.fifos[channel])

    def _record(self, params: np.ndarray) -> ParamsRecord:
        """Decode the params record; the same bytes decode to the same (cached) record, since a
        program re-sends identical records every run."""
        key = params.tobytes()
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= _RECORD_CACHE_SIZE:
                self._records.clear()
            record = self._records[key] = ParamsRecord.decode(key)
        return record

    def check_drained(self, **loc: Any) -> None:
        """Raise if the current launch still has output bytes no S2MM task asked for."""
        if self.remaining:
            rec = self.record
            raise EmulatorHang(
                f"launch {self.launches - 1} (kernel {rec.kernel_id if rec else '?'}) produced "
                f"{self.pending.size} output bytes but the queued S2MM tasks took only {self.pos}; "
                f"the array would stall on the remaining {self.remaining} B (surplus output): "
                "queue S2MM tasks for every output byte",
                **loc,
            )

    def fire(self, **loc: Any) -> None:
        """Decode the record, cut operands, run the kernel and make its outputs pending."""
        self.check_drained(**loc)
        params = self._stream(self.inputs[0])
        if params.size == 0:
            raise EmulatorHang(
                f"S2MM tasks wait for kernel output but no params record arrived on {PARAMS_CHANNEL}"
                " (no launch is pending): queue the params record MM2S task first",
                **loc,
            )
        try:
            size = record_size(params[:HEADER_BYTES].tobytes())
            record = self._record(params)
        except DeviceHang as exc:
            raise EmulatorHang(str(exc), channel=PARAMS_CHANNEL, **loc) from exc
        if params.size > size:
            raise EmulatorHang(
                f"{params.size} B arrived on {PARAMS_CHANNEL} but the record is {size} B: "
                f"surplus {params.size - size} B would back-pressure the params channel forever",
                channel=PARAMS_CHANNEL,
                **loc,
            )
        # No copy once the layout is learnt, one at most before: every operand chunk in ABI
        # channel order; operands are read-only views into it.
        stream = self._operand_stream()
        need = sum(record.operand_bytes)
        if stream.size != need:
            sizes = ((ch, sum(c.size for c in self.fifos[ch])) for ch in self.inputs[1:])
            got = ", ".join(f"{ch}: {n} B" for ch, n in sizes if n) or "nothing"
            kind = "missing operand bytes" if stream.size < need else "surplus operand bytes"
            raise EmulatorHang(
                f"kernel {record.kernel_id} needs operands of {record.operand_bytes} B "
                f"(total {need} B) but the operand channels delivered {stream.size} B ({got}): "
                f"{kind}; the launch can never complete",
                **loc,
            )
        kernel = self.kernels.get(record.kernel_id)
        if kernel is None:
            known = ", ".join(map(str, self.kernels)) or "none"
            raise EmulatorHang(
                f"params record names kernel id {record.kernel_id}, which no operator registered "
                f"(registered: {known}); the overlay would wait forever: register the kernel in "
                "the KernelRegistry passed to the emulator",
                **loc,
            )
        stream = stream.view()
        stream.flags.writeable = False  # kernels get their operands read-only, as before
        bounds = np.cumsum([0, *record.operand_bytes]).tolist()
        operands = [stream[a:b] for a, b in pairwise(bounds)]
        # The array computes IEEE values and never traps: an overflow to infinity (e.g. casting
        # 3.4e38 to bf16) is a result, whatever numpy error mode the caller runs under.
        try:
            with np.errstate(all="ignore"):
                outs = [_as_bytes(o) for o in kernel(record, operands)]
        except DeviceError:
            raise
        except KernelOperandError as exc:  # the model's input values, not the program
            err = KernelError(
                f"kernel {record.kernel_id} (launch {self._ordinal} of the run) refused its "
                f"operands: {exc}",
                **loc,
            )
            err.launch, err.operands_refused = self._ordinal, True
            raise err from exc
        except Exception as exc:  # the kernel is device code: its crash is a device error
            err = KernelError(
                f"kernel {record.kernel_id} (launch {self._ordinal} of the run) failed: "
                f"{type(exc).__name__}: {exc}; its params record or operands are inconsistent",
                **loc,
            )
            err.launch = self._ordinal
            raise err from exc
        sizes = [o.size for o in outs]
        if sizes != list(record.output_bytes):
            raise KernelContractError(
                f"kernel {record.kernel_id} returned outputs of {sizes} B but its params record "
                f"declares {record.output_bytes} B: fix the kernel or the record"
            )
        if any(np.may_share_memory(o, self._operand_buf) for o in outs):
            # an output viewing its operands must survive the next launch's operand bytes
            outs = [o.copy() for o in outs]
        self.pending = _joined(outs)
        self.pos = 0
        self.record = record
        self.launches += 1
        self._ordinal += 1
        self._placed.clear()
        self._arrived, self._need = 0, None
        for chunks in self.fifos.values():
            chunks.clear()

    def take(self, nbytes: int) -> np.ndarray | None:
        """The next ``nbytes`` of pending output, or None if fewer remain."""
        if self.pending is None or self.remaining < nbytes:
            return None
        out = self.pending[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out
