"""Fixtures for operator tests (helpers live in opkit.py)."""

from __future__ import annotations

import numpy as np
import pytest
from opkit import BF16


@pytest.fixture(params=[np.dtype(np.float32), BF16], ids=["f32", "bf16"])
def float_dtype(request) -> np.dtype:
    """Both supported float dtypes."""
    return request.param
