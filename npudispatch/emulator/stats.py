"""Per-run counters of the virtual NPU."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from npudispatch.txn.registers import ShimChannel


@dataclass(slots=True)
class RunStats:
    """Counters of one run: ops by opcode name, bytes and tasks per shim channel, launches, tokens."""

    ops: Counter[str] = field(default_factory=Counter)
    bytes_by_channel: Counter[ShimChannel] = field(default_factory=Counter)
    tasks_by_channel: Counter[ShimChannel] = field(default_factory=Counter)
    kernel_launches: int = 0
    tokens: int = 0
    unresolved: int = 0  # trace mode: BD executions whose buffer is unknown (argidx None)

    @property
    def tasks(self) -> int:
        """Shim DMA tasks queued in total."""
        return sum(self.tasks_by_channel.values())

    @property
    def bytes_moved(self) -> int:
        """Bytes moved by all shim DMAs."""
        return sum(self.bytes_by_channel.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (channels as ``'col 0 MM2S1'`` strings)."""
        return {
            "ops": dict(sorted(self.ops.items())),
            "bytes_by_channel": {
                str(c): n for c, n in sorted(self.bytes_by_channel.items(), key=_ck)
            },
            "tasks_by_channel": {
                str(c): n for c, n in sorted(self.tasks_by_channel.items(), key=_ck)
            },
            "tasks": self.tasks,
            "bytes_moved": self.bytes_moved,
            "kernel_launches": self.kernel_launches,
            "tokens": self.tokens,
            "unresolved": self.unresolved,
        }


def _ck(item: tuple[ShimChannel, int]) -> tuple[int, int, int]:
    c = item[0]
    return (c.col, -int(c.direction), c.channel)
