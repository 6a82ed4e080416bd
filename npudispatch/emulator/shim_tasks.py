"""The shim DMA side of the virtual NPU: task queues, BD chains executed through the address
generator, MM2S reads fed to the overlay and S2MM writes of what it produced.

:class:`ShimTasks` is a part of :class:`~npudispatch.emulator.device.VirtualNpu` (its base
class), kept in its own module so each file has one job: ``device`` executes transaction ops
against the register file, this module runs the DMA work those ops queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from npudispatch.emulator.addrgen import base_byte_address, extent_words, pattern
from npudispatch.emulator.dma import ChainError, Task, decode_bd, snapshot_chain
from npudispatch.emulator.errors import EmulatorFault, EmulatorHang, EmulatorLimitError
from npudispatch.emulator.memory import HostMemory, Location
from npudispatch.emulator.regmap import CORE_QUEUES, MEMTILE_QUEUES, TOKEN_BIT
from npudispatch.txn.registers import (
    MEMTILE_ROW,
    SHIM_ROW,
    Direction,
    ShimChannel,
    decode_shim_queue,
)
from npudispatch.txn.shim import TaskQueueEntry

if TYPE_CHECKING:
    from npudispatch.emulator.memory import SymbolicMemory
    from npudispatch.emulator.overlay import Overlay
    from npudispatch.emulator.stats import RunStats

__all__ = ["ShimTasks"]

EXECUTIONS_LIMIT = 1 << 14  # checked BD executions remembered per virtual NPU


class ShimTasks:
    """Queues and runs shim DMA tasks for the virtual NPU (state lives on the VirtualNpu)."""

    memory: HostMemory | SymbolicMemory
    overlay: Overlay
    stats: RunStats
    trace: bool
    queue_depth: int
    max_transfers: int
    tokens: list[tuple[int, int, Direction, int]]
    _queue_of: dict[int, deque[Task]]
    _output_queues: list[deque[Task]]
    _channel_index: dict[int, int]
    _task_counts: list[int]
    _byte_counts: list[int | None]
    _rows: list[tuple]
    _executions: dict[tuple[int, int], tuple[Any, tuple[Location, Any, int]]]
    _op_index: int | None

    # provided by VirtualNpu
    channel: Callable[[int, Direction, int], ShimChannel]
    _loc: Callable[..., dict[str, Any]]
    _bd_reader: Callable[[int, int], tuple[int, ...]]

    def _on_queue_write(self, col: int, row: int, off: int, value: int) -> None:
        if row == SHIM_ROW:
            dc = decode_shim_queue(off)
            assert dc is not None
            self._enqueue(self.channel(col, *dc), TaskQueueEntry.decode(value))
            return
        table = MEMTILE_QUEUES if row == MEMTILE_ROW else CORE_QUEUES
        direction, ch = table[off]
        if value & TOKEN_BIT:  # unmodelled DMA: completes at once, issues its token
            self.tokens.append((col, row, direction, ch))
            self.stats.tokens += 1

    def _enqueue(self, channel: ShimChannel, entry: TaskQueueEntry) -> None:
        bd = decode_bd(self._bd_reader(channel.col, entry.start_bd))
        if bd.valid and not bd.use_next_bd:  # a one-BD chain (the common case), as snapshot_chain
            chain = [(entry.start_bd, bd)]
        else:
            try:
                chain = snapshot_chain(
                    self._bd_reader, channel.col, entry.start_bd, allow_invalid=self.trace
                )
            except ChainError as exc:
                raise EmulatorHang(str(exc), **self._loc(channel=channel, bd=exc.bd)) from exc
        task = Task(channel, entry, chain, self._op_index if self._op_index is not None else -1)
        self._task_counts[self._channel_index[id(channel)]] += 1
        if self.trace:
            self._trace_task(task)
            return
        queue = self._queue_of[id(channel)]
        if len(queue) >= self.queue_depth:
            self._make_room(channel)
        queue.append(task)

    def _make_room(self, channel: ShimChannel) -> None:
        queue = self._queue_of[id(channel)]
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
        self._rows.append(
            (c.col, c.direction, c.channel, argidx, offset, nbytes, bd_id, task.op_index)
        )
        if argidx is None:
            self.stats.unresolved += 1

    def _count_bytes(self, channel: ShimChannel, nbytes: int) -> None:
        i = self._channel_index[id(channel)]
        before = self._byte_counts[i]
        self._byte_counts[i] = nbytes if before is None else before + nbytes

    def _locate(self, task: Task, bd_id: int, address: int, span: int) -> Location:
        loc = self.memory.locate(address, span)
        if loc.problem:
            raise EmulatorFault(
                f"DMA of the task queued by op #{task.op_index} {loc.problem}",
                **self._loc(channel=task.channel, bd=bd_id, address=address),
            )
        return loc

    def _bd_pattern(self, task: Task, bd_id: int, bd: Any, rep: int) -> tuple[Location, Any, int]:
        """Bounds-check one BD execution from its extent, then expand its address pattern;
        returns the location, the word pattern and the bytes moved.

        The extent is computed without expanding (a corrupt BD of 2^28 words must fault, not
        allocate gigabytes first); a BD moving more bytes than all device memory together is
        refused as well (it can only be a corrupt length revisiting the same words). A checked
        execution is remembered by BD object and repeat: programs re-queue the same BDs (shared
        by :func:`~npudispatch.emulator.dma.decode_bd`) every run, and the buffers never move.
        """
        key = (id(bd), rep)
        known = self._executions.get(key)
        if known is not None and known[0] is bd:
            return known[1]
        address = base_byte_address(bd, rep)
        loc = self._locate(task, bd_id, address, 4 * extent_words(bd))
        total = self.memory.total_bytes
        if bd.length_bytes > total:
            raise EmulatorFault(
                f"DMA of the task queued by op #{task.op_index} moves {bd.length_bytes} B, more "
                f"than all {total} B of device memory: the BD's length field is corrupt",
                **self._loc(channel=task.channel, bd=bd_id, address=address),
            )
        checked = (loc, pattern(bd, rep), bd.length_bytes)
        if len(self._executions) >= EXECUTIONS_LIMIT:
            self._executions.clear()
        self._executions[key] = (bd, checked)
        return checked

    def _reserve(self, task: Task) -> None:
        """Refuse a task whose executions would push :attr:`transfers` past the limit."""
        executions = (task.entry.repeat_count + 1) * len(task.chain)
        if len(self._rows) + executions > self.max_transfers:
            raise EmulatorLimitError(
                f"the task queued by op #{task.op_index} runs {len(task.chain)} BD(s) "
                f"{task.runs} time(s); with the {len(self._rows)} executions so far that is "
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
            self._count_bytes(task.channel, bd.length_bytes)
        self._finish_task(task)

    def _run_mm2s(self, task: Task) -> None:
        memory = self.memory
        assert isinstance(memory, HostMemory)
        self._reserve(task)
        moved, done = 0, 0
        try:
            for rep in range(task.entry.repeat_count + 1):
                for bd_id, bd in task.chain:
                    loc, pat, nbytes = self._bd_pattern(task, bd_id, bd, rep)
                    slot = self.overlay.slot(task.channel, nbytes)
                    self.overlay.feed(task.channel, memory.read(loc, pat, out=slot))
                    self._record(task, bd_id, loc.argidx, loc.offset, nbytes)
                    moved, done = moved + nbytes, done + 1
        finally:
            if done:  # counted per task, not per BD execution
                self._count_bytes(task.channel, moved)
        self._finish_task(task)

    def _run_s2mm(self, task: Task, data: np.ndarray) -> None:
        memory = self.memory
        assert isinstance(memory, HostMemory)
        self._reserve(task)
        pos, done = 0, 0
        try:
            for rep in range(task.entry.repeat_count + 1):
                for bd_id, bd in task.chain:
                    loc, pat, nbytes = self._bd_pattern(task, bd_id, bd, rep)
                    memory.write(loc, pat, data[pos : pos + nbytes])
                    self._record(task, bd_id, loc.argidx, loc.offset, nbytes)
                    pos, done = pos + nbytes, done + 1
        finally:
            if done:
                self._count_bytes(task.channel, pos)
        self._finish_task(task)

    def _drain(self, channel: ShimChannel) -> None:
        """Run what is needed until ``channel`` is idle (raises if it never can be)."""
        queue = self._queue_of[id(channel)]
        if channel.direction == Direction.MM2S:
            while queue:
                self._run_mm2s(queue.popleft())
        elif queue:
            self._serve_outputs()

    def _serve_outputs(self) -> None:
        """Fire the launch if its output is needed, then serve queued S2MM tasks in ABI order."""
        if self.overlay.remaining == 0 and any(self._output_queues):
            for ch in self.overlay.inputs:
                self._drain(ch)
            self.overlay.fire(**self._loc())
        for ch, queue in zip(self.overlay.outputs, self._output_queues):
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
