"""Shared pytest fixtures: the AMD transaction corpus beside the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

CORPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "dd_stx_txn"
CORPUS_SKIP_REASON = (
    f"AMD transaction corpus not found at {CORPUS_DIR} "
    "(tests that need it run when ../shared/corpus sits beside the checkout)"
)


def corpus_files() -> list[Path]:
    """Every corpus transaction listed in MANIFEST.tsv (empty when the corpus is absent)."""
    manifest = CORPUS_DIR / "MANIFEST.tsv"
    if not manifest.exists():
        return []
    lines = manifest.read_text().splitlines()[1:]
    return [CORPUS_DIR / line.split("\t")[0] for line in lines if line.strip()]


@pytest.fixture
def corpus_dir() -> Path:
    """The corpus folder; skips the test with a clear reason when it is absent."""
    if not (CORPUS_DIR / "MANIFEST.tsv").exists():
        pytest.skip(CORPUS_SKIP_REASON)
    return CORPUS_DIR
