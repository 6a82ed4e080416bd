"""AIE transaction binaries: byte-exact codec, builder, re-basing, fusion and inspection."""

from npudispatch.txn.builder import TxnBuilder
from npudispatch.txn.codec import decode_op, encode_op, opcode_name
from npudispatch.txn.explain import BdTransfer, DataMovement, DmaTask, Transfer, explain
from npudispatch.txn.framing import OpIndex, scan
from npudispatch.txn.fuse import fuse, fuse_rebased, to_opt, to_plain, unwrap, wrap
from npudispatch.txn.header import HEADER_SIZE, TxnHeader
from npudispatch.txn.inspect import describe_op, dump, stats
from npudispatch.txn.ops import CustomOp, Op, Opcode
from npudispatch.txn.rebase import ArgRange, patches, rebase, rebase_tiling
from npudispatch.txn.transaction import INDEX_CACHE, Transaction

__all__ = [
    "HEADER_SIZE",
    "INDEX_CACHE",
    "ArgRange",
    "BdTransfer",
    "CustomOp",
    "DataMovement",
    "DmaTask",
    "Op",
    "OpIndex",
    "Opcode",
    "Transaction",
    "Transfer",
    "TxnBuilder",
    "TxnHeader",
    "decode_op",
    "describe_op",
    "dump",
    "encode_op",
    "explain",
    "fuse",
    "fuse_rebased",
    "opcode_name",
    "patches",
    "rebase",
    "rebase_tiling",
    "scan",
    "stats",
    "to_opt",
    "to_plain",
    "unwrap",
    "wrap",
]
