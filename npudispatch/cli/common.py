"""Small helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from npudispatch.errors import ModelError, NpuDispatchError, TxnFormatError

# ONNX stores dims as int64; larger values cannot even be serialized.
MAX_DIM = 2**63 - 1


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """Parse repeated ``--dims name=value`` options into a dict, with clear errors."""
    dims: dict[str, int] = {}
    for item in items or []:
        for part in item.split(","):
            if not part:
                continue
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name or not value.isdigit():
                raise ModelError(
                    f"--dims expects NAME=INT with a non-negative INT (e.g. --dims batch=1), "
                    f"got {part!r}"
                )
            size = int(value)
            if size > MAX_DIM:
                raise ModelError(f"--dims {name}={value}: a dim must be at most {MAX_DIM}")
            if dims.get(name, size) != size:
                raise ModelError(
                    f"--dims gives {name!r} twice with different values ({dims[name]} and "
                    f"{size}); give it once"
                )
            dims[name] = size
    return dims


def parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse repeated ``--shape INPUT=1x3x224x224`` options into ``{input: shape}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or []:
        name, sep, text = item.rpartition("=")
        parts = text.strip().lower().split("x")
        if not sep or not name.strip() or not all(p.strip().isdigit() for p in parts):
            raise ModelError(
                f"--shape expects INPUT=D0xD1x... with non-negative ints (e.g. --shape "
                f"x=1x3x224x224), got {item!r}"
            )
        shape = tuple(int(p) for p in parts)
        if any(d > MAX_DIM for d in shape):
            raise ModelError(f"--shape {item}: a dim must be at most {MAX_DIM}")
        name = name.strip()
        if shapes.get(name, shape) != shape:
            raise ModelError(f"--shape gives input {name!r} twice with different shapes")
        shapes[name] = shape
    return shapes


def add_dims_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--dims NAME=INT`` and ``--shape INPUT=1x3x224x224``, used by every model command."""
    parser.add_argument(
        "--dims",
        action="append",
        metavar="NAME=INT",
        help="bind a symbolic dimension by name (repeatable, or comma-separated)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        metavar="INPUT=D0xD1x...",
        help="give a graph input its whole shape, e.g. x=1x3x224x224 (repeatable; works for "
        "unnamed dims and for dims that share a name such as '?')",
    )


def non_negative(kind: type[int] | type[float]):
    """argparse ``type=`` converter accepting only values >= 0 of ``kind``."""

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
        if not value >= 0:  # also rejects NaN
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


@contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``what`` to ``path`` into one clear npudispatch error."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise NpuDispatchError(
            f"cannot write {what} to {str(path)!r}: {reason}{where}; choose a writable path"
        ) from exc


def output_dir(path: Path, what: str) -> Path:
    """Create the output directory ``path`` (parents too); refuse an existing non-directory."""
    if path.exists() and not path.is_dir():
        raise NpuDispatchError(
            f"-o {str(path)!r} is an existing file, not a directory; give a new or existing "
            f"folder for {what}"
        )
    with writing(path, what):
        path.mkdir(parents=True, exist_ok=True)
    return path


def output_file(path: Path, what: str) -> Path:
    """Check that ``path`` can be written as a file: not a directory; parents are created."""
    if path.is_dir():
        raise NpuDispatchError(
            f"-o {str(path)!r} is a directory; give a file name for {what} (e.g. {path / 'out'})"
        )
    with writing(path, what):
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_input_file(path: str | Path, what: str) -> bytes:
    """The bytes of the input file ``path``; a missing path, a directory or an unreadable file
    raises ``ModelError`` naming it."""
    file = Path(path)
    if file.is_dir():
        raise ModelError(f"{str(file)!r} is a directory; give the path of a {what} file")
    if not file.is_file():
        raise ModelError(f"{str(file)!r} does not exist; give the path of a {what} file")
    try:
        return file.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read {what} file {str(file)!r}: {exc.strerror or exc}") from exc


def load_transaction(path: str | Path) -> Any:
    """Read a transaction binary, plain or wrapped in the 8-byte instruction-buffer frame.

    A TXN header never has version 0.0, so a file starting with two zero bytes is taken as a
    wrapped image and its frame is checked (a wrong frame is reported as such).
    """
    from npudispatch.txn import Transaction, unwrap

    file = Path(path)
    if file.is_dir() or not file.is_file():
        state = "is a directory" if file.is_dir() else "does not exist"
        raise TxnFormatError(f"{path}: {state}; give the path of a transaction binary (.bin)")
    data = read_input_file(file, "transaction")
    try:
        if data[:2] == b"\0\0" and len(data) >= 8:
            try:
                return unwrap(data)  # instruction-buffer image: 8-byte frame + transaction
            except TxnFormatError as exc:
                if "frame" not in str(exc):
                    raise
                raise TxnFormatError(
                    f"{exc}: the file starts like an instruction-buffer image (u32 0, u32 total "
                    f"size = {len(data)}) but its frame is wrong; re-create it with txn.wrap() "
                    "or pass the raw transaction"
                ) from None
        return Transaction.from_bytes(data)
    except TxnFormatError as exc:
        raise TxnFormatError(f"{path}: {exc}") from None


def print_json(obj: Any) -> None:
    """Print one JSON object on stdout (stable key order as given)."""
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
