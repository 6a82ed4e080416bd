"""Conv, ConvTranspose and npudispatch.FusedConv (Conv + bias + activation): bf16 convolution with
float32 accumulation on a compile-time formatted weight image (kernel ids 600..603; the kernel's
arithmetic is in :mod:`.conv_kernel`).

Any spatial rank 1..3, any ``group`` (depthwise, depthwise with multiplier), ``strides``,
``dilations``, explicit ``pads`` and every ``auto_pad`` mode; ConvTranspose adds
``output_padding`` and ``output_shape``. Weights and bias must be constant initializers.

Weight image (const region, formatted once at compile time)
------------------------------------------------------------
``G`` groups, ``Mg = M / G`` output channels and ``Cg`` input channels per group, ``R`` kernel
taps (product of the kernel shape, row-major), ``Kg = Cg * R``, ``Kp = Kg`` rounded up to whole
8-lane bf16 vectors:

* part 0, **weights**: bf16 ``[G, Mg, Kp]``; row ``(g, m)`` holds output channel ``g * Mg + m``,
  column ``c * R + t`` its weight for input channel ``g * Cg + c`` at tap ``t``; columns
  ``Kg..Kp`` are zero. A ConvTranspose weight ``[C, M / G, *k]`` is stored as the equivalent
  stride-1 convolution's weight: channels swapped within each group and taps flipped.
* part 1, **bias**: float32 ``[M]`` (zeros when the node has none), 4-byte aligned after part 0.

Kernel
------
The input is cropped to its real shape (padded lanes never enter a window), zero-inserted by the
ConvTranspose stride, padded (or cropped for negative pads), and every window is gathered with
one strided view; per group one float32 matmul ``W[g] (Mg x Kg) @ patches (Kg x P)`` computes all
``P`` output pixels (inputs rounded to bf16, float32 accumulation). Then bias, the fused
activation and affine, one rounding to bf16, and the result is written into the (possibly
padded) output.

Params record ``dims``: ``[variant, r, G, Mg, Cg, *kernel, *strides, *dilations, *pads_begin,
*pads_end, *upsample, activation]`` (variant 0 Conv / FusedConv, 1 ConvTranspose; ``upsample`` =
ConvTranspose strides, else 1s; activation codes :data:`ACTIVATION_CODES`); floats ``[alpha,
beta, post_scale, post_shift]`` (FusedConv's affine after the activation; 1 and 0 otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from npudispatch.errors import DeviceError
from npudispatch.operators import records
from npudispatch.operators.base import (
    Decline,
    OpConfig,
    Operator,
    ShapeConstraints,
    check_node_kind,
    const_array,
    node_config,
    op_label,
    round_up,
    tensor_spec,
)
from npudispatch.operators.conv_kernel import (
    ACTIVATION_CODES,
    K_LANES,
    activate,
    activate_and_shift,
    conv_core,
    decode_launch,
)
from npudispatch.operators.dtypes import (
    F32,
    FLOAT_DTYPES,
    fp32_compute,
    store,
    to_bf16,
    to_compute,
    weight_dtype,
    widen,
)
from npudispatch.operators.matmul import fit, view
from npudispatch.operators.window import (
    Window,
    crop_real,
    resolve_window,
)
from npudispatch.opset import CONV_ACTIVATIONS, DOMAIN
from npudispatch.overlay_abi import ParamsRecord

M_GRANULE = 8  # output channels are produced as whole 8-lane bf16 vectors

VARIANT_CONV, VARIANT_TRANSPOSE = 0, 1


def format_weights(w: np.ndarray, group: int, transpose: bool, *, fp32: bool = False) -> np.ndarray:
    """The bf16 weight image ``[G, Mg, Kp]`` of an ONNX Conv / ConvTranspose weight (module doc);
    float32 in float32 compute (``fp32``)."""
    w = np.asarray(w, F32)
    taps = w.shape[2:]
    if transpose:  # [C, Mg, *k] -> [G, Mg, Cg, *k] with flipped taps
        c, mg = w.shape[:2]
        cg = c // group
        w = w.reshape(group, cg, mg, *taps).swapaxes(1, 2)
        w = np.flip(w, axis=tuple(range(3, 3 + len(taps))))
    else:  # [M, Cg, *k] -> [G, Mg, Cg, *k]
        m, cg = w.shape[:2]
        w = w.reshape(group, m // group, cg, *taps)
    kg = cg * math.prod(taps)
    elem = weight_dtype(fp32)
    image = np.zeros((group, w.shape[1], round_up(kg, K_LANES)), dtype=elem)
    image[..., :kg] = w.reshape(group, w.shape[1], kg).astype(elem)
    return image


# ---------------------------------------------------------------------------------------------
# Operators


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return value.decode() if isinstance(value, bytes) else value


class Conv(Operator):
    """ONNX Conv with constant weights (and bias) on the NPU; see the module docstring."""

    op_type = "Conv"
    kernel_id = 600
    variant = VARIANT_CONV

    # ---- matching -----------------------------------------------------------------------------
    def match(self, node: ir.Node) -> OpConfig | Decline:
        if (bad := check_node_kind(self, node)) is not None:
            return bad
        label = op_label(node)
        if not 2 <= len(node.inputs) <= 3 or len(node.outputs) != 1:
            return Decline(f"{label}: expects 2..3 inputs and 1 output")
        x = tensor_spec(node.inputs[0], f"{label} input X")
        if isinstance(x, Decline):
            return x
        if x.dtype not in FLOAT_DTYPES:
            return Decline(f"{label}: dtype {x.dtype} not supported (float32 or bfloat16 only)")
        if const_array(node.inputs[0]) is not None:
            return Decline(f"{label}: input X is constant (fold it on the CPU instead)")
        rank = len(x.shape)
        if not 3 <= rank <= 5:
            return Decline(f"{label}: input rank {rank}; 1-D to 3-D convolution (rank 3..5) only")
        w_val = node.inputs[1]
        w = const_array(w_val)
        w_spec = tensor_spec(w_val, f"{label} weight W")
        if isinstance(w_spec, Decline):
            return w_spec
        if w is None:
            return Decline(
                f"{label}: weight W '{w_val.name}' is not a constant initializer "
                "(a runtime weight runs on the CPU)"
            )
        if w.ndim != rank:
            return Decline(f"{label}: weight rank {w.ndim} differs from input rank {rank}")
        b_val = node.inputs[2] if len(node.inputs) > 2 else None
        bias, b_spec = None, None
        if b_val is not None:
            bias = const_array(b_val)
            b_spec = tensor_spec(b_val, f"{label} bias B")
            if bias is None or isinstance(b_spec, Decline):
                return Decline(f"{label}: bias B must be a constant initializer")
        y = tensor_spec(node.outputs[0], f"{label} output Y")
        if isinstance(y, Decline):
            return y
        if y.dtype != x.dtype:
            return Decline(f"{label}: output dtype {y.dtype} differs from the input's {x.dtype}")
        attrs = {
            k: _attr(node, k, None)
            for k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides",
                      "output_padding", "output_shape", "activation", "alpha", "beta",
                      "post_scale", "post_shift")
        }  # fmt: skip
        geo = self.geometry(attrs, x.logical_shape, w.shape, label)
        if isinstance(geo, Decline):
            return geo
        if bias is not None and bias.size != geo["M"]:
            return Decline(f"{label}: bias has {bias.size} values for {geo['M']} output channels")
        act = self.activation(attrs, label)
        if isinstance(act, Decline):
            return act
        want = (x.logical_shape[0], geo["M"], *geo["out"])
        if tuple(y.logical_shape) != want:
            return Decline(f"{label}: output shape {y.logical_shape} is not the computed {want}")
        consts = {1: w} if bias is None else {1: w, 2: bias.reshape(-1)}
        return node_config(
            self, node, [x, w_spec, b_spec], [y], consts=consts, attrs=attrs,
            extra={**geo, "activation": act},
        )  # fmt: skip

    def geometry(
        self, attrs: dict[str, Any], x_shape: Sequence[int], w_shape: Sequence[int], label: str
    ) -> dict[str, Any] | Decline:
        """Groups, channels, the :class:`Window` and the output spatial size of a Conv."""
        group = int(attrs["group"] or 1)
        c, m, cg = x_shape[1], w_shape[0], w_shape[1]
        if group < 1 or c % group or m % group or c // group != cg:
            return Decline(
                f"{label}: group={group} does not fit {c} input channels, weight {tuple(w_shape)}"
            )
        kernel = tuple(w_shape[2:])
        if attrs["kernel_shape"] is not None and tuple(attrs["kernel_shape"]) != kernel:
            return Decline(
                f"{label}: kernel_shape {list(attrs['kernel_shape'])} differs from W {list(kernel)}"
            )
        for bad in ("output_padding", "output_shape"):
            if attrs[bad] is not None:
                return Decline(f"{label}: attribute {bad} is not a Conv attribute")
        window = resolve_window(attrs, x_shape[2:], kernel)
        if isinstance(window, str):
            return Decline(f"{label}: {window}")
        out = window.output_size(x_shape[2:])
        if any(o < 1 for o in out):
            return Decline(f"{label}: the windows do not fit the input (output size {out})")
        return {"G": group, "M": m, "Mg": m // group, "Cg": cg, "window": window, "out": out,
                "upsample": (1,) * window.rank}  # fmt: skip

    def activation(
        self, attrs: dict[str, Any], label: str
    ) -> tuple[int, float, float, float, float] | Decline:
        """``(code, alpha, beta, post_scale, post_shift)``: plain Conv has no fused activation
        (code 0, identity affine); FusedConv overrides this."""
        for name in ("activation", "alpha", "beta", "post_scale", "post_shift"):
            if attrs[name] is not None:
                return Decline(f"{label}: attribute {name} is not a Conv attribute")
        return (0, 0.0, 0.0, 1.0, 0.0)

    # ---- consts / record ----------------------------------------------------------------------
    def _parts(self, cfg: OpConfig) -> list[np.ndarray]:
        if "const_parts" not in cfg.extra:  # formatting is done once per config
            image = format_weights(
                cfg.consts[1],
                cfg.extra["G"],
                self.variant == VARIANT_TRANSPOSE,
                fp32=cfg.fp32_compute,
            )
            bias = np.zeros(cfg.extra["M"], F32)
            if 2 in cfg.consts:
                bias[:] = np.asarray(cfg.consts[2], F32)
            cfg.extra["const_parts"] = [image.view(np.uint8).reshape(-1), bias.view(np.uint8)]
        return cfg.extra["const_parts"]

    def format_consts(self, cfg: OpConfig) -> bytes:
        """Weight image then float32 bias (module docstring)."""
        return records.pack_consts(self._parts(cfg))

    def const_region_bytes(self, cfg: OpConfig) -> int:
        return sum(round_up(p.size) for p in self._parts(cfg))

    def op_dims(self, cfg: OpConfig) -> list[int]:
        e = cfg.extra
        window: Window = e["window"]
        return [self.variant, window.rank, e["G"], e["Mg"], e["Cg"], *window.dims(),
                *e["upsample"], e["activation"][0]]  # fmt: skip

    def op_floats(self, cfg: OpConfig) -> list[float]:
        """``[alpha, beta, post_scale, post_shift]``."""
        return [float(v) for v in cfg.extra["activation"][1:]]

    # ---- kernel -------------------------------------------------------------------------------
    def kernel(self, record: ParamsRecord, operands: Sequence[Any]) -> list[np.ndarray]:
        """Decode X and the const region (weight image, bias) and convolve (module docstring)."""
        if len(operands) != 2:
            raise DeviceError(f"conv kernel got {len(operands)} operands, expects X and consts")
        launch = decode_launch(record)
        g, mg, kg, r = launch.groups, launch.mg, launch.kg, launch.window.rank
        const = np.frombuffer(memoryview(operands[1]).cast("B"), dtype=np.uint8)
        if const.size < round_up(launch.img_bytes) + g * mg * 4:
            raise DeviceError(f"conv kernel: const region of {const.size} B is too short")
        image = const[: launch.img_bytes].view(launch.elem).reshape(g, mg, -1)
        weights = np.ascontiguousarray(widen(image)[..., :kg])
        off = round_up(launch.img_bytes)
        bias = const[off : off + g * mg * 4].view("<f4")
        x_spec = launch.x_spec
        x = crop_real(view(operands[0], x_spec, "conv input X"), x_spec.real_shape)
        # bf16 compute gathers the windows as bf16 (conv_core); float32 compute as float32
        x = to_compute(x) if fp32_compute() else to_bf16(x)
        y = conv_core(x, weights, launch.window, launch.upsample)
        y += bias.reshape(1, -1, *(1,) * r)  # y is the matmul's own float32 result
        y = activate_and_shift(y, launch.code, launch.floats)
        out = launch.out
        result = [fit(store(y, out.dtype), out.shape)]
        return records.pack_outputs(result, launch.outputs, record.output_bytes)

    # ---- reference / padding ------------------------------------------------------------------
    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """onnx.reference's Conv (float32), then the activation."""
        from onnx.reference.ops.op_conv import _conv_implementation

        x, w = np.asarray(inputs[0], F32), np.asarray(inputs[1], F32)
        b = None if len(inputs) < 3 or inputs[2] is None else np.asarray(inputs[2], F32)
        window: Window = cfg.extra["window"]
        y = _conv_implementation(
            x, w, b, "NOTSET", list(window.dilations), cfg.extra["G"], list(window.kernel),
            [*window.pads_begin, *window.pads_end], list(window.strides),
        )  # fmt: skip
        code, alpha, beta, scale, shift = cfg.extra["activation"]
        y = activate(y, code, alpha, beta) * scale + shift
        return [np.asarray(y).astype(cfg.outputs[0].dtype)]

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """X: any padding on any axis (the kernel crops it to its real shape before windowing);
        W and B keep their shapes (formatted here); Y: output channels in whole 8-lane vectors."""
        rank = len(cfg.outputs[0].shape)
        return ShapeConstraints(
            inputs=((1,) * rank, None, None),
            outputs=((1, M_GRANULE, *(1,) * (rank - 2)),),
        )


class FusedConv(Conv):
    """``npudispatch.FusedConv(X, W, B)``: Conv then ``activation`` (``alpha``, ``beta``), then
    ``* post_scale + post_shift``, one launch; produced by :mod:`npudispatch.rewrites.cnn` (see
    :mod:`npudispatch.opset`)."""

    domain = DOMAIN
    op_type = "FusedConv"
    kernel_id = 601

    def activation(
        self, attrs: dict[str, Any], label: str
    ) -> tuple[int, float, float, float, float] | Decline:
        name = attrs["activation"] or ""
        if name not in CONV_ACTIVATIONS:
            return Decline(f"{label}: activation {name!r} is not one of {sorted(CONV_ACTIVATIONS)}")
        code = ACTIVATION_CODES[name]
        alpha, beta = CONV_ACTIVATIONS[name]
        alpha = alpha if attrs["alpha"] is None else float(attrs["alpha"])
        beta = beta if attrs["beta"] is None else float(attrs["beta"])
        scale = 1.0 if attrs["post_scale"] is None else float(attrs["post_scale"])
        shift = 0.0 if attrs["post_shift"] is None else float(attrs["post_shift"])
        return (code, alpha, beta, scale, shift)


class ConvTranspose(Conv):
    """ONNX ConvTranspose with constant weights, computed as a stride-1 convolution of the
    zero-inserted input with the flipped, channel-swapped weight image (module docstring)."""

    op_type = "ConvTranspose"
    kernel_id = 602
    variant = VARIANT_TRANSPOSE

    def geometry(
        self, attrs: dict[str, Any], x_shape: Sequence[int], w_shape: Sequence[int], label: str
    ) -> dict[str, Any] | Decline:
        group = int(attrs["group"] or 1)
        c, mg = x_shape[1], w_shape[1]
        if group < 1 or c % group or w_shape[0] != c:
            return Decline(
                f"{label}: group={group} does not fit {c} input channels, weight {tuple(w_shape)}"
            )
        kernel = tuple(w_shape[2:])
        r = len(kernel)
        if attrs["kernel_shape"] is not None and tuple(attrs["kernel_shape"]) != kernel:
            return Decline(
                f"{label}: kernel_shape {list(attrs['kernel_shape'])} differs from W {list(kernel)}"
            )
        base = resolve_window({**attrs, "auto_pad": "NOTSET", "pads": attrs["pads"]}, x_shape[2:],
                              kernel)  # fmt: skip
        if isinstance(base, str):
            return Decline(f"{label}: {base}")
        strides, dil = base.strides, base.dilations
        out_pad = tuple(int(v) for v in (attrs["output_padding"] or (0,) * r))
        if len(out_pad) != r or any(not 0 <= p < max(s, d) for p, s, d in
                                    zip(out_pad, strides, dil)):  # fmt: skip
            return Decline(f"{label}: output_padding {list(out_pad)} must be < stride or dilation")
        auto_pad = attrs["auto_pad"] or "NOTSET"
        full = [(n - 1) * s + (k - 1) * d + 1 + op
                for n, s, k, d, op in zip(x_shape[2:], strides, kernel, dil, out_pad)]  # fmt: skip
        if attrs["output_shape"] is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = (
                [int(v) for v in attrs["output_shape"]][-r:]
                if attrs["output_shape"] is not None
                else [n * s for n, s in zip(x_shape[2:], strides)]
            )
            if len(target) != r:
                return Decline(f"{label}: output_shape {attrs['output_shape']} has the wrong rank")
            total = [f - t for f, t in zip(full, target)]
            if any(t < 0 for t in total):
                return Decline(f"{label}: output_shape {target} is larger than the full output")
            upper = auto_pad == "SAME_UPPER"
            begin = tuple(t // 2 if upper else t - t // 2 for t in total)
            end = tuple(t - t // 2 if upper else t // 2 for t in total)
        elif auto_pad == "VALID":
            begin = end = (0,) * r
        else:
            begin, end = base.pads_begin, base.pads_end
        out = tuple(f - b - e for f, b, e in zip(full, begin, end))
        if any(o < 1 for o in out):
            return Decline(f"{label}: computed output size {out} is empty")
        # The equivalent stride-1 convolution over the zero-inserted input.
        reach = tuple((k - 1) * d for k, d in zip(kernel, dil))
        window = Window(kernel, (1,) * r, dil, tuple(q - b for q, b in zip(reach, begin)),
                        tuple(q - e + op for q, e, op in zip(reach, end, out_pad)))  # fmt: skip
        return {"G": group, "M": mg * group, "Mg": mg, "Cg": c // group, "window": window,
                "out": out, "upsample": strides, "pads": [*begin, *end]}  # fmt: skip

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """onnx.reference's ConvTranspose (float32) on the node's attributes."""
        from onnx import helper
        from onnx.reference import ReferenceEvaluator

        attrs = {k: v for k, v in cfg.attrs.items() if v is not None and k not in _FUSION_ATTRS}
        # onnx.reference mishandles group > 1 and output_shape: run it per group, explicit pads.
        attrs.update(group=1, pads=cfg.extra["pads"])
        attrs.pop("output_shape", None)
        attrs.pop("auto_pad", None)
        node = ReferenceEvaluator(helper.make_node("ConvTranspose", ["X", "W"], ["Y"], **attrs))
        x, w = np.asarray(inputs[0], F32), np.asarray(inputs[1], F32)
        g = cfg.extra["G"]
        cg = x.shape[1] // g
        parts = [
            node.run(None, {"X": x[:, i * cg : (i + 1) * cg], "W": w[i * cg : (i + 1) * cg]})[0]
            for i in range(g)
        ]
        y = np.concatenate(parts, axis=1)
        if len(inputs) > 2 and inputs[2] is not None:
            y = y + np.asarray(inputs[2], F32).reshape(1, -1, *(1,) * (y.ndim - 2))
        return [np.asarray(y).astype(cfg.outputs[0].dtype)]


class FusedConvTranspose(ConvTranspose):
    """``npudispatch.FusedConvTranspose(X, W, B)``: ConvTranspose then ``activation``, then
    ``* post_scale + post_shift``, one launch (the conv kernel with the transpose variant and an
    activation code); produced by :mod:`npudispatch.rewrites.cnn`."""

    domain = DOMAIN
    op_type = "FusedConvTranspose"
    kernel_id = 603
    activation = FusedConv.activation

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """onnx.reference's ConvTranspose (float32), then the activation and the affine."""
        (y,) = super().reference(cfg, inputs)
        code, alpha, beta, scale, shift = cfg.extra["activation"]
        y = activate(np.asarray(y, F32), code, alpha, beta) * scale + shift
        return [np.asarray(y).astype(cfg.outputs[0].dtype)]


_FUSION_ATTRS = ("activation", "alpha", "beta", "post_scale", "post_shift")


__all__ = ["Conv", "ConvTranspose", "FusedConv", "FusedConvTranspose", "format_weights"]
