"""Session fixtures of the graph-layer tests (the golden graphs are built once)."""

from __future__ import annotations

import onnx
import pytest

from npudispatch.examples import EXAMPLES, build_example

GOLDEN_NAMES = [name for name in EXAMPLES if name.startswith("G")]


@pytest.fixture(scope="session")
def golden_protos() -> dict[str, onnx.ModelProto]:
    """Every golden graph G1-G20 as a ModelProto (DD shapes; built once per session)."""
    return {name: build_example(name) for name in GOLDEN_NAMES}
