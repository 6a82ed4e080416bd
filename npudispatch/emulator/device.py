"""The virtual NPU: executes transaction ops against a register file, shim DMAs and the overlay.

See the package docstring for the model and the decisions it makes (when kernels fire, queue
depth, what counts as a hang or a fault).
"""

from __future__ import annotations

import functools
import operator
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from npudispatch.emulator.blas import KERNEL_BLAS_THREADS, limited_blas_threads
from npudispatch.emulator.dma import (
    QUEUE_DEPTH,
    Task,
    Transfer,
)
from npudispatch.emulator.errors import EmulatorFault, EmulatorHang
from npudispatch.emulator.memory import (
    ADDRESS_LIMIT,
    NUM_ARGS,
    HostMemory,
    Location,
    SymbolicMemory,
    describe_arg,
)
from npudispatch.emulator.overlay import KernelRegistry, Overlay
from npudispatch.emulator.prepared import PreparedProgram, prepare_program
from npudispatch.emulator.regmap import (
    NUM_ROWS,
    is_idle_status,
    is_lock_request,
    is_queue_register,
    queue_offsets,
)
from npudispatch.emulator.shim_tasks import ShimTasks
from npudispatch.emulator.stats import RunStats
from npudispatch.errors import DeviceError
from npudispatch.txn import ops as txops
from npudispatch.txn.registers import (
    SHIM_NUM_BDS,
    SHIM_ROW,
    Direction,
    ShimChannel,
    decode_shim_status,
    shim_bd_addr,
    split_addr,
    tile_addr,
)
from npudispatch.txn.shim import TaskQueueEntry

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


@functools.cache
def _opcode_name(code: object, kind: type) -> str:
    try:
        return txops.Opcode(code).name
    except ValueError:
        return f"CUSTOM_{code:#x}" if isinstance(code, int) else kind.__name__


def opname(op: object) -> str:
    """Opcode name of a typed op (``CUSTOM_0x86`` for unknown custom ops)."""
    return _opcode_name(getattr(op, "opcode", None), type(op))


class VirtualNpu(ShimTasks):
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
        # One ShimChannel object per channel: dict lookups then hit by identity.
        self._channels = {
            (c, d, ch): ShimChannel(c, d, ch)
            for c in range(num_cols)
            for d in (Direction.MM2S, Direction.S2MM)
            for ch in (0, 1)
        }
        # Word addresses of every shim BD, for snapshotting chains straight from the register file.
        self._bd_words = {
            (c, bd): tuple(shim_bd_addr(c, bd) + 4 * k for k in range(8))
            for c in range(num_cols)
            for bd in range(SHIM_NUM_BDS)
        }
        self._bd_getters = {
            key: operator.itemgetter(*words) for key, words in self._bd_words.items()
        }
        # Bounds-checked (location, word pattern, bytes) of each BD execution, by BD and repeat.
        self._executions: dict[tuple[int, int], tuple[Any, tuple[Location, Any, int]]] = {}
        self.overlay = Overlay(num_cols, self.kernels, self._channels)
        self.queues: dict[ShimChannel, deque[Task]] = {}
        self._queue_of: dict[int, deque[Task]] = {}  # by id() of the canonical channel object
        self._output_queues: list[deque[Task]] = []  # the overlay's output channels' queues
        # Per-run counters by channel position (a ShimChannel hash is two Python calls): folded
        # into stats.tasks_by_channel / bytes_by_channel when the run ends (None = no bytes).
        self._channel_index = {id(ch): i for i, ch in enumerate(self._channels.values())}
        self._task_counts: list[int] = []
        self._byte_counts: list[int | None] = []
        self.tokens: list[tuple[int, int, Direction, int]] = []
        self.reset()
        self.stats = RunStats()
        # BD executions of the last run as Transfer field tuples; Transfer objects are built
        # when :attr:`transfers` is read.
        self._rows: list[tuple] = []
        self._transfers: list[Transfer] | None = None
        self._op_index: int | None = None
        self._opname: str | None = None
        self._names: Sequence[str] = ()
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
        self.overlay = Overlay(self.num_cols, self.kernels, self._channels)
        self.queues = {ch: deque() for ch in self._channels.values()}
        self._queue_of = {id(ch): q for ch, q in self.queues.items()}
        self._output_queues = [self._queue_of[id(ch)] for ch in self.overlay.outputs]
        self.tokens = []

    def channel(self, col: int, direction: Direction, channel: int) -> ShimChannel:
        """The canonical :class:`ShimChannel` object of (col, direction, channel)."""
        return self._channels[col, direction, channel]

    @property
    def transfers(self) -> list[Transfer]:
        """Every BD execution of the last run, in order (:class:`Transfer` records)."""
        if self._transfers is None:
            self._transfers = [Transfer(*row) for row in self._rows]
        return self._transfers

    @property
    def argv(self) -> list[int]:
        """The five buffer addresses DDR_PATCH adds ``argplus`` to."""
        return list(self.memory.argv)

    @property
    def buffers(self) -> list[np.ndarray]:
        """The five argument buffers (``uint8``, real size); empty list in trace mode."""
        return self.memory.buffers if isinstance(self.memory, HostMemory) else []

    def prepare(self, program: Any) -> PreparedProgram:
        """Decode a ``Transaction`` (or a sequence of typed ops) once for many :meth:`run` calls.

        Checks the header against this virtual NPU and works out each op's static half
        (:mod:`npudispatch.emulator.prepared`); the ops are snapshotted, so prepare again after
        editing them. Raises :class:`~npudispatch.errors.DeviceError` for a header this NPU cannot
        run.
        """
        if isinstance(program, PreparedProgram):
            return program
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
        ops = list(program.ops if hasattr(program, "ops") else program)
        return prepare_program(self, ops, [opname(op) for op in ops])

    def run(self, program: Any) -> RunStats:
        """Execute a :class:`PreparedProgram` from :meth:`prepare`, a ``Transaction`` (uses
        ``.ops``) or a sequence of typed ops; returns stats.

        Raises :class:`~npudispatch.errors.DeviceHang` / :class:`~npudispatch.errors.DeviceFault`
        (as located :class:`EmulatorHang` / :class:`EmulatorFault`) when the program cannot
        complete or touches memory outside the buffers. Any failure resets the control state
        (:meth:`reset`), so the next run starts clean.
        """
        with limited_blas_threads(self.kernel_blas_threads):
            return self._run(self.prepare(program))

    def _run(self, prepared: PreparedProgram) -> RunStats:
        if prepared.npu_id != id(self):
            raise DeviceError("the program was prepared by another VirtualNpu: prepare it here")
        self.stats = RunStats()
        self._rows, self._transfers = [], None
        self._task_counts = [0] * len(self._channels)
        self._byte_counts = [None] * len(self._channels)
        self._names = prepared.names
        launches0 = self.overlay.launches
        self.overlay.start_run()
        index = 0
        try:
            for index, (handler, arg) in enumerate(prepared.steps):
                self._op_index = index
                handler(arg)
            index = len(prepared.steps)
            self._op_index, self._opname = None, "end of program"
            self._finish()
        except BaseException:
            self.stats.ops.update(prepared.names[:index])  # the ops that completed
            self.stats.kernel_launches = self.overlay.launches - launches0
            self.reset()  # a failed run must not leave streams behind for the next one
            raise
        else:
            self.stats.ops.update(prepared.counts)
            self.stats.kernel_launches = self.overlay.launches - launches0
        finally:
            self._op_index, self._opname = None, None
            self._count_channels()
        return self.stats

    def _count_channels(self) -> None:
        """Fold the run's per-channel counters into :attr:`stats`."""
        tasks, moved = self.stats.tasks_by_channel, self.stats.bytes_by_channel
        for ch, n, nbytes in zip(self._channels.values(), self._task_counts, self._byte_counts):
            if n:
                tasks[ch] += n
            if nbytes is not None:
                moved[ch] += nbytes

    # ------------------------------------------------------------------ helpers
    def _loc(self, **extra: Any) -> dict[str, Any]:
        name = self._opname
        if name is None and self._op_index is not None:
            name = self._names[self._op_index]
        return {"op_index": self._op_index, "opname": name, **extra}

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

    def _bd_reader(self, col: int, bd_id: int) -> tuple[int, ...]:
        """The 8 register words of shim BD ``bd_id`` in column ``col`` (0 if never written)."""
        try:
            return self._bd_getters[col, bd_id](self.regs)
        except KeyError:
            get = self.regs.get
            return tuple([get(a, 0) for a in self._bd_words[col, bd_id]])

    def _store(self, addr: int, value: int) -> None:
        col, row, off = self._check_reg(addr)
        value &= 0xFFFFFFFF
        self.regs[addr] = value
        if is_queue_register(row, off):
            self._on_queue_write(col, row, off, value)

    # ------------------------------------------------------------------ prepared steps
    # The run-time half of ops whose static checks passed in prepare (see emulator.prepared).

    def _step_store(self, arg: tuple[int, int]) -> None:
        self.regs[arg[0]] = arg[1]

    def _step_store_enqueue(self, arg: tuple[int, int, ShimChannel, TaskQueueEntry]) -> None:
        addr, value, channel, entry = arg
        self.regs[addr] = value
        self._enqueue(channel, entry)

    def _step_blockwrite(self, arg: tuple[dict[int, int], tuple[tuple, ...]]) -> None:
        items, actions = arg
        self.regs.update(items)
        for channel, entry in actions:
            self._enqueue(channel, entry)

    def _step_ddr_patch(self, op: txops.DdrPatch) -> None:
        # argidx/argplus are read from the op now: runtime patch sites rewrite argplus per run.
        if not 0 <= op.argidx < NUM_ARGS:
            self._op_ddr_patch(op)  # raises the located fault
            return
        addr = self.memory.argv[op.argidx] + op.argplus
        if addr == 0:  # firmware skips a zero address (docs/txn_format.md §5)
            return
        if not 0 < addr < ADDRESS_LIMIT or addr & 3:
            self._op_ddr_patch(op)  # raises the located fault
            return
        regs = self.regs
        regs[op.regaddr] = addr & 0xFFFFFFFF
        hi = op.regaddr + 4
        regs[hi] = (regs.get(hi, 0) & 0xFFFF0000) | (addr >> 32)

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
        for q in queue_offsets(row):
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
            self._drain(self.channel(col, *dc))
            status = 0  # idle, no error bits: every failure raised while draining
        elif is_lock_request(row, off):
            return  # no core model: lock acquire/release requests always succeed
        elif is_idle_status(row, off):
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
                    self._drain(self.channel(c, direction, op.channel))
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
