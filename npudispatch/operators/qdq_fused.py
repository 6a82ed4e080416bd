"""Quantized fused ops ``npudispatch.QDQ<Op>``: DequantizeLinear -> <Op> -> QuantizeLinear as one
NPU kernel (table in :mod:`npudispatch.opset_quant`; rewrite in ``rewrites/qdq.py``).

Kernel: dequantize every operand exactly like onnxruntime (``float32(q - zp) * scale``), run the
float op in float32 (the AIE2P float32/integer datapath a quantized kernel uses, not bf16), and
quantize like onnxruntime (``rint(r / y_scale) + y_zp``, half to even, saturated). onnxruntime's
QDQ execution does the same float32 steps, so results agree except where the two float32
computations of the op differ in their last bits (summation order of a MatMul, Softmax or mean;
exp/erf/tanh polynomials) *and* the value lands within that difference of a rounding boundary:
then one element is one quantization step off. onnxruntime's own optimized QDQ run (QLinearAdd,
QLinearMatMul... with fixed-point requantization) differs from its unoptimized run the same way.

Weight forms: the weight of a MatMul, Gemm, Conv or ConvTranspose (a chain's first stage) may be
per channel along any axis or blocked (``weight_axis`` / ``weight_block_size``; record dims end
with ``[axis, block]`` for those ops), dequantized like DequantizeLinear-21.
Operands: per-tensor scale and zero point (one element each); quantized types uint8, int8,
uint16, int16, uint4, int4 and int32 (the bias type, e.g. a LayerNormalization bias). Constant
quantized operands (weights, exponents) travel in the const region with the scales; activations
are streamed. Padded tensors are declined: a padded quantized lane holds 0, which dequantizes to
``-zp * scale``, and reductions would read it (the padding pass then pins the shapes).
Record dims: op-specific (Softmax/LayerNormalization axis; Transpose perm; ReduceMean keepdims
and axes); floats: LayerNormalization epsilon.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    TensorSpec,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    tensor_spec,
)
from npudispatch.operators.conv import ConvTranspose
from npudispatch.operators.pool import KIND_AVG, KIND_MAX
from npudispatch.operators.qdq_float import STAGE_FLOATS, float_op
from npudispatch.operators.quantize import (
    QUANT_DTYPES,
    dequantize,
    expand_param,
    quant_range,
    quantize,
)
from npudispatch.operators.window import resolve_window
from npudispatch.opset import DOMAIN
from npudispatch.opset_quant import (
    CHAIN,
    QDQ_OPS,
    WEIGHT_AXIS,
    WEIGHT_BLOCK,
    QuantizedOp,
    chain_arity,
    chain_stages,
)

__all__ = ["QDQ_OPERATORS", "STAGE_FLOATS", "QdqChain", "QdqFusedOp", "float_op"]

KERNEL_BASE = 810
_QTYPES = {*QUANT_DTYPES.values(), np.dtype(np.int32)}


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
        return None
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        return None
    return (*batch, a[-2], b[-1])


def stage_attrs(spec: QuantizedOp, node: ir.Node, prefix: str, rank: int) -> dict | Decline:
    """The attributes stage ``spec`` of ``node`` uses (names prefixed), normalised for ``rank``."""
    inner, a = spec.inner, node.attributes
    attrs: dict = {}
    if inner in ("Softmax", "LayerNormalization"):
        axis = a.get_int(f"{prefix}axis", -1)
        if not -rank <= axis < rank:
            return Decline(f"{inner} axis {axis} out of range for rank {rank}")
        attrs["axis"] = axis % rank
    for name, default in STAGE_FLOATS.get(inner, ()):
        attrs[name] = a.get_float(f"{prefix}{name}", default)
    if inner == "Gemm":
        attrs["transA"] = a.get_int(f"{prefix}transA", 0)
        attrs["transB"] = a.get_int(f"{prefix}transB", 0)
    if inner == "Transpose":
        perm = a.get_ints(f"{prefix}perm", list(range(rank))[::-1])
        if sorted(perm) != list(range(rank)):
            return Decline(f"perm {perm} is not a permutation of {rank} axes")
        attrs["perm"] = list(perm)
    if inner in ("MaxPool", "AveragePool"):
        for name in ("dilations", "kernel_shape", "pads", "strides"):
            attrs[name] = a.get_ints(f"{prefix}{name}", None)
        attrs["auto_pad"] = a.get_string(f"{prefix}auto_pad", "NOTSET")
        attrs["ceil_mode"] = a.get_int(f"{prefix}ceil_mode", 0)
        attrs["count_include_pad"] = a.get_int(f"{prefix}count_include_pad", 0)
        if a.get_int(f"{prefix}storage_order", 0):
            return Decline("MaxPool storage_order=1 is not supported")
    if inner in ("Conv", "ConvTranspose"):
        for name in ("dilations", "kernel_shape", "pads", "strides"):
            attrs[name] = a.get_ints(f"{prefix}{name}", None)
        attrs["group"] = a.get_int(f"{prefix}group", 1)
        attrs["auto_pad"] = a.get_string(f"{prefix}auto_pad", "NOTSET")
        if inner == "ConvTranspose":
            attrs["output_padding"] = a.get_ints(f"{prefix}output_padding", None)
            attrs["output_shape"] = None
    if inner == "ReduceMean":
        axes = a.get_ints(f"{prefix}axes", None)
        if not axes or any(not -rank <= x < rank for x in axes):
            return Decline(f"ReduceMean axes {axes} must name axes of the rank-{rank} input")
        attrs["axes"] = sorted({x % rank for x in axes})
        attrs["keepdims"] = a.get_int(f"{prefix}keepdims", 1)
    return attrs


def stage_shape(spec: QuantizedOp, shapes: list[tuple[int, ...]], attrs: dict) -> tuple | Decline:
    """Output shape of stage ``spec`` on operand ``shapes``."""
    inner = spec.inner
    if inner == "MatMul":
        out = _matmul_shape(shapes[0], shapes[1])
        return out if out is not None else Decline(f"shapes {shapes} do not multiply")
    if inner == "Transpose":
        return tuple(shapes[0][p] for p in attrs["perm"])
    if inner == "Gemm":
        a, b, c = shapes
        if len(a) != 2 or len(b) != 2:
            return Decline(f"Gemm operands {a}, {b} must be 2-D")
        (m, k) = a[::-1] if attrs["transA"] else a
        (k2, n) = b[::-1] if attrs["transB"] else b
        if k != k2:
            return Decline(f"Gemm shapes {a} and {b} do not multiply")
        try:
            if np.broadcast_shapes(c, (m, n)) != (m, n):
                raise ValueError
        except ValueError:
            return Decline(f"Gemm C {c} does not broadcast to {(m, n)}")
        return (m, n)
    if inner == "BatchNormalization":
        x = shapes[0]
        if len(x) < 2 or any(s != (x[1],) for s in shapes[1:]):
            return Decline(f"BatchNormalization parameters {shapes[1:]} must be [C] of {x}")
        return x
    if inner in ("MaxPool", "AveragePool"):
        x = shapes[0]
        if len(x) < 3 or attrs["kernel_shape"] is None:
            return Decline(f"{inner} needs kernel_shape and a rank >= 3 input, got {x}")
        window = resolve_window(attrs, x[2:], attrs["kernel_shape"])
        if isinstance(window, str):
            return Decline(f"{inner} {window}")
        if any(max(b, e) >= kk * d for b, e, kk, d in zip(window.pads_begin, window.pads_end,
                                                        window.kernel, window.dilations)):  # fmt: skip
            return Decline(f"{inner} pads reach a whole window into the padding")
        out = window.output_size(x[2:], bool(attrs["ceil_mode"]))
        if any(o < 1 for o in out):
            return Decline(f"{inner} windows do not fit the input (output size {out})")
        attrs["window"] = window
        return (*x[:2], *out)
    if inner == "GlobalAveragePool":
        x = shapes[0]
        return Decline(f"input rank {len(x)} < 3") if len(x) < 3 else (*x[:2], *(1,) * (len(x) - 2))
    if inner == "Conv":
        x, w, b = shapes
        if b != (w[0],):
            return Decline(f"Conv bias {b} must be [M={w[0]}] for weight {w}")
        group = attrs["group"]
        if not 3 <= len(x) <= 5 or len(w) != len(x):
            return Decline(f"Conv input {x} / weight {w}: 1-D to 3-D convolution only")
        if group < 1 or x[1] % group or w[0] % group or x[1] // group != w[1]:
            return Decline(f"Conv group={group} does not fit input {x} and weight {w}")
        if attrs["kernel_shape"] is not None and tuple(attrs["kernel_shape"]) != tuple(w[2:]):
            return Decline(f"Conv kernel_shape {attrs['kernel_shape']} differs from W {w}")
        window = resolve_window(attrs, x[2:], w[2:])
        if isinstance(window, str):
            return Decline(f"Conv {window}")
        out = window.output_size(x[2:])
        if any(o < 1 for o in out):
            return Decline(f"Conv windows do not fit the input (output size {out})")
        attrs["window"] = window
        return (x[0], w[0], *out)
    if inner == "ConvTranspose":
        x, w, b = shapes
        if not 3 <= len(x) <= 5 or len(w) != len(x):
            return Decline(f"ConvTranspose input {x} / weight {w}: 1-D to 3-D only")
        geo = ConvTranspose().geometry(attrs, x, w, "ConvTranspose")
        if isinstance(geo, Decline):
            return geo
        if b != (geo["M"],):
            return Decline(f"ConvTranspose bias {b} must be [M={geo['M']}]")
        attrs["geometry"] = geo
        return (x[0], geo["M"], *geo["out"])
    if inner == "ReduceMean":
        axes = attrs["axes"]
        return tuple(
            1 if i in axes else d
            for i, d in enumerate(shapes[0])
            if attrs["keepdims"] or i not in axes
        )
    if inner == "LayerNormalization":
        tail = shapes[0][attrs["axis"] :]
        for shape in shapes[1:]:
            try:
                ok = np.broadcast_shapes(shape, tail) == tail
            except ValueError:
                ok = False
            if not ok:
                return Decline(f"scale/bias shape {shape} does not broadcast to {tail}")
        return shapes[0]
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        return Decline(f"shapes {shapes} do not broadcast")


def stage_dims(spec: QuantizedOp, attrs: dict) -> list[int]:
    """Record dims of one stage (axis; perm; keepdims + axes)."""
    if spec.inner in ("Softmax", "LayerNormalization"):
        return [attrs["axis"]]
    if spec.inner == "Transpose":
        return list(attrs["perm"])
    if spec.inner == "ReduceMean":
        return [attrs["keepdims"], *attrs["axes"]]
    if spec.inner == "Gemm":
        return [attrs["transA"], attrs["transB"]]
    if spec.inner in ("MaxPool", "AveragePool"):
        win = attrs["window"]
        kind = KIND_MAX if spec.inner == "MaxPool" else KIND_AVG
        return [kind, attrs["ceil_mode"], attrs["count_include_pad"], win.rank, *win.kernel,
                *win.strides, *win.dilations, *win.pads_begin, *win.pads_end]  # fmt: skip
    if spec.inner == "Conv":
        win = attrs["window"]
        return [attrs["group"], win.rank, *win.kernel, *win.strides, *win.dilations,
                *win.pads_begin, *win.pads_end]  # fmt: skip
    if spec.inner == "ConvTranspose":
        geo = attrs["geometry"]
        win = geo["window"]
        return [geo["G"], win.rank, *win.kernel, *win.dilations, *win.pads_begin,
                *win.pads_end, *geo["upsample"]]  # fmt: skip
    return []


def stage_floats(spec: QuantizedOp, attrs: dict) -> list[float]:
    """Record floats of one stage (LayerNormalization epsilon)."""
    return [attrs[name] for name, _ in STAGE_FLOATS.get(spec.inner, ())]


def _operand_params(
    q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int = 0, block: int = 0
):
    """Scale and zero point of one operand: per tensor, per channel along ``axis``, or in
    blocks of ``block`` along ``axis`` (DequantizeLinear-21's blocked form)."""
    if scale.size == 1 and not block:
        return scale.reshape(()), zp.reshape(())
    return (
        expand_param(scale, q.shape, axis, block, 1.0),
        expand_param(zp.astype(np.int64), q.shape, axis, block, 0),
    )


def weight_form(node: ir.Node, stages: list[QuantizedOp]) -> tuple[int, int] | Decline | None:
    """``(axis, block_size)`` of a single fused op's weight when the node gives one
    (``weight_axis`` / ``weight_block_size``), None for the default form."""
    if WEIGHT_AXIS not in node.attributes:
        return None
    if stages[0].weight is None:
        return Decline(
            f"{WEIGHT_AXIS} is only taken by a QDQ MatMul, Gemm, Conv or ConvTranspose "
            "(a chain's first stage)"
        )
    axis, block = node.attributes.get_int(WEIGHT_AXIS), node.attributes.get_int(WEIGHT_BLOCK, 0)
    if axis < 0 or block < 0 or block == 1:
        return Decline(f"{WEIGHT_AXIS}={axis} / {WEIGHT_BLOCK}={block}: a non-negative axis and "
                       f"a block size of 0 (per channel) or >= 2")  # fmt: skip
    return axis, block


def _form_params_fit(scale: np.ndarray, zp: np.ndarray, shape, form: tuple[int, int]) -> bool:
    """Whether ``scale`` / ``zp`` are the per-channel or blocked parameters of a ``shape``
    weight quantized in ``form`` (per tensor is the default form, never a ``form``)."""
    axis, block = form
    if axis >= len(shape) or zp.shape != scale.shape:
        return False
    if not block:
        return scale.shape == (shape[axis],)
    blocked = tuple(-(-d // block) if i == axis else d for i, d in enumerate(shape))
    return scale.shape == blocked


_CODES = {inner: i for i, inner in enumerate(QDQ_OPS)}
_BY_CODE = list(QDQ_OPS.values())


class QdqFusedOp(Operator):
    """Base of the quantized fused operators: per-tensor (q, scale, zero point) operand triples,
    then ``y_scale, y_zero_point``; :meth:`stages` says which float ops run in between."""

    domain = DOMAIN

    @abstractmethod
    def stages(self, node: ir.Node) -> list[QuantizedOp] | Decline:
        """The float ops this node computes, in order."""

    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        stages = self.stages(node)
        if isinstance(stages, Decline):
            return Decline(f"{label}: {stages.reason}")
        arity = chain_arity(stages) if len(stages) > 1 else stages[0].arity
        if len(node.inputs) != 3 * arity + 2 or any(v is None for v in node.inputs):
            return Decline(f"{label}: needs {3 * arity + 2} inputs (zero points included)")
        form = weight_form(node, stages)
        if isinstance(form, Decline):
            return Decline(f"{label}: {form.reason}")
        specs: list[TensorSpec | None] = []
        consts: dict[int, np.ndarray] = {}
        for k in range(arity + 1):
            base = 3 * k
            if k < arity:
                q = tensor_spec(node.inputs[base], f"{label} input x{k}")
                if isinstance(q, Decline):
                    return q
                if q.real_shape is not None:
                    return Decline(f"{label}: input x{k} is padded (quantized padding is not 0)")
                if q.dtype not in _QTYPES:
                    return Decline(f"{label}: input x{k} is {q.dtype}, not a quantized type")
                specs.append(q)
                if (arr := const_array(node.inputs[base])) is not None:
                    consts[base] = arr
                qdtype = q.dtype
                s_idx, z_idx, what = base + 1, base + 2, f"x{k}"
            else:
                s_idx, z_idx, what = base, base + 1, "y"
                y = tensor_spec(node.outputs[0], f"{label} output y")
                if isinstance(y, Decline):
                    return y
                if y.real_shape is not None:
                    return Decline(f"{label}: output y is padded (quantized padding is not 0)")
                qdtype = y.dtype
            scale, zp = const_array(node.inputs[s_idx]), const_array(node.inputs[z_idx])
            if scale is None or zp is None:
                return Decline(f"{label}: {what} scale and zero point must be constants")
            # Per channel only where the op allows it (a Conv weight along axis 0, a
            # ConvTranspose weight along axis 1).
            per_axis = k < arity and k in stages[0].per_axis and scale.size != 1
            axis = stages[0].axis_of(k)
            shape = specs[-1].shape if k < arity and specs[-1] is not None else ()
            if form is not None and k == stages[0].weight:
                if base not in consts:
                    return Decline(f"{label}: weight x{k} of {WEIGHT_AXIS} must be a constant")
                if not _form_params_fit(scale, zp, shape, form):
                    return Decline(
                        f"{label}: weight x{k} {shape} scale {scale.shape} / zero point "
                        f"{zp.shape} do not fit axis {form[0]}, block size {form[1]}"
                    )
            elif per_axis and not (
                scale.ndim == 1
                and zp.shape == scale.shape
                and len(shape) > axis
                and scale.size == shape[axis]
            ):
                return Decline(
                    f"{label}: {what} scale {scale.shape} / zero point {zp.shape} must be per "
                    f"tensor or per channel along axis {axis} of {shape}"
                )
            if not per_axis and (scale.size != 1 or zp.size != 1):
                return Decline(
                    f"{label}: {what} scale and zero point must be one-element constants"
                )
            if scale.dtype != np.float32 or not (np.isfinite(scale).all() and (scale > 0).all()):
                return Decline(f"{label}: {what} scale must be a positive finite float32")
            if zp.dtype != qdtype:
                return Decline(f"{label}: {what} zero point is {zp.dtype}, {what} is {qdtype}")
            lo, hi = quant_range(qdtype)
            if not (lo <= zp.astype(np.int64)).all() or not (zp.astype(np.int64) <= hi).all():
                return Decline(f"{label}: {what} zero point outside {qdtype}")
            for idx, arr in ((s_idx, scale), (z_idx, zp)):
                specs.append(TensorSpec(tuple(arr.shape), arr.dtype))
                consts[idx] = arr
        if y.dtype not in QUANT_DTYPES.values():
            return Decline(f"{label}: output dtype {y.dtype} is not a quantized type")
        if all(3 * i in consts for i in range(arity)):
            return Decline(f"{label}: every operand is constant (fold it on the CPU instead)")
        operand_shapes = [s.shape for s in specs[0 : 3 * arity : 3] if s is not None]
        plan: list[tuple[QuantizedOp, dict]] = []
        shape: tuple[int, ...] | None = None
        used = 0
        chained = len(stages) > 1
        for k, spec in enumerate(stages):
            n_new = spec.arity if k == 0 else spec.arity - 1
            shapes = ([] if k == 0 else [shape]) + operand_shapes[used : used + n_new]
            used += n_new
            attrs = stage_attrs(spec, node, f"s{k}_" if chained else "", len(shapes[0]))
            if isinstance(attrs, Decline):
                return Decline(f"{label}: {attrs.reason}")
            out = stage_shape(spec, shapes, attrs)
            if isinstance(out, Decline):
                return Decline(f"{label}: {spec.inner}: {out.reason}")
            plan.append((spec, attrs))
            shape = out
        if shape != y.shape:
            return Decline(f"{label}: output shape {y.shape}, the ops give {shape}")
        return node_config(
            self, node, specs, [y], consts=consts, attrs={"plan": plan, "form": form}
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        """One op: its stage dims. A chain: ``[n, (code, n_dims, *dims) per stage]``."""
        plan = cfg.attrs["plan"]
        if len(plan) == 1:  # a weight op ends with its weight's (axis, block_size)
            spec = plan[0][0]
            form = cfg.attrs.get("form") or (spec.axis_of(spec.weight or 0), 0)
            return stage_dims(*plan[0]) + (list(form) if spec.weight is not None else [])
        dims = [len(plan)]
        for spec, attrs in plan:
            own = stage_dims(spec, attrs)
            dims += [_CODES[spec.inner], len(own), *own]
        first = plan[0][0]  # a chain from a weight op ends with the weight's (axis, block_size)
        form = cfg.attrs.get("form") or (first.axis_of(first.weight or 0), 0)
        return dims + (list(form) if first.weight is not None else [])

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [f for spec, attrs in cfg.attrs["plan"] for f in stage_floats(spec, attrs)]

    @abstractmethod
    def decode_stages(self, dims: list[int]) -> list[tuple[QuantizedOp, list[int]]]:
        """Inverse of :meth:`op_dims`: each stage and its dims (what the kernel reads)."""

    def decode_form(self, dims: list[int]) -> tuple[int, int] | None:
        """The weight's ``(axis, block_size)`` from the record dims (None: the default)."""
        return None

    # ---- execution ------------------------------------------------------------------------
    def _run(self, inputs, out_dtype: np.dtype, dims, floats) -> np.ndarray:
        stages = self.decode_stages(list(dims))
        form = self.decode_form(list(dims))
        arity = (len(inputs) - 2) // 3
        first = stages[0][0]
        forms = {i: (first.axis_of(i), 0) for i in range(arity)}
        if form is not None and first.weight is not None:
            forms[first.weight] = form
        xs = [
            dequantize(
                inputs[3 * i],
                *_operand_params(inputs[3 * i], *inputs[3 * i + 1 : 3 * i + 3], *forms[i]),
            )
            for i in range(arity)
        ]
        floats = list(floats)
        r: np.ndarray | None = None
        used = 0
        for k, (spec, own) in enumerate(stages):
            n_new = spec.arity if k == 0 else spec.arity - 1
            operands = ([] if r is None else [r]) + xs[used : used + n_new]
            used += n_new
            n_floats = len(STAGE_FLOATS.get(spec.inner, ()))
            r = float_op(spec.inner, operands, own, floats[:n_floats])
            floats = floats[n_floats:]
        ys, yz = inputs[3 * arity].reshape(()), inputs[3 * arity + 1].reshape(())
        assert r is not None
        return quantize(r, ys, yz, out_dtype)

    def compute(self, inputs, outputs, dims, floats):
        return [self._run(inputs, outputs[0].dtype, dims, floats)]

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [
            self._run(
                [np.asarray(x) for x in inputs],
                cfg.outputs[0].dtype,
                self.op_dims(cfg),
                self.op_floats(cfg),
            )
        ]


class _SingleQdqOp(QdqFusedOp):
    """``QDQ<Op>``: one float op (``spec``)."""

    spec: ClassVar[QuantizedOp]

    def stages(self, node: ir.Node) -> list[QuantizedOp] | Decline:
        return [self.spec]

    def decode_stages(self, dims: list[int]) -> list[tuple[QuantizedOp, list[int]]]:
        return [(self.spec, list(dims[:-2] if self.spec.weight is not None else dims))]

    def decode_form(self, dims: list[int]) -> tuple[int, int] | None:
        if self.spec.weight is None:
            return None
        return dims[-2], dims[-1]


class QdqChain(QdqFusedOp):
    """``npudispatch.QDQChain``: several float ops between one set of DQs and one Q (the
    quantizer left their intermediates float), e.g. ``Pow -> ReduceMean`` of a decomposed
    RMSNorm or ``Div -> Erf`` of a GELU. Stages from the ``stages`` attribute (``"Pow.ReduceMean"``)."""

    op_type = CHAIN
    kernel_id = KERNEL_BASE - 1

    def stages(self, node: ir.Node) -> list[QuantizedOp] | Decline:
        text = node.attributes.get_string("stages", "")
        stages = chain_stages(text)
        if stages is None:
            return Decline(f"stages {text!r} is not a '.'-separated list of 2+ quantized-form ops")
        return stages

    def decode_stages(self, dims: list[int]) -> list[tuple[QuantizedOp, list[int]]]:
        out, pos = [], 1
        for _ in range(dims[0]):
            code, n = dims[pos], dims[pos + 1]
            out.append((_BY_CODE[code], dims[pos + 2 : pos + 2 + n]))
            pos += 2 + n
        return out

    def decode_form(self, dims: list[int]) -> tuple[int, int] | None:
        if _BY_CODE[dims[1]].weight is None:
            return None
        return dims[-2], dims[-1]


def _make(index: int, spec: QuantizedOp) -> type[QdqFusedOp]:
    return type(
        spec.name,
        (_SingleQdqOp,),
        {
            "op_type": spec.name,
            "kernel_id": KERNEL_BASE + index,
            "spec": spec,
            "__doc__": f"npudispatch.{spec.name}: QuantizeLinear({spec.inner}(DequantizeLinear...)).",
            "__module__": __name__,
        },
    )


#: Every quantized fused operator: one class per op in :data:`QDQ_OPS` order (kernel ids
#: 810...), then the chain (809).
QDQ_OPERATORS: list[type[QdqFusedOp]] = [
    *(_make(i, spec) for i, spec in enumerate(QDQ_OPS.values())),
    QdqChain,
]
assert KERNEL_BASE + len(QDQ_OPS) <= 900
