"""Shim DMA n-d address generation (docs/txn_format.md §9), vectorized with numpy.

Addresses are produced as *word* indices (32-bit words) relative to the BD's effective base, for the
whole BD at once by broadcasting the (d2, d1, d0) grid, so a multi-megabyte BD costs a few numpy
operations instead of a Python loop per word.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from npudispatch.txn.shim import ShimBd


def iteration_index(bd: ShimBd, rep: int) -> int:
    """Iteration index of repeat ``rep``: ``(Iteration_Current + rep) % Iteration_Wrap`` (docs/txn_format.md §9)."""
    return (bd.iteration_current + rep) % bd.iteration_wrap


def base_byte_address(bd: ShimBd, rep: int) -> int:
    """Byte address where repeat ``rep`` of ``bd`` starts (base plus the iteration offset)."""
    return bd.address + 4 * iteration_index(bd, rep) * bd.iteration_step


def is_linear(bd: ShimBd) -> bool:
    """True when the BD's words are consecutive (so a slice can replace an index array)."""
    n0, n1, length = bd.d0_wrap, bd.d1_wrap, bd.length_words
    if n0 == 0 or length <= 1:
        return True
    if bd.d0_step != 1:
        return False
    if length <= n0:
        return True
    if n1 == 0:
        return bd.d1_step == n0
    if bd.d1_step != n0:
        return False
    return length <= n0 * n1 or bd.d2_step == n0 * n1


def word_offsets(bd: ShimBd) -> np.ndarray:
    """Word offsets (int64, length ``length_words``) of every element, relative to the base.

    ``n0 == 0`` means linear; ``n1 == 0`` a 2-d pattern whose outer dimension uses ``d1_step``;
    otherwise 3-d with ``d2`` running until the length is consumed (docs/txn_format.md §4: d2 has no wrap).
    """
    length, n0, n1 = bd.length_words, bd.d0_wrap, bd.d1_wrap
    if n0 == 0:
        return np.arange(length, dtype=np.int64)
    d0 = np.arange(n0, dtype=np.int64) * bd.d0_step
    if n1 == 0:
        outer = -(-length // n0)
        grid = (np.arange(outer, dtype=np.int64) * bd.d1_step)[:, None] + d0
    else:
        outer = -(-length // (n0 * n1))
        d2 = np.arange(outer, dtype=np.int64) * bd.d2_step
        d1 = np.arange(n1, dtype=np.int64) * bd.d1_step
        grid = (d2[:, None, None] + d1[None, :, None]) + d0
    return grid.reshape(-1)[:length]


def extent_words(bd: ShimBd) -> int:
    """Words from the base to one past the highest word ``bd`` touches, without expanding it.

    Exact: steps are non-negative, so the highest offset is the last element of the pattern or
    the last element of the last complete d0 row / d1 plane before it. The emulator bounds-checks
    this extent before :func:`word_offsets` allocates one index per word.
    """
    length, n0, n1 = bd.length_words, bd.d0_wrap, bd.d1_wrap
    if length <= 0:
        return 0
    if n0 == 0:
        return length
    last = length - 1
    if n1 == 0:
        i1, i0 = divmod(last, n0)
        best = i1 * bd.d1_step + i0 * bd.d0_step
        if i1:
            best = max(best, (i1 - 1) * bd.d1_step + (n0 - 1) * bd.d0_step)
        return best + 1
    i2, rest = divmod(last, n0 * n1)
    i1, i0 = divmod(rest, n0)
    full_row, full_plane = (n0 - 1) * bd.d0_step, (n1 - 1) * bd.d1_step + (n0 - 1) * bd.d0_step
    best = i2 * bd.d2_step + i1 * bd.d1_step + i0 * bd.d0_step
    if i1:
        best = max(best, i2 * bd.d2_step + (i1 - 1) * bd.d1_step + full_row)
    if i2:
        best = max(best, (i2 - 1) * bd.d2_step + full_plane)
    return best + 1


#: One strided block of a pattern: first word offset, shape and word strides (outer first).
Block = tuple[int, tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class WordPattern:
    """The words one BD execution touches: ``base_word`` plus, in order, the words of each
    strided block (``blocks`` None = linear). At most three blocks: the whole d2 x d1 x d0 grid,
    then the whole rows and the part row the length leaves in the last plane. Blocks are read
    and written through strided views, so no index array proportional to the bytes moved is built.
    """

    base_word: int
    length: int
    blocks: tuple[Block, ...] | None

    @property
    def offsets(self) -> np.ndarray | None:
        """Word offsets of every element (None when linear); for tools and tests, not the DMA path."""
        if self.blocks is None:
            return None
        parts = [
            (start + sum(np.ix_(*(np.arange(n) * st for n, st in zip(shape, strides))))).reshape(-1)
            for start, shape, strides in self.blocks
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    @property
    def span_words(self) -> int:
        """Number of words from the lowest to one past the highest word touched."""
        if self.length == 0:
            return 0
        if self.blocks is None:
            return self.length
        return (
            max(s + sum((n - 1) * st for n, st in zip(sh, sts)) for s, sh, sts in self.blocks) + 1
        )

    @property
    def overlaps(self) -> bool:
        """True when some word is touched twice (a write must then keep the element order)."""
        for _, shape, strides in self.blocks or ():
            inner = 0
            for n, st in reversed(list(zip(shape, strides))):
                if n > 1 and st <= inner:
                    return True
                inner += (n - 1) * st
        return len(self.blocks or ()) > 1 and self._blocks_interleave()

    def _blocks_interleave(self) -> bool:
        spans = [
            (s, s + sum((n - 1) * st for n, st in zip(sh, sts))) for s, sh, sts in self.blocks or ()
        ]
        return any(lo_b <= hi_a for (_, hi_a), (lo_b, _) in pairwise(spans))


def blocks(bd: ShimBd) -> tuple[Block, ...] | None:
    """The strided blocks of ``bd``'s pattern (None when linear); see :class:`WordPattern`."""
    if is_linear(bd):
        return None
    length, n0, n1 = bd.length_words, bd.d0_wrap, bd.d1_wrap
    s0, s1, s2 = bd.d0_step, bd.d1_step, bd.d2_step
    out: list[Block] = []
    if n1 == 0:
        rows, tail = divmod(length, n0)
        out.append((0, (rows, n0), (s1, s0)))
        out.append((rows * s1, (tail,), (s0,)))
    else:
        planes, rest = divmod(length, n0 * n1)
        rows, tail = divmod(rest, n0)
        out.append((0, (planes, n1, n0), (s2, s1, s0)))
        out.append((planes * s2, (rows, n0), (s1, s0)))
        out.append((planes * s2 + rows * s1, (tail,), (s0,)))
    return tuple(b for b in out if all(b[1]))


_BLOCKS: dict[tuple[int, ...], tuple[Block, ...] | None] = {}
_BLOCKS_CACHE_SIZE = 4096  # distinct BD shapes remembered (a few tuples each)


def pattern(bd: ShimBd, rep: int) -> WordPattern:
    """Word pattern of repeat ``rep`` of ``bd`` (no blocks when the BD is linear); the blocks
    are remembered by the fields that shape them, since a program queues the same BDs every run."""
    base = base_byte_address(bd, rep) // 4
    key = (bd.length_words, bd.d0_wrap, bd.d0_step, bd.d1_wrap, bd.d1_step, bd.d2_step)
    try:
        found = _BLOCKS[key]
    except KeyError:
        if len(_BLOCKS) >= _BLOCKS_CACHE_SIZE:
            _BLOCKS.clear()
        found = _BLOCKS[key] = blocks(bd)
    return WordPattern(base, bd.length_words, found)
