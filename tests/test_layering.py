"""The layering rules of README.md / docs/architecture.md §5, checked on the imports themselves.

Every ``import npudispatch.X`` / ``from npudispatch.X import ...`` counts, including imports inside
functions (a lazy import is still a dependency); ``if TYPE_CHECKING:`` imports do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "npudispatch"

LEAVES = {"errors", "domains", "display", "progress", "precision"}
#: What each layer may import besides the leaves (None = anything: the top layers).
ALLOWED: dict[str, set[str] | None] = {
    **{leaf: set() for leaf in LEAVES},
    "txn": set(),
    "graph": set(),
    "overlay_abi": {"txn"},
    "opset": {"opset_quant"},
    "opset_quant": {"opset"},
    "emulator": {"txn", "overlay_abi"},
    "operators": {"txn", "overlay_abi", "opset", "opset_quant"},
    "rewrites": {"graph", "operators", "opset", "opset_quant", "txn", "overlay_abi"},
    "examples": set(),
    "dispatch": {
        "txn", "graph", "overlay_abi", "opset", "opset_quant", "emulator", "operators",
        "rewrites", "examples", "__version__",
    },
}  # fmt: skip
TOP = {"viz", "generate", "onnxruntime", "testing", "cli", "(root)"}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    return "(root)" if rel == ("__init__",) else rel[0]


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "npudispatch":
                found.update(a.name for a in node.names)
            elif node.module.startswith("npudispatch."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("npudispatch.")
            )
    return found


def test_every_layer_imports_only_what_it_may():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if layer in TOP:
            continue
        allowed = ALLOWED.get(layer)
        assert allowed is not None or layer in TOP, f"{path}: layer {layer!r} has no rule"
        for target in _imports(path) - {layer} - LEAVES - allowed:
            broken.append(f"{path.relative_to(PACKAGE.parent)} ({layer}) imports {target}")
    assert not broken, "layering broken:\n" + "\n".join(broken)


def test_nothing_below_the_top_imports_the_top():
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(path) in TOP:
            continue
        assert not (_imports(path) & (TOP - {"(root)"})), path
