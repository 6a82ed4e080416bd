"""The 16-byte transaction header (docs/txn_format.md §1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from npudispatch.errors import TxnFormatError

HEADER_SIZE = 16
_HEADER = struct.Struct("<BBBBBBHII")

PLAIN_VERSION = (0, 1)
OPT_VERSION = (1, 0)


@dataclass(frozen=True, slots=True)
class TxnHeader:
    """Header fields. ``num_ops``/``txn_size`` are as stored (a Transaction keeps them in sync)."""

    major: int = 0
    minor: int = 1
    dev_gen: int = 4
    num_rows: int = 6
    num_cols: int = 4
    num_mem_tile_rows: int = 1
    pad: int = 0
    num_ops: int = 0
    txn_size: int = HEADER_SIZE

    @property
    def is_opt(self) -> bool:
        """True for the optimised (1.0) format, False for plain (0.1)."""
        return (self.major, self.minor) == OPT_VERSION

    def pack(self) -> bytes:
        """The 16 header bytes."""
        try:
            return _HEADER.pack(
                self.major,
                self.minor,
                self.dev_gen,
                self.num_rows,
                self.num_cols,
                self.num_mem_tile_rows,
                self.pad,
                self.num_ops,
                self.txn_size,
            )
        except struct.error as exc:
            raise TxnFormatError(f"transaction header field out of range ({self}): {exc}") from None

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> TxnHeader:
        """Parse and check the header at the start of ``data`` (format version and TxnSize)."""
        if len(data) < HEADER_SIZE:
            raise TxnFormatError(
                f"transaction truncated at byte offset {len(data)}: the header needs "
                f"{HEADER_SIZE} bytes, the buffer has {len(data)}"
            )
        header = cls(*_HEADER.unpack_from(data, 0))
        if (header.major, header.minor) not in (PLAIN_VERSION, OPT_VERSION):
            raise TxnFormatError(
                f"bad transaction header at byte offset 0: version {header.major}.{header.minor} "
                "is neither plain 0.1 nor optimised 1.0 (is this a TXN file?)"
            )
        if header.txn_size != len(data):
            raise TxnFormatError(
                f"transaction header TxnSize (byte offset 12) is {header.txn_size} but the buffer "
                f"has {len(data)} bytes: the file is truncated or not a single transaction"
            )
        return header
