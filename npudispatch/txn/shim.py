"""Typed shim DMA buffer descriptors and task-queue words (docs/txn_format.md §4).

:class:`ShimBd` holds every field of the 8-word AIE2/AIE2P shim BD in *logical* units (strides and
iteration wrap as counts, not minus-one encodings) and encodes/decodes them bit-exactly. Bits no
field covers are kept in ``spare`` so ``ShimBd.decode(w).encode() == w`` for any eight words.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from npudispatch.txn.registers import (
    TASK_QUEUE_REPEAT_MASK,
    TASK_QUEUE_REPEAT_SHIFT,
    TASK_QUEUE_START_BD_MASK,
    TASK_QUEUE_TOKEN_BIT,
)

# (word, low bit, width) of every field; logical = encoded + bias for the "minus one" fields.
_FIELDS: dict[str, tuple[int, int, int]] = {
    "length_words": (0, 0, 32),
    "addr_low": (1, 2, 30),
    "addr_high": (2, 0, 16),
    "packet_type": (2, 16, 3),
    "packet_id": (2, 19, 5),
    "out_of_order_bd_id": (2, 24, 6),
    "enable_packet": (2, 30, 1),
    "d0_step": (3, 0, 20),
    "d0_wrap": (3, 20, 10),
    "secure_access": (3, 30, 1),
    "d1_step": (4, 0, 20),
    "d1_wrap": (4, 20, 10),
    "burst_length": (4, 30, 2),
    "d2_step": (5, 0, 20),
    "axqos": (5, 20, 4),
    "axcache": (5, 24, 4),
    "smid": (5, 28, 4),
    "iteration_step": (6, 0, 20),
    "iteration_wrap": (6, 20, 6),
    "iteration_current": (6, 26, 6),
    "lock_acq_id": (7, 0, 4),
    "lock_acq_value": (7, 5, 7),
    "lock_acq_enable": (7, 12, 1),
    "lock_rel_id": (7, 13, 4),
    "lock_rel_value": (7, 18, 7),
    "valid": (7, 25, 1),
    "use_next_bd": (7, 26, 1),
    "next_bd": (7, 27, 4),
    "tlast_suppress": (7, 31, 1),
}
_MINUS_ONE = {"d0_step", "d1_step", "d2_step", "iteration_step", "iteration_wrap"}
_SIGNED7 = {"lock_acq_value", "lock_rel_value"}
_BOOLS = {
    "enable_packet",
    "secure_access",
    "lock_acq_enable",
    "valid",
    "use_next_bd",
    "tlast_suppress",
}


def _covered_masks() -> tuple[int, ...]:
    masks = [0] * 8
    for word, lo, width in _FIELDS.values():
        masks[word] |= ((1 << width) - 1) << lo
    return tuple(masks)


_COVERED = _covered_masks()


@dataclass(slots=True)
class ShimBd:
    """One shim DMA buffer descriptor, every field typed and in logical units.

    ``address`` is the 48-bit byte address (bits 1:0 are not stored). Strides are in 32-bit words
    (``d0_step=1`` means contiguous); a wrap of 0 means the dimension is unused; ``d2`` has no wrap
    (it runs until ``length_words`` are moved). ``iteration_wrap`` is the iteration count (1 = no
    iteration). Lock values are signed 7-bit.
    """

    length_words: int = 0
    address: int = 0
    packet_type: int = 0
    packet_id: int = 0
    out_of_order_bd_id: int = 0
    enable_packet: bool = False
    d0_step: int = 1
    d0_wrap: int = 0
    secure_access: bool = False
    d1_step: int = 1
    d1_wrap: int = 0
    burst_length: int = 0
    d2_step: int = 1
    axqos: int = 0
    axcache: int = 0
    smid: int = 0
    iteration_step: int = 1
    iteration_wrap: int = 1
    iteration_current: int = 0
    lock_acq_id: int = 0
    lock_acq_value: int = 0
    lock_acq_enable: bool = False
    lock_rel_id: int = 0
    lock_rel_value: int = 0
    valid: bool = True
    use_next_bd: bool = False
    next_bd: int = 0
    tlast_suppress: bool = False
    spare: tuple[int, ...] = field(default=(0,) * 8)

    @property
    def length_bytes(self) -> int:
        """Transfer length in bytes."""
        return self.length_words * 4

    def encode(self) -> list[int]:
        """The eight u32 words of this BD."""
        if self.address & 3:
            raise ValueError(f"shim BD address {self.address:#x} is not 4-byte aligned")
        if not 0 <= self.address < 1 << 48:
            raise ValueError(f"shim BD address {self.address:#x} does not fit in 48 bits")
        words = [s & ~c & 0xFFFFFFFF for s, c in zip(self.spare, _COVERED)]
        for name, (word, lo, width) in _FIELDS.items():
            if name == "addr_low":
                value = (self.address & 0xFFFFFFFF) >> 2
            elif name == "addr_high":
                value = self.address >> 32
            else:
                value = int(getattr(self, name))
                if name in _MINUS_ONE:
                    value -= 1
                elif name in _SIGNED7:
                    if not -64 <= value <= 63:
                        raise ValueError(f"shim BD {name}={value} does not fit signed 7 bits")
                    value &= 0x7F
            if not 0 <= value < 1 << width:
                shown = getattr(self, name) if name not in ("addr_low", "addr_high") else value
                raise ValueError(f"shim BD field {name}={shown} out of range for {width} bits")
            words[word] |= value << lo
        return words

    @classmethod
    def decode(cls, words: Sequence[int]) -> ShimBd:
        """Decode eight u32 words (e.g. the payload of a BLOCKWRITE to a shim BD)."""
        if len(words) != 8:
            raise ValueError(f"a shim BD has 8 words, got {len(words)}")
        w = [int(x) & 0xFFFFFFFF for x in words]
        values: dict[str, object] = {}
        for name, (word, lo, width) in _FIELDS.items():
            raw = (w[word] >> lo) & ((1 << width) - 1)
            if name in _MINUS_ONE:
                values[name] = raw + 1
            elif name in _SIGNED7:
                values[name] = raw - 128 if raw & 0x40 else raw
            elif name in _BOOLS:
                values[name] = bool(raw)
            else:
                values[name] = raw
        address = (int(values.pop("addr_high")) << 32) | (int(values.pop("addr_low")) << 2)
        spare = tuple(x & ~c & 0xFFFFFFFF for x, c in zip(w, _COVERED))
        return cls(address=address, spare=spare, **values)  # type: ignore[arg-type]

    def access_pattern(self) -> str:
        """Short text of the n-d pattern, e.g. ``d0 816x1 d1 44x816 d2 step 71808``."""
        if self.d0_wrap == 0:
            text = "linear"
        else:
            text = f"d0 {self.d0_wrap}x{self.d0_step}"
            if self.d1_wrap:
                text += f" d1 {self.d1_wrap}x{self.d1_step} d2 step {self.d2_step}"
            else:
                text += f" d1 step {self.d1_step}"
        if self.iteration_wrap > 1:
            text += f" iter {self.iteration_wrap}x{self.iteration_step}"
        return text


@dataclass(frozen=True, slots=True)
class TaskQueueEntry:
    """Value written to a shim task-queue register: start BD, extra repeats, token issue."""

    start_bd: int
    repeat_count: int = 0
    issue_token: bool = False

    def encode(self) -> int:
        """The u32 register value."""
        if not 0 <= self.start_bd <= TASK_QUEUE_START_BD_MASK:
            raise ValueError(f"task queue start BD {self.start_bd} out of range 0..15")
        if not 0 <= self.repeat_count <= TASK_QUEUE_REPEAT_MASK:
            raise ValueError(f"task queue repeat count {self.repeat_count} out of range 0..255")
        value = self.start_bd | (self.repeat_count << TASK_QUEUE_REPEAT_SHIFT)
        return value | (TASK_QUEUE_TOKEN_BIT if self.issue_token else 0)

    @classmethod
    def decode(cls, value: int) -> TaskQueueEntry:
        """Decode a task-queue register value."""
        return cls(
            start_bd=value & TASK_QUEUE_START_BD_MASK,
            repeat_count=(value >> TASK_QUEUE_REPEAT_SHIFT) & TASK_QUEUE_REPEAT_MASK,
            issue_token=bool(value & TASK_QUEUE_TOKEN_BIT),
        )
