"""Spatial data movement for CNNs: Pad (constant, reflect, edge, wrap), DepthToSpace (DCR, CRD)
and SpaceToDepth; kernel ids 760..769. Exact: bytes are moved, never rounded (a constant pad
value is stored in the tensor's dtype).

These run in the datamove family's kernel mode (:mod:`.datamove`): the input is streamed
linearly, the core crops it to its real shape, moves it with one numpy gather / reshape-transpose
and zero-pads the result to the padded output shape. Why not the DMA: Pad writes values that are
not in the input (constants) or repeats elements (reflect/edge), and a DepthToSpace/SpaceToDepth
interleave needs six loop dimensions at element granularity where one shim BD has three, so it
would take one BD per ``(n, c, h, i)`` row.

Padding (``granularity``): every axis may be padded and none is tied, because the kernel works
on the real shapes; padded lanes of the input are cropped away before anything is moved.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import onnx_ir as ir

from npudispatch.errors import DeviceError
from npudispatch.operators import records
from npudispatch.operators.base import (
    Decline,
    OpConfig,
    ShapeConstraints,
    const_array,
    node_config,
    opset_version,
)
from npudispatch.operators.datamove import (
    MODE_KERNEL,
    _crop,
    _data_spec,
    _DataMove,
    _int_param,
    _place,
)
from npudispatch.overlay_abi import ParamsRecord

PAD_MODES = ("constant", "reflect", "edge", "wrap")


class _KernelMove(_DataMove):
    """A one-input, one-output move done in the core on real shapes (no DMA mode)."""

    def granularity(self, cfg: OpConfig) -> ShapeConstraints:
        """Any size on every axis, nothing tied (the kernel crops to the real shape)."""
        return ShapeConstraints(
            tuple(
                (1,) * len(s.shape) if i == 0 and s is not None else None
                for i, s in enumerate(cfg.inputs)
            ),
            tuple((1,) * len(s.shape) for s in cfg.outputs),
        )

    def kernel(self, record: ParamsRecord, operands) -> list[np.ndarray]:
        table = records.decode_table(record.payload)
        dims = list(record.dims)
        if not dims or dims[0] != MODE_KERNEL:
            raise DeviceError(f"{type(self).__name__} record has no kernel mode in dims {dims}")
        inputs = records.unpack_inputs(table, operands, record.operand_bytes)
        floats = records.decode_floats(record.payload, table)
        outs = self.move(table, inputs, dims[1:], floats)
        return records.pack_outputs(outs, table.outputs, record.output_bytes)

    def move(self, table, inputs, dims, floats=()):
        (_, spec), x = table.inputs[0], inputs[0]
        assert spec is not None and x is not None
        (out,) = table.outputs
        y = self.move_real(np.asarray(_crop(x, spec)), dims, list(floats))
        return [_place(y, out, f"{self.op_type} output")]

    @abstractmethod
    def move_real(self, x: np.ndarray, dims: list[int], floats: list[float]) -> np.ndarray:
        """The op on the real (cropped) input; ``dims`` are :meth:`op_dims` without the mode."""
        ...

    def reference(self, cfg: OpConfig, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [self.move_real(np.asarray(inputs[0]), self.op_dims(cfg)[1:], self.op_floats(cfg))]

    def finish(
        self, node: ir.Node, label: str, want: tuple[int, ...], extra: dict
    ) -> OpConfig | Decline:
        """Check the output against the expected real shape ``want`` and build the config."""
        x = _data_spec(node.inputs[0], f"{label} input 0")
        assert not isinstance(x, Decline)
        out = _data_spec(node.outputs[0] if node.outputs else None, f"{label} output 0")
        if isinstance(out, Decline):
            return out
        if out.logical_shape != want or out.dtype != x.dtype:
            return Decline(
                f"{label}: output is {out.logical_shape} {out.dtype}, expected {want} {x.dtype}"
            )
        return node_config(self, node, [x] + [None] * (len(node.inputs) - 1), [out], extra=extra)


# ---- Pad -----------------------------------------------------------------------------------


class Pad(_KernelMove):
    """ONNX Pad: opset 2 (``pads``/``value`` attributes) and 11+ (``pads``, ``constant_value``,
    opset 18 ``axes`` as constant inputs); modes constant, reflect, edge and (opset 19) wrap.

    dims: ``[mode, mode_code, *begin pads, *end pads]`` over every axis; ``floats = [value]``.
    Negative pads (cropping) are taken in constant mode.
    """

    op_type = "Pad"
    kernel_id = 760

    def match(self, node: ir.Node) -> OpConfig | Decline:
        got = self.match_data_input(node, 4)
        if isinstance(got, Decline):
            return got
        x, label = got
        version = opset_version(node)
        if version is None:
            return Decline(
                f"{label}: the model declares no ONNX opset version, so whether pads are an "
                "attribute (Pad-2) or an input (Pad-11+) is unknown"
            )
        rank = len(x.shape)
        real = x.logical_shape
        mode = node.attributes.get_string("mode", "constant")
        if mode not in PAD_MODES or (mode == "wrap" and version < 19):
            return Decline(f"{label}: mode {mode!r} is not one of {PAD_MODES[:3]} (wrap: opset 19)")
        value = 0.0
        if version < 11:
            if len(node.inputs) != 1:
                return Decline(f"{label}: Pad-{version} takes one input, got {len(node.inputs)}")
            pads = [int(p) for p in node.attributes.get_ints("pads", [])]
            value = float(node.attributes.get_float("value", 0.0))
            axes = list(range(rank))
        else:
            got_pads = _int_param(node, 1, "", f"{label} pads")
            if isinstance(got_pads, Decline):
                return got_pads
            if got_pads is None:
                return Decline(f"{label}: the pads input is required")
            pads = got_pads
            cv = node.inputs[2] if len(node.inputs) > 2 else None
            if cv is not None and cv.name:
                arr = const_array(cv)
                if arr is None:
                    return Decline(
                        f"{label}: constant_value '{cv.name}' is not a constant (make it an "
                        "initializer)"
                    )
                if arr.size != 1:
                    return Decline(f"{label}: constant_value has shape {arr.shape}, not a scalar")
                value = float(arr.reshape(()).astype(np.float64))
            got_axes = _int_param(node, 3, "", f"{label} axes")
            if isinstance(got_axes, Decline):
                return got_axes
            axes = list(range(rank)) if got_axes is None else got_axes
        if len(pads) != 2 * len(axes):
            return Decline(f"{label}: {len(pads)} pads for {len(axes)} axes (need 2 per axis)")
        norm = [a % rank if -rank <= a < rank else None for a in axes]
        if None in norm or len(set(norm)) != len(norm):
            return Decline(f"{label}: axes {axes} are out of range or repeated for rank {rank}")
        begin, end = [0] * rank, [0] * rank
        for k, ax in enumerate(norm):
            assert ax is not None
            begin[ax], end[ax] = pads[k], pads[k + len(norm)]
        want = tuple(d + b + e for d, b, e in zip(real, begin, end))
        if any(w <= 0 for w in want):
            return Decline(f"{label}: pads {pads} leave an empty output {want}")
        if mode != "constant":
            if any(p < 0 for p in begin + end):
                return Decline(f"{label}: negative pads with mode {mode!r} (constant mode only)")
            if mode == "reflect" and any(
                max(b, e) >= d and (b or e) for d, b, e in zip(real, begin, end)
            ):
                return Decline(
                    f"{label}: reflect pads {pads} reach past the edge of {real} (each pad must "
                    "be smaller than its axis)"
                )
        if np.dtype(x.dtype).kind in "iu" and value != int(value):
            return Decline(f"{label}: constant value {value} does not fit {x.dtype} data")
        return self.finish(
            node,
            label,
            want,
            {"mode": PAD_MODES.index(mode), "begin": begin, "end": end, "value": value},
        )

    def op_dims(self, cfg: OpConfig) -> list[int]:
        e = cfg.extra
        return [MODE_KERNEL, e["mode"], *e["begin"], *e["end"]]

    def op_floats(self, cfg: OpConfig) -> list[float]:
        return [cfg.extra["value"]]

    def move_real(self, x, dims, floats):
        return pad(x, dims, floats[0])


def pad(x: np.ndarray, dims: list[int], value: float) -> np.ndarray:
    """ONNX Pad of ``x`` with ``dims = [mode_code, *begin, *end]`` (one gather per mode)."""
    rank = x.ndim
    mode = PAD_MODES[dims[0]]
    begin, end = dims[1 : 1 + rank], dims[1 + rank : 1 + 2 * rank]
    if mode == "constant":
        crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for n, b, e in zip(x.shape, begin, end))
        widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
        return np.pad(x[crop], widths, constant_values=np.asarray(value).astype(x.dtype))
    index = [np.pad(np.arange(n), (b, e), mode=mode) for n, b, e in zip(x.shape, begin, end)]
    return x[np.ix_(*index)]


# ---- DepthToSpace / SpaceToDepth -----------------------------------------------------------

D2S_MODES = ("DCR", "CRD")


def depth_to_space(x: np.ndarray, block: int, mode: str) -> np.ndarray:
    """ONNX DepthToSpace of an NCHW array (``mode`` DCR or CRD)."""
    n, c, h, w = x.shape
    out_c = c // (block * block)
    if mode == "DCR":
        t = x.reshape(n, block, block, out_c, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        t = x.reshape(n, out_c, block, block, h, w).transpose(0, 1, 4, 2, 5, 3)
    return t.reshape(n, out_c, h * block, w * block)


def space_to_depth(x: np.ndarray, block: int, mode: str = "DCR") -> np.ndarray:
    """ONNX SpaceToDepth of an NCHW array: the inverse of DepthToSpace in the same ``mode``
    (CRD: the ``mode`` attribute of recent opsets; DCR is the classic order)."""
    n, c, h, w = x.shape
    t = x.reshape(n, c, h // block, block, w // block, block)
    t = t.transpose(0, 3, 5, 1, 2, 4) if mode == "DCR" else t.transpose(0, 1, 3, 5, 2, 4)
    return t.reshape(n, c * block * block, h // block, w // block)


class _BlockMove(_KernelMove):
    """Shared matching of DepthToSpace / SpaceToDepth: rank-4 NCHW, ``blocksize`` >= 1."""

    def match(self, node: ir.Node) -> OpConfig | Decline:
        got = self.match_data_input(node, 1)
        if isinstance(got, Decline):
            return got
        x, label = got
        if len(x.shape) != 4:
            return Decline(f"{label}: input has rank {len(x.shape)}; only NCHW (rank 4) is defined")
        if "blocksize" not in node.attributes:
            return Decline(f"{label}: attribute 'blocksize' is required")
        block = node.attributes.get_int("blocksize")
        if block < 1:
            return Decline(f"{label}: blocksize {block} must be >= 1")
        mode = node.attributes.get_string("mode", "DCR")
        want = self.out_shape(x.logical_shape, block, mode, label)
        if isinstance(want, Decline):
            return want
        return self.finish(node, label, want, {"block": block, "mode": D2S_MODES.index(mode)})

    @abstractmethod
    def out_shape(
        self, shape: tuple[int, ...], block: int, mode: str, label: str
    ) -> tuple[int, ...] | Decline: ...

    def op_dims(self, cfg: OpConfig) -> list[int]:
        return [MODE_KERNEL, cfg.extra["block"], cfg.extra["mode"]]


class DepthToSpace(_BlockMove):
    """ONNX DepthToSpace (DCR, and CRD of opset 11+); dims ``[mode, blocksize, DCR=0|CRD=1]``."""

    op_type = "DepthToSpace"
    kernel_id = 761

    def out_shape(self, shape, block, mode, label):
        n, c, h, w = shape
        if mode not in D2S_MODES:
            return Decline(f"{label}: mode {mode!r} is not DCR or CRD")
        if c % (block * block):
            return Decline(f"{label}: {c} channels are not a multiple of blocksize² {block**2}")
        return (n, c // (block * block), h * block, w * block)

    def move_real(self, x, dims, floats):
        return depth_to_space(x, dims[0], D2S_MODES[dims[1]])


class SpaceToDepth(_BlockMove):
    """ONNX SpaceToDepth (DCR, and the CRD ``mode`` of recent opsets); dims
    ``[mode, blocksize, DCR=0|CRD=1]``."""

    op_type = "SpaceToDepth"
    kernel_id = 762

    def out_shape(self, shape, block, mode, label):
        n, c, h, w = shape
        if mode not in D2S_MODES:
            return Decline(f"{label}: mode {mode!r} is not DCR or CRD")
        if h % block or w % block:
            return Decline(f"{label}: spatial size {h}x{w} is not a multiple of blocksize {block}")
        return (n, c * block * block, h // block, w // block)

    def move_real(self, x, dims, floats):
        return space_to_depth(x, dims[0], D2S_MODES[dims[1]])
