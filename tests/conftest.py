"""Shared pytest fixtures: the AMD transaction corpus beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus_util import CORPUS_DIR, CORPUS_SKIP_REASON, corpus_available, corpus_files

__all__ = ["CORPUS_DIR", "CORPUS_SKIP_REASON", "corpus_dir", "corpus_files"]


@pytest.fixture
def corpus_dir() -> Path:
    """The corpus folder; skips the test with a clear reason when it is absent."""
    if not corpus_available():
        pytest.skip(CORPUS_SKIP_REASON)
    return CORPUS_DIR
