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

from dataclasses import dataclass, field

__all__ = ["QDQ_OPS", "QuantizedOp", "quantized_bodies", "quantized_specs"]


@dataclass(frozen=True)
class QuantizedOp:
    """A float op with a quantized fused form: its ONNX op type, data inputs and attributes.

    ``attributes``: name -> (ONNX attribute type, default as ONNX text or None = required).
    ``min_opset``: lowest default-domain opset whose form of the op the body uses.
    """

    inner: str
    arity: int
    attributes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    min_opset: int = 13

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

    def body(self) -> str:
        """The ONNX function body (text) of the fused op."""
        header = ""
        if self.attributes:
            parts = [
                f"{n}: {t}" + (f" = {d}" if d is not None else "")
                for n, (t, d) in self.attributes.items()
            ]
            header = " <" + ", ".join(parts) + ">"
        lines = [
            f"f{i} = DequantizeLinear (x{i}, x{i}_scale, x{i}_zero_point)"
            for i in range(self.arity)
        ]
        args = ", ".join(f"f{i}" for i in range(self.arity))
        if self.inner == "ReduceMean":  # opset 18 form: axes as an input
            lines.append("ax = Constant <value_ints = @axes> ()")
            lines.append(f"r = ReduceMean <keepdims = @keepdims> ({args}, ax)")
        else:
            refs = ", ".join(f"{n} = @{n}" for n in self.attributes)
            lines.append(f"r = {self.inner}{f' <{refs}>' if refs else ''} ({args})")
        lines.append("y = QuantizeLinear (r, y_scale, y_zero_point)")
        body = "\n            ".join(lines)
        return (
            f"\n        {self.name}{header} ({', '.join(self.inputs)}) => (y) {{\n"
            f"            {body}\n        }}"
        )


def _ops() -> dict[str, QuantizedOp]:
    ops = [QuantizedOp(op, 2) for op in ("Add", "Sub", "Mul", "Div", "Pow", "MatMul")]
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
        QuantizedOp("Softmax", 1, {"axis": ("int", "-1")}),
        QuantizedOp("Transpose", 1, {"perm": ("ints", None)}),
        QuantizedOp("ReduceMean", 1, {"axes": ("ints", None), "keepdims": ("int", "1")}, 18),
        QuantizedOp(
            "LayerNormalization", 3, {"axis": ("int", "-1"), "epsilon": ("float", "1e-05")}, 17
        ),
    ]
    return {op.inner: op for op in ops}


#: Quantized fused ops by the float op they wrap.
QDQ_OPS: dict[str, QuantizedOp] = _ops()


def quantized_specs() -> dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, str], str]]:
    """``name -> (inputs, outputs, attribute defaults, doc)`` for :class:`npudispatch.opset.OpSpec`."""
    return {
        op.name: (
            op.inputs,
            ("y",),
            {n: d or "" for n, (_, d) in op.attributes.items()},
            f"QuantizeLinear({op.inner}(DequantizeLinear(x_i)...)), per-tensor parameters",
        )
        for op in QDQ_OPS.values()
    }


def quantized_bodies() -> dict[tuple[str, str], str]:
    """Function bodies keyed like ``npudispatch.opset``'s (``(name, overload)``)."""
    return {(op.name, ""): op.body() for op in QDQ_OPS.values()}
