"""Host memory seen by the shim DMAs: the five kernel-ABI argument buffers at device addresses.

:class:`HostMemory` holds real bytes (numpy ``uint8``) and bounds-checks every access;
:class:`SymbolicMemory` (trace mode) only decodes addresses into ``(argidx, offset)`` with unbounded
buffers. Both map ``argv[i]`` (the u64 kernel argument of buffer ``i``) to buffer ``i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from npudispatch.emulator.addrgen import WordPattern
from npudispatch.overlay_abi import BUFFER_NAMES, NUM_BUFFERS, describe_buffer

# The five buffers are the overlay ABI's (one definition); the emulator names them as "args".
NUM_ARGS = NUM_BUFFERS
ARG_NAMES = BUFFER_NAMES
describe_arg = describe_buffer
ADDRESS_LIMIT = 1 << 48  # shim BD addresses are 48-bit


def default_argv() -> list[int]:
    """Distinct symbolic bases ``(i + 1) << 40``: any address decodes to (buffer, offset)."""
    return [(i + 1) << 40 for i in range(NUM_ARGS)]


def _check_argv(argv: Sequence[int]) -> list[int]:
    argv = [int(a) for a in argv]
    if len(argv) != NUM_ARGS:
        raise ValueError(
            f"argv needs {NUM_ARGS} buffer addresses (0 input .. 4 params), got {argv}"
        )
    for i, a in enumerate(argv):
        if a % 4 or not 0 < a < ADDRESS_LIMIT:
            raise ValueError(
                f"argv[{i}] = {a:#x} must be a non-zero, 4-byte aligned address below 2**48"
            )
    return argv


@dataclass(frozen=True, slots=True)
class Location:
    """Where an access landed: buffer ``argidx`` at byte ``offset``; ``problem`` when it is bad."""

    argidx: int
    offset: int
    problem: str | None = None


class SymbolicMemory:
    """Trace-mode memory: buffers have no size and no bytes; addresses decode by nearest base."""

    def __init__(self, argv: Sequence[int] | None = None) -> None:
        self.argv = _check_argv(argv if argv is not None else default_argv())
        self._order = sorted(range(NUM_ARGS), key=lambda i: self.argv[i])

    def locate(self, address: int, span_bytes: int) -> Location:
        """Buffer with the highest base at or below ``address`` (no upper bound)."""
        best = None
        for i in self._order:
            if self.argv[i] <= address:
                best = i
        if best is None:
            return Location(-1, address, "below every argument buffer (was the BD patched?)")
        return Location(best, address - self.argv[best])


class HostMemory:
    """The five argument buffers as ``uint8`` arrays mapped at ``argv`` device addresses.

    Buffer storage is rounded up to whole 32-bit words internally (the DMA moves words) but every
    access is checked against the buffer's real size. :attr:`buffers` gives the real-size views.

    A ``bytes`` buffer of whole words (a program's const or params image) is used in place, not
    copied: it is immutable, so the view is read-only until a DMA writes to it, which first gives
    that buffer a private copy (copy on write). A weights image is then held once per process.
    """

    def __init__(
        self,
        buffers: Sequence[np.ndarray | bytes | bytearray | int | None],
        argv: Sequence[int] | None = None,
    ) -> None:
        if len(buffers) != NUM_ARGS:
            raise ValueError(
                f"expected {NUM_ARGS} buffers (input, output, scratch, const, params), "
                f"got {len(buffers)}; pass None or 0 for unused ones"
            )
        self.argv = _check_argv(argv if argv is not None else default_argv())
        self.sizes: list[int] = []
        self._store: list[np.ndarray] = []
        for buf in buffers:
            if buf is None or isinstance(buf, int):
                data = np.zeros(int(buf or 0), dtype=np.uint8)
            elif isinstance(buf, np.ndarray):
                data = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
            else:
                data = np.frombuffer(bytes(buf), dtype=np.uint8)
            if isinstance(buf, bytes) and data.size % 4 == 0:
                store = data  # read-only: copied on the first write (see writable)
            else:
                store = np.zeros(-(-data.size // 4) * 4, dtype=np.uint8)
                store[: data.size] = data
            self.sizes.append(int(data.size))
            self._store.append(store)
        spans = sorted((self.argv[i], self.argv[i] + self.sizes[i], i) for i in range(NUM_ARGS))
        for (_, hi_a, a), (lo_b, _, b) in pairwise(spans):
            if hi_a > lo_b:
                raise ValueError(f"argument buffers {a} and {b} overlap at {lo_b:#x}")
        self._spans = spans
        self.total_bytes = sum(self.sizes)
        self._word_views = [s.view("<u4") for s in self._store]  # replaced only by writable()

    @property
    def buffers(self) -> list[np.ndarray]:
        """Real-size ``uint8`` views of the five buffers (writes through; a buffer given as
        ``bytes`` is read-only until :meth:`writable` or a DMA write copies it)."""
        return [s[:n] for s, n in zip(self._store, self.sizes)]

    def writable(self, argidx: int) -> np.ndarray:
        """Buffer ``argidx`` as a writable real-size view (copying a ``bytes`` buffer once)."""
        store = self._store[argidx]
        if not store.flags.writeable:
            store = self._store[argidx] = store.copy()
            self._word_views[argidx] = store.view("<u4")
        return store[: self.sizes[argidx]]

    def locate(self, address: int, span_bytes: int) -> Location:
        """Find the buffer holding ``[address, address + span_bytes)``; ``problem`` if none does."""
        for lo, hi, i in self._spans:
            if lo <= address < hi or (span_bytes == 0 and lo <= address <= hi):
                if address + span_bytes > hi:
                    return Location(
                        i,
                        address - lo,
                        f"runs past the end of {describe_arg(i)} "
                        f"({span_bytes} B from offset {address - lo:#x}, buffer is {hi - lo} B)",
                    )
                return Location(i, address - lo)
        near = ", ".join(f"{describe_arg(i)} [{lo:#x}, {hi:#x})" for lo, hi, i in self._spans)
        return Location(-1, address, f"is outside every argument buffer ({near})")

    def _words(self, argidx: int) -> np.ndarray:
        return self._word_views[argidx]

    def read(self, loc: Location, pat: WordPattern, out: np.ndarray | None = None) -> np.ndarray:
        """Gather the bytes of one BD execution (``loc`` from :meth:`locate` of its base), into
        ``out`` (``4 * pat.length`` uint8) when given instead of a new array."""
        words = self._words(loc.argidx)
        first = loc.offset // 4
        if pat.blocks is None:
            if out is None:
                return words[first : first + pat.length].copy().view(np.uint8)
            out.view("<u4")[...] = words[first : first + pat.length]
            return out
        dest = out.view("<u4") if out is not None else np.empty(pat.length, dtype="<u4")
        pos = 0
        for start, shape, strides in pat.blocks:  # bounds-checked from the BD's extent
            n = math.prod(shape)
            dest[pos : pos + n].reshape(shape)[...] = _strided(words, first + start, shape, strides)
            pos += n
        return dest.view(np.uint8)

    def write(self, loc: Location, pat: WordPattern, data: np.ndarray) -> None:
        """Scatter ``data`` (``4 * pat.length`` bytes) to the words of one BD execution."""
        self.writable(loc.argidx)
        words = self._words(loc.argidx)
        first = loc.offset // 4
        values = np.ascontiguousarray(data, dtype=np.uint8).view("<u4")
        if pat.blocks is None:
            words[first : first + pat.length] = values
        elif pat.overlaps:  # a word written twice: the later element wins, as the DMA does it
            np.put(words[first:], pat.offsets, values)
        else:
            pos = 0
            for start, shape, strides in pat.blocks:
                n = math.prod(shape)
                view = _strided(words, first + start, shape, strides)
                view[...] = values[pos : pos + n].reshape(shape)
                pos += n


def _strided(
    words: np.ndarray, first: int, shape: tuple[int, ...], strides: tuple[int, ...]
) -> np.ndarray:
    """A view of ``words`` from word ``first`` with word ``strides`` (no index array; numpy
    checks the view lies inside ``words``). Writable when ``words`` is."""
    item = words.itemsize
    return np.ndarray(
        shape,
        words.dtype,
        buffer=words,
        offset=first * item,
        strides=tuple(st * item for st in strides),
    )
