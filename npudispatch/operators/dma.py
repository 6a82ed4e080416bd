"""Emit one overlay launch (overlay_abi protocol) as shim DMA programming, with striping.

:func:`launch` is all an operator needs for its transaction: the params record on
:data:`~npudispatch.overlay_abi.PARAMS_CHANNEL`, operands on the operand channels, outputs on the
output channels, then a wait for every channel used. The operand (output) streams are concatenated
in order and cut into per-channel runs, like AMD's silu/mladf transactions stripe a 1x11008 vector
over the columns: a stream of ``nbytes`` is spread over ``min(channels, nbytes // STRIPE_MIN_BYTES)``
channels in equal word-aligned runs. A channel whose run crosses operands gets a chain of BDs
(``use_next_bd``) and one task. A :class:`Stream` with an n-d :class:`Pattern` (gather/scatter with
strides) is never split: it occupies one channel with one BD.

Receivers are programmed first (S2MM output tasks), then the params record, then the operands, so
the array never back-pressures a sender into a channel nobody drains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from npudispatch.errors import PlanError
from npudispatch.overlay_abi import PARAMS_CHANNEL, operand_channels, output_channels
from npudispatch.txn.registers import SHIM_NUM_BDS, ShimChannel
from npudispatch.txn.shim import ShimBd

STRIPE_MIN_BYTES = 2048  # below this per channel, another channel costs more than it saves
MAX_WRAP = (1 << 10) - 1  # BD d0/d1 wraps are 10-bit fields (docs/txn_format.md §4)
MAX_STEP = 1 << 20  # BD steps are 20-bit "step - 1" fields


@dataclass(frozen=True)
class Pattern:
    """An n-d shim BD access pattern, in 32-bit words (docs/txn_format.md §9 address model).

    Word ``i`` of the stream is read from ``(i % d0_wrap)·d0_step + ((i // d0_wrap) % d1_wrap)·
    d1_step + (i // (d0_wrap·d1_wrap))·d2_step`` (``d1_wrap=0``: ``(i // d0_wrap)·d1_step``).
    """

    d0_wrap: int
    d0_step: int
    d1_wrap: int = 0
    d1_step: int = 1
    d2_step: int = 1

    def apply(self, bd: ShimBd) -> ShimBd:
        """``bd`` with this pattern's wraps and steps."""
        bd.d0_wrap, bd.d0_step = self.d0_wrap, self.d0_step
        bd.d1_wrap, bd.d1_step, bd.d2_step = self.d1_wrap, self.d1_step, self.d2_step
        return bd


@dataclass(frozen=True)
class Stream:
    """``nbytes`` (a multiple of 4) of buffer ``argidx`` from byte ``offset``, optionally n-d."""

    argidx: int
    offset: int
    nbytes: int
    pattern: Pattern | None = None

    def __post_init__(self) -> None:
        if self.nbytes % 4 or self.offset % 4:
            raise PlanError(
                f"DMA stream of arg {self.argidx} at offset {self.offset}, {self.nbytes} B is not "
                "4-byte aligned: round buffer sizes and offsets to whole 32-bit words"
            )


@dataclass
class Piece:
    """A run of one stream on one channel: one BD."""

    stream: Stream
    start: int  # byte offset inside the stream (linear streams only)
    nbytes: int


@dataclass
class Plan:
    """Per-channel BD chains of one launch (exposed for inspection and tests)."""

    runs: dict[ShimChannel, list[Piece]] = field(default_factory=dict)


def stripe(streams: list[Stream], channels: list[ShimChannel]) -> dict[ShimChannel, list[Piece]]:
    """Cut the concatenation of ``streams`` into consecutive per-channel runs (channel order)."""
    total = sum(s.nbytes for s in streams)
    if total == 0:
        return {}
    n_chan = max(1, min(len(channels), total // STRIPE_MIN_BYTES))
    target = -(-total // (4 * n_chan)) * 4
    runs: dict[ShimChannel, list[Piece]] = {}
    ch, fill = 0, 0

    def advance() -> None:
        nonlocal ch, fill
        if ch + 1 >= len(channels):
            raise PlanError(
                f"launch needs more than {len(channels)} DMA channels for {len(streams)} streams "
                "(n-d streams take a channel each): use more columns or fewer strided operands"
            )
        ch, fill = ch + 1, 0

    for s in streams:
        if s.nbytes == 0:
            continue
        if s.pattern is not None:
            if fill:
                advance()
            runs.setdefault(channels[ch], []).append(Piece(s, 0, s.nbytes))
            fill = target  # the channel is full: nothing may follow a strided stream on it
            continue
        pos = 0
        while pos < s.nbytes:
            if fill >= target and ch + 1 < len(channels):
                advance()
            last = ch + 1 >= len(channels)
            take = s.nbytes - pos if last else min(s.nbytes - pos, target - fill)
            runs.setdefault(channels[ch], []).append(Piece(s, pos, take))
            pos, fill = pos + take, fill + take
    return runs


def launch(
    *, params: Stream, operands: list[Stream], outputs: list[Stream], num_cols: int = 4
):  # -> TxnBuilder
    """A :class:`~npudispatch.txn.builder.TxnBuilder` holding one complete overlay launch.

    Call ``.build()`` for the Transaction (or add more launches to the same builder with
    :func:`emit`).
    """
    from npudispatch.txn.builder import TxnBuilder

    builder = TxnBuilder(num_cols=num_cols)
    emit(builder, params=params, operands=operands, outputs=outputs, num_cols=num_cols)
    return builder


def emit(
    builder, *, params: Stream, operands: list[Stream], outputs: list[Stream], num_cols: int = 4
) -> Plan:
    """Append one launch to ``builder``; returns the channel plan it used."""
    if num_cols < 1:
        raise PlanError(f"num_cols must be >= 1, got {num_cols}")
    if params.pattern is not None:
        raise PlanError("the params record must be streamed linearly")
    plan = Plan()
    plan.runs.update(stripe(outputs, output_channels(num_cols)))
    plan.runs[PARAMS_CHANNEL] = [Piece(params, 0, params.nbytes)]
    plan.runs.update(stripe(operands, operand_channels(num_cols)))
    program(builder, plan.runs, what="launch", hint="use more columns or fewer operands")
    return plan


def program(builder, runs: dict[ShimChannel, list[Piece]], *, what: str, hint: str) -> None:
    """Program ``runs`` into ``builder``: per channel one BD chain (BD ids allocated per column)
    and one task, in dict order; then a wait for every channel. ``what``/``hint`` word the error
    raised when a column runs out of BDs."""
    queue(builder, runs, {}, what=what, hint=hint)
    for chan in runs:
        builder.wait_channel_idle(chan.col, chan.direction, chan.channel)


def queue(
    builder, runs: dict[ShimChannel, list[Piece]], next_bd: dict[int, int], *, what: str, hint: str
) -> None:
    """The BD chains and tasks of :func:`program` without the waits; ``next_bd`` (column -> first
    free BD id) is updated, so a caller can queue more work on the BDs left over."""
    for chan, pieces in runs.items():
        first = next_bd.get(chan.col, 0)
        if first + len(pieces) > SHIM_NUM_BDS:
            raise PlanError(
                f"{what} needs more than {SHIM_NUM_BDS} shim BDs in column {chan.col}: {hint}"
            )
        next_bd[chan.col] = first + len(pieces)
        for k, piece in enumerate(pieces):
            bd = ShimBd(length_words=piece.nbytes // 4)
            if piece.stream.pattern is not None:
                piece.stream.pattern.apply(bd)
            if k + 1 < len(pieces):
                bd.use_next_bd, bd.next_bd = True, first + k + 1
            builder.shim_bd(
                chan.col,
                first + k,
                bd,
                argidx=piece.stream.argidx,
                argplus=piece.stream.offset + piece.start,
            )
        builder.push_task(chan.col, chan.direction, chan.channel, first)
