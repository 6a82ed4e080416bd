"""The :class:`Transaction`: a byte-exact, lazily decoded AIE transaction (docs/txn_format.md §1-3).

A transaction parsed from bytes keeps those bytes plus an :class:`OpIndex` (numpy arrays of op
offsets, opcodes and sizes) and decodes typed ops only when ``ops`` is asked for. Indexes are cached
by content, so the same op transaction reused by many layers is framed once. Once ``ops`` has been
materialized the op list is the source of truth (callers may edit it) and ``to_bytes`` re-encodes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from npudispatch.display import rich_html
from npudispatch.errors import TxnFormatError
from npudispatch.txn.codec import decode_op, encode_op, encoded_size
from npudispatch.txn.framing import OpIndex, scan
from npudispatch.txn.header import HEADER_SIZE, OPT_VERSION, PLAIN_VERSION, TxnHeader
from npudispatch.txn.ops import Op

_CACHE_MAX_ENTRIES = 256
_CACHE_MAX_BYTES = 256 << 20


class Framing:
    """What is known about one transaction content: its OpIndex and, once read, its patch fields.

    Shared by every Transaction with the same bytes (values are derived from the content only).
    The index may be given as a thunk (fusion builds it only if someone asks).
    """

    __slots__ = ("_index", "_make", "end", "patches")

    def __init__(
        self,
        index: OpIndex | None,
        patches: object | None = None,
        *,
        make: Callable[[], OpIndex] | None = None,
        end: int | None = None,
    ) -> None:
        if index is None and (make is None or end is None):
            raise ValueError("Framing needs an OpIndex, or a thunk and the op-stream end")
        self._index = index
        self._make = make
        self.end = index.end if index is not None else end
        self.patches = patches  # rebase.PatchFields, filled on first use

    @property
    def index(self) -> OpIndex:
        """The OpIndex (built on first access when given as a thunk)."""
        if self._index is None:
            assert self._make is not None
            self._index, self._make = self._make(), None
        return self._index


class _IndexCache:
    """Bounded LRU of Framing by transaction content (bytes objects cache their own hash)."""

    def __init__(self) -> None:
        self._entries: OrderedDict[bytes, Framing] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, data: bytes) -> Framing | None:
        with self._lock:
            entry = self._entries.get(data)
            if entry is not None:
                self._entries.move_to_end(data)
            return entry

    def put(self, data: bytes, entry: Framing) -> None:
        if len(data) > _CACHE_MAX_BYTES // 4:
            return
        with self._lock:
            if data in self._entries:
                return
            self._entries[data] = entry
            self._bytes += len(data)
            while len(self._entries) > _CACHE_MAX_ENTRIES or self._bytes > _CACHE_MAX_BYTES:
                old, _ = self._entries.popitem(last=False)
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


INDEX_CACHE = _IndexCache()


class Transaction:
    """An AIE transaction in plain (0.1) or optimised (1.0) format.

    Build one with :meth:`from_bytes`, :class:`~npudispatch.txn.builder.TxnBuilder`, or
    ``Transaction(header, ops)``. ``header.num_ops``/``header.txn_size`` always reflect the content.
    """

    __slots__ = ("_buf", "_framing", "_header", "_ops", "_trailing")

    def __init__(self, header: TxnHeader, ops: Iterable[Op] = (), trailing: bytes = b"") -> None:
        if (header.major, header.minor) not in (PLAIN_VERSION, OPT_VERSION):
            raise TxnFormatError(
                f"bad transaction header: version {header.major}.{header.minor} is neither "
                "plain 0.1 nor optimised 1.0"
            )
        self._header = header
        self._ops: list[Op] | None = list(ops)
        self._trailing = bytes(trailing)
        self._buf: bytes | memoryview | None = None  # memoryview: a fused image, see buffer
        self._framing: Framing | None = None

    # -- construction from bytes -----------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Transaction:
        """Parse a transaction; raises :class:`TxnFormatError` naming offset, op and opcode."""
        data = data if isinstance(data, bytes) else bytes(data)
        header = TxnHeader.parse(data)
        framing = INDEX_CACHE.get(data)
        if framing is None:
            framing = Framing(scan(data, header.num_ops, header.is_opt, HEADER_SIZE))
            INDEX_CACHE.put(data, framing)
        return cls._from_parts(header, data, framing)

    @classmethod
    def _from_parts(
        cls, header: TxnHeader, data: bytes | memoryview, framing: Framing
    ) -> Transaction:
        """Wrap already-framed bytes (used by rebase/fuse, which keep the framing); ``data`` may
        be a read-only memoryview of an image nobody else holds (fuse's output array)."""
        txn = cls.__new__(cls)
        txn._header = header
        txn._buf = data
        txn._framing = framing
        txn._ops = None
        txn._trailing = bytes(data[framing.end :])
        return txn

    # -- views -------------------------------------------------------------------------------
    @property
    def is_opt(self) -> bool:
        """True for the optimised (1.0) format."""
        return self._header.is_opt

    @property
    def ops(self) -> list[Op]:
        """Typed ops (decoded on first access; the list may then be edited in place)."""
        if self._ops is None:
            self._ops = list(self.iter_ops())
            self._buf = None
            self._framing = None
        return self._ops

    def iter_ops(self) -> Iterator[Op]:
        """Decode ops one by one without switching the transaction to op-list mode."""
        if self._ops is not None:
            yield from self._ops
            return
        buf, framing, opt = self._buf, self._framing, self.is_opt
        assert buf is not None and framing is not None
        index = framing.index
        for i, (off, size) in enumerate(zip(index.offsets.tolist(), index.sizes.tolist())):
            yield decode_op(buf, off, size, opt, i)

    @property
    def num_ops(self) -> int:
        """Number of ops (custom ops included)."""
        if self._ops is not None:
            return len(self._ops)
        return len(self._framing.index)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return self.num_ops

    @property
    def nbytes(self) -> int:
        """TxnSize: total bytes including the header."""
        if self._ops is None:
            return len(self._buf)  # type: ignore[arg-type]
        opt = self.is_opt
        body = sum(encoded_size(op, opt) for op in self._ops)
        return HEADER_SIZE + body + len(self._trailing)

    @property
    def header(self) -> TxnHeader:
        """The header with NumOps and TxnSize matching the content."""
        return replace(self._header, num_ops=self.num_ops, txn_size=self.nbytes)

    @property
    def trailing(self) -> bytes:
        """Pad bytes between the last op and TxnSize (aie-rt rounds TxnSize up to 4)."""
        return self._trailing

    # -- serialization -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialize: byte-exact for parsed, unmodified ops; zeros in padding of new ops."""
        if self._ops is None:
            if not isinstance(self._buf, bytes):  # a fused image: one copy, then kept as bytes
                self._buf = bytes(self._buf)  # type: ignore[arg-type]
            return self._buf
        return self._encode()

    @property
    def buffer(self) -> bytes | memoryview:
        """The serialized transaction without a copy where possible: a read-only buffer for
        writers that take any bytes-like object (files, hashes, device buffers). A fused
        transaction's image is handed out as it was assembled, so the 100 MB programs of big
        models are not copied once more into a ``bytes`` object."""
        if self._ops is None:
            return self._buf  # type: ignore[return-value]
        return self._encode()

    def framed(self) -> tuple[bytes, OpIndex]:
        """The bytes and their OpIndex (re-encoding and re-framing if the op list is live)."""
        data, framing = self.framing()
        return data, framing.index

    def framing(self) -> tuple[bytes | memoryview, Framing]:
        """The bytes and their shared :class:`Framing` (index plus cached patch fields)."""
        if self._ops is None:
            return self._buf, self._framing  # type: ignore[return-value]
        data = self._encode()
        return data, Framing(scan(data, len(self._ops), self.is_opt, HEADER_SIZE))

    def _encode(self) -> bytes:
        ops, opt = self._ops, self.is_opt
        assert ops is not None
        body = b"".join([encode_op(op, opt, index=i) for i, op in enumerate(ops)])
        size = HEADER_SIZE + len(body) + len(self._trailing)
        head = replace(self._header, num_ops=len(ops), txn_size=size).pack()
        return head + body + self._trailing

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Transaction):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    __hash__ = None  # type: ignore[assignment]

    # Notebook view (header, op histogram, patches, data movement): txn.html, registered by viz.
    _repr_html_ = rich_html

    def __repr__(self) -> str:
        fmt = "opt 1.0" if self.is_opt else "plain 0.1"
        h = self._header
        return (
            f"Transaction({fmt}, dev_gen={h.dev_gen}, cols={h.num_cols}, "
            f"{self.num_ops} ops, {self.nbytes} B)"
        )
