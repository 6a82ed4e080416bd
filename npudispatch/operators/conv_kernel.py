"""The convolution kernel's arithmetic, shared by Conv, ConvTranspose, their fused forms and the
quantized convolutions: the core (windows gathered once, one float32 matmul per group), the
fused activations, and the params record decoded once per launch (layout in :mod:`.conv`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from npudispatch.errors import DeviceError
from npudispatch.operators import records
from npudispatch.operators.base import round_up
from npudispatch.operators.dtypes import fp32_compute, weight_dtype, widen
from npudispatch.operators.window import Window, pad_spatial, windows, zero_insert
from npudispatch.opset import CONV_ACTIVATIONS, conv_activation
from npudispatch.overlay_abi import ParamsRecord

__all__ = [
    "ACTIVATION_CODES",
    "K_LANES",
    "PATCH_BLOCK_ELEMENTS",
    "activate",
    "activate_and_shift",
    "conv_core",
    "decode_launch",
]

K_LANES = 8  # the weight image's reduction axis is stored as whole 8-lane bf16 vectors
PATCH_BLOCK_ELEMENTS = 1 << 24  # at most 64 MB of float32 patches gathered at once

#: Record codes of FusedConv's activations (:data:`npudispatch.opset.CONV_ACTIVATIONS`); 0 = none.
ACTIVATION_CODES: dict[str, int] = {"": 0, **{n: i + 1 for i, n in enumerate(CONV_ACTIVATIONS)}}
_BY_CODE = {code: name for name, code in ACTIVATION_CODES.items()}


def activate(y: np.ndarray, code: int, alpha: float, beta: float) -> np.ndarray:
    """Apply the activation with record code ``code`` (float64 evaluation; 0 = none)."""
    name = _BY_CODE.get(code)
    if name is None:
        raise DeviceError(f"conv kernel: unknown fused activation code {code}")
    return conv_activation(y, name, alpha, beta) if name else y


def conv_core(
    x: np.ndarray,
    weights: np.ndarray,
    window: Window,
    upsample: Sequence[int],
) -> np.ndarray:
    """``x`` ``[N, C, *S]`` (float32, or bf16: see below) convolved with ``weights``
    ``[G, Mg, Cg * R]`` -> float32 ``[N, G * Mg, *O]`` (no bias); ``upsample`` zero-inserts first
    (ConvTranspose). A bf16 ``x`` is padded and gathered as 2-byte values and the windows are
    widened to float32 right before the matmul: exactly the float32 path's operands (widening
    is exact, padding zeros are +0 either way) for half the gather traffic."""
    n, c = x.shape[:2]
    g, mg, _ = weights.shape
    cg = c // g
    xu = zero_insert(x, upsample)
    xp = pad_spatial(xu, window.pads_begin, window.pads_end)
    out = tuple(
        (size - e) // s + 1 if size >= e else 0
        for size, e, s in zip(xp.shape[2:], window.effective, window.strides)
    )
    if any(o <= 0 for o in out):
        raise DeviceError(f"conv kernel: output spatial size {out} is empty")
    r = window.rank
    taps = math.prod(window.kernel)
    inner = math.prod(out[1:])
    if taps == 1 and all(s == 1 for s in window.strides):
        # A 1x1 stride-1 window is the tensor itself: [N, C, *O] is already [N, G, Cg, P].
        cols = widen(xp).reshape(n, g, cg, -1)
        return np.matmul(weights, cols).reshape(n, g * mg, *out)
    patches = windows(xp, window, out)  # [N, C, *O, *k] view
    # [N, G, Cg, *k, *O] -> [N, G, Cg * R, P]: one gather copy, channel-major like the image.
    # Blocks of output rows bound that copy (PATCH_BLOCK_ELEMENTS) for large feature maps.
    order = (0, 1, *range(2 + r, 2 + 2 * r), *range(2, 2 + r))
    rows = max(1, PATCH_BLOCK_ELEMENTS // max(1, n * c * taps * inner))
    if rows >= out[0]:  # one block: the matmul's result is the output (no copy into place)
        cols = widen(patches.transpose(order)).reshape(n, g, cg * taps, -1)
        return np.matmul(weights, cols).reshape(n, g * mg, *out)
    y = np.empty((n, g, mg, out[0], inner), dtype=np.float32)
    for start in range(0, out[0], rows):
        block = patches[:, :, start : start + rows]
        cols = widen(block.transpose(order)).reshape(n, g, cg * taps, -1)
        part = np.matmul(weights, cols)  # [N, G, Mg, rows * inner], float32 accumulation
        y[:, :, :, start : start + rows] = part.reshape(n, g, mg, -1, inner)
    return y.reshape(n, g * mg, *out)


@dataclass(frozen=True, slots=True)
class _Launch:
    """What a conv params record says, decoded once per distinct record."""

    x_spec: Any
    out: Any
    outputs: Sequence[Any]
    floats: tuple[float, ...]
    window: Window
    upsample: tuple[int, ...]
    code: int
    groups: int
    mg: int
    kg: int
    elem: np.dtype
    img_bytes: int


_LAUNCHES: dict[int, tuple[ParamsRecord, _Launch]] = {}
_LAUNCHES_LIMIT = 4096


def decode_launch(record: ParamsRecord) -> _Launch:
    """The decoded record: the emulator hands a program's launches the same (cached) record
    object every run, so it is decoded once (kept with the record to rule out a reused id)."""
    known = _LAUNCHES.get(id(record))
    if known is not None and known[0] is record:
        return known[1]
    table = records.decode_table(record.payload)
    floats = tuple(records.decode_floats(record.payload, table))
    x_spec = table.inputs[0][1]
    if x_spec is None:
        raise DeviceError("conv kernel: the record's tensor table has no input X")
    d = list(record.dims)
    r, g, mg, cg = d[1:5]
    window = Window.from_dims(r, d[5 : 5 + 5 * r])
    kg = cg * math.prod(window.kernel)
    elem = weight_dtype(fp32_compute())
    launch = _Launch(
        x_spec=x_spec,
        out=table.outputs[0],
        outputs=table.outputs,
        floats=floats,
        window=window,
        upsample=tuple(d[5 + 5 * r : 5 + 6 * r]),
        code=d[5 + 6 * r],
        groups=g,
        mg=mg,
        kg=kg,
        elem=elem,
        img_bytes=g * mg * round_up(kg, K_LANES) * elem.itemsize,
    )
    if len(_LAUNCHES) >= _LAUNCHES_LIMIT:
        _LAUNCHES.clear()
    _LAUNCHES[id(record)] = (record, launch)
    return launch


_RELU = ACTIVATION_CODES["Relu"]
_CLIP = ACTIVATION_CODES["Clip"]
_HARD_SIGMOID = ACTIVATION_CODES["HardSigmoid"]
_HARD_SWISH = ACTIVATION_CODES["HardSwish"]


def activate_and_shift(y: np.ndarray, code: int, floats: Sequence[float]) -> np.ndarray:
    """``activate(y, code, alpha, beta) * post_scale + post_shift`` (the affine only when it is
    not the identity) with the same float64 operations, done in place on one float64 copy
    instead of a temporary per step; a plain Relu stays in float32 (max commutes with rounding)."""
    alpha, beta, scale, shift = floats[:4]
    affine = (scale, shift) != (1.0, 0.0)
    if code == 0:
        if affine:
            y *= scale
            y += shift
        return y
    if code == _RELU and not affine:
        return np.maximum(y, 0.0, out=y)
    if code not in (_RELU, _CLIP, _HARD_SIGMOID, _HARD_SWISH):
        y = activate(y, code, alpha, beta)
        return y * scale + shift if affine else y
    y64 = y.astype(np.float64)
    if code == _RELU:
        np.maximum(y64, 0.0, out=y64)
    elif code == _CLIP:
        np.maximum(y64, alpha, out=y64)
        np.minimum(y64, beta, out=y64)
    elif code == _HARD_SIGMOID:  # clip(alpha * y + beta, 0, 1)
        y64 *= alpha
        y64 += beta
        np.clip(y64, 0.0, 1.0, out=y64)
    else:  # HardSwish: y * clip(y / 6 + 0.5, 0, 1)
        gate = y64 / 6.0
        gate += 0.5
        np.clip(gate, 0.0, 1.0, out=gate)
        gate *= y64
        y64 = gate
    if affine:
        y64 *= scale
        y64 += shift
    return y64
