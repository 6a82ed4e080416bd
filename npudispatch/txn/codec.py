"""Per-opcode length rules, decoding and encoding for both formats (docs/txn_format.md §2-3).

:func:`op_size` applies the length rules to one op (:mod:`npudispatch.txn.framing` frames whole
transactions); :func:`decode_op` / :func:`encode_op` convert one op between bytes and the typed
dataclasses of :mod:`npudispatch.txn.ops`. Encoding starts from the op's ``raw`` bytes when their length still
fits, so padding survives a round trip byte for byte; new ops get zeros there.
"""

from __future__ import annotations

import struct

import numpy as np

from npudispatch.errors import TxnFormatError
from npudispatch.txn.ops import (
    FIRST_UNKNOWN_CUSTOM_OP,
    BlockWrite,
    CreateScratchpad,
    CustomOp,
    DdrPatch,
    LoadPdi,
    LoadPmStart,
    MaskPoll,
    MaskPollBusy,
    MaskWrite,
    MergeSync,
    Noop,
    Op,
    Opcode,
    Preempt,
    ReadRegs,
    RecordTimer,
    Tct,
    UpdateReg,
    UpdateScratch,
    UpdateStateTable,
    Write,
)

CUSTOM_MIN = 0x80
# Opt DDR_PATCH variants (docs/txn_format.md §3.4): Size 48 = plain patch_op_t, Size 24 = patch_op_opt_t.
PATCH_SIZE_PLAIN = 48
PATCH_SIZE_OPT24 = 24
PATCH_SIZES_OPT = (PATCH_SIZE_PLAIN, PATCH_SIZE_OPT24)

# Fixed-length non-custom ops, identical in both formats.
_FIXED_COMMON = {
    Opcode.NOOP: 4,
    Opcode.PREEMPT: 4,
    Opcode.LOADPDI: 16,
    Opcode.LOAD_PM_START: 8,
    Opcode.CREATE_SCRATCHPAD: 16,
    Opcode.UPDATE_STATE_TABLE: 8,
    Opcode.UPDATE_REG: 12,
    Opcode.UPDATE_SCRATCH: 4,
}
MASK_OPCODES = (Opcode.MASKWRITE, Opcode.MASKPOLL, Opcode.MASKPOLL_BUSY)


def _tables(opt: bool) -> tuple[list[int], list[int]]:
    """Per-opcode (fixed length | 0 = read Size field | -1 = unknown) and Size-field offset."""
    fixed = [-1] * 256
    size_at = [-1] * 256
    for op, n in _FIXED_COMMON.items():
        fixed[op] = n
    for op in range(CUSTOM_MIN, 256):
        fixed[op], size_at[op] = 0, 4
    if opt:
        fixed[Opcode.WRITE] = 12
        for op in MASK_OPCODES:
            fixed[op] = 16
        fixed[Opcode.BLOCKWRITE], size_at[Opcode.BLOCKWRITE] = 0, 8
    else:
        fixed[Opcode.WRITE], size_at[Opcode.WRITE] = 0, 20
        fixed[Opcode.BLOCKWRITE], size_at[Opcode.BLOCKWRITE] = 0, 12
        for op in MASK_OPCODES:
            fixed[op], size_at[op] = 0, 24
    return fixed, size_at


# Per format: each opcode's fixed length (0 = read its Size field, -1 = unknown), Size-field offset.
LENGTH_TABLES = {False: _tables(False), True: _tables(True)}
_U32 = struct.Struct("<I").unpack_from


def opcode_name(opcode: int) -> str:
    """Readable name of an opcode (``CUSTOM_0x86`` for unnamed custom ops)."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"CUSTOM_{opcode:#04x}" if opcode >= CUSTOM_MIN else f"UNKNOWN_{opcode:#04x}"


def size_problem(opcode: int, size: int, opt: bool) -> str | None:
    """Why ``size`` is not a valid length for ``opcode`` (None when it is)."""
    if opcode == Opcode.WRITE and not opt:
        ok, want = size == 24, "24"
    elif opcode == Opcode.BLOCKWRITE:
        base = 12 if opt else 16
        ok, want = size >= base and (size - base) % 4 == 0, f"{base} + 4*n"
    elif opcode in MASK_OPCODES and not opt:
        ok, want = size == 32, "32"
    elif opcode == Opcode.DDR_PATCH:
        ok = size in (PATCH_SIZES_OPT if opt else (PATCH_SIZE_PLAIN,))
        want = "48 or 24" if opt else "48"
    elif opcode in (Opcode.TCT, Opcode.MERGE_SYNC):
        ok, want = size == 16, "16"
    elif opcode == Opcode.RECORD_TIMER:
        ok, want = size == 12, "12"
    elif opcode == Opcode.READ_REGS:
        ok, want = size >= 16 and (size - 16) % 8 == 0, "16 + 8*count"
    elif opcode >= CUSTOM_MIN:
        ok, want = size >= 8, ">= 8"
    else:
        return None
    return None if ok else f"Size field is {size}, expected {want}"


def _err(what: str, index: int, off: int, opcode: int | None) -> TxnFormatError:
    name = "" if opcode is None else f" {opcode_name(opcode)} (opcode {opcode:#04x})"
    return TxnFormatError(f"op {index}{name} at byte offset {off}: {what}")


def op_size(buf: bytes | memoryview, off: int, opt: bool, index: int = -1) -> int:
    """Length of the op at byte ``off`` by the per-opcode rules; raises naming op and offset."""
    fixed, size_at = LENGTH_TABLES[opt]
    end = len(buf)
    op = buf[off]
    size = fixed[op]
    if size == 0:
        at = off + size_at[op]
        if at + 4 > end:
            raise _err(f"truncated: its Size field needs bytes up to {at + 4}", index, off, op)
        size = _U32(buf, at)[0]
        problem = size_problem(op, size, opt)
        if problem:
            raise _err(problem, index, off, op)
    elif size < 0:
        raise _err("unknown opcode (not a known op and below the custom range)", index, off, op)
    if off + size > end:
        raise _err(f"truncated: op needs {size} bytes, only {end - off} remain", index, off, op)
    return size


# ---------------------------------------------------------------------------------------------
# Decoding
_P_WRITE = struct.Struct("<8xQI")  # reg_off @8, value @16
_P_BLOCK = struct.Struct("<8xI")  # reg_off @8 (payload @16)
_P_MASK = struct.Struct("<8xQII")  # reg_off @8, value @16, mask @20
_P_PATCH = struct.Struct("<16xI4xQQQ")  # action @16, regaddr @24, argidx @32, argplus @40
_O_WRITE = struct.Struct("<4xII")  # reg_off @4, value @8
_O_BLOCK = struct.Struct("<4xI")  # reg_off @4 (payload @12)
_O_MASK = struct.Struct("<4xIII")  # reg_off, value, mask
_O_PATCH24 = struct.Struct("<8xIB3xQ")  # regaddr @8, argidx @12, argplus @16
_PREEMPT = struct.Struct("<xB")
_LOADPDI = struct.Struct("<xxHIQ")
_LOAD_PM = struct.Struct("<II")  # opcode | count << 8, pm_load_id
_SCRATCH = struct.Struct("<xBxxIQ")
_STATE = struct.Struct("<xBBxI")
_UPDATE_REG = struct.Struct("<xBBxII")
_TWO_U32 = struct.Struct("<8xII")
_ONE_U32 = struct.Struct("<8xI")
_CUSTOM_HDR = struct.Struct("<B3xI")


def decode_op(buf: bytes | memoryview, off: int, size: int, opt: bool, index: int = -1) -> Op:
    """Decode the op of ``size`` bytes at ``off`` (already framed by :func:`scan`)."""
    raw = bytes(buf[off : off + size])
    op = raw[0]
    if op == Opcode.WRITE:
        reg, val = _O_WRITE.unpack_from(raw) if opt else _P_WRITE.unpack_from(raw)
        return Write(reg, val, raw=raw)
    if op == Opcode.BLOCKWRITE:
        head = 12 if opt else 16
        (reg,) = (_O_BLOCK if opt else _P_BLOCK).unpack_from(raw)
        return BlockWrite(reg, np.frombuffer(raw, dtype="<u4", offset=head).copy(), raw=raw)
    if op in MASK_OPCODES:
        reg, val, mask = (_O_MASK if opt else _P_MASK).unpack_from(raw)
        cls = {Opcode.MASKWRITE: MaskWrite, Opcode.MASKPOLL: MaskPoll}.get(op, MaskPollBusy)
        return cls(reg, val, mask, raw=raw)
    if op == Opcode.DDR_PATCH:
        if size == PATCH_SIZE_OPT24 and opt:
            regaddr, argidx, argplus = _O_PATCH24.unpack_from(raw)
            return DdrPatch(regaddr, argidx, argplus, raw=raw)
        action, regaddr, argidx, argplus = _P_PATCH.unpack_from(raw)
        return DdrPatch(regaddr, argidx, argplus, action=action, raw=raw)
    if op == Opcode.TCT:
        return Tct(*_TWO_U32.unpack_from(raw), raw=raw)
    if op == Opcode.MERGE_SYNC:
        return MergeSync(*_TWO_U32.unpack_from(raw), raw=raw)
    if op == Opcode.RECORD_TIMER:
        return RecordTimer(_ONE_U32.unpack_from(raw)[0], raw=raw)
    if op == Opcode.READ_REGS:
        (count,) = _ONE_U32.unpack_from(raw)
        if 16 + 8 * count != size:
            raise _err(f"READ_REGS count {count} disagrees with Size {size}", index, off, op)
        return ReadRegs(struct.unpack_from(f"<{count}Q", raw, 16), raw=raw)
    if op >= FIRST_UNKNOWN_CUSTOM_OP:
        return CustomOp(op, raw[8:], raw=raw)
    if op == Opcode.NOOP:
        return Noop(raw=raw)
    if op == Opcode.PREEMPT:
        return Preempt(_PREEMPT.unpack_from(raw)[0], raw=raw)
    if op == Opcode.LOADPDI:
        return LoadPdi(*_LOADPDI.unpack_from(raw), raw=raw)
    if op == Opcode.LOAD_PM_START:
        word, pm_id = _LOAD_PM.unpack_from(raw)
        return LoadPmStart(word >> 8, pm_id, raw=raw)
    if op == Opcode.CREATE_SCRATCHPAD:
        return CreateScratchpad(*_SCRATCH.unpack_from(raw), raw=raw)
    if op == Opcode.UPDATE_STATE_TABLE:
        return UpdateStateTable(*_STATE.unpack_from(raw), raw=raw)
    if op == Opcode.UPDATE_REG:
        return UpdateReg(*_UPDATE_REG.unpack_from(raw), raw=raw)
    if op == Opcode.UPDATE_SCRATCH:
        return UpdateScratch(raw=raw)
    raise _err("unknown opcode", index, off, op)


# ---------------------------------------------------------------------------------------------
# Encoding
def encoded_size(op: Op, opt: bool, patch_size: int | None = None) -> int:
    """Length in bytes of ``op`` once encoded in the given format."""
    code = op.opcode
    if code == Opcode.WRITE:
        return 12 if opt else 24
    if code == Opcode.BLOCKWRITE:
        return (12 if opt else 16) + 4 * len(op.values)  # type: ignore[union-attr]
    if code in MASK_OPCODES:
        return 16 if opt else 32
    if code == Opcode.DDR_PATCH:
        if not opt:
            return PATCH_SIZE_PLAIN
        if patch_size is not None:
            return patch_size
        raw = op.raw
        return len(raw) if raw is not None and len(raw) in PATCH_SIZES_OPT else PATCH_SIZE_PLAIN
    if code in (Opcode.TCT, Opcode.MERGE_SYNC):
        return 16
    if code == Opcode.RECORD_TIMER:
        return 12
    if code == Opcode.READ_REGS:
        return 16 + 8 * len(op.addresses)  # type: ignore[union-attr]
    if isinstance(op, CustomOp):
        return 8 + len(op.payload)
    return _FIXED_COMMON[Opcode(code)]


def encode_op(
    op: Op, opt: bool, *, patch_size: int | None = None, use_raw: bool = True, index: int = -1
) -> bytes:
    """Serialize one op. Starts from ``op.raw`` when ``use_raw`` and its length still fits."""
    size = encoded_size(op, opt, patch_size)
    raw = op.raw if use_raw else None
    out = bytearray(raw) if raw is not None and len(raw) == size else bytearray(size)
    try:
        _fill(out, op, opt, size)
    except (struct.error, OverflowError, ValueError) as exc:
        raise TxnFormatError(
            f"op {index} {opcode_name(op.opcode)}: a field does not fit the "
            f"{'optimised' if opt else 'plain'} layout ({op!r}): {exc}"
        ) from None
    return bytes(out)


def _put(out: bytearray, off: int, fmt: str, *values: int) -> None:
    # struct's "x" pad codes would write zeros over raw padding, so fields are packed one by one.
    struct.pack_into("<" + fmt, out, off, *values)


def _fill(out: bytearray, op: Op, opt: bool, size: int) -> None:
    code = op.opcode
    if not 0 <= code <= 0xFF:
        raise ValueError(f"opcode {code} is not a byte")
    out[0] = code
    if code >= CUSTOM_MIN:
        _put(out, 4, "I", size)
    match op:
        case Write():
            if opt:
                _put(out, 4, "II", op.reg_off, op.value)
            else:
                _put(out, 8, "QII", op.reg_off, op.value, size)
        case BlockWrite():
            head = 12 if opt else 16
            _put(out, head - 8, "II", op.reg_off, size)
            out[head:] = op.values.astype("<u4").tobytes()
        case MaskWrite() | MaskPoll() | MaskPollBusy():
            if opt:
                _put(out, 4, "III", op.reg_off, op.value, op.mask)
            else:
                _put(out, 8, "QIII", op.reg_off, op.value, op.mask, size)
        case DdrPatch():
            if size == PATCH_SIZE_OPT24:
                _put(out, 8, "IB", op.regaddr, op.argidx)
                _put(out, 16, "Q", op.argplus)
            else:
                _put(out, 16, "I", op.action)
                _put(out, 24, "QQQ", op.regaddr, op.argidx, op.argplus)
        case Tct() | MergeSync():
            _put(out, 8, "II", op.word, op.config)
        case RecordTimer():
            _put(out, 8, "I", op.timer_id)
        case ReadRegs():
            _put(out, 8, "I", len(op.addresses))
            _put(out, 16, f"{len(op.addresses)}Q", *op.addresses)
        case CustomOp():
            if code < FIRST_UNKNOWN_CUSTOM_OP:
                raise ValueError(
                    f"CustomOp opcode {code:#x} must be >= {FIRST_UNKNOWN_CUSTOM_OP:#x}"
                )
            out[8:] = op.payload
        case Noop() | UpdateScratch():
            pass
        case Preempt():
            _put(out, 1, "B", op.level)
        case LoadPdi():
            _put(out, 2, "HIQ", op.pdi_id, op.pdi_size, op.pdi_address)
        case LoadPmStart():
            if not 0 <= op.load_sequence_count < 1 << 24:
                raise ValueError(f"load_sequence_count {op.load_sequence_count} exceeds 24 bits")
            _put(out, 0, "II", code | op.load_sequence_count << 8, op.pm_load_id)
        case CreateScratchpad():
            _put(out, 1, "B", op.usage_type)
            _put(out, 4, "IQ", op.size, op.scratch_offset)
        case UpdateStateTable():
            _put(out, 1, "BB", op.state_table_idx, op.func)
            _put(out, 4, "I", op.func_arg)
        case UpdateReg():
            _put(out, 1, "BB", op.state_table_idx, op.func)
            _put(out, 4, "II", op.func_arg, op.reg_off)
        case _:
            raise ValueError(f"not a transaction op: {op!r}")
