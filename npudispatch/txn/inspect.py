"""Human-readable views of a transaction: :func:`dump` (one line per op) and :func:`stats`."""

from __future__ import annotations

import dataclasses

import numpy as np

from npudispatch.txn.codec import opcode_name
from npudispatch.txn.ops import (
    BlockWrite,
    CustomOp,
    DdrPatch,
    MaskPoll,
    MaskPollBusy,
    MaskWrite,
    MergeSync,
    Op,
    Tct,
    Write,
)
from npudispatch.txn.rebase import patches
from npudispatch.txn.registers import (
    SHIM_BD_BASE,
    SHIM_BD_STRIDE,
    SHIM_BD_WORDS,
    SHIM_ROW,
    decode_shim_bd_offset,
    decode_shim_queue,
    decode_shim_status,
    split_addr,
)
from npudispatch.txn.shim import ShimBd, TaskQueueEntry
from npudispatch.txn.transaction import Transaction

_MAX_WORDS_SHOWN = 8


def _reg(addr: int) -> str:
    col, row, off = split_addr(addr)
    return f"c{col} r{row} {off:#07x}"


def _shim_bds(op: BlockWrite) -> str | None:
    """Decoded shim BDs when the BLOCKWRITE covers whole shim BDs, else None."""
    _, row, off = split_addr(op.reg_off)
    n = len(op.values)
    first = decode_shim_bd_offset(off)
    if row != SHIM_ROW or first is None or (off - SHIM_BD_BASE) % SHIM_BD_STRIDE or n % 8 or not n:
        return None
    parts = []
    for k in range(n // SHIM_BD_WORDS):
        bd = ShimBd.decode(op.values[k * SHIM_BD_WORDS : (k + 1) * SHIM_BD_WORDS])
        nxt = f" next BD{bd.next_bd}" if bd.use_next_bd else ""
        parts.append(
            f"shim BD{first + k}: {bd.length_words} words @ {bd.address:#x}, "
            f"{bd.access_pattern()}{nxt}{'' if bd.valid else ' INVALID'}"
        )
    return "; ".join(parts)


def describe_op(op: Op) -> str:
    """Decoded fields of one op (the part after the opcode name in :func:`dump`)."""
    match op:
        case Write():
            col, row, off = split_addr(op.reg_off)
            text = f"{_reg(op.reg_off)} = {op.value:#010x}"
            queue = decode_shim_queue(off) if row == SHIM_ROW else None
            if queue is not None:
                e = TaskQueueEntry.decode(op.value)
                text += (
                    f"  [col {col} {queue[0].name}{queue[1]} push BD{e.start_bd} "
                    f"repeat {e.repeat_count}{' token' if e.issue_token else ''}]"
                )
            return text
        case BlockWrite():
            text = f"{_reg(op.reg_off)} {len(op.values)} words"
            bds = _shim_bds(op)
            if bds is not None:
                return f"{text}  [{bds}]"
            shown = " ".join(f"{v:#x}" for v in op.values[:_MAX_WORDS_SHOWN].tolist())
            more = " ..." if len(op.values) > _MAX_WORDS_SHOWN else ""
            return f"{text}: {shown}{more}"
        case MaskWrite() | MaskPoll() | MaskPollBusy():
            col, row, off = split_addr(op.reg_off)
            text = f"{_reg(op.reg_off)} value {op.value:#x} mask {op.mask:#x}"
            status = decode_shim_status(off) if row == SHIM_ROW else None
            if status is not None and not isinstance(op, MaskWrite):
                text += f"  [wait col {col} {status[0].name}{status[1]}]"
            return text
        case DdrPatch():
            col, row, off = split_addr(op.regaddr)
            bd = decode_shim_bd_offset(off) if row == SHIM_ROW else None
            where = (
                f" (shim BD{bd} word {(off - SHIM_BD_BASE) % 32 // 4})" if bd is not None else ""
            )
            return f"{_reg(op.regaddr)}{where} <- arg {op.argidx} + {op.argplus:#x}"
        case Tct():
            return (
                f"col {op.col} row {op.row} dir {op.direction} ch {op.channel} "
                f"cols {op.col_count} rows {op.row_count}"
            )
        case MergeSync():
            return f"tokens {op.num_tokens} cols {op.num_cols}"
        case CustomOp():
            return f"payload {op.payload.hex()}"
    names = [f.name for f in dataclasses.fields(op) if f.name != "raw"]
    return " ".join(f"{n}={getattr(op, n)}" for n in names)


def dump(txn: Transaction) -> str:
    """One line per op: index, byte offset, opcode name and decoded fields."""
    h = txn.header
    lines = [
        f"# TXN {'opt 1.0' if txn.is_opt else 'plain 0.1'} dev_gen {h.dev_gen} rows {h.num_rows} "
        f"cols {h.num_cols} memtile_rows {h.num_mem_tile_rows} ops {h.num_ops} bytes {h.txn_size}"
    ]
    _, index = txn.framed()
    for i, (off, op) in enumerate(zip(index.offsets.tolist(), txn.iter_ops())):
        lines.append(f"{i:6d} {off:#09x} {opcode_name(op.opcode):<14} {describe_op(op)}")
    return "\n".join(lines)


def stats(txn: Transaction) -> dict:
    """Opcode histogram, bytes per opcode, and DDR patches per argidx (no op decoding)."""
    _, index = txn.framed()
    h = txn.header
    codes, counts = np.unique(index.opcodes, return_counts=True)
    by_bytes = np.bincount(index.opcodes, weights=index.sizes, minlength=256)
    found = patches(txn)
    args, arg_counts = np.unique(
        np.array([p[2] for p in found], dtype=np.uint64), return_counts=True
    )
    return {
        "format": "opt" if txn.is_opt else "plain",
        "dev_gen": h.dev_gen,
        "num_rows": h.num_rows,
        "num_cols": h.num_cols,
        "num_ops": h.num_ops,
        "nbytes": h.txn_size,
        "opcodes": {opcode_name(int(c)): int(n) for c, n in zip(codes, counts)},
        "bytes_by_opcode": {opcode_name(int(c)): int(by_bytes[c]) for c in codes},
        "ddr_patches": len(found),
        "ddr_patches_by_argidx": {int(a): int(n) for a, n in zip(args, arg_counts)},
    }
