"""The overlay ABI: the five kernel buffers and how an op launch talks to the virtual NPU.

The one home of the kernel contract (docs/overlay_abi.md): :class:`BufferKind` (the five buffers
every fused program gets, numbered as DDR_PATCH ``argidx``), :data:`Kernel` (what the overlay calls
per launch), :class:`ParamsRecord` and the channel order below.

This is *our* protocol (versioned), shared by the operator library, which writes params records and
programs shim DMA channels, and the emulator, which reads them. One op launch is:

1. **Params record** on column 0 MM2S channel 0 (:data:`PARAMS_CHANNEL`): a :class:`ParamsRecord`
   streamed from the params buffer (argidx 4 in a fused program).
2. **Operands** on the operand channels (:func:`operand_channels`: col0 MM2S1, col1 MM2S0, col1 MM2S1,
   col2 MM2S0, ...). The operand stream is the concatenation, in that channel order, of everything
   the MM2S tasks of the launch pushed; it is cut into operands by ``operand_bytes`` in order. An
   operand may therefore be striped over several channels. Missing bytes make the launch hang;
   surplus bytes also hang (the array would back-pressure the DMA forever).
3. **Outputs** on the output channels (:func:`output_channels`: col0 S2MM0, col1 S2MM0, ..., then
   col0 S2MM1, ...). The kernel's outputs are concatenated in order and dealt out over the output
   channels in channel order; each channel receives exactly the bytes its queued S2MM tasks ask for.
   Requests must add up to ``sum(output_bytes)``: fewer or more is a hang.
4. The kernel runs once the record and every operand byte have arrived; the launch ends when every
   channel's tasks are done (the transaction polls the channel status registers).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from npudispatch.errors import DeviceHang
from npudispatch.txn.registers import Direction, ShimChannel

MAGIC = 0x4F445031  # bytes b"1PDO" in memory: "NPU Dispatch Overlay", version-tagged
ABI_VERSION = 1
HEADER_FORMAT = "<IHHHHHHI"  # magic, abi, kernel_id, n_operands, n_outputs, n_dims, flags, payload
HEADER_BYTES = struct.calcsize(HEADER_FORMAT)  # 20
MAX_COUNT = 64  # operands, outputs and dims per record (guards against garbage headers)

PARAMS_CHANNEL = ShimChannel(0, Direction.MM2S, 0)

# Header ``flags`` bits (the former reserved half-word: 0 = the default launch, so bf16 records
# are byte-for-byte what they were before the field had a meaning).
FLAG_FP32_COMPUTE = 0x1
"""Float math with float32 operands (no bf16 rounding) and float32 weight images (``--fp32``)."""
FLAG_MIXED_COMPUTE = 0x2
"""bf16 operands for multiply-accumulate kernels only, float32 everywhere else (``--precision
mixed``; ``operators.dtypes``)."""
KNOWN_FLAGS = FLAG_FP32_COMPUTE | FLAG_MIXED_COMPUTE


class KernelOperandError(ValueError):
    """Raised by a kernel whose operand *values* are outside what its op accepts (e.g.
    GroupQueryAttention's ``seqlens_k`` beyond its present buffer): the model's inputs are wrong,
    not the program; the overlay reports it as a refusal naming the launch."""


WORD = 4  # shim DMAs move 32-bit words: every stream and buffer size is a multiple of this


def round_up(n: int, multiple: int = WORD) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (a DMA word by default)."""
    return -(-n // multiple) * multiple


class BufferKind(IntEnum):
    """The five kernel buffers of a fused program; the value is the DDR_PATCH ``argidx`` (and the
    position among the kernel's data arguments) that selects the buffer."""

    INPUT = 0
    OUTPUT = 1
    SCRATCH = 2
    CONST = 3
    PARAMS = 4

    @property
    def label(self) -> str:
        """Lower-case name: ``input``, ``output``, ``scratch``, ``const``, ``params``."""
        return self.name.lower()


NUM_BUFFERS = len(BufferKind)
BUFFER_NAMES: tuple[str, ...] = tuple(k.label for k in BufferKind)


def describe_buffer(argidx: int) -> str:
    """``'arg 1 (output)'``: how messages name a kernel buffer (``?`` for a bad index)."""
    name = BUFFER_NAMES[argidx] if 0 <= argidx < NUM_BUFFERS else "?"
    return f"arg {argidx} ({name})"


Kernel = Callable[["ParamsRecord", list[Any]], Sequence[Any]]
"""``kernel(record, operands) -> outputs``: operands are read-only ``uint8`` arrays in record order
(view them as the dtype the record says); each output must have exactly ``record.output_bytes[i]``
bytes (numpy array of any dtype, or bytes)."""


@dataclass(slots=True)
class ParamsRecord:
    """Header + kernel-specific payload of one op launch.

    ``operand_bytes``/``output_bytes`` are the exact byte counts of each operand and output stream;
    ``dims`` are kernel-defined integers (shapes, tile counts...); ``payload`` is kernel-specific
    (padded to 4 bytes when encoded); ``flags`` holds launch-mode bits (:data:`FLAG_FP32_COMPUTE`,
    :data:`FLAG_MIXED_COMPUTE`).
    """

    kernel_id: int
    operand_bytes: list[int]
    output_bytes: list[int]
    dims: list[int] = field(default_factory=list)
    payload: bytes = b""
    flags: int = 0

    def encode(self) -> bytes:
        """Serialize the record (length is a multiple of 4)."""
        for name, seq in (("operands", self.operand_bytes), ("outputs", self.output_bytes)):
            if len(seq) > MAX_COUNT or any(not 0 <= n < 1 << 32 for n in seq):
                raise ValueError(f"params record: bad {name} byte counts {seq!r}")
        if len(self.dims) > MAX_COUNT:
            raise ValueError(f"params record: at most {MAX_COUNT} dims, got {len(self.dims)}")
        payload = self.payload + b"\0" * (-len(self.payload) % 4)
        head = struct.pack(
            HEADER_FORMAT,
            MAGIC,
            ABI_VERSION,
            self.kernel_id,
            len(self.operand_bytes),
            len(self.output_bytes),
            len(self.dims),
            self.flags,
            len(payload),
        )
        counts = struct.pack(
            f"<{len(self.operand_bytes) + len(self.output_bytes)}I",
            *self.operand_bytes,
            *self.output_bytes,
        )
        dims = struct.pack(f"<{len(self.dims)}q", *self.dims)
        return head + counts + dims + payload

    @property
    def nbytes(self) -> int:
        """Encoded size in bytes."""
        return record_size(self.encode()[:HEADER_BYTES])

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> ParamsRecord:
        """Parse a record from the start of ``data``; raises :class:`DeviceHang` if malformed.

        A malformed record means the overlay would wait forever for a launch it cannot decode,
        which is how the virtual NPU reports it.
        """
        data = bytes(data)
        size = record_size(data)
        if len(data) < size:
            raise DeviceHang(
                f"params record needs {size} bytes but only {len(data)} arrived on {PARAMS_CHANNEL}"
            )
        _, _, kernel_id, n_in, n_out, n_dims, flags, n_payload = struct.unpack_from(
            HEADER_FORMAT, data
        )
        off = HEADER_BYTES
        counts = struct.unpack_from(f"<{n_in + n_out}I", data, off)
        off += 4 * (n_in + n_out)
        dims = list(struct.unpack_from(f"<{n_dims}q", data, off))
        off += 8 * n_dims
        return cls(
            kernel_id=kernel_id,
            operand_bytes=list(counts[:n_in]),
            output_bytes=list(counts[n_in:]),
            dims=dims,
            payload=data[off : off + n_payload],
            flags=flags,
        )


def record_size(head: bytes | bytearray | memoryview) -> int:
    """Total size of the record whose first :data:`HEADER_BYTES` bytes are ``head``.

    Raises :class:`DeviceHang` when the header is short, has the wrong magic or ABI version, or
    absurd counts or flags (the overlay cannot decode the launch).
    """
    if len(head) < HEADER_BYTES:
        raise DeviceHang(
            f"params record header needs {HEADER_BYTES} bytes, {len(head)} arrived on "
            f"{PARAMS_CHANNEL}"
        )
    magic, abi, _kid, n_in, n_out, n_dims, flags, n_payload = struct.unpack_from(
        HEADER_FORMAT, bytes(head[:HEADER_BYTES])
    )
    if magic != MAGIC:
        raise DeviceHang(
            f"params record on {PARAMS_CHANNEL} has magic {magic:#010x}, expected {MAGIC:#010x}: "
            "the params buffer or its DDR patch is wrong"
        )
    if abi != ABI_VERSION:
        raise DeviceHang(f"params record ABI version {abi}, this overlay speaks {ABI_VERSION}")
    if max(n_in, n_out, n_dims) > MAX_COUNT or n_payload % 4:
        raise DeviceHang(f"params record header is corrupt ({n_in=}, {n_out=}, {n_dims=})")
    if flags & ~KNOWN_FLAGS or flags & KNOWN_FLAGS == KNOWN_FLAGS:
        raise DeviceHang(
            f"params record flags {flags:#06x} name an unknown or contradictory launch mode "
            f"(known bits {KNOWN_FLAGS:#06x}, at most one set): re-compile the program"
        )
    return HEADER_BYTES + 4 * (n_in + n_out) + 8 * n_dims + n_payload


def operand_channels(num_cols: int) -> list[ShimChannel]:
    """Operand MM2S channels in stream order: col0 MM2S1, then both MM2S channels of each column."""
    chans = [ShimChannel(0, Direction.MM2S, 1)]
    for col in range(1, num_cols):
        chans += [ShimChannel(col, Direction.MM2S, 0), ShimChannel(col, Direction.MM2S, 1)]
    return chans


def output_channels(num_cols: int) -> list[ShimChannel]:
    """Output S2MM channels in stream order: S2MM0 of every column, then S2MM1 of every column."""
    return [ShimChannel(c, Direction.S2MM, 0) for c in range(num_cols)] + [
        ShimChannel(c, Direction.S2MM, 1) for c in range(num_cols)
    ]


def split_stream(stream: bytes | memoryview, sizes: Sequence[int]) -> list[bytes]:
    """Cut a concatenated stream into consecutive pieces of ``sizes`` bytes."""
    out, off = [], 0
    for n in sizes:
        out.append(bytes(stream[off : off + n]))
        off += n
    return out
