"""Operator contract: match an ONNX node, describe its buffers, emit its transaction, run its kernel.

One :class:`Operator` subclass per op (or op family member). The framework implements everything
that is the same for every op — buffer list (DD ``OpArgMap`` idea), params record, const region,
overlay launch transaction, kernel operand decoding — so a simple operator only writes
:meth:`Operator.match`, :meth:`Operator.compute` (the NPU math, bf16) and :meth:`Operator.reference`
(plain ONNX semantics). Bigger operators (matmul family) override ``buffers``/``transaction``/
``format_consts``/``kernel`` as they need.

Params record layout written by the default :meth:`Operator.params` (overlay_abi header first):
``dims`` = :meth:`Operator.op_dims` (op-specific ints); ``payload`` = a tensor table
(:mod:`npudispatch.operators.records`) describing every node input and output (dtype, padded and
real shape, and whether the input arrives as its own operand or inside the const region) followed by
:meth:`Operator.op_floats` as float64. Kernels therefore need nothing but the record and the bytes.

Padding: tensors may be padded by the terminal-padding pass; the real shape of a padded value is
read from its ``metadata_props[REAL_SHAPE_KEY]`` (``"1,11007"``). Padded lanes hold zeros. The
default kernel writes zeros into every output lane outside the real shape, and reductions
(softmax, norms) take their real length from the record, so padding never leaks into results.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import onnx_ir as ir

from npudispatch.domains import is_onnx_domain, normalize_domain
from npudispatch.operators import records
from npudispatch.operators.dtypes import launch_precision, np_dtype
from npudispatch.overlay_abi import (
    FLAG_FP32_COMPUTE,
    FLAG_MIXED_COMPUTE,
    BufferKind,
    ParamsRecord,
    round_up,
)
from npudispatch.precision import Precision

if TYPE_CHECKING:
    from npudispatch.operators import dma
    from npudispatch.txn.builder import Transaction

_T = TypeVar("_T")

REAL_SHAPE_KEY = "npudispatch.real_shape"
"""``Value.metadata_props`` key holding the unpadded shape of a padded value, e.g. ``"1,11007"``."""

ArgKind = BufferKind
"""Kind of an op buffer: the fused buffer (= kernel argidx) it lands in (the overlay ABI's
:class:`~npudispatch.overlay_abi.BufferKind`, under the name operators have always used)."""


@dataclass(frozen=True)
class TensorSpec:
    """Static shape and numpy dtype of a tensor (``ml_dtypes.bfloat16`` for bf16).

    ``real_shape`` is the unpadded shape when the tensor was padded (None = not padded).
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    real_shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the (padded) tensor."""
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize  # Python ints: no overflow

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The real shape when padded, else ``shape``."""
        return self.real_shape if self.real_shape is not None else self.shape


@dataclass
class ArgSpec:
    """One buffer an op reads or writes, in the op's own (standalone) argidx numbering."""

    kind: ArgKind
    local_argidx: int
    offset: int
    nbytes: int
    index: int | None = None  # INPUT/CONST: position in node.inputs; OUTPUT: in node.outputs
    padded_shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None


@dataclass
class OpConfig:
    """Everything an operator derived from one node; the other methods work from this alone."""

    operator: Operator
    node_name: str
    op_type: str
    domain: str
    inputs: list[TensorSpec | None]
    outputs: list[TensorSpec]
    attrs: dict[str, Any]
    consts: dict[
        int, np.ndarray
    ]  # initializer-fed inputs by input index (weights, scales, bias...)
    extra: dict[str, Any] = field(default_factory=dict)  # op-specific derived values
    # Launch precision (``operators.dtypes``): decided at compile time, written into the record's
    # flags; in "fp32" float weights and q4 scales are formatted in float32 too.
    precision: Precision = "bf16"

    @property
    def fp32_compute(self) -> bool:
        """Float32 compute: float32 operands, results and weight images."""
        return self.precision == "fp32"


@dataclass(frozen=True)
class RuntimePatch:
    """A DDR_PATCH of an op's transaction that the host rewrites before every run (docs/txn_format.md
    §6.1): the ``patch``-th DDR_PATCH of the op's own transaction addresses row 0 of a const
    table; before the kernel call its ``argplus`` becomes ``table + index * row_bytes``, where
    ``index`` is element ``element`` (flat, C order) of node input ``input_index`` (negative
    indices wrap, indices outside ``[-rows, rows)`` are an error)."""

    patch: int
    input_index: int
    element: int
    row_bytes: int
    rows: int


@dataclass(eq=True)
class Decline(Exception):
    """Why an operator does not take a node (shown in the partition report).

    Usable both ways: ``match`` may *return* a Decline, or *raise* one from anywhere below it (a
    helper deep in the matching code); :class:`Operator` turns a raised Decline into the returned
    value, so callers of ``match`` always get ``OpConfig | Decline``. :meth:`check` turns a
    helper's ``value | Decline`` result into the value or a raised Decline::

        spec = Decline.check(tensor_spec(node.inputs[0], "input A"))
    """

    reason: str

    def __post_init__(self) -> None:
        super().__init__(self.reason)

    def __str__(self) -> str:
        return self.reason

    def __bool__(self) -> bool:  # so `if cfg := op.match(node)` reads naturally
        return False

    __hash__ = None  # type: ignore[assignment]  # a value, compared by reason

    @staticmethod
    def check(value: _T | Decline) -> _T:
        """``value`` unless it is a Decline, which is raised (ends the ``match`` in progress)."""
        if isinstance(value, Decline):
            raise value
        return value


@dataclass(frozen=True)
class ShapeConstraints:
    """Shapes the op's kernel wants, for the terminal-padding pass.

    ``inputs[i]`` / ``outputs[j]``: per-axis multiples the padded shape of that tensor must be a
    multiple of (1 = any size), or None when the tensor must keep its exact shape (constants the op
    formats itself, absent optional inputs). ``tied``: groups of ``("in"|"out", index, axis)`` that
    must be padded to the same size (e.g. the last axis of every Add operand and its output).
    The kernel is exact on padded data with zero padding (see module docstring).
    """

    inputs: tuple[tuple[int, ...] | None, ...]
    outputs: tuple[tuple[int, ...] | None, ...]
    tied: tuple[tuple[tuple[str, int, int], ...], ...] = ()


class Operator(ABC):
    """Base class of every NPU operator. Subclasses set ``op_type``, ``domain`` and ``kernel_id``.

    Operators are stateless and cheap to construct; all per-node data lives in :class:`OpConfig`.
    A subclass's ``match`` may raise :class:`Decline`; it is wrapped so that callers always get
    the Decline returned.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("match")
        if own is not None and not getattr(own, "_returns_declines", False):
            cls.match = _returning_declines(own)  # type: ignore[method-assign]
        kernel = cls.kernel  # own or inherited (the base class's is wrapped here too)
        if not getattr(kernel, "_sets_precision", False):
            cls.kernel = _in_record_precision(kernel)  # type: ignore[method-assign]

    domain: ClassVar[str] = ""
    op_type: ClassVar[str]
    kernel_id: ClassVar[int]  # unique per operator class (framework 1..99, matmul family 100..199)

    # ---- matching -------------------------------------------------------------------------
    @abstractmethod
    def match(self, node: ir.Node) -> OpConfig | Decline:
        """Return the op's config for ``node`` or a :class:`Decline` with a precise reason."""

    # ---- buffers / params / consts ---------------------------------------------------------
    def activation_inputs(self, cfg: OpConfig) -> list[int]:
        """Input indices streamed as their own operands (present inputs that are not consts)."""
        return [i for i, s in enumerate(cfg.inputs) if s is not None and i not in cfg.consts]

    def io_buffers(self, cfg: OpConfig) -> list[ArgSpec]:
        """Every buffer but the params record: activation inputs, const region, outputs.

        Each gets its own local argidx at offset 0 (like DD's silu IN→0, OUT→1). Override this
        (not :meth:`buffers`) for custom layouts; the params record is sized from it.
        """
        args: list[ArgSpec] = []
        for i in self.activation_inputs(cfg):
            spec = cfg.inputs[i]
            assert spec is not None
            args.append(_arg(ArgKind.INPUT, len(args), spec.nbytes, i, spec))
        const_bytes = self.const_region_bytes(cfg)
        if const_bytes:
            args.append(ArgSpec(ArgKind.CONST, len(args), 0, const_bytes))
        for j, spec in enumerate(cfg.outputs):
            args.append(_arg(ArgKind.OUTPUT, len(args), spec.nbytes, j, spec))
        return args

    def const_region_bytes(self, cfg: OpConfig) -> int:
        """Size of the const region buffer (0 = none); override when formatting it is costly."""
        return round_up(len(self.format_consts(cfg)))

    def buffers(self, cfg: OpConfig) -> list[ArgSpec]:
        """:meth:`io_buffers` plus the params record (last local argidx)."""
        args = self.io_buffers(cfg)
        argidx = 1 + max((a.local_argidx for a in args), default=-1)
        return [*args, ArgSpec(ArgKind.PARAMS, argidx, 0, len(self.params(cfg)))]

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """Op-specific integers for the record's ``dims`` (axis, real lengths...)."""
        return []

    def op_floats(self, cfg: OpConfig) -> list[float]:
        """Op-specific floats (epsilon...) appended to the record payload as float64."""
        return []

    def params(self, cfg: OpConfig) -> bytes:
        """The encoded :class:`ParamsRecord` of this launch."""
        return self.params_record(cfg).encode()

    def params_record(self, cfg: OpConfig) -> ParamsRecord:
        """The params record: operand/output stream sizes, op dims, tensor table + floats."""
        io = self.io_buffers(cfg)
        return self.build_record(
            cfg,
            operand_bytes=[a.nbytes for a in _operands(io)],
            output_bytes=[a.nbytes for a in io if a.kind == ArgKind.OUTPUT],
        )

    def build_record(
        self, cfg: OpConfig, *, operand_bytes: list[int], output_bytes: list[int]
    ) -> ParamsRecord:
        """A record of this launch with the given stream sizes: kernel id, :meth:`op_dims` and the
        payload (tensor table of every node input and output, then :meth:`op_floats`)."""
        table = records.encode_table(
            [
                None
                if s is None
                else (s, records.SRC_CONST if i in cfg.consts else records.SRC_OPERAND)
                for i, s in enumerate(cfg.inputs)
            ],
            cfg.outputs,
        )
        return ParamsRecord(
            kernel_id=self.kernel_id,
            operand_bytes=operand_bytes,
            output_bytes=output_bytes,
            dims=list(self.op_dims(cfg)),
            payload=table + records.encode_floats(self.op_floats(cfg)),
            flags=_PRECISION_FLAGS[cfg.precision],
        )

    def format_consts(self, cfg: OpConfig) -> bytes:
        """The const region: each const input (index order) as raw bytes, each 4-byte aligned."""
        return records.pack_consts(
            [
                np.ascontiguousarray(cfg.consts[i], dtype=cfg.inputs[i].dtype)
                for i in sorted(cfg.consts)
            ]  # type: ignore[union-attr]
        )

    def buffers_of(self, cfg: OpConfig, kind: ArgKind) -> list[ArgSpec]:
        """The :meth:`buffers` entries of one kind, in order."""
        return [a for a in self.buffers(cfg) if a.kind == kind]

    def operand_args(self, cfg: OpConfig) -> list[ArgSpec]:
        """Buffers streamed as operands, in stream order: activation inputs, then the const region."""
        return _operands(self.io_buffers(cfg))

    def bind_host_inputs(self, cfg: OpConfig, host_inputs: frozenset[int]) -> None:  # noqa: B027
        """Told (by the planner, before buffers and records are derived) which node inputs the
        host writes before every run (inputs of the NPU partition, through zero-copy views). An
        operator may then read such an input through :meth:`runtime_patches` instead of as an
        operand; the default streams every input."""

    def runtime_patches(self, cfg: OpConfig, num_cols: int = 4) -> list[RuntimePatch]:
        """DDR_PATCHes of :meth:`transaction` the host rewrites from input values before every
        run (a DMA gather's row addresses); none by default."""
        return []

    # ---- transaction ----------------------------------------------------------------------
    def transaction(self, cfg: OpConfig, num_cols: int = 4) -> Transaction:
        """The op's shim DMA program (overlay protocol), in its own local argidx numbering."""
        from npudispatch.operators import dma

        params = self.buffers_of(cfg, ArgKind.PARAMS)[0]
        return dma.launch(
            params=dma.Stream(params.local_argidx, params.offset, params.nbytes),
            operands=self.operand_streams(cfg),
            outputs=[
                dma.Stream(a.local_argidx, a.offset, a.nbytes)
                for a in self.io_buffers(cfg)
                if a.kind == ArgKind.OUTPUT
            ],
            num_cols=num_cols,
        ).build()

    def operand_streams(self, cfg: OpConfig) -> list[dma.Stream]:
        """DMA streams of the operands in stream order; override to gather with n-d patterns."""
        from npudispatch.operators import dma

        return [dma.Stream(a.local_argidx, a.offset, a.nbytes) for a in self.operand_args(cfg)]

    # ---- execution ------------------------------------------------------------------------
    def kernel(self, record: ParamsRecord, operands: Sequence[Any]) -> list[np.ndarray]:
        """What the NPU computes: decode the operands with the record, run :meth:`compute`.

        Returns one uint8 array per output, exactly ``record.output_bytes[j]`` long, with every
        lane outside an output's real shape zeroed.
        """
        table = records.decode_table(record.payload)
        inputs = records.unpack_inputs(table, operands, record.operand_bytes)
        floats = records.decode_floats(record.payload, table)
        outs = self.compute(inputs, table.outputs, list(record.dims), floats)
        return records.pack_outputs(outs, table.outputs, record.output_bytes)

    def compute(
        self,
        inputs: list[np.ndarray | None],
        outputs: list[TensorSpec],
        dims: list[int],
        floats: list[float],
    ) -> list[np.ndarray]:
        """Kernel math on typed, shaped (padded) inputs; float math in bf16 (see dtypes)."""
        raise TypeError(f"{type(self).__name__} overrides kernel() and has no compute()")

    @abstractmethod
    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """ONNX semantics in plain numpy on ONNX-layout inputs (node input order)."""

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Shape constraints for the padding pass; default: any shape, tensors keep their shape."""
        return ShapeConstraints(
            inputs=tuple(
                None if s is None or i in cfg.consts else (1,) * len(s.shape)
                for i, s in enumerate(cfg.inputs)
            ),
            outputs=tuple((1,) * len(s.shape) for s in cfg.outputs),
        )


def _returning_declines(match: Any) -> Any:
    """``match`` with a raised :class:`Decline` turned into the returned value."""

    @functools.wraps(match)
    def wrapper(self: Operator, node: ir.Node) -> OpConfig | Decline:
        try:
            return match(self, node)
        except Decline as decline:
            return decline

    wrapper._returns_declines = True  # type: ignore[attr-defined]
    return wrapper


_PRECISION_FLAGS: dict[Precision, int] = {
    "bf16": 0,
    "mixed": FLAG_MIXED_COMPUTE,
    "fp32": FLAG_FP32_COMPUTE,
}


def precision_of_flags(flags: int) -> Precision:
    """The launch precision a params record's flags select (bf16 when no mode bit is set)."""
    if flags & FLAG_FP32_COMPUTE:
        return "fp32"
    return "mixed" if flags & FLAG_MIXED_COMPUTE else "bf16"


def _in_record_precision(kernel: Any) -> Any:
    """``kernel`` run in the compute precision its params record's flags select (one switch point
    for every operator: ``dtypes.to_compute``/``store`` and the weight decoders read it)."""

    @functools.wraps(kernel)
    def wrapper(self: Operator, record: ParamsRecord, operands: Sequence[Any]) -> Any:
        with launch_precision(precision_of_flags(record.flags)):
            return kernel(self, record, operands)

    wrapper._sets_precision = True  # type: ignore[attr-defined]
    return wrapper


def _operands(args: list[ArgSpec]) -> list[ArgSpec]:
    return [a for a in args if a.kind == ArgKind.INPUT] + [
        a for a in args if a.kind == ArgKind.CONST
    ]


def _arg(kind: ArgKind, argidx: int, nbytes: int, index: int, spec: TensorSpec) -> ArgSpec:
    return ArgSpec(kind, argidx, 0, round_up(nbytes), index, spec.shape, spec.dtype)


# ---- helpers for match() -------------------------------------------------------------------


def tensor_spec(value: ir.Value | None, what: str) -> TensorSpec | Decline:
    """Static :class:`TensorSpec` of ``value`` or a Decline naming ``what`` and the problem."""
    if value is None:
        return Decline(f"{what} is missing")
    dtype = np_dtype(value.dtype)
    if dtype is None:
        return Decline(f"{what} '{value.name}' has unknown dtype {value.dtype}")
    if value.shape is None:
        return Decline(f"{what} '{value.name}' has no shape (run shape inference)")
    if not all(isinstance(d, int) for d in value.shape):
        return Decline(
            f"{what} '{value.name}' has symbolic shape {value.shape} (bind dims, e.g. --dims N=1)"
        )
    shape = tuple(int(d) for d in value.shape)
    real = real_shape(value)
    if real is not None and (len(real) != len(shape) or any(r > s for r, s in zip(real, shape))):
        return Decline(f"{what} '{value.name}' real shape {real} does not fit shape {shape}")
    return TensorSpec(shape, dtype, real)


def real_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The unpadded shape recorded on ``value`` by the padding pass (``REAL_SHAPE_KEY``), or None
    when the value is not padded."""
    text = value.metadata_props.get(REAL_SHAPE_KEY)
    if not text:
        return None
    return tuple(int(x) for x in text.split(",") if x != "")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array behind ``value`` (initializer or Constant output), else None (also when
    its external data cannot be read)."""
    if value is None or value.const_value is None:
        return None
    try:
        return np.asarray(value.const_value.numpy())
    except (FileNotFoundError, ValueError):
        return None


def opset_version(node: ir.Node, domain: str | None = None) -> int | None:
    """The opset version that defines ``node``'s semantics, or None when nothing declares it.

    ONNX ops change meaning between opset versions (Softmax-13 normalises one axis where
    Softmax-1/11 flattens at ``axis``; Clip-11, Split-13, Squeeze/Unsqueeze-13, ReduceSum-13,
    Reduce*-18, Pad-11 and Slice-10 turned attributes into inputs), so a ``match`` whose
    semantics depend on the version must ask this instead of assuming the newest one.

    ``domain`` defaults to the node's own domain (``""`` and ``"ai.onnx"`` are the same opset).
    Looks at the node's explicit ``version`` (set by onnx_ir builders), then at the opset imports
    of the graph holding the node (for a whole model, the model's imports; partitions extracted
    by ``graph.partition.extract`` keep them). A node in no graph, or in a graph that does not
    import the domain, gives None: callers must then ``Decline`` (naming the node and saying
    the opset version is unknown) rather than guess.
    """
    if node.version is not None and domain is None:
        return int(node.version)
    want = node.domain if domain is None else domain
    keys = ("", "ai.onnx") if is_onnx_domain(want) else (want,)
    graph = node.graph
    imports = getattr(graph, "opset_imports", None) or {}
    for key in keys:
        if key in imports:
            return int(imports[key])
    return None


def node_label(node: ir.Node) -> str:
    """Printable node name for messages (``<unnamed Add>`` when the node has no name)."""
    return node.name or f"<unnamed {node.op_type}>"


def op_label(node: ir.Node) -> str:
    """``Add node 'name'``: how decline messages name a node."""
    return f"{node.op_type} node '{node_label(node)}'"


def check_node_kind(op: Operator, node: ir.Node) -> Decline | None:
    """Decline when ``node`` is not ``op``'s op type and domain (``""`` = ``"ai.onnx"``)."""
    if node.op_type != op.op_type:
        return Decline(f"op type {node.op_type} is not {op.op_type}")
    if normalize_domain(node.domain) != normalize_domain(op.domain):
        want = f"'{op.domain}'" if op.domain else "the ONNX domain"
        return Decline(f"{op_label(node)}: domain '{node.domain}' is not {want}")
    return None


def node_config(
    op: Operator,
    node: ir.Node,
    inputs: list[TensorSpec | None],
    outputs: list[TensorSpec],
    *,
    consts: dict[int, np.ndarray] | None = None,
    attrs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> OpConfig:
    """:class:`OpConfig` of ``node`` for ``op``: name, op type and domain taken from the node;
    ``attrs`` default to the node's attribute values."""
    return OpConfig(
        operator=op,
        node_name=node_label(node),
        op_type=node.op_type,
        domain=node.domain,
        inputs=inputs,
        outputs=outputs,
        attrs={k: a.value for k, a in node.attributes.items()} if attrs is None else attrs,
        consts={} if consts is None else consts,
        extra={} if extra is None else extra,
    )
