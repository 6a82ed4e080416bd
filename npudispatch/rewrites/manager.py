"""The pass manager: onnx_ir's ``PassManager`` with our checks, records, dumps and networkx view.

The sequencing (passes in order, repeated until a round changes nothing) is
``onnx_ir.passes.PassManager``'s; each pass runs inside an observing wrapper that times it, diffs
the graph (nodes added / removed / changed), checks the global invariants on the networkx view of
:class:`~npudispatch.rewrites.analysis.GraphAnalysis` and dumps the model when asked. Each pass's
own ``requires``/``ensures`` run as onnx_ir runs them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from npudispatch.errors import RewriteError
from npudispatch.rewrites.analysis import GraphAnalysis


@dataclass(frozen=True)
class PassRecord:
    """What one run of one pass did: time, reported/observed modification, node deltas."""

    name: str
    step: int
    seconds: float
    reported_modified: bool
    nodes_before: int
    nodes_after: int
    added: int
    removed: int
    changed: int

    @property
    def modified(self) -> bool:
        """Reported by the pass or observed in the graph structure."""
        return self.reported_modified or bool(self.added or self.removed or self.changed)


def _node_signature(node: ir.Node) -> tuple:
    attrs = tuple(
        sorted(
            (k, repr(a.value) if a.type not in _OPAQUE_ATTRS else id(a.value))
            for k, a in node.attributes.items()
        )
    )
    return (
        node.domain,
        node.op_type,
        node.overload,
        tuple(map(id, node.inputs)),
        tuple(map(id, node.outputs)),
        attrs,
        tuple(sorted(node.metadata_props.items())),
    )


_OPAQUE_ATTRS = {
    ir.AttributeType.TENSOR,
    ir.AttributeType.TENSORS,
    ir.AttributeType.GRAPH,
    ir.AttributeType.GRAPHS,
}


def _snapshot(graph: ir.Graph) -> dict[ir.Node, tuple]:
    # Keyed by the node objects themselves so ids cannot be recycled while the snapshot lives.
    return {n: _node_signature(n) for n in graph}


def check_invariants(model: ir.Model, analysis: GraphAnalysis) -> list[str]:
    """Global invariants of the main graph; returns the violations (empty when all hold).

    Acyclic, topologically ordered, no input produced by a node outside the graph (dangling),
    every graph output produced by a node of the graph or a graph input / initializer.
    """
    graph = model.graph
    problems: list[str] = []
    if not analysis.is_acyclic():
        cycle = ", ".join(repr(n.name) for n in analysis.find_cycle())
        problems.append(f"graph has a cycle through nodes [{cycle}]")
    members = set(graph)
    seen: set[ir.Value] = {*graph.inputs, *graph.initializers.values()}
    for idx, node in enumerate(graph):
        for slot, v in enumerate(node.inputs):
            if v is None:
                continue
            p = v.producer()
            if p is not None and p not in members:  # main graph: no outer scope
                problems.append(
                    f"node #{idx} {node.name!r} input {slot} {v.name!r} is produced by a node "
                    f"{p.name!r} that was removed from the graph (dangling input)"
                )
            elif p is None and v not in seen and not v.is_initializer():
                problems.append(
                    f"node #{idx} {node.name!r} input {slot} {v.name!r} is neither a graph input, "
                    "an initializer nor a node output (dangling input)"
                )
            elif p is not None and p in members and v not in seen:
                problems.append(
                    f"node #{idx} {node.name!r} input {slot} {v.name!r} is used before its producer "
                    f"{p.name!r} (graph not topologically sorted; run TopologicalSortPass)"
                )
        seen.update(node.outputs)
    for out in graph.outputs:
        p = out.producer()
        if p is None and out not in graph.inputs and not out.is_initializer():
            problems.append(f"graph output {out.name!r} is not produced by any node")
        elif p is not None and p not in members:
            problems.append(
                f"graph output {out.name!r} is produced by node {p.name!r}, which is no longer "
                "in the graph"
            )
    return problems


def pass_name(p: ir.passes.PassBase) -> str:
    """Display name of a pass: its ``name`` attribute if set, else its class name."""
    return getattr(p, "name", None) or type(p).__name__


class PassManager:
    """Run onnx_ir passes over a model in place, with checks, records and optional dumps.

    Args:
        passes: ``ir.passes.PassBase`` instances (ours, onnx_ir's, ``onnxscript.rewriter.RewritePass``).
        fixpoint: repeat the whole sequence until one round modifies nothing.
        max_steps: rounds allowed before a fixpoint run fails with :class:`RewriteError`.
        dump_dir: write the model as ``.onnx`` + ``.txt`` after passes (all, or ``dump_after``).
        dump_after: names of the passes to dump after (implies dumping; default dir ``"dumps"``).
        check: check the global invariants (acyclic, sorted, no dangling input, outputs produced)
            after each pass; each pass's own ``requires``/``ensures`` always run.
    """

    def __init__(
        self,
        passes: Iterable[ir.passes.PassBase] = (),
        *,
        fixpoint: bool = False,
        max_steps: int = 10,
        dump_dir: str | Path | None = None,
        dump_after: Iterable[str] | None = None,
        check: bool = True,
    ) -> None:
        self.passes: list[ir.passes.PassBase] = []
        for p in passes:
            self.add(p)
        if max_steps < 1:
            raise RewriteError(f"max_steps must be >= 1, got {max_steps}")
        self.fixpoint = fixpoint
        self.max_steps = max_steps
        self.dump_after = set(dump_after) if dump_after is not None else None
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        if self.dump_after is not None and self.dump_dir is None:
            self.dump_dir = Path("dumps")
        self.check = check
        self.records: list[PassRecord] = []
        self.analysis: GraphAnalysis | None = None
        self._dumps = 0

    def add(
        self,
        p: ir.passes.PassBase,
        *,
        before: type[ir.passes.PassBase] | str | None = None,
    ) -> PassManager:
        """Append a pass, or insert it before the first pass of class ``before`` (e.g.
        ``before=MarkViewsPass``; a pass name string also works); returns self."""
        if not isinstance(p, ir.passes.PassBase):
            raise RewriteError(
                f"{p!r} is not an onnx_ir pass; subclass ir.passes.InPlacePass (or wrap onnxscript "
                "rules with npudispatch.rewrites.rules_pass)"
            )
        if before is None:
            self.passes.append(p)
            return self
        for i, q in enumerate(self.passes):
            if isinstance(before, str) and pass_name(q) == before:
                self.passes.insert(i, p)
                return self
            if isinstance(before, type) and isinstance(q, before):
                self.passes.insert(i, p)
                return self
        wanted = before if isinstance(before, str) else before.__name__
        raise RewriteError(
            f"no pass {wanted!r} to insert before; passes: {[pass_name(q) for q in self.passes]}"
        )

    @property
    def names(self) -> list[str]:
        """The names of the passes, in order."""
        return [pass_name(p) for p in self.passes]

    def __call__(self, model: ir.Model) -> ir.passes.PassResult:
        """Run the passes on ``model`` in place; ``modified`` is True when anything changed."""
        self.records = []
        self.analysis = GraphAnalysis(model)
        if not self.passes:
            return ir.passes.PassResult(model, False)
        sequence = ir.passes.PassManager(
            [_Observed(self, p) for p in self.passes],
            steps=self.max_steps if self.fixpoint else 1,
            early_stop=True,
        )
        try:
            result = sequence(model)
        except Exception as exc:  # onnx_ir wraps a pass's error in PassError: surface ours
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, RewriteError):
                cause = cause.__cause__
            if cause is not None:
                raise cause from None
            raise RewriteError(f"the pass manager failed: {exc}") from exc
        last = self.max_steps - 1
        if self.fixpoint and any(r.step == last and r.modified for r in self.records):
            busy = sorted({r.name for r in self.records if r.step == last and r.modified})
            raise RewriteError(
                f"no fixpoint after {self.max_steps} rounds: passes {busy} still modify the "
                "model (a pass reporting modified=True forever, or rules that undo each "
                "other); raise max_steps or fix the pass"
            )
        return ir.passes.PassResult(model, result.modified)

    def _run_one(self, p: ir.passes.PassBase, model: ir.Model) -> PassRecord:
        """Run one pass observed: time, graph diff, invariants, dump; the record is kept."""
        name = pass_name(p)
        step = len(self.records) // len(self.passes)
        before = _snapshot(model.graph)
        t0 = time.perf_counter()
        try:
            result = p(model)
        except RewriteError:
            raise
        except Exception as exc:
            raise RewriteError(
                f"pass {name!r} (round {step}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.perf_counter() - t0
        if not isinstance(result, ir.passes.PassResult) or result.model is not model:
            raise RewriteError(
                f"pass {name!r} did not modify the model in place (returned {type(result).__name__}"
                " with another model); the PassManager runs in-place passes only"
            )
        after = _snapshot(model.graph)
        added = sum(1 for n in after if n not in before)
        removed = sum(1 for n in before if n not in after)
        changed = sum(1 for n, sig in after.items() if n in before and before[n] != sig)
        rec = PassRecord(
            name,
            step,
            seconds,
            bool(result.modified),
            len(before),
            len(after),
            added,
            removed,
            changed,
        )
        if self.check:
            assert self.analysis is not None
            problems = check_invariants(model, self.analysis)
            if problems:
                raise RewriteError(
                    f"pass {name!r} (round {step}) broke graph invariants:\n  "
                    + "\n  ".join(problems[:20])
                )
        if self.dump_dir is not None and (self.dump_after is None or name in self.dump_after):
            self._dump(model, name, step)
        self.records.append(rec)
        return rec

    def _dump(self, model: ir.Model, name: str, step: int) -> None:
        assert self.dump_dir is not None
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self._dumps:03d}_r{step}_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        self._dumps += 1
        ir.save(
            model,
            self.dump_dir / f"{stem}.onnx",
            external_data=f"{stem}.onnx.data",
            size_threshold_bytes=1024,
        )
        (self.dump_dir / f"{stem}.txt").write_text(str(model))

    def summary(self) -> str:
        """A readable table of :attr:`records`."""
        return format_records(self.records)


class _Observed(ir.passes.InPlacePass):
    """One pass as the manager's onnx_ir ``PassManager`` runs it (see the module docstring)."""

    def __init__(self, manager: PassManager, inner: ir.passes.PassBase) -> None:
        super().__init__()
        self.manager, self.inner = manager, inner

    def __repr__(self) -> str:
        return pass_name(self.inner)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, self.manager._run_one(self.inner, model).modified)


def format_records(records: Sequence[PassRecord]) -> str:
    """Render pass records as a fixed-width table with a total line."""
    head = (
        f"{'round':>5}  {'pass':<40} {'ms':>9} {'mod':>3} {'nodes':>11} {'+':>5} {'-':>5} {'~':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(
            f"{r.step:>5}  {r.name[:40]:<40} {r.seconds * 1e3:>9.2f} {'yes' if r.modified else 'no':>3} "
            f"{f'{r.nodes_before}->{r.nodes_after}':>11} {r.added:>5} {r.removed:>5} {r.changed:>5}"
        )
    total = sum(r.seconds for r in records)
    lines.append("-" * len(head))
    lines.append(f"{'':>5}  {'total':<40} {total * 1e3:>9.2f}")
    return "\n".join(lines)
