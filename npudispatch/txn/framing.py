"""Op framing (docs/txn_format.md §2): where every op of a transaction starts, its opcode and length.

:func:`scan` builds an :class:`OpIndex` without decoding ops. For the plain format it never steps
op by op through the common ops: one numpy search per Size-field value finds every op whose length
a Size field pins (WRITE, the MASK ops, DDR_PATCH, TCT, ...) or holds (BLOCKWRITE), and wherever
such candidates tile the buffer back to back they are consecutive ops of the chain. Python only
steps where a run of tiling candidates ends: a look-alike inside a BLOCKWRITE payload, or an op
without a Size field (NOOP, LOADPDI, unknown custom ops...), framed by the per-op rules. The
optimised format (WRITE and MASK ops without Size fields) gets a length for every word and one walk
along the chain. Anything unusual (a malformed op, a custom op of odd length) goes to
:func:`scan_scalar`, the op-by-op reference that names the op and byte offset of the problem.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np

from npudispatch.errors import TxnFormatError
from npudispatch.txn.codec import (
    CUSTOM_MIN,
    LENGTH_TABLES,
    MASK_OPCODES,
    PATCH_SIZE_PLAIN,
    op_size,
)
from npudispatch.txn.header import HEADER_SIZE
from npudispatch.txn.ops import Opcode


@dataclass(slots=True)
class OpIndex:
    """Where every op of a transaction sits: numpy arrays, built once per distinct transaction.

    ``offsets`` are byte offsets from the start of the transaction (header included).
    """

    offsets: np.ndarray  # int64
    opcodes: np.ndarray  # uint8
    sizes: np.ndarray  # int64
    end: int  # byte offset just past the last op
    patch_ops: np.ndarray = field(init=False)  # op indices of DDR_PATCH ops

    def __post_init__(self) -> None:
        self.patch_ops = np.flatnonzero(self.opcodes == Opcode.DDR_PATCH)

    def __len__(self) -> int:
        return len(self.offsets)

    def shifted(self, delta: int) -> OpIndex:
        """The same index for the same ops placed ``delta`` bytes later."""
        return OpIndex(self.offsets + delta, self.opcodes, self.sizes, self.end + delta)

    @staticmethod
    def concat(parts: list[OpIndex]) -> OpIndex:
        """Index of consecutive op streams (already shifted to their final offsets)."""
        return OpIndex(
            np.concatenate([p.offsets for p in parts]),
            np.concatenate([p.opcodes for p in parts]),
            np.concatenate([p.sizes for p in parts]),
            parts[-1].end,
        )


def scan(buf: bytes | memoryview, num_ops: int, opt: bool, start: int = HEADER_SIZE) -> OpIndex:
    """Frame ``num_ops`` ops of ``buf`` starting at ``start``; validate every length.

    Raises :class:`TxnFormatError` on truncation, a Size field that disagrees with its opcode, an
    unknown non-custom opcode, or a NumOps that does not match the bytes. Loops at most
    ``len(buf) / 4`` times whatever the header claims.
    """
    index = None if opt else _scan_runs(buf, num_ops, start)
    if index is None:
        index = _scan_steps(buf, num_ops, opt, start)
    return index if index is not None else scan_scalar(buf, num_ops, opt, start)


def scan_scalar(
    buf: bytes | memoryview, num_ops: int, opt: bool, start: int = HEADER_SIZE
) -> OpIndex:
    """Reference op-by-op framing (same contract as :func:`scan`); gives the precise errors."""
    end = len(buf)
    offsets: list[int] = []
    opcodes: list[int] = []
    sizes: list[int] = []
    off = start
    for i in range(num_ops):
        if off >= end:
            raise TxnFormatError(
                f"header NumOps is {num_ops} but the ops end after op {i - 1} at byte offset "
                f"{off} (TxnSize {end}): NumOps overruns the buffer"
            )
        size = op_size(buf, off, opt, i)
        offsets.append(off)
        opcodes.append(buf[off])
        sizes.append(size)
        off += size
    # aie-rt rounds TxnSize up to a multiple of 4, so < 4 bytes of trailing pad is legitimate.
    if end - off >= 4:
        raise TxnFormatError(
            f"{end - off} bytes remain after the last op (op {num_ops - 1}, ending at byte "
            f"offset {off}): header NumOps ({num_ops}) is smaller than the op count or "
            "TxnSize is too large"
        )
    return OpIndex(
        np.array(offsets, dtype=np.int64),
        np.array(opcodes, dtype=np.uint8),
        np.array(sizes, dtype=np.int64),
        off,
    )


# ---------------------------------------------------------------------------------------------
# Plain format: candidates and runs
# Plain ops whose Size field has one valid value: (word of the field, that value, opcodes). With
# BLOCKWRITE (Size field read) they are ~99% of the ops of real transactions.
_PINNED = (
    (5, 24, (Opcode.WRITE,)),
    (6, 32, MASK_OPCODES),
    (1, 48, (Opcode.DDR_PATCH,)),
    (1, 16, (Opcode.TCT, Opcode.MERGE_SYNC)),
    (1, 12, (Opcode.RECORD_TIMER,)),
)
_BLOCK_FIELD, _BLOCK_MIN = 3, 16  # plain BLOCKWRITE: Size-field word, minimum length
# Per opcode: the word of the Size field searched for (0: none), its only valid value (-1: any).
_FIELD_WORD = np.zeros(256, dtype=np.int64)
_PINNED_SIZE = np.full(256, -1, dtype=np.int64)
for _word, _value, _opcodes in _PINNED:
    _FIELD_WORD[list(_opcodes)], _PINNED_SIZE[list(_opcodes)] = _word, _value
_FIELD_WORD[Opcode.BLOCKWRITE] = _BLOCK_FIELD
# Past these, stepping run by run (or framing op after op alone) costs more than the step walk.
_MAX_RUNS_PER_OP = 0.5
_MAX_ALONE_PER_OP = 1 / 16


def _candidates(words: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Word positions (>= ``first``) of every plain op look-alike of the searched kinds that fits
    the buffer, and its length in words, sorted by position. Every true op of these kinds is one.

    One whole-buffer comparison per Size-field value (and one for the BLOCKWRITE opcode) marks the
    positions worth a look; only those are then checked against their opcode's rule.
    """
    n = len(words)
    marked = np.zeros(max(n - first, 0), dtype=bool)  # marked[k]: look at an op at first + k
    for word, value, _ in _PINNED:
        marked[: max(n - first - word, 0)] |= words[first + word :] == value
    low = words[first : max(n - _BLOCK_FIELD, first)] & 0xFF
    marked[: len(low)] |= low == Opcode.BLOCKWRITE
    pos = np.flatnonzero(marked)
    pos += first
    opcode = (words.take(pos) & 0xFF).astype(np.intp)  # converted once for both table looks
    pinned = _PINNED_SIZE.take(opcode)
    # A mark may come from another kind's field: positions past the end read the last word, and
    # the length check below drops them.
    size = words.take(pos + _FIELD_WORD.take(opcode), mode="clip").astype(np.int64)
    block = opcode == Opcode.BLOCKWRITE
    ok = (size == pinned) | (block & (size >= _BLOCK_MIN) & (size & 3 == 0))
    length = np.where(block, size, pinned) >> 2
    ok &= pos + length <= n
    keep = np.flatnonzero(ok)  # two takes beat two boolean selections
    return pos.take(keep), length.take(keep)


def _scan_runs(buf: bytes | memoryview, num_ops: int, start: int) -> OpIndex | None:
    """Plain-format fast path of :func:`scan`; None whenever another path must decide."""
    n = len(buf) // 4
    if start % 4 or num_ops > n or num_ops == 0:
        return None
    first = start >> 2
    words = np.frombuffer(buf, dtype="<u4", count=n)
    pos, length = _candidates(words, first)
    if len(pos) == 0:
        return None
    nxt = pos + length
    ends = np.flatnonzero(nxt[:-1] != pos[1:])  # last candidate of each run that tiles
    if len(ends) > _MAX_RUNS_PER_OP * num_ops + 16:
        return None
    ends = np.append(ends, len(pos) - 1)
    after = nxt[ends]  # where the op after each run starts
    land = np.minimum(np.searchsorted(pos, after), len(pos) - 1)
    land = np.where(pos[land] == after, land, -1)  # the candidate there, or -1
    ends_l, after_l, land_l = ends.tolist(), after.tolist(), land.tolist()

    run_pos: list[np.ndarray] = []
    run_len: list[np.ndarray] = []
    done, at, alone = 0, first, 0
    i = 0 if pos[0] == first else -1  # candidate index of the op at word `at`, or -1
    while done < num_ops and at < n:
        if i >= 0:  # a true op at a candidate: its whole run are the next ops
            e = bisect_left(ends_l, i)
            j = ends_l[e] + 1
            run_pos.append(pos[i:j])
            run_len.append(length[i:j])
            done += j - i
            at, i = after_l[e], land_l[e]
            continue
        try:  # an op of a kind not searched for (NOOP, LOADPDI, custom...): frame it alone
            size = op_size(buf, 4 * at, False)
        except TxnFormatError:
            return None
        alone += 1
        if size % 4 or alone > _MAX_ALONE_PER_OP * num_ops + 64:
            return None
        run_pos.append(np.array([at], dtype=np.int64))
        run_len.append(np.array([size >> 2], dtype=np.int64))
        done += 1
        at += size >> 2
        k = int(np.searchsorted(pos, at))
        i = k if k < len(pos) and pos[k] == at else -1
    if done != num_ops or at != n:
        return None
    starts = np.concatenate(run_pos)
    opcodes = (words.take(starts) & 0xFF).astype(np.uint8)
    return OpIndex(starts << 2, opcodes, np.concatenate(run_len) << 2, at << 2)


# ---------------------------------------------------------------------------------------------
# Any format: a length for every word, then a walk along the chain
def _np_tables(opt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """numpy forms of the length tables: fixed length, Size-field word offset, exact, minimum."""
    fixed, size_at = LENGTH_TABLES[opt]
    exact = np.zeros(256, dtype=np.int64)
    minimum = np.zeros(256, dtype=np.int64)
    minimum[CUSTOM_MIN:] = 8
    minimum[Opcode.BLOCKWRITE] = 12 if opt else 16
    minimum[Opcode.READ_REGS] = 16
    exact[[Opcode.TCT, Opcode.MERGE_SYNC]] = 16
    exact[Opcode.RECORD_TIMER] = 12
    if not opt:
        exact[Opcode.WRITE] = 24
        exact[list(MASK_OPCODES)] = 32
        exact[Opcode.DDR_PATCH] = PATCH_SIZE_PLAIN
    size_words = np.array([a // 4 if a >= 0 else -1 for a in size_at], dtype=np.int64)
    return np.array(fixed, dtype=np.int64), size_words, exact, minimum


_NP_TABLES = {False: _np_tables(False), True: _np_tables(True)}


def _scan_steps(buf: bytes | memoryview, num_ops: int, opt: bool, start: int) -> OpIndex | None:
    """Framing for the optimised format (whose WRITE and MASK ops carry no Size field to search
    for) and for plain transactions too unusual for :func:`_scan_runs`.

    Computes, for every 4-byte position, the length an op starting there would have (numpy), then
    follows the chain in one tight loop. Returns None whenever anything is unusual, so the exact
    :func:`scan_scalar` can report the error (or handle odd custom-op lengths).
    """
    fixed_t, size_w_t, exact_t, min_t = _NP_TABLES[opt]
    n_words = len(buf) // 4
    if start % 4 or num_ops > n_words:
        return None
    words = np.frombuffer(buf, dtype="<u4", count=n_words)
    op_at = (words & 0xFF).astype(np.uint8)
    fixed = fixed_t[op_at]
    field_pos = np.arange(n_words, dtype=np.int64) + size_w_t[op_at]
    has_field = (fixed == 0) & (field_pos < n_words)
    size = np.where(fixed > 0, fixed, 0)
    size[has_field] = words[field_pos[has_field]]
    steps = np.where(size % 4 == 0, size >> 2, 0).tolist()
    starts: list[int] = []
    append = starts.append
    p = start >> 2
    for _ in range(num_ops):
        step = steps[p] if p < n_words else 0
        if step == 0:
            return None
        append(p)
        p += step
    if p > n_words or len(buf) - 4 * p >= 4:
        return None
    pos = np.array(starts, dtype=np.int64)
    opcodes = op_at[pos]
    sizes = size[pos]
    exact = exact_t[opcodes]
    bad = ((exact > 0) & (sizes != exact)) | (sizes < min_t[opcodes])
    bad |= (opcodes == Opcode.READ_REGS) & ((sizes - 16) % 8 != 0)
    if opt:
        bad |= (opcodes == Opcode.DDR_PATCH) & (sizes != 48) & (sizes != 24)
    if bad.any():
        return None
    return OpIndex(pos * 4, opcodes, sizes, 4 * p)
