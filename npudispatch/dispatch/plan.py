"""The buffer plan of one fused NPU program: where every tensor, const and params record lives.

A fused program gets five buffers in DD's fixed kernel-argument order (docs/architecture.md §3):
``INPUT`` (graph inputs back to back), ``OUTPUT`` (graph outputs back to back), ``SCRATCH``
(intermediates at lifetime-planned offsets with reuse, then ONE shared per-op scratch pad that every
op may use because ops run one after another), ``CONST`` (one region per op, op order) and
``PARAMS`` (one kernel-params record per op, op order). :class:`BufferKind` values equal the
DDR_PATCH ``argidx`` of each buffer.

The planner works from plain data (:class:`TensorRequest`, dicts of per-op byte counts), so it
depends on neither the operator library nor onnx_ir; the dispatch layer adapts those into it.
Zero-copy views (Reshape, Squeeze, Unsqueeze, Flatten, Identity) are *aliases*: they take their
base's placement (plus a byte offset) and never get memory of their own, and the base stays live
for as long as any of its views is used.

Improvements over DD's planner (docs/architecture.md §6): graph IO never leaves holes in scratch,
several packing heuristics are tried and the smallest kept, the exact lower bound is reported next
to the result, and :meth:`BufferPlan.validate` proves no two live tensors share a byte.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from npudispatch.dispatch.allocate import (
    ALL_STRATEGIES,
    Interval,
    allocate,
    dd_style_no_reuse_size,
)
from npudispatch.display import rich_html
from npudispatch.errors import PlanError
from npudispatch.overlay_abi import BufferKind, round_up

__all__ = [
    "BufferKind",
    "BufferPlan",
    "Placement",
    "TensorRequest",
    "build_plan",
]

TensorKind = Literal["input", "output", "intermediate"]
_TENSOR_KINDS: tuple[str, ...] = ("input", "output", "intermediate")
_FOREVER = (-(1 << 62), 1 << 62)  # lifetime of things the host touches outside the run
PAD_NAME = "<shared op scratch pad>"
_PLAN_FORMAT = 1


@dataclass(frozen=True)
class TensorRequest:
    """One tensor of the NPU subgraph as the planner needs it.

    ``nbytes`` is already the maximum request of every op touching the tensor (padding included);
    ``first``/``last`` are inclusive op indices of its producer and last consumer; ``shape`` is the
    logical ONNX shape and ``padded_shape`` the shape kernels actually read/write, if different.
    """

    name: str
    nbytes: int
    kind: TensorKind
    first: int
    last: int
    shape: tuple[int, ...]
    dtype: str
    padded_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Placement:
    """Where a tensor lives: ``nbytes`` at byte ``offset`` of fused buffer ``buffer``.

    ``first``/``last`` is the lifetime the planner honoured (a base's lifetime is extended over its
    aliases' uses); ``alias_of`` names the root tensor whose memory an alias views.
    """

    buffer: BufferKind
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: str
    padded_shape: tuple[int, ...] | None = None
    first: int = 0
    last: int = 0
    alias_of: str | None = None

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.offset + self.nbytes


@dataclass(frozen=True)
class BufferPlan:
    """Byte layout of the five fused buffers of one NPU subgraph (see module docstring).

    ``buffer_sizes`` is indexed by :class:`BufferKind`; ``aliases`` maps each alias to its *root*
    base and total byte offset; ``const_regions``/``params_regions`` map op name to
    ``(offset, size)`` (ops without consts/params have no entry); the shared op scratch pad is
    ``op_scratch_bytes`` at ``op_scratch_offset`` of the scratch buffer. ``strategy_sizes`` are the
    intermediate-area sizes reached by each packing strategy tried; ``dd_no_reuse_bytes`` is what DD
    would use without scratch optimisation.
    """

    placements: dict[str, Placement]
    aliases: dict[str, tuple[str, int]]
    buffer_sizes: tuple[int, int, int, int, int]
    op_scratch_offset: int
    op_scratch_bytes: int
    const_regions: dict[str, tuple[int, int]]
    params_regions: dict[str, tuple[int, int]]
    scratch_intermediate_bytes: int
    scratch_lower_bound_bytes: int
    strategy: str
    strategy_sizes: dict[str, int] = field(default_factory=dict)
    dd_no_reuse_bytes: int = 0
    alignment: int = 64

    # --- sizes ---------------------------------------------------------------------------------

    def size(self, buffer: BufferKind) -> int:
        """Size in bytes of one fused buffer."""
        return self.buffer_sizes[buffer]

    @property
    def input_bytes(self) -> int:
        return self.buffer_sizes[BufferKind.INPUT]

    @property
    def output_bytes(self) -> int:
        return self.buffer_sizes[BufferKind.OUTPUT]

    @property
    def scratch_bytes(self) -> int:
        return self.buffer_sizes[BufferKind.SCRATCH]

    @property
    def const_bytes(self) -> int:
        return self.buffer_sizes[BufferKind.CONST]

    @property
    def params_bytes(self) -> int:
        return self.buffer_sizes[BufferKind.PARAMS]

    # --- validation ----------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise :class:`PlanError` unless the plan is consistent.

        Checks: every placement and region lies inside its buffer; every alias resolves to a
        non-alias tensor and lies inside it; no two tensors (or regions) that are live at the same
        time share a byte of the same buffer. Graph inputs/outputs, const/params regions and the op
        scratch pad count as live for the whole run (the host and every op may touch them).
        """
        if len(self.buffer_sizes) != len(BufferKind) or min(self.buffer_sizes) < 0:
            raise PlanError(f"plan: need 5 non-negative buffer sizes, got {self.buffer_sizes!r}")
        for name, pl in self.placements.items():
            self._check_bounds(f"tensor {name!r}", pl.buffer, pl.offset, pl.nbytes)
        self._check_bounds(
            "the shared op scratch pad",
            BufferKind.SCRATCH,
            self.op_scratch_offset,
            self.op_scratch_bytes,
        )
        for regions, kind, what in (
            (self.const_regions, BufferKind.CONST, "const region"),
            (self.params_regions, BufferKind.PARAMS, "params region"),
        ):
            for op, (offset, size) in regions.items():
                self._check_bounds(f"{what} of op {op!r}", kind, offset, size)
        self._check_aliases()

        groups: dict[BufferKind, list[tuple[str, int, int, int, int]]] = {k: [] for k in BufferKind}
        for name, pl in self.placements.items():
            if pl.alias_of is not None:
                continue
            first, last = (pl.first, pl.last) if pl.buffer == BufferKind.SCRATCH else _FOREVER
            groups[pl.buffer].append((f"tensor {name!r}", pl.offset, pl.end, first, last))
        groups[BufferKind.SCRATCH].append(
            (
                PAD_NAME,
                self.op_scratch_offset,
                self.op_scratch_offset + self.op_scratch_bytes,
                *_FOREVER,
            )
        )
        for op, (offset, size) in self.const_regions.items():
            groups[BufferKind.CONST].append(
                (f"const region of op {op!r}", offset, offset + size, *_FOREVER)
            )
        for op, (offset, size) in self.params_regions.items():
            groups[BufferKind.PARAMS].append(
                (f"params region of op {op!r}", offset, offset + size, *_FOREVER)
            )
        for kind, items in groups.items():
            _check_disjoint(kind, items)

    def _check_bounds(self, what: str, buffer: BufferKind, offset: int, nbytes: int) -> None:
        size = self.buffer_sizes[buffer]
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            raise PlanError(
                f"plan: {what} at bytes [{offset}, {offset + nbytes}) of the {buffer.name} buffer "
                f"is out of bounds (buffer size {size} B); the plan is corrupt, rebuild it with "
                "build_plan()"
            )

    def _check_aliases(self) -> None:
        for alias, (root, offset) in self.aliases.items():
            pl = self.placements.get(alias)
            base = self.placements.get(root)
            if pl is None or base is None or base.alias_of is not None:
                missing = alias if pl is None else root
                raise PlanError(
                    f"plan: alias {alias!r} -> {root!r} points nowhere ({missing!r} has no "
                    "placement of its own); every alias must resolve to a placed, non-alias tensor"
                )
            if pl.alias_of != root or pl.buffer != base.buffer or pl.offset != base.offset + offset:
                raise PlanError(
                    f"plan: alias {alias!r} is placed at {pl.buffer.name}+{pl.offset} but its base "
                    f"{root!r} + {offset} B is at {base.buffer.name}+{base.offset + offset}"
                )
            if pl.end > base.end:
                raise PlanError(
                    f"plan: alias {alias!r} ({pl.nbytes} B at +{offset}) runs past the end of its "
                    f"base {root!r} ({base.nbytes} B)"
                )
            if (
                base.buffer == BufferKind.SCRATCH
                and not base.first <= pl.first <= pl.last <= base.last
            ):
                raise PlanError(
                    f"plan: alias {alias!r} is used over ops [{pl.first}, {pl.last}] but its base "
                    f"{root!r} is only kept live over [{base.first}, {base.last}]; the base's "
                    "memory could be reused under the view. Re-plan with build_plan()"
                )
        for name, pl in self.placements.items():
            if pl.alias_of is not None and name not in self.aliases:
                raise PlanError(
                    f"plan: {name!r} says it aliases {pl.alias_of!r} but is not in the alias map"
                )

    # --- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for ``report.json`` and saved programs); :meth:`from_dict` inverts it."""
        return {
            "format": _PLAN_FORMAT,
            "alignment": self.alignment,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "scratch_bytes": self.scratch_bytes,
            "const_bytes": self.const_bytes,
            "params_bytes": self.params_bytes,
            "scratch_intermediate_bytes": self.scratch_intermediate_bytes,
            "scratch_lower_bound_bytes": self.scratch_lower_bound_bytes,
            "op_scratch_offset": self.op_scratch_offset,
            "op_scratch_bytes": self.op_scratch_bytes,
            "strategy": self.strategy,
            "strategy_sizes": dict(self.strategy_sizes),
            "dd_no_reuse_bytes": self.dd_no_reuse_bytes,
            "placements": {
                name: {
                    "buffer": pl.buffer.name,
                    "offset": pl.offset,
                    "nbytes": pl.nbytes,
                    "shape": list(pl.shape),
                    "dtype": pl.dtype,
                    "padded_shape": None if pl.padded_shape is None else list(pl.padded_shape),
                    "first": pl.first,
                    "last": pl.last,
                    "alias_of": pl.alias_of,
                }
                for name, pl in self.placements.items()
            },
            "aliases": {alias: [root, off] for alias, (root, off) in self.aliases.items()},
            "const_regions": {op: list(r) for op, r in self.const_regions.items()},
            "params_regions": {op: list(r) for op, r in self.params_regions.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BufferPlan:
        """Rebuild a plan written by :meth:`to_dict`; validates it (raises :class:`PlanError`)."""
        try:
            if data["format"] != _PLAN_FORMAT:
                raise PlanError(
                    f"plan: format {data['format']!r} is not supported (expected {_PLAN_FORMAT}); "
                    "re-plan with this version of npudispatch"
                )
            placements = {
                name: Placement(
                    buffer=BufferKind[p["buffer"]],
                    offset=int(p["offset"]),
                    nbytes=int(p["nbytes"]),
                    shape=tuple(p["shape"]),
                    dtype=p["dtype"],
                    padded_shape=None if p["padded_shape"] is None else tuple(p["padded_shape"]),
                    first=int(p["first"]),
                    last=int(p["last"]),
                    alias_of=p["alias_of"],
                )
                for name, p in data["placements"].items()
            }
            plan = cls(
                placements=placements,
                aliases={a: (r, int(o)) for a, (r, o) in data["aliases"].items()},
                buffer_sizes=tuple(
                    int(data[key])
                    for key in (
                        "input_bytes",
                        "output_bytes",
                        "scratch_bytes",
                        "const_bytes",
                        "params_bytes",
                    )
                ),  # type: ignore[arg-type]
                op_scratch_offset=int(data["op_scratch_offset"]),
                op_scratch_bytes=int(data["op_scratch_bytes"]),
                const_regions={
                    op: (int(o), int(s)) for op, (o, s) in data["const_regions"].items()
                },
                params_regions={
                    op: (int(o), int(s)) for op, (o, s) in data["params_regions"].items()
                },
                scratch_intermediate_bytes=int(data["scratch_intermediate_bytes"]),
                scratch_lower_bound_bytes=int(data["scratch_lower_bound_bytes"]),
                strategy=data["strategy"],
                strategy_sizes={k: int(v) for k, v in data["strategy_sizes"].items()},
                dd_no_reuse_bytes=int(data["dd_no_reuse_bytes"]),
                alignment=int(data["alignment"]),
            )
        except KeyError as exc:
            raise PlanError(f"plan: serialized plan lacks key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan: serialized plan is malformed: {exc}") from exc
        plan.validate()
        return plan

    # --- human views ---------------------------------------------------------------------------

    def table_rows(self) -> list[tuple[str, str, str, str, str, str, str, str]]:
        rows = []
        order = sorted(self.placements.items(), key=lambda kv: (kv[1].buffer, kv[1].offset, kv[0]))
        for name, pl in order:
            rows.append(
                (
                    name,
                    pl.buffer.name,
                    f"{pl.offset:,}",
                    f"{pl.nbytes:,}",
                    f"[{pl.first}, {pl.last}]",
                    "x".join(map(str, pl.shape)) or "scalar",
                    pl.dtype,
                    f"-> {pl.alias_of}" if pl.alias_of else "",
                )
            )
        return rows

    def headline(self) -> list[str]:
        lb = self.scratch_lower_bound_bytes
        ratio = f"{self.scratch_intermediate_bytes / lb:.3f}x" if lb else "n/a"
        tried = ", ".join(f"{k} {v:,}" for k, v in self.strategy_sizes.items())
        return [
            "buffers (B): "
            + ", ".join(f"{k.name.lower()} {self.buffer_sizes[k]:,}" for k in BufferKind),
            f"scratch intermediates {self.scratch_intermediate_bytes:,} B (lower bound {lb:,} B, "
            f"{ratio}; DD without reuse {self.dd_no_reuse_bytes:,} B) via {self.strategy}",
            f"shared op scratch pad {self.op_scratch_bytes:,} B at +{self.op_scratch_offset:,}",
            f"strategies tried: {tried or 'none (no intermediates)'}",
        ]

    def summary(self) -> str:
        """Plain-text report: buffer sizes, scratch quality, then one row per tensor."""
        header = ("tensor", "buffer", "offset", "bytes", "life", "shape", "dtype", "alias")
        rows = [header, *self.table_rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        numeric = {2, 3}
        lines = [*self.headline(), ""]
        for r in rows:
            cells = (
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths))
            )
            lines.append("  ".join(cells).rstrip())
        for title, regions in (("const", self.const_regions), ("params", self.params_regions)):
            if regions:
                lines.append(
                    f"{title} regions: "
                    + ", ".join(f"{op} {o:,}+{s:,}" for op, (o, s) in regions.items())
                )
        return "\n".join(lines)

    # Notebook view and picture (npudispatch.viz.plan_html / plot_plan), registered by viz.
    _repr_html_ = rich_html


def _check_disjoint(buffer: BufferKind, items: list[tuple[str, int, int, int, int]]) -> None:
    """Raise PlanError naming two items ``(what, offset, end, first, last)`` that share a byte
    while both are live. Sweep over time with the live byte ranges kept sorted by offset."""
    starts: list[int] = []  # offsets of live ranges, sorted (disjoint while no error)
    live: list[tuple[int, int, str, int, int]] = []
    expiry: list[tuple[int, int]] = []  # (last, offset) heap
    for what, offset, end, first, last in sorted(items, key=lambda it: (it[3], it[1])):
        if end <= offset:
            continue  # empty: holds no byte
        while expiry and expiry[0][0] < first:
            _, gone = heapq.heappop(expiry)
            pos = bisect_right(starts, gone) - 1
            del starts[pos], live[pos]
        pos = bisect_right(starts, offset)
        for other in (live[pos - 1] if pos else None, live[pos] if pos < len(live) else None):
            if other is not None and other[0] < end and offset < other[1]:
                o_start, o_end, o_what, o_first, o_last = other
                raise PlanError(
                    f"plan: {o_what} (bytes [{o_start}, {o_end}), ops {_life(o_first, o_last)}) and "
                    f"{what} (bytes [{offset}, {end}), ops {_life(first, last)}) overlap in the "
                    f"{buffer.name} buffer while both are live; re-plan with build_plan() or fix "
                    "the lifetimes you passed"
                )
        starts.insert(pos, offset)
        live.insert(pos, (offset, end, what, first, last))
        heapq.heappush(expiry, (last, offset))


def _life(first: int, last: int) -> str:
    return "whole run" if (first, last) == _FOREVER else f"[{first}, {last}]"


# --- building a plan ---------------------------------------------------------------------------


def _resolve_aliases(
    by_name: Mapping[str, TensorRequest], aliases: Mapping[str, tuple[str, int]]
) -> dict[str, tuple[str, int]]:
    """Map every alias to (root base, total byte offset); checks kinds, cycles and bounds."""
    for alias, (base, offset) in aliases.items():
        view = by_name.get(alias)
        if view is None:
            raise PlanError(
                f"alias {alias!r} is not among the planned tensors; pass a TensorRequest for it "
                "(its shape, dtype and lifetime are needed)"
            )
        if base not in by_name:
            raise PlanError(
                f"alias {alias!r} views {base!r}, which is not among the planned tensors"
            )
        if view.kind != "intermediate":
            raise PlanError(
                f"alias {alias!r} is a graph {view.kind}; the host reads/writes it, so it needs its "
                f"own memory. Make {base!r} the alias of {alias!r} instead (reverse the view), or "
                "keep a copy op"
            )
        if offset < 0 or offset + view.nbytes > by_name[base].nbytes:
            raise PlanError(
                f"alias {alias!r} ({view.nbytes} B at byte offset {offset}) does not fit inside its "
                f"base {base!r} ({by_name[base].nbytes} B)"
            )
    resolved: dict[str, tuple[str, int]] = {}
    for alias in aliases:
        chain = [alias]
        root, total = alias, 0
        while root in aliases:
            root, step = aliases[root]
            total += step
            if root in chain:
                raise PlanError(f"aliases form a cycle: {' -> '.join([*chain, root])}")
            chain.append(root)
        resolved[alias] = (root, total)
    return resolved


def _pack(requests: Sequence[TensorRequest], alignment: int) -> tuple[dict[str, int], int]:
    """Offsets of tensors packed back to back in order, and the buffer size."""
    offsets: dict[str, int] = {}
    cursor = 0
    for t in requests:
        offsets[t.name] = round_up(cursor, alignment)
        cursor = offsets[t.name] + t.nbytes
    return offsets, round_up(cursor, alignment)


def _regions(
    what: str, sizes: Mapping[str, int], alignment: int
) -> tuple[dict[str, tuple[int, int]], int]:
    regions: dict[str, tuple[int, int]] = {}
    cursor = 0
    for op, size in sizes.items():
        if size < 0:
            raise PlanError(f"op {op!r}: negative {what} size {size} B")
        if size:
            regions[op] = (cursor, size)
            cursor = round_up(cursor + size, alignment)
    return regions, cursor


def build_plan(
    tensors: Sequence[TensorRequest],
    aliases: Mapping[str, tuple[str, int]] | None = None,
    op_scratch: Mapping[str, int] | None = None,
    op_consts: Mapping[str, int] | None = None,
    op_params: Mapping[str, int] | None = None,
    *,
    alignment: int = 64,
    strategies: Sequence[str] = ALL_STRATEGIES,
) -> BufferPlan:
    """Plan the five fused buffers of one NPU subgraph from plain data.

    * ``tensors``: every tensor of the subgraph; inputs and outputs are packed back to back in
      the given order; intermediates share scratch by lifetime (all ``strategies`` are tried,
      the smallest kept);
    * ``aliases``: ``view -> (base, byte_offset)`` for zero-copy views (chains allowed); a view
      takes its base's memory and extends the base's lifetime over its own;
    * ``op_scratch``: per-op internal scratch requests; one shared pad sized to the maximum is
      placed after the intermediates;
    * ``op_consts`` / ``op_params``: per-op byte counts; regions follow the mapping's order.

    Every offset is a multiple of ``alignment`` (DD uses 4; 64 suits DMA bursts). The result is
    validated before it is returned. Raises :class:`PlanError` on inconsistent input.
    """
    aliases = dict(aliases or {})
    by_name: dict[str, TensorRequest] = {}
    for i, t in enumerate(tensors):
        if t.name in by_name:
            raise PlanError(f"tensor #{i} {t.name!r} is listed twice; tensor names must be unique")
        if t.kind not in _TENSOR_KINDS:
            raise PlanError(f"tensor {t.name!r}: kind {t.kind!r} is not one of {_TENSOR_KINDS}")
        if t.nbytes < 0 or t.first > t.last:
            raise PlanError(
                f"tensor {t.name!r}: needs nbytes >= 0 and first <= last, got {t.nbytes} B over "
                f"ops [{t.first}, {t.last}]"
            )
        by_name[t.name] = t
    resolved = _resolve_aliases(by_name, aliases)

    # A base must stay live while any of its views is used.
    life = {t.name: (t.first, t.last) for t in tensors if t.name not in resolved}
    for alias, (root, _) in resolved.items():
        f, last = life[root]
        view = by_name[alias]
        life[root] = (min(f, view.first), max(last, view.last))

    owners = [t for t in tensors if t.name not in resolved]
    in_offsets, in_size = _pack([t for t in owners if t.kind == "input"], alignment)
    out_offsets, out_size = _pack([t for t in owners if t.kind == "output"], alignment)
    intervals = [
        Interval(t.name, t.nbytes, *life[t.name]) for t in owners if t.kind == "intermediate"
    ]
    alloc = allocate(intervals, alignment, strategies)

    where: dict[str, tuple[BufferKind, int]] = {}
    where.update((n, (BufferKind.INPUT, o)) for n, o in in_offsets.items())
    where.update((n, (BufferKind.OUTPUT, o)) for n, o in out_offsets.items())
    where.update((n, (BufferKind.SCRATCH, o)) for n, o in alloc.offsets.items())

    placements: dict[str, Placement] = {}
    for t in tensors:
        root, delta = resolved.get(t.name, (t.name, 0))
        buffer, offset = where[root]
        first, last = life.get(t.name, (t.first, t.last))
        placements[t.name] = Placement(
            buffer=buffer,
            offset=offset + delta,
            nbytes=t.nbytes,
            shape=tuple(t.shape),
            dtype=t.dtype,
            padded_shape=None if t.padded_shape is None else tuple(t.padded_shape),
            first=first,
            last=last,
            alias_of=root if t.name in resolved else None,
        )

    pad_offset = round_up(alloc.size, alignment)
    for op, size in (op_scratch or {}).items():
        if size < 0:
            raise PlanError(f"op {op!r}: negative scratch pad request {size} B")
    pad_bytes = round_up(max((op_scratch or {}).values(), default=0), alignment)
    const_regions, const_size = _regions("const", op_consts or {}, alignment)
    params_regions, params_size = _regions("params", op_params or {}, alignment)
    plan = BufferPlan(
        placements=placements,
        aliases=resolved,
        buffer_sizes=(in_size, out_size, pad_offset + pad_bytes, const_size, params_size),
        op_scratch_offset=pad_offset,
        op_scratch_bytes=pad_bytes,
        const_regions=const_regions,
        params_regions=params_regions,
        scratch_intermediate_bytes=alloc.size,
        scratch_lower_bound_bytes=alloc.lower_bound,
        strategy=alloc.strategy,
        strategy_sizes=dict(alloc.tried),
        dd_no_reuse_bytes=dd_style_no_reuse_size(intervals),
        alignment=alignment,
    )
    plan.validate()
    return plan
