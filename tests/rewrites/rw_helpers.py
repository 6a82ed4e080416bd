"""Helpers for the rewrite tests: tiny textual models, runners, snapshot text."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator

from npudispatch import opset
from npudispatch.rewrites import is_view

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"


def model(text: str, opset_version: int = 18) -> ir.Model:
    """An ir.Model from textual ONNX (header added: IR 10, default opset ``opset_version``)."""
    header = f'<ir_version: 10, opset_import: ["" : {opset_version}]>\n'
    return ir.from_onnx_text(header + text)


def ops(m: ir.Model) -> list[str]:
    """``domain.Op`` (or ``Op`` in the default domain) for every node, in order."""
    return [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in m.graph]


def apply(rules, m: ir.Model) -> int:
    """Apply a rule set once (like RewritePass) and return the number of rewrites."""
    return rules.apply_to_model(m)


def run_reference(m: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Exact numpy evaluation with the npudispatch OpRun classes."""
    return ReferenceEvaluator(ir.to_proto(m), new_ops=opset.reference_ops()).run(None, feeds)


def run_ort(m: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime evaluation of a copy of ``m`` with the npudispatch function bodies attached."""
    proto = ir.to_proto(m)
    clone = ir.from_proto(proto)
    opset.attach_functions(clone)
    sess = ort.InferenceSession(
        ir.to_proto(clone).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feeds)


def snapshot_text(m: ir.Model) -> str:
    """Stable text of a graph: one line per node, ``domain::Op(inputs) -> (outputs) [view]``."""
    lines = [f"inputs: {', '.join(v.name for v in m.graph.inputs)}"]
    for n in m.graph:
        dom = n.domain or "ai.onnx"
        ins = ", ".join("" if v is None else v.name for v in n.inputs)
        outs = ", ".join(v.name for v in n.outputs)
        tag = "  [view]" if is_view(n) else ""
        lines.append(f"{dom}::{n.op_type}({ins}) -> ({outs}){tag}")
    lines.append(f"outputs: {', '.join(v.name for v in m.graph.outputs)}")
    return "\n".join(lines) + "\n"


def check_snapshot(name: str, text: str) -> None:
    """Compare with tests/rewrites/snapshots/<name>.txt; NPUD_UPDATE_SNAPSHOTS=1 rewrites it."""
    path = SNAPSHOT_DIR / f"{name}.txt"
    if os.environ.get("NPUD_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"snapshot {path} missing; run with NPUD_UPDATE_SNAPSHOTS=1")
    assert text == path.read_text(), (
        f"snapshot {name} changed (NPUD_UPDATE_SNAPSHOTS=1 to accept):\n{text}"
    )
