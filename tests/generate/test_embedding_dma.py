"""The Qwen2 genai decoders' token embedding runs as a DMA gather (issue 14): per decode step the
device reads the one table row of the new token, at that token's address, instead of the whole
table. Checked on what the emulator's shim DMAs actually moved during the step."""

from __future__ import annotations

import numpy as np
import pytest
from corpus_util import MODELS_DIR

from npudispatch.errors import ModelError
from npudispatch.generate import Generator
from npudispatch.overlay_abi import BufferKind

FOLDER = MODELS_DIR / "qwen2_tiny_fp32"
pytestmark = pytest.mark.skipif(
    not FOLDER.is_dir(),
    reason="needs the Qwen2 genai folders in ../shared/models beside the checkout",
)


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FOLDER, max_length=16, prefill_length=4)


def _table_reads(gen: Generator, phase: str) -> list[tuple[int, int]]:
    """``(offset, bytes)`` of every const-buffer read inside the embedding table during the
    last run of ``phase``, and the table's base, row size and row count."""
    (program,) = gen.phases[phase].programs
    sites = program.patch_sites
    base, row_bytes, rows = sites[0].base, sites[0].row_bytes, sites[0].rows
    npu = gen.device.slots[0].memory.npu
    reads = [
        ((t.offset - base) // row_bytes, t.nbytes)
        for t in npu.transfers
        if t.argidx == BufferKind.CONST and base <= t.offset < base + rows * row_bytes
    ]
    return reads


def test_every_phase_gathers_the_embedding_by_dma(gen):
    for phase in gen.phases.values():
        (program,) = phase.programs
        (path,) = program.gathers().values()
        assert path.startswith("dma: ") and "'input_ids'" in path
        assert {s.input for s in program.patch_sites} == {"input_ids"}


def test_decode_step_reads_one_embedding_row_not_the_table(gen):
    cfg = gen.config
    row_bytes = cfg.num_heads * cfg.head_size * 2  # bf16 rows of hidden_size 192
    (decode,) = gen.phases["decode"].programs
    (site,) = decode.patch_sites  # one token per step: one row address to patch
    assert (site.rows, site.row_bytes) == (cfg.vocab_size, row_bytes)
    table_bytes = cfg.vocab_size * row_bytes  # what the row-copy kernel streamed every step
    assert table_bytes == 147_456

    # the cost model counts one row per step
    (embed,) = [op for op in decode.estimate().ops if op.op_type == "Gather"]
    assert embed.bytes_by_buffer["const"]["read"] == row_bytes

    # and the device moved exactly that row, the new token's, during each decode step
    ids = [1, 17, 200, 33, 5, 99, 150]  # 4 prefill positions, then 3 decode steps
    logits = gen.teacher_forced_logits(ids)
    assert np.isfinite(logits).all()
    assert _table_reads(gen, "decode") == [(ids[-1], row_bytes)]
    last, stats = gen._decode(383, len(ids))  # the table's last row...
    assert stats.kernel_calls == 1
    assert _table_reads(gen, "decode") == [(383, row_bytes)]
    wrapped, _ = gen._decode(-1, len(ids))  # ...and -1 wraps to it, as in onnxruntime
    assert _table_reads(gen, "decode") == [(383, row_bytes)]
    np.testing.assert_array_equal(wrapped, last)


def test_prefill_reads_the_prompt_rows(gen):
    ids = [5, 5, 300]
    gen.teacher_forced_logits(ids)
    pad = gen.config.pad_token_id
    row_bytes = gen.config.num_heads * gen.config.head_size * 2
    want = [(t, row_bytes) for t in [*ids, pad]]  # prompt right-padded to prefill_length
    assert sorted(_table_reads(gen, "prefill")) == sorted(want)


def test_token_id_outside_the_table_is_refused_on_the_device(gen):
    """The generator checks prompts itself; the device-side check guards any other caller."""
    vocab = gen.config.vocab_size
    feeds = {
        gen.config.input_ids: np.asarray([[vocab + 5]], np.int64),
        gen.config.attention_mask: np.ones((1, gen.max_length), np.int64),
    }
    with pytest.raises(ModelError, match=rf"index {vocab + 5} at position \[0, 0\] of input "):
        gen.device.run("decode", feeds)
