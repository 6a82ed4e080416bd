"""npudispatch.txn.html: the notebook summary of a transaction."""

from __future__ import annotations

import re
from pathlib import Path

from npudispatch.txn import Transaction, TxnBuilder
from npudispatch.txn.html import html_table, transaction_html
from npudispatch.txn.registers import Direction
from npudispatch.txn.shim import ShimBd


def _rows(html_text: str, section: str) -> list[list[str]]:
    """Cells of the first table after the section title ``section``."""
    start = html_text.index(f"<b>{section}")
    table = html_text[start:].split("</table>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]


def small_txn() -> Transaction:
    """MM2S of 1 KiB from arg 3 (repeated twice), S2MM of 512 B into arg 1, both waited on."""
    b = TxnBuilder(num_cols=2)
    b.shim_bd(0, 0, ShimBd(length_words=256), argidx=3, argplus=0x40)
    b.push_task(0, Direction.MM2S, 0, 0, repeat_count=1)
    b.shim_bd(1, 1, ShimBd(length_words=128), argidx=1, argplus=0)
    b.push_task(1, Direction.S2MM, 0, 1)
    b.wait_channel_idle(0, Direction.MM2S, 0).wait_channel_idle(1, Direction.S2MM, 0)
    return b.build()


def test_sections_reflect_the_transaction():
    txn = small_txn()
    out = transaction_html(txn)
    assert f"{txn.num_ops:,} ops" in out and "plain 0.1" in out
    histogram = {r[0]: int(r[1]) for r in _rows(out, "op histogram")}
    assert histogram == {"BLOCKWRITE": 2, "DDR_PATCH": 2, "WRITE": 2, "MASKPOLL": 2}
    assert _rows(out, "DDR patches") == [["1", "1"], ["3", "1"]]
    movement = _rows(out, "data movement")
    # largest first: two executions of the 1 KiB BD, then the 512 B write-back
    assert movement == [
        ["0", "MM2S", "0", "3", "1", "2,048"],
        ["1", "S2MM", "0", "1", "1", "512"],
    ]
    assert "2 tasks, 2,560 B moved in total" in out


def test_row_limit_says_what_was_left_out():
    out = transaction_html(small_txn(), max_movement_rows=1)
    assert len(_rows(out, "data movement")) == 1
    assert "1 more rows not shown" in out


def test_without_patches_or_dma():
    b = TxnBuilder()
    b.write(0x1000, 1)
    out = transaction_html(b.build())
    assert "no DDR_PATCH ops" in out and "no shim DMA tasks" in out


def test_html_table_escapes_except_raw_columns():
    out = html_table(("a<b", "c"), [("<x>", "<i>ok</i>")], raw_columns=(1,))
    assert "<th>a&lt;b</th>" in out
    assert "<td>&lt;x&gt;</td>" in out and "<td><i>ok</i></td>" in out


def test_corpus_silu(corpus_dir: Path):
    txn = Transaction.from_bytes((corpus_dir / "silu" / "silu_v1_a16_1_11008.bin").read_bytes())
    out = transaction_html(txn)
    assert _rows(out, "DDR patches") == [["0", "8"], ["1", "8"]]
    movement = _rows(out, "data movement")
    assert len(movement) == 16  # 8 columns x (MM2S from arg 0, S2MM to arg 1)
    assert {(r[1], r[3]) for r in movement} == {("MM2S", "0"), ("S2MM", "1")}
    assert sum(int(r[5].replace(",", "")) for r in movement) == 2 * 11008 * 2
