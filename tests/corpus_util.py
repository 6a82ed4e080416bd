"""Where ../shared's AMD transaction corpus and real models live (importable by any test module)."""

from __future__ import annotations

from pathlib import Path

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
CORPUS_DIR = SHARED_DIR / "corpus" / "dd_stx_txn"
#: The real models made by other teams and tools (README there); tests skip when absent.
MODELS_DIR = SHARED_DIR / "models"
CORPUS_SKIP_REASON = (
    f"AMD transaction corpus not found at {CORPUS_DIR} "
    "(tests that need it run when ../shared/corpus sits beside the checkout)"
)


def corpus_available() -> bool:
    """True when ../shared/corpus/dd_stx_txn/MANIFEST.tsv exists."""
    return (CORPUS_DIR / "MANIFEST.tsv").exists()


def corpus_files() -> list[Path]:
    """Every corpus transaction listed in MANIFEST.tsv (empty when the corpus is absent)."""
    if not corpus_available():
        return []
    lines = (CORPUS_DIR / "MANIFEST.tsv").read_text().splitlines()[1:]
    return [CORPUS_DIR / line.split("\t")[0] for line in lines if line.strip()]
