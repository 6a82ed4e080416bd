"""Dispatch tests share the standard-ONNX golden-graph builders of tests/e2e (e2e_models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.insert(0, _E2E)
