"""Quantized fused ops of the ``npudispatch`` domain: one ``QDQ<Op>`` per float op a QDQ graph
wraps in DequantizeLinear -> op -> QuantizeLinear (the rewrite in ``rewrites/qdq.py``).

``QDQ<Op>(x0, x0_scale, x0_zero_point, [x1, x1_scale, x1_zero_point, ...], y_scale,
y_zero_point) -> y`` means exactly ``QuantizeLinear(<Op>(DequantizeLinear(x0, ...), ...), y_scale,
y_zero_point)`` with per-tensor scales and zero points and ``<Op>``'s own attributes.
``QDQRequantize`` is the DQ -> Q chain (``<Op>`` = Identity). This module is pure data (names,
arities, attributes, ONNX function bodies) so :mod:`npudispatch.opset` can give onnxruntime the
bodies and the operator library and rewrites share one table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "CHAIN",
    "PER_AXIS_OPSET",
    "QDQ_OPS",
    "WEIGHT_AXIS",
    "WEIGHT_BLOCK",
    "QuantizedOp",
    "chain_arity",
    "chain_body",
    "chain_stages",
    "lower_per_axis_dq",
    "quantized_bodies",
    "quantized_specs",
    "weight_form_body",
    "weight_form_overload",
]


@dataclass(frozen=True)
class QuantizedOp:
    """A float op with a quantized fused form: its ONNX op type, data inputs and attributes.

    ``attributes``: name -> (ONNX attribute type, default as ONNX text or None = required).
    ``min_opset``: lowest default-domain opset whose form of the op the body uses (the body
    is instantiated at the model's opset).
    """

    inner: str
    arity: int
    attributes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    min_opset: int = 10  # QuantizeLinear/DequantizeLinear exist since 10
    per_axis: tuple[int, ...] = ()  # operands that may be quantized per channel (axis 0...)
    optional: tuple[int, ...] = ()  # trailing operands the float op may omit (a zero bias)
    axes: tuple[tuple[int, int], ...] = ()  # (operand, axis) of per-channel operands not on 0
    # The constant weight operand that may also be quantized along any axis or in blocks (a
    # ``weight_axis`` / ``weight_block_size`` form of the fused op, :func:`weight_form_overload`).
    weight: int | None = None

    def axis_of(self, operand: int) -> int:
        """The axis along which a per-channel ``operand`` is quantized (0 unless ``axes``)."""
        return dict(self.axes).get(operand, 0)

    @property
    def name(self) -> str:
        """Op type of the fused op in the ``npudispatch`` domain."""
        return "QDQRequantize" if self.inner == "Identity" else f"QDQ{self.inner}"

    @property
    def inputs(self) -> tuple[str, ...]:
        ins: list[str] = []
        for i in range(self.arity):
            ins += [f"x{i}", f"x{i}_scale", f"x{i}_zero_point"]
        return (*ins, "y_scale", "y_zero_point")

    def attribute_decls(self, prefix: str = "") -> list[str]:
        """Function-header declarations of the op's attributes (names prefixed)."""
        return [
            f"{prefix}{n}: {t}" + (f" = {d}" if d is not None else "")
            for n, (t, d) in self.attributes.items()
        ]

    def op_lines(self, args: list[str], result: str, prefix: str = "") -> list[str]:
        """Body lines computing ``result`` from ``args`` (attributes referenced with prefix)."""
        if self.inner == "ReduceMean":  # opset 18 form: axes as an input
            return [
                f"{result}_axes = Constant <value_ints = @{prefix}axes> ()",
                f"{result} = ReduceMean <keepdims = @{prefix}keepdims> "
                f"({', '.join(args)}, {result}_axes)",
            ]
        refs = ", ".join(f"{n} = @{prefix}{n}" for n in self.attributes)
        return [f"{result} = {self.inner}{f' <{refs}>' if refs else ''} ({', '.join(args)})"]

    def body(self, form: tuple[int, int] | None = None) -> str:
        """The ONNX function body (text) of the fused op; ``form`` = ``(axis, block_size)`` of
        its :attr:`weight` operand's DequantizeLinear when it is not the default one."""
        decls, dq_attrs = self.attribute_decls(), {}
        if form is not None and self.weight is not None:
            axis, block = form
            decls += [f"{WEIGHT_AXIS}: int = {axis}", f"{WEIGHT_BLOCK}: int = {block}"]
            dq_attrs[self.weight] = f"axis = {axis}" + (f", block_size = {block}" if block else "")
        return _function_text(self.name, decls, self.inputs, self.arity,
                              self.op_lines([f"f{i}" for i in range(self.arity)], "r"),
                              self.per_axis, self.axes, dq_attrs)  # fmt: skip


def _function_text(
    name: str,
    decls: list[str],
    inputs: tuple[str, ...],
    n_dq: int,
    lines: list[str],
    per_axis: tuple[int, ...] = (),
    axes: tuple[tuple[int, int], ...] = (),
    dq_attrs: dict[int, str] | None = None,
) -> str:
    header = f" <{', '.join(decls)}>" if decls else ""
    attrs = {i: f"axis = {dict(axes).get(i, 0)}" for i in per_axis} | (dq_attrs or {})
    dqs = [
        f"f{i} = DequantizeLinear{f' <{attrs[i]}>' if i in attrs else ''} "
        f"(x{i}, x{i}_scale, x{i}_zero_point)"
        for i in range(n_dq)
    ]
    body = "\n            ".join([*dqs, *lines, "y = QuantizeLinear (r, y_scale, y_zero_point)"])
    return (
        f"\n        {name}{header} ({', '.join(inputs)}) => (y) {{\n            {body}\n        }}"
    )


PER_AXIS_OPSET = 13
"""First opset whose DequantizeLinear takes ``axis`` (per-channel operands); below it
:func:`lower_per_axis_dq` spells a per-channel dequantization with plain arithmetic."""

_PER_AXIS_DQ = re.compile(r"(\w+) = DequantizeLinear <axis = (0|-1)> \((\w+), (\w+), (\w+)\)")
_OTHER_AXIS = re.compile(r"DequantizeLinear <axis = \d+>")


def lower_per_axis_dq(text: str) -> str:
    """A function body without ``DequantizeLinear <axis = 0 | -1>`` (for opsets < 13, whose
    DequantizeLinear has no axis): ``float32(int32(x) - int32(zp)) * scale``, where a ``[C]``
    scale broadcasts along the last axis; for axis 0 it is computed on the reversed-axes tensor
    (axis 0 last) and reversed back. This is DequantizeLinear's definition (onnxruntime's int32
    subtraction and one float32 multiply), so it also holds for per-tensor operands there."""

    def lowered(m: re.Match) -> str:
        f, axis, x, scale, zp = m.groups()
        flip = axis == "0"
        lines = [f"{f}_xi = Cast <to = 6> ({x})", f"{f}_zi = Cast <to = 6> ({zp})"]
        if flip:
            lines.append(f"{f}_xt = Transpose ({f}_xi)")
        lines += [
            f"{f}_d = Sub ({f}_xt, {f}_zi)" if flip else f"{f}_d = Sub ({f}_xi, {f}_zi)",
            f"{f}_df = Cast <to = 1> ({f}_d)",
            f"{f}_t = Mul ({f}_df, {scale})" if flip else f"{f} = Mul ({f}_df, {scale})",
        ]
        if flip:
            lines.append(f"{f} = Transpose ({f}_t)")
        return "\n            ".join(lines)

    # Other axes (a ConvTranspose weight's 1) only ever hold per-tensor operands below opset
    # 13, where no DequantizeLinear of the source model has an axis: the axis is dropped.
    return _OTHER_AXIS.sub("DequantizeLinear", _PER_AXIS_DQ.sub(lowered, text))


WEIGHT_AXIS = "weight_axis"
WEIGHT_BLOCK = "weight_block_size"
_FORM = re.compile(r"weight_axis(\d+)_block(\d+)")


def weight_form_overload(axis: int, block: int, stages: str = "") -> str:
    """Function overload of a fused op (a :data:`CHAIN` with ``stages``) whose
    :attr:`QuantizedOp.weight` is quantized along ``axis`` (>= 0) in blocks of ``block`` (0: per
    channel) instead of the default form (per tensor, or per channel along
    :meth:`QuantizedOp.axis_of`): its body's DequantizeLinear takes that axis and block_size,
    which the node carries as ``weight_axis`` and ``weight_block_size`` (the kernel reads them
    from its record). A chain's overload is ``"<stages>:weight_axis<A>_block<B>"``."""
    form = f"weight_axis{axis}_block{block}"
    return f"{stages}:{form}" if stages else form


def _parse_form(text: str) -> tuple[int, int] | None:
    m = _FORM.fullmatch(text)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def weight_form_body(op_type: str, overload: str) -> str | None:
    """Function body of ``op_type`` with a :func:`weight_form_overload`, None if not one."""
    form = _parse_form(overload)
    spec = next((op for op in QDQ_OPS.values() if op.name == op_type), None)
    if form is None or spec is None or spec.weight is None:
        return None
    return spec.body(form)


CHAIN = "QDQChain"
"""Op type of a chain of quantized-form ops between one set of DQs and one Q; the stages are its
``overload`` (``"Pow.ReduceMean"``) and its ``stages`` attribute; stage ``k``'s attributes are
prefixed ``s<k>_``; stage 0 reads the first triples, stage ``k > 0`` the previous result and
its own further triples."""


def chain_stages(overload: str) -> list[QuantizedOp] | None:
    """The stages of a :data:`CHAIN` overload, None when it names an unknown op."""
    names = overload.split(".") if overload else []
    if len(names) < 2 or any(n not in QDQ_OPS or n == "Identity" for n in names):
        return None
    return [QDQ_OPS[n] for n in names]


def chain_arity(stages: list[QuantizedOp]) -> int:
    """Quantized operands (triples) a chain reads."""
    return stages[0].arity + sum(s.arity - 1 for s in stages[1:])


def chain_body(overload: str) -> str | None:
    """Function body of ``QDQChain`` with ``overload`` (its stages, and a
    :func:`weight_form_overload` suffix for its first stage's weight; None when invalid)."""
    names, _, suffix = overload.partition(":")
    stages = chain_stages(names)
    form = _parse_form(suffix) if suffix else None
    if stages is None or (suffix and (form is None or stages[0].weight is None)):
        return None
    n = chain_arity(stages)
    inputs: list[str] = []
    for i in range(n):
        inputs += [f"x{i}", f"x{i}_scale", f"x{i}_zero_point"]
    decls = ['stages: string = ""']
    dq_attrs: dict[int, str] = {}
    if form is not None and stages[0].weight is not None:
        axis, block = form
        decls += [f"{WEIGHT_AXIS}: int = {axis}", f"{WEIGHT_BLOCK}: int = {block}"]
        dq_attrs[stages[0].weight] = f"axis = {axis}" + (f", block_size = {block}" if block else "")
    lines: list[str] = []
    used = 0
    for k, stage in enumerate(stages):
        decls += stage.attribute_decls(f"s{k}_")
        if k == 0:
            args = [f"f{i}" for i in range(stage.arity)]
        else:
            args = [f"r{k - 1}", *[f"f{used + i}" for i in range(stage.arity - 1)]]
        used += len(args) if k == 0 else len(args) - 1
        lines += stage.op_lines(args, "r" if k == len(stages) - 1 else f"r{k}", f"s{k}_")
    return _function_text(
        CHAIN,
        decls,
        (*inputs, "y_scale", "y_zero_point"),
        n,
        lines,
        stages[0].per_axis,
        stages[0].axes,
        dq_attrs,
    )


def _ops() -> dict[str, QuantizedOp]:
    ops = [QuantizedOp(op, 2) for op in ("Add", "Sub", "Mul", "Div", "Pow")]
    # B may be a constant weight [K, N] quantized per row (axis 0, along the reduction axis K),
    # which QMatMul's integer kernel cannot take (the scale cannot leave the integer sum).
    ops.append(QuantizedOp("MatMul", 2, per_axis=(1,), weight=1))
    ops += [
        QuantizedOp(op, 1)
        for op in (
            "Identity",
            "Sigmoid",
            "Tanh",
            "Relu",
            "Erf",
            "Exp",
            "Sqrt",
            "Reciprocal",
            "Neg",
            "Abs",
            "Softplus",
        )
    ]
    ops += [
        # One-axis semantics; below opset 13 only along the last axis (rewrites/qdq.py).
        QuantizedOp("Softmax", 1, {"axis": ("int", "-1")}),
        QuantizedOp("Transpose", 1, {"perm": ("ints", None)}),
        QuantizedOp("ReduceMean", 1, {"axes": ("ints", None), "keepdims": ("int", "1")}, 18),
        QuantizedOp(
            "LayerNormalization", 3, {"axis": ("int", "-1"), "epsilon": ("float", "1e-05")}, 17
        ),
    ]
    # Appended last: kernel ids follow this order. Weight W per output channel (axis 0); bias B
    # the int32 DQ quantizers emit (scale x_scale * w_scale[m]); a Conv without one reads an
    # exact zero bias.
    conv_attrs = {
        "auto_pad": ("string", '"NOTSET"'),
        "dilations": ("ints", None),
        "group": ("int", "1"),
        "kernel_shape": ("ints", None),
        "pads": ("ints", None),
        "strides": ("ints", None),
    }
    ops.append(QuantizedOp("Conv", 3, conv_attrs, per_axis=(1, 2), optional=(2,), weight=1))
    gemm_attrs = {
        "alpha": ("float", "1.0"),
        "beta": ("float", "1.0"),
        "transA": ("int", "0"),
        "transB": ("int", "0"),
    }
    # B per channel along axis 0: per output channel with transB=1 (B [N, K]), per K with
    # transB=0 (the rewrite transposes a weight quantized along axis 1 and flips transB);
    # C is the int32 bias per channel, or an exact zero.
    ops.append(QuantizedOp("Gemm", 3, gemm_attrs, per_axis=(1, 2), optional=(2,), weight=1))
    ops.append(QuantizedOp("GlobalAveragePool", 1))
    # Inference BatchNormalization: scale, B, mean, var per channel (exact DQs of the floats).
    bn_attrs = {"epsilon": ("float", "1e-05"), "momentum": ("float", "0.9")}
    ops.append(QuantizedOp("BatchNormalization", 5, bn_attrs, per_axis=(1, 2, 3, 4)))
    ops.append(QuantizedOp("HardSigmoid", 1, {"alpha": ("float", "0.2"), "beta": ("float", "0.5")}))
    ops.append(QuantizedOp("HardSwish", 1, min_opset=14))
    window_attrs = {
        "auto_pad": ("string", '"NOTSET"'),
        "ceil_mode": ("int", "0"),
        "dilations": ("ints", None),
        "kernel_shape": ("ints", None),
        "pads": ("ints", None),
        "strides": ("ints", None),
    }
    ops.append(QuantizedOp("MaxPool", 1, {**window_attrs, "storage_order": ("int", "0")}))
    ops.append(
        QuantizedOp("AveragePool", 1, {**window_attrs, "count_include_pad": ("int", "0")}, 19)
    )
    ops.append(QuantizedOp("LeakyRelu", 1, {"alpha": ("float", "0.01")}))
    # Weight W [C, M/G, *k] per output channel along axis 1 (as quantize_static emits); bias
    # per channel or none. output_shape is left out (an absent ints attribute reaches
    # onnxruntime's body as an empty list, which would mean "given"): the rewrite spells it as
    # the explicit pads ONNX derives from it (rewrites/qdq_operands.py).
    ct_attrs = conv_attrs | {"output_padding": ("ints", None)}
    ops.append(
        QuantizedOp(
            "ConvTranspose", 3, ct_attrs, per_axis=(1, 2), optional=(2,), axes=((1, 1),), weight=1
        )
    )
    return {op.inner: op for op in ops}


#: Quantized fused ops by the float op they wrap.
QDQ_OPS: dict[str, QuantizedOp] = _ops()


def quantized_specs() -> dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str], str]]:
    """``name -> (inputs, outputs, attribute defaults, doc)`` for :class:`npudispatch.opset.OpSpec`."""
    return {
        op.name: (
            op.inputs,
            ("y",),
            {n: d or "" for n, (_, d) in op.attributes.items()}
            | ({WEIGHT_AXIS: "", WEIGHT_BLOCK: "0"} if op.weight is not None else {}),
            f"QuantizeLinear({op.inner}(DequantizeLinear(x_i)...)), per-tensor parameters",
        )
        for op in QDQ_OPS.values()
    } | {
        CHAIN: (
            ("x0", "x0_scale", "x0_zero_point", "...", "y_scale", "y_zero_point"),
            ("y",),
            {"stages": "", WEIGHT_AXIS: "", WEIGHT_BLOCK: "0"},
            "QuantizeLinear(stage_n(...stage_0(DequantizeLinear(x_i)...)...)), per-tensor",
        )
    }


def quantized_bodies() -> dict[tuple[str, str], str]:
    """Function bodies keyed like ``npudispatch.opset``'s (``(name, overload)``)."""
    return {(op.name, ""): op.body() for op in QDQ_OPS.values()}
