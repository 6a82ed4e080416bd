"""Functional emulator of an AIE2P NPU partition that executes transaction binaries.

The virtual NPU (:class:`VirtualNpu`) is DevGen 4, 6 rows, ``num_cols`` columns (default 4), seen
from DDR (docs/overlay_abi.md, docs/txn_format.md §4, §5, §9):

* **Registers**: WRITE / BLOCKWRITE / MASKWRITE update a dict of u32 registers (partition-relative
  addresses; an address outside the partition is a :class:`DeviceFault`).
* **Buffers**: the five kernel-ABI buffers (0 input, 1 output, 2 scratch, 3 const, 4 params) live at
  ``argv`` (default ``(i + 1) << 40``). DDR_PATCH writes ``argv[argidx] + argplus`` into BD words
  1/2 (docs/txn_format.md §5); argidx > 4 is a fault.
* **Shim DMA**: a write to a shim task-queue register snapshots the BD chain at that moment; a BD
  with Valid_BD = 0 or a looping chain is a hang. Addresses follow docs/txn_format.md §9 exactly (d0/d1/d2,
  iteration, chaining, repeat count), generated with numpy broadcasting. Every BD execution is
  bounds-checked against the buffer it lands in (:class:`DeviceFault` naming op, column, channel,
  BD, address and buffer) and recorded as a :class:`Transfer`.
* **Queue depth**: 4 pending tasks per channel (:data:`QUEUE_DEPTH`); a fifth first tries to let the
  channel progress, then is a task-queue-overflow :class:`DeviceHang`.
* **Overlay** (overlay_abi.py): MM2S tasks run lazily, when a wait needs them or the launch fires,
  and feed per-channel FIFOs. A launch *fires* when a wait needs output (a MASKPOLL on an S2MM
  status register with tasks queued, a TCT/MERGE_SYNC for such a channel, or a full S2MM queue):
  all queued MM2S tasks of the params/operand channels run, the params FIFO must hold exactly one
  record and the operand FIFOs exactly ``sum(operand_bytes)`` bytes (in ABI channel order); the
  kernel from the :class:`KernelRegistry` runs (unknown id = hang). Its outputs are served to the
  S2MM tasks queued on the output channels, in ABI channel order, whole tasks at a time: the output
  request count is the bytes of those tasks (repeats included). A task asking for more than remains
  is a short-output hang; output no task takes is a surplus hang at the next launch or at the end.
  When every output byte is taken the launch is complete and the overlay is ready for the next one
  (fused programs run launch after launch).
* **Waits**: MASKPOLL on a shim status register drains that channel, then the register reads 0;
  memtile/core status registers read 0 (not modelled); lock-request addresses succeed; any other
  poll whose condition does not hold now is a hang (nothing else will change the register).
  TCT and MERGE_SYNC consume task-complete tokens, issued by shim tasks queued with
  Enable_Token_Issue (and by memtile/core start-queue writes with bit 31, which complete at once);
  a missing token is a hang. Other ops (NOOP, PREEMPT, RECORD_TIMER, READ_REGS, LOAD_PM_START,
  unknown custom ops...) are accepted and counted.
* **End of program**: queued tasks, unconsumed input or undelivered output left over is a hang
  (the kernel call would return before the DMA finished).
* **Trace mode** (:func:`trace_transaction`, ``VirtualNpu(trace=True)``): no buffers or kernels;
  tasks complete when queued against unbounded buffers; only transfers and stats are produced.
"""

from npudispatch.emulator.addrgen import WordPattern, base_byte_address, pattern, word_offsets
from npudispatch.emulator.device import VirtualNpu
from npudispatch.emulator.dma import QUEUE_DEPTH, Task, Transfer
from npudispatch.emulator.errors import EmulatorFault, EmulatorHang, KernelContractError
from npudispatch.emulator.memory import HostMemory, SymbolicMemory, default_argv
from npudispatch.emulator.overlay import Kernel, KernelRegistry, Overlay
from npudispatch.emulator.stats import RunStats
from npudispatch.emulator.trace import TraceResult, trace_transaction

__all__ = [
    "QUEUE_DEPTH",
    "EmulatorFault",
    "EmulatorHang",
    "HostMemory",
    "Kernel",
    "KernelContractError",
    "KernelRegistry",
    "Overlay",
    "RunStats",
    "SymbolicMemory",
    "Task",
    "TraceResult",
    "Transfer",
    "VirtualNpu",
    "WordPattern",
    "base_byte_address",
    "default_argv",
    "pattern",
    "trace_transaction",
    "word_offsets",
]
