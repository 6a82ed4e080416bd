"""Shared pytest fixtures: the AMD transaction corpus beside the checkout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from corpus_util import CORPUS_DIR, CORPUS_SKIP_REASON, corpus_available, corpus_files

__all__ = ["CORPUS_DIR", "CORPUS_SKIP_REASON", "corpus_dir", "corpus_files"]

# Sessions keep a persistent compile cache; tests (and the CLI subprocesses they start) never
# write into the real user cache folder: one throw-away folder per test process.
_TEST_CACHE = tempfile.mkdtemp(prefix="npudispatch-test-cache-")
os.environ["NPUDISPATCH_CACHE_DIR"] = _TEST_CACHE
atexit.register(shutil.rmtree, _TEST_CACHE, ignore_errors=True)


@pytest.fixture
def corpus_dir() -> Path:
    """The corpus folder; skips the test with a clear reason when it is absent."""
    if not corpus_available():
        pytest.skip(CORPUS_SKIP_REASON)
    return CORPUS_DIR
