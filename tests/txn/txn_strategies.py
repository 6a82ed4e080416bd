"""Hypothesis strategies for typed transaction ops (every op type)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from npudispatch.txn import ops as o

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)


def op_strategy(*, opt_safe: bool = False, patch24: bool = False) -> st.SearchStrategy[o.Op]:
    """Any op; ``opt_safe`` keeps fields within the optimised layout (u32 registers)."""
    reg = U32 if opt_safe else U64
    argidx = U8 if patch24 else U64
    regaddr = U32 if (opt_safe or patch24) else U64
    words = st.lists(U32, max_size=24).map(lambda v: np.array(v, dtype=np.uint32))
    return st.one_of(
        st.builds(o.Write, reg, U32),
        st.builds(o.BlockWrite, U32, words),
        st.builds(o.MaskWrite, reg, U32, U32),
        st.builds(o.MaskPoll, reg, U32, U32),
        st.builds(o.MaskPollBusy, reg, U32, U32),
        st.builds(o.Noop),
        st.builds(o.Preempt, U8),
        st.builds(o.LoadPdi, U16, U32, U64),
        st.builds(o.LoadPmStart, st.integers(0, (1 << 24) - 1), U32),
        st.builds(o.CreateScratchpad, U8, U32, U64),
        st.builds(o.UpdateStateTable, U8, U8, U32),
        st.builds(o.UpdateReg, U8, U8, U32, U32),
        st.builds(o.UpdateScratch),
        st.builds(o.Tct, U32, U32),
        st.builds(
            o.DdrPatch,
            regaddr,
            argidx,
            U64,
            action=st.just(0) if patch24 else U32,
        ),
        st.builds(o.ReadRegs, st.lists(U64, max_size=4).map(tuple)),
        st.builds(o.RecordTimer, U32),
        st.builds(o.MergeSync, U32, U32),
        st.builds(o.CustomOp, st.integers(0x85, 0xFF), st.binary(max_size=24)),
    )
