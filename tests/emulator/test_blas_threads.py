"""The virtual NPU bounds OpenBLAS's threads while it runs a program and restores them after."""

from __future__ import annotations

import numpy as np
import pytest

from npudispatch.emulator import VirtualNpu
from npudispatch.emulator.blas import _openblas, limited_blas_threads


@pytest.fixture
def openblas():
    funcs = _openblas()
    if funcs is None:
        pytest.skip("numpy is not linked against OpenBLAS here: nothing to bound")
    get, set_ = funcs
    before = get()
    set_(2)  # a count above the kernel limit, so the bound is observable even on 1 core
    yield get
    set_(before)


def test_limit_applies_inside_and_is_restored(openblas) -> None:
    with limited_blas_threads(1):
        assert openblas() == 1
    assert openblas() == 2


def test_limit_is_restored_when_the_block_raises(openblas) -> None:
    with pytest.raises(RuntimeError), limited_blas_threads(1):
        raise RuntimeError("kernel crashed")
    assert openblas() == 2


def test_virtual_npu_run_restores_the_thread_count(openblas) -> None:
    seen: list[int] = []

    class Probe:  # an empty op sequence that records the BLAS threads it is iterated with
        def __iter__(self):
            seen.append(openblas())
            return iter([])

    npu = VirtualNpu([np.zeros(4, np.uint8), 4, 0, 0, 0], kernel_blas_threads=1)
    npu.run(Probe())
    assert seen == [1]
    assert openblas() == 2
