"""`npudispatch txn dump|stats|explain` through the CLI entry point."""

from __future__ import annotations

import argparse
import json

import pytest

from npudispatch.cli import txn_cmd
from npudispatch.txn import Transaction, TxnBuilder, wrap
from npudispatch.txn.registers import Direction
from npudispatch.txn.shim import ShimBd


def _main():
    """npudispatch.cli.main (every command module must import)."""
    from npudispatch import cli

    return cli.main


@pytest.fixture
def txn_file(tmp_path):
    b = TxnBuilder(num_cols=2)
    b.shim_bd(1, 2, ShimBd(length_words=16), argidx=1, argplus=0x40)
    b.push_task(1, Direction.S2MM, 0, 2)
    b.wait_channel_idle(1, Direction.S2MM, 0)
    path = tmp_path / "t.bin"
    path.write_bytes(b.build().to_bytes())
    return path


def _run_own_parser(argv):
    parser = argparse.ArgumentParser()
    txn_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_register_adds_every_txn_subcommand(txn_file, capsys):
    assert _run_own_parser(["txn", "stats", str(txn_file)]) == 0
    assert "DDR patches" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    txn_cmd.register(parser.add_subparsers(dest="command", required=True))
    for name in ("dump", "stats", "explain", "trace"):
        assert parser.parse_args(["txn", name, str(txn_file)]).txn_command == name


def test_cli_dump(txn_file, capsys):
    assert _main()(["txn", "dump", str(txn_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 4
    assert "BLOCKWRITE" in out[1] and "shim BD2: 16 words" in out[1]
    assert out[2].split()[:3] == ["1", "0x0000040", "DDR_PATCH"]
    assert "S2MM0 push BD2" in out[3] and "wait col 1 S2MM0" in out[4]


def test_cli_stats_json(txn_file, capsys):
    assert _main()(["txn", "stats", str(txn_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opcodes"] == {"WRITE": 1, "BLOCKWRITE": 1, "MASKPOLL": 1, "DDR_PATCH": 1}
    assert info["ddr_patches_by_argidx"] == {"1": 1}


def test_cli_explain(txn_file, tmp_path, capsys):
    assert _main()(["txn", "explain", str(txn_file)]) == 0
    out = capsys.readouterr().out
    assert "col 1 S2MM0 BD2: arg 1 + 0x40, 64 B, linear" in out
    assert "col 1 S2MM0 arg 1: 64 B" in out
    wrapped = tmp_path / "w.bin"
    wrapped.write_bytes(wrap(Transaction.from_bytes(txn_file.read_bytes())))
    assert _main()(["txn", "explain", str(wrapped), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"] == [
        {"col": 1, "direction": "S2MM", "channel": 0, "argidx": 1, "nbytes": 64}
    ]


def test_cli_reports_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0\x01\x04\x06\x04\x01\0\0\x05\0\0\0\x14\0\0\0\x05\0\0\0")
    assert _main()(["txn", "dump", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.bin" in err and "NumOps" in err
