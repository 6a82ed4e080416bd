"""The virtual NPU: executes transaction ops against a register file, shim DMAs and the overlay.

See the package docstring for the model and the decisions it makes (when kernels fire, queue
depth, what counts as a hang or a fault).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from npudispatch.emulator.addrgen import base_byte_address, extent_words, pattern
from npudispatch.emulator.blas import KERNEL_BLAS_THREADS, limited_blas_threads
from npudispatch.emulator.dma import (
    QUEUE_DEPTH,
    ChainError,
    Task,
    Transfer,
    snapshot_chain,
)
from npudispatch.emulator.errors import EmulatorFault, EmulatorHang, EmulatorLimitError
from npudispatch.emulator.memory import (
    ADDRESS_LIMIT,
    NUM_ARGS,
    HostMemory,
    Location,
    SymbolicMemory,
    describe_arg,
)
from npudispatch.emulator.overlay import KernelRegistry, Overlay
from npudispatch.emulator.stats import RunStats
from npudispatch.errors import DeviceError
from npudispatch.txn import ops as txops
from npudispatch.txn.registers import (
    MEMTILE_ROW,
    SHIM_MM2S_TASK_QUEUE,
    SHIM_ROW,
    SHIM_S2MM_TASK_QUEUE,
    Direction,
    ShimChannel,
    decode_shim_queue,
    decode_shim_status,
    split_addr,
    tile_addr,
)
from npudispatch.txn.shim import TaskQueueEntry

NUM_ROWS = 6  # AIE2P partition: shim, memtile, 4 core rows
MAX_COLS = 32  # widest array the emulator models (AIE2P partitions use 1-8 columns)
MAX_TRANSFERS = 1_000_000
"""Default cap on BD executions one run records (``VirtualNpu(max_transfers=...)``): every
execution is kept in :attr:`VirtualNpu.transfers`, so a corrupt task repeating long BD chains
thousands of times would otherwise take minutes and gigabytes before anything is reported."""
DEV_GEN = 4
SUPPORTED_DEV_GENS = (
    3,
    4,
)  # AIE2 (phx) and AIE2P (stx): identical shim register map (docs/txn_format.md §4)

# Start-queue registers of the DMAs the emulator does not model (memtile, core tiles): a write with
# bit 31 set stands for a task that completes at once and issues a token. Values: (dir, channel).
_MEMTILE_QUEUES = {0xA0604 + 8 * n: (Direction.S2MM, n) for n in range(6)} | {
    0xA0634 + 8 * n: (Direction.MM2S, n) for n in range(6)
}
_CORE_QUEUES = {
    0x1DE04: (Direction.S2MM, 0),
    0x1DE0C: (Direction.S2MM, 1),
    0x1DE14: (Direction.MM2S, 0),
    0x1DE1C: (Direction.MM2S, 1),
}
_SHIM_QUEUES = (*SHIM_S2MM_TASK_QUEUE, *SHIM_MM2S_TASK_QUEUE)
_MEMTILE_STATUS = range(0xA0660, 0xA06A0, 4)
_CORE_STATUS = (0x1DF00, 0x1DF04, 0x1DF10, 0x1DF14)
_TOKEN_BIT = 1 << 31


def _is_lock_request(row: int, off: int) -> bool:
    if row == MEMTILE_ROW:
        return 0xD0000 <= off < 0x100000
    return 0x40000 <= off < 0x44000


_QUEUE_OFFSETS = {SHIM_ROW: _SHIM_QUEUES, MEMTILE_ROW: tuple(_MEMTILE_QUEUES)}
_CORE_QUEUE_OFFSETS = tuple(_CORE_QUEUES)
_QUEUE_SETS = {SHIM_ROW: frozenset(_SHIM_QUEUES), MEMTILE_ROW: frozenset(_MEMTILE_QUEUES)}
_CORE_QUEUE_SET = frozenset(_CORE_QUEUES)


def _queue_offsets(row: int) -> Sequence[int]:
    """Task-queue register offsets of a tile in ``row``, in the order a BLOCKWRITE serves them."""
    return _QUEUE_OFFSETS.get(row, _CORE_QUEUE_OFFSETS)


@functools.cache
def _opcode_name(code: object, kind: type) -> str:
    try:
        return txops.Opcode(code).name
    except ValueError:
        return f"CUSTOM_{code:#x}" if isinstance(code, int) else kind.__name__


def opname(op: object) -> str:
    """Opcode name of a typed op (``CUSTOM_0x86`` for unknown custom ops)."""
    return _opcode_name(getattr(op, "opcode", None), type(op))


class VirtualNpu:
    """A functional AIE2P partition (DevGen 4, 6 rows, ``num_cols`` columns) seen from DDR.

    Execution mode: ``buffers`` are the five kernel-ABI buffers (0 input, 1 output, 2 scratch,
    3 const, 4 params: arrays/bytes, or an int size for a zeroed buffer, or None for empty), mapped
    at ``argv`` (default ``(i + 1) << 40``); ``kernels`` supplies the overlay kernels. Trace mode
    (``trace=True``): no buffers, no kernels; every task completes when queued and only its
    transfers are recorded against unbounded buffers.

    The buffers are copied in (word-padded internally); read results from :attr:`buffers`.
    Registers and buffers persist across :meth:`run` calls (one call = one kernel invocation);
    :attr:`stats` and :attr:`transfers` describe the last run. A failed run resets the control
    state (:meth:`reset`); the buffers keep whatever the failed run wrote.

    ``kernel_blas_threads`` bounds OpenBLAS's threads while a program runs (restored afterwards;
    see :mod:`npudispatch.emulator.blas`): the kernels' tile-sized matrices lose more to thread
    synchronisation than they gain.
    """

    def __init__(
        self,
        buffers: Sequence[np.ndarray | bytes | bytearray | int | None] | None = None,
        *,
        num_cols: int = 4,
        argv: Sequence[int] | None = None,
        kernels: KernelRegistry | None = None,
        trace: bool = False,
        queue_depth: int = QUEUE_DEPTH,
        max_transfers: int = MAX_TRANSFERS,
        kernel_blas_threads: int = KERNEL_BLAS_THREADS,
    ) -> None:
        if not 1 <= num_cols <= MAX_COLS:
            raise ValueError(f"num_cols must be 1..{MAX_COLS}, got {num_cols}")
        self.max_transfers = max_transfers
        self.kernel_blas_threads = kernel_blas_threads
        self.num_cols = num_cols
        self.trace = trace
        self.queue_depth = queue_depth
        self.memory: HostMemory | SymbolicMemory
        if trace:
            if buffers is not None:
                raise ValueError("trace mode has no buffer contents; pass buffers=None")
            self.memory = SymbolicMemory(argv)
        else:
            self.memory = HostMemory(buffers if buffers is not None else [None] * NUM_ARGS, argv)
        self.kernels = kernels if kernels is not None else KernelRegistry()
        self.regs: dict[int, int] = {}
        self.overlay = Overlay(num_cols, self.kernels)
        self.queues: dict[ShimChannel, deque[Task]] = {}
        self.tokens: list[tuple[int, int, Direction, int]] = []
        self.reset()
        self.stats = RunStats()
        self.transfers: list[Transfer] = []
        self._op_index: int | None = None
        self._opname: str | None = None
        self._handlers: dict[type, Callable[[Any], None]] = {
            txops.Write: self._op_write,
            txops.BlockWrite: self._op_blockwrite,
            txops.MaskWrite: self._op_maskwrite,
            txops.MaskPoll: self._op_maskpoll,
            txops.MaskPollBusy: self._op_maskpoll,
            txops.DdrPatch: self._op_ddr_patch,
            txops.Tct: self._op_tct,
            txops.MergeSync: self._op_merge_sync,
        }

    # ------------------------------------------------------------------ public API
    def reset(self) -> None:
        """Return the array to its power-on control state; the five buffers are kept.

        Clears registers, task queues, pending tokens and the overlay's FIFOs and pending
        outputs, like the driver's reset of a hung context. :meth:`run` calls it when a run
        fails (hang, fault, kernel exception, interrupt), so half-consumed streams of a failed
        run never leak into the next one.
        """
        self.regs = {}
        self.overlay = Overlay(self.num_cols, self.kernels)
        self.queues = {
            ShimChannel(c, d, ch): deque()
            for c in range(self.num_cols)
            for d in (Direction.MM2S, Direction.S2MM)
            for ch in (0, 1)
        }
        self.tokens = []

    @property
    def argv(self) -> list[int]:
        """The five buffer addresses DDR_PATCH adds ``argplus`` to."""
        return list(self.memory.argv)

    @property
    def buffers(self) -> list[np.ndarray]:
        """The five argument buffers (``uint8``, real size); empty list in trace mode."""
        return self.memory.buffers if isinstance(self.memory, HostMemory) else []

    def run(self, program: Any) -> RunStats:
        """Execute a ``Transaction`` (uses ``.ops``) or a sequence of typed ops; returns stats.

        Raises :class:`~npudispatch.errors.DeviceHang` / :class:`~npudispatch.errors.DeviceFault`
        (as located :class:`EmulatorHang` / :class:`EmulatorFault`) when the program cannot
        complete or touches memory outside the buffers. Any failure resets the control state
        (:meth:`reset`), so the next run starts clean.
        """
        header = getattr(program, "header", None)
        cols = getattr(header, "num_cols", None)
        if cols is not None and cols > self.num_cols:
            raise DeviceError(
                f"transaction header asks for {cols} columns but this virtual NPU has "
                f"{self.num_cols}: create VirtualNpu(num_cols={cols})"
            )
        gen, rows = getattr(header, "dev_gen", DEV_GEN), getattr(header, "num_rows", NUM_ROWS)
        if gen not in SUPPORTED_DEV_GENS or rows != NUM_ROWS:
            raise DeviceError(
                f"transaction header is for DevGen {gen} with {rows} rows; this virtual NPU models "
                f"DevGen {DEV_GEN} (AIE2P; AIE2 DevGen 3 shares its register map) with {NUM_ROWS} rows"
            )
        ops = program.ops if hasattr(program, "ops") else program
        self.stats = RunStats()
        self.transfers = []
        launches0 = self.overlay.launches
        try:
            with limited_blas_threads(self.kernel_blas_threads):
                for index, op in enumerate(ops):
                    self._op_index, self._opname = index, opname(op)
                    handler = self._handlers.get(type(op))
                    if handler is not None:
                        handler(op)
                    self.stats.ops[self._opname] += 1
                self._op_index, self._opname = None, "end of program"
                self._finish()
        except BaseException:
            self.stats.kernel_launches = self.overlay.launches - launches0
            self.reset()  # a failed run must not leave streams behind for the next one
            raise
        else:
            self.stats.kernel_launches = self.overlay.launches - launches0
        finally:
            self._op_index, self._opname = None, None
        return self.stats

    # ------------------------------------------------------------------ helpers
    def _loc(self, **extra: Any) -> dict[str, Any]:
        return {"op_index": self._op_index, "opname": self._opname, **extra}

    def _check_reg(self, addr: int) -> tuple[int, int, int]:
        col, row, off = split_addr(addr)
        if addr >> 32 or col >= self.num_cols or row >= NUM_ROWS:
            raise EmulatorFault(
                f"register access at col {col} row {row} is outside the {self.num_cols}-column, "
                f"{NUM_ROWS}-row partition",
                **self._loc(address=addr),
            )
        return col, row, off

    def _reg(self, addr: int) -> int:
        return self.regs.get(addr, 0)

    def _store(self, addr: int, value: int) -> None:
        col, row, off = self._check_reg(addr)
        value &= 0xFFFFFFFF
        self.regs[addr] = value
        if off in _QUEUE_SETS.get(row, _CORE_QUEUE_SET):
            self._on_queue_write(col, row, off, value)

    # ------------------------------------------------------------------ op handlers
    def _op_write(self, op: txops.Write) -> None:
        self._store(op.reg_off, op.value)

    def _op_maskwrite(self, op: txops.MaskWrite) -> None:
        old = self._reg(op.reg_off)
        self._store(op.reg_off, (old & ~op.mask) | (op.value & op.mask))

    def _op_blockwrite(self, op: txops.BlockWrite) -> None:
        n = int(op.values.size)
        if n == 0:
            return
        col, row, off = self._check_reg(op.reg_off)
        self._check_reg(op.reg_off + 4 * (n - 1))
        self.regs.update(zip(range(op.reg_off, op.reg_off + 4 * n, 4), op.values.tolist()))
        for q in _queue_offsets(row):
            if off <= q < off + 4 * n:
                self._on_queue_write(col, row, q, self.regs[tile_addr(col, row, q)])

    def _op_ddr_patch(self, op: txops.DdrPatch) -> None:
        if not 0 <= op.argidx < NUM_ARGS:
            raise EmulatorFault(
                f"DDR_PATCH argidx {op.argidx} is not a kernel buffer (0..{NUM_ARGS - 1}); the "
                "firmware rejects it: re-base the op's patches",
                **self._loc(address=op.regaddr),
            )
        addr = self.memory.argv[op.argidx] + op.argplus
        if addr == 0:  # firmware skips a zero address (docs/txn_format.md §5)
            return
        if not 0 < addr < ADDRESS_LIMIT:
            raise EmulatorFault(
                f"DDR_PATCH {describe_arg(op.argidx)} + {op.argplus:#x} = {addr:#x} does not fit "
                "the 48-bit shim address",
                **self._loc(address=op.regaddr),
            )
        if addr & 3:
            # The BD address field drops bits 1:0: the DMA would silently start up to 3 bytes early.
            raise EmulatorFault(
                f"DDR_PATCH {describe_arg(op.argidx)} + {op.argplus:#x} = {addr:#x} is not 4-byte "
                "aligned; shim DMAs address 32-bit words: align the tensor placement or the patch",
                **self._loc(address=op.regaddr),
            )
        self._store(op.regaddr, addr)
        hi = self._reg(op.regaddr + 4)
        self._store(op.regaddr + 4, (hi & 0xFFFF0000) | (addr >> 32))

    def _op_maskpoll(self, op: txops.MaskPoll | txops.MaskPollBusy) -> None:
        col, row, off = self._check_reg(op.reg_off)
        status: int
        if row == SHIM_ROW and (dc := decode_shim_status(off)) is not None:
            channel = ShimChannel(col, *dc)
            self._drain(channel)
            status = 0  # idle, no error bits: every failure raised while draining
        elif _is_lock_request(row, off):
            return  # no core model: lock acquire/release requests always succeed
        elif (row == MEMTILE_ROW and off in _MEMTILE_STATUS) or (row > 1 and off in _CORE_STATUS):
            status = 0  # memtile/core DMAs are not modelled: they are idle
        else:
            status = self._reg(op.reg_off)
        if status & op.mask != op.value:
            raise EmulatorHang(
                f"poll waits for (reg & {op.mask:#010x}) == {op.value:#010x} but the register reads "
                f"{status:#010x} and nothing in the program will change it",
                **self._loc(address=op.reg_off),
            )

    def _op_tct(self, op: txops.Tct) -> None:
        direction = Direction(op.direction & 1)
        for c in range(op.col, op.col + max(op.col_count, 1)):
            for r in range(op.row, op.row + max(op.row_count, 1)):
                key = (c, r, direction, op.channel)
                if key not in self.tokens and r == SHIM_ROW and c < self.num_cols:
                    self._drain(ShimChannel(c, direction, op.channel))
                if key not in self.tokens:
                    raise EmulatorHang(
                        f"TCT waits for a task-complete token from col {c} row {r} "
                        f"{direction.name}{op.channel}, but no task queued there issues one "
                        "(set Enable_Token_Issue on the task)",
                        **self._loc(),
                    )
                self.tokens.remove(key)

    def _op_merge_sync(self, op: txops.MergeSync) -> None:
        cols = range(max(op.num_cols, 1))

        def available() -> list[int]:
            return [i for i, t in enumerate(self.tokens) if t[0] in cols]

        if len(available()) < op.num_tokens:
            for ch in self.queues:
                if ch.col in cols and ch.direction == Direction.MM2S:
                    self._drain(ch)
            for ch in self.queues:
                if ch.col in cols and ch.direction == Direction.S2MM:
                    self._drain(ch)
        got = available()
        if len(got) < op.num_tokens:
            raise EmulatorHang(
                f"MERGE_SYNC waits for {op.num_tokens} tokens from columns 0..{len(cols) - 1} but "
                f"only {len(got)} token-issuing tasks completed there",
                **self._loc(),
            )
        for i in reversed(got[: op.num_tokens]):
            del self.tokens[i]

    # ------------------------------------------------------------------ DMA tasks
    def _on_queue_write(self, col: int, row: int, off: int, value: int) -> None:
        if row == SHIM_ROW:
            dc = decode_shim_queue(off)
            assert dc is not None
            self._enqueue(ShimChannel(col, *dc), TaskQueueEntry.decode(value))
            return
        table = _MEMTILE_QUEUES if row == MEMTILE_ROW else _CORE_QUEUES
        direction, ch = table[off]
        if value & _TOKEN_BIT:  # unmodelled DMA: completes at once, issues its token
            self.tokens.append((col, row, direction, ch))
            self.stats.tokens += 1

    def _enqueue(self, channel: ShimChannel, entry: TaskQueueEntry) -> None:
        try:
            chain = snapshot_chain(self._reg, channel.col, entry.start_bd, allow_invalid=self.trace)
        except ChainError as exc:
            raise EmulatorHang(str(exc), **self._loc(channel=channel, bd=exc.bd)) from exc
        task = Task(channel, entry, chain, self._op_index if self._op_index is not None else -1)
        self.stats.tasks_by_channel[channel] += 1
        if self.trace:
            self._trace_task(task)
            return
        queue = self.queues[channel]
        if len(queue) >= self.queue_depth:
            self._make_room(channel)
        queue.append(task)

    def _make_room(self, channel: ShimChannel) -> None:
        queue = self.queues[channel]
        cause: Exception | None = None
        if channel.direction == Direction.MM2S:
            self._run_mm2s(queue.popleft())
        else:
            try:
                self._serve_outputs()
            except EmulatorHang as exc:
                cause = exc
        if len(queue) >= self.queue_depth:
            raise EmulatorHang(
                f"task queue overflow: {len(queue)} tasks already pending (depth "
                f"{self.queue_depth}) and none can finish yet"
                + (f" ({cause})" if cause else "")
                + "; wait for the channel before queueing more tasks",
                **self._loc(channel=channel),
            ) from cause

    def _finish_task(self, task: Task) -> None:
        if task.entry.issue_token:
            c = task.channel
            self.tokens.append((c.col, SHIM_ROW, c.direction, c.channel))
            self.stats.tokens += 1

    def _record(self, task: Task, bd_id: int, argidx: int | None, offset: int, nbytes: int) -> None:
        c = task.channel
        self.transfers.append(
            Transfer(c.col, c.direction, c.channel, argidx, offset, nbytes, bd_id, task.op_index)
        )
        self.stats.bytes_by_channel[c] += nbytes
        if argidx is None:
            self.stats.unresolved += 1

    def _locate(self, task: Task, bd_id: int, address: int, span: int) -> Location:
        loc = self.memory.locate(address, span)
        if loc.problem:
            raise EmulatorFault(
                f"DMA of the task queued by op #{task.op_index} {loc.problem}",
                **self._loc(channel=task.channel, bd=bd_id, address=address),
            )
        return loc

    def _bd_pattern(self, task: Task, bd_id: int, bd: Any, rep: int) -> tuple[Location, Any]:
        """Bounds-check one BD execution from its extent, then expand its address pattern.

        The extent is computed without expanding (a corrupt BD of 2^28 words must fault, not
        allocate gigabytes first); a BD moving more bytes than all device memory together is
        refused as well (it can only be a corrupt length revisiting the same words).
        """
        address = base_byte_address(bd, rep)
        loc = self._locate(task, bd_id, address, 4 * extent_words(bd))
        total = self.memory.total_bytes
        if bd.length_bytes > total:
            raise EmulatorFault(
                f"DMA of the task queued by op #{task.op_index} moves {bd.length_bytes} B, more "
                f"than all {total} B of device memory: the BD's length field is corrupt",
                **self._loc(channel=task.channel, bd=bd_id, address=address),
            )
        return loc, pattern(bd, rep)

    def _reserve(self, task: Task) -> None:
        """Refuse a task whose executions would push :attr:`transfers` past the limit."""
        executions = task.runs * len(task.chain)
        if len(self.transfers) + executions > self.max_transfers:
            raise EmulatorLimitError(
                f"the task queued by op #{task.op_index} runs {len(task.chain)} BD(s) "
                f"{task.runs} time(s); with the {len(self.transfers)} executions so far that is "
                f"more than the emulator's limit of {self.max_transfers} BD executions per run "
                "(VirtualNpu(max_transfers=...) raises it)",
                **self._loc(channel=task.channel),
            )

    def _trace_task(self, task: Task) -> None:
        # Tolerant on purpose: real transactions may use BDs programmed by control packets or
        # raw addresses; such executions are recorded with argidx None (as txn.explain does).
        self._reserve(task)
        for rep, bd_id, bd in task.executions():
            address = base_byte_address(bd, rep)
            loc = self.memory.locate(address, 0) if bd.valid else None
            if loc is None or loc.problem:
                self._record(task, bd_id, None, address, bd.length_bytes)
            else:
                self._record(task, bd_id, loc.argidx, loc.offset, bd.length_bytes)
        self._finish_task(task)

    def _run_mm2s(self, task: Task) -> None:
        assert isinstance(self.memory, HostMemory)
        self._reserve(task)
        for rep, bd_id, bd in task.executions():
            loc, pat = self._bd_pattern(task, bd_id, bd, rep)
            self.overlay.feed(task.channel, self.memory.read(loc, pat))
            self._record(task, bd_id, loc.argidx, loc.offset, bd.length_bytes)
        self._finish_task(task)

    def _run_s2mm(self, task: Task, data: np.ndarray) -> None:
        assert isinstance(self.memory, HostMemory)
        self._reserve(task)
        pos = 0
        for rep, bd_id, bd in task.executions():
            loc, pat = self._bd_pattern(task, bd_id, bd, rep)
            self.memory.write(loc, pat, data[pos : pos + bd.length_bytes])
            pos += bd.length_bytes
            self._record(task, bd_id, loc.argidx, loc.offset, bd.length_bytes)
        self._finish_task(task)

    def _drain(self, channel: ShimChannel) -> None:
        """Run what is needed until ``channel`` is idle (raises if it never can be)."""
        queue = self.queues[channel]
        if channel.direction == Direction.MM2S:
            while queue:
                self._run_mm2s(queue.popleft())
        elif queue:
            self._serve_outputs()

    def _serve_outputs(self) -> None:
        """Fire the launch if its output is needed, then serve queued S2MM tasks in ABI order."""
        outputs = self.overlay.outputs
        if self.overlay.remaining == 0 and any(self.queues[ch] for ch in outputs):
            for ch in self.overlay.inputs:
                self._drain(ch)
            self.overlay.fire(**self._loc())
        for ch in outputs:
            queue = self.queues[ch]
            while queue:
                task = queue[0]
                data = self.overlay.take(task.nbytes)
                if data is None:
                    rec = self.overlay.record
                    raise EmulatorHang(
                        f"short output: the task queued by op #{task.op_index} asks for "
                        f"{task.nbytes} B but launch {self.overlay.launches - 1} (kernel "
                        f"{rec.kernel_id if rec else '?'}) has only {self.overlay.remaining} B "
                        "left; the S2MM channel would wait forever",
                        **self._loc(channel=ch, bd=task.entry.start_bd),
                    )
                queue.popleft()
                self._run_s2mm(task, data)

    def _finish(self) -> None:
        """End of program: nothing may be left queued, unfired or undelivered."""
        if self.trace:
            return
        self.overlay.check_drained(**self._loc())
        left = [f"{ch}: {len(q)} task(s)" for ch, q in self.queues.items() if q]
        if left or self.overlay.has_input():
            fifo = [
                f"{ch}: {sum(x.size for x in v)} B" for ch, v in self.overlay.fifos.items() if v
            ]
            raise EmulatorHang(
                "the program ended with DMA work no wait covers ("
                + "; ".join(left + [f"unconsumed input {f}" for f in fifo])
                + "): the kernel call would return before it finished; add a MASKPOLL on the "
                "channel status (or a TCT) after queueing",
                **self._loc(),
            )
