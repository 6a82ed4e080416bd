"""Memory of a Session on the emulator: weights held once, nothing proportional to them per run.

A 4-bit MLP with an 18 MB weight image: a repeated ``Session.run`` may allocate the 4-bit
kernel's cache-sized dequantization band and activation-sized arrays, never a copy of the weights
(before: the operand gathers, their join and a full float32 dequantization, ~8x the image).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from npudispatch.dispatch import Session, compile_model
from npudispatch.examples.llama import llama2_mlp
from npudispatch.operators import q4_kernel


@pytest.fixture(scope="module")
def mlp_session(tmp_path_factory) -> Session:
    folder = tmp_path_factory.mktemp("mlp") / "program"
    compile_model(llama2_mlp(hidden=2048, intermediate=5632, m=1)).save(folder)
    return Session(folder, backend="emulator")


def test_repeated_run_allocates_no_weight_sized_memory(mlp_session: Session):
    sess = mlp_session
    (program,) = sess.programs
    weights = len(program.const_image)
    assert weights > 16 << 20
    x = {"X": np.random.default_rng(0).standard_normal(sess.get_inputs()[0].shape).astype("f4")}
    (first,) = sess.run(None, x)
    tracemalloc.start()
    try:
        (second,) = sess.run(None, x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(first, second)
    # per 4-bit kernel thread the scratch of its chunk (q4_kernel.scratch_bytes: fixed by the
    # chunk size, ~3 MB here), plus activations: a fixed few MB, far below the weights
    scratch = max(q4_kernel.scratch_bytes(k, n, 128) for k, n in ((2048, 5632), (5632, 2048)))
    bound = (1 << 20) + q4_kernel.Q4_MATMUL_THREADS * scratch
    assert bound < weights / 2
    assert peak < bound, f"a run allocated {peak:,} B at its peak ({weights:,} B of weights)"


def test_loaded_program_holds_its_weight_image_once(mlp_session: Session):
    """The emulator uses the loaded const image in place (copy on write), not a second copy."""
    (program,) = mlp_session.programs
    (segment,) = [s for s in mlp_session._segments if hasattr(s, "prepared")]
    const = segment.prepared.npu.buffers[3]
    assert np.shares_memory(const, np.frombuffer(program.const_image, np.uint8))
