"""Fixtures for backend tests: an installed fake pyxrt and a fake xclbin on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from npudispatch.testing import KernelCall, install_fake_pyxrt, write_fake_xclbin


def add_one_executor(call: KernelCall) -> None:
    """A trivial device: output BO (arg 4) = input BO (arg 3) + 1, on device memory."""
    src, dst = call.buffer(3), call.buffer(4)
    n = min(len(src.view), len(dst.view))
    np.frombuffer(dst.view, np.uint8)[:n] = np.frombuffer(src.view, np.uint8)[:n] + 1


@pytest.fixture
def fake_xrt() -> Iterator[ModuleType]:
    """The fake ``pyxrt`` with the add-one device, removed again after the test."""
    with install_fake_pyxrt(add_one_executor) as mod:
        yield mod


@pytest.fixture
def add_one():
    """The add-one executor, for tests that install their own fake."""
    return add_one_executor


@pytest.fixture
def xclbin_path(tmp_path: Path) -> Path:
    """A fake MLIR_AIE xclbin (+ JSON sidecar)."""
    return write_fake_xclbin(tmp_path / "fake.xclbin")
