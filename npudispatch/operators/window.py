"""Sliding-window geometry shared by Conv, ConvTranspose and the pooling operators.

ONNX spatial ops describe their windows with ``kernel_shape``, ``strides``, ``dilations``,
``pads`` (``[b1, b2, ..., e1, e2, ...]``) and ``auto_pad``. :func:`resolve_window` turns those
attributes into one :class:`Window` (or a precise decline reason); :func:`windows` extracts every
window of a padded tensor as a strided **view** (``numpy.lib.stride_tricks``), so kernels gather
patches without any Python loop over pixels or channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AUTO_PADS = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


@dataclass(frozen=True)
class Window:
    """One window geometry over ``r`` spatial axes; pads may be negative (= crop)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def rank(self) -> int:
        """Number of spatial axes."""
        return len(self.kernel)

    @property
    def effective(self) -> tuple[int, ...]:
        """Extent of one dilated window per axis: ``(k - 1) * d + 1``."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations))

    def output_size(self, spatial: Sequence[int], ceil_mode: bool = False) -> tuple[int, ...]:
        """Output spatial sizes for input sizes ``spatial`` (``ceil_mode``: pooling's rule that
        the last window must start inside the input or the leading pad)."""
        out = []
        for n, b, e, eff, s in zip(spatial, self.pads_begin, self.pads_end, self.effective,
                                   self.strides):  # fmt: skip
            span = n + b + e - eff
            if span < 0:
                out.append(0)
                continue
            o = (-(-span // s) if ceil_mode else span // s) + 1
            if ceil_mode and (o - 1) * s >= n + b:
                o -= 1
            out.append(o)
        return tuple(out)

    def dims(self) -> list[int]:
        """The geometry as record ints: kernel, strides, dilations, pads_begin, pads_end."""
        return [*self.kernel, *self.strides, *self.dilations, *self.pads_begin, *self.pads_end]

    @classmethod
    def from_dims(cls, r: int, dims: Sequence[int]) -> Window:
        """Inverse of :meth:`dims` for ``r`` spatial axes."""
        parts = [tuple(int(x) for x in dims[i * r : (i + 1) * r]) for i in range(5)]
        return cls(*parts)


def _ints(value: object, r: int, default: int, what: str) -> tuple[int, ...] | str:
    if value is None:
        return (default,) * r
    vals = tuple(int(v) for v in value)  # type: ignore[union-attr]
    if len(vals) != r:
        return f"{what} has {len(vals)} values for {r} spatial axes"
    return vals


def resolve_window(
    attrs: dict[str, object], spatial: Sequence[int], kernel: Sequence[int]
) -> Window | str:
    """The :class:`Window` of ONNX window attributes over inputs of size ``spatial``, or a reason.

    ``SAME_UPPER``/``SAME_LOWER`` give ``ceil(n / s)`` outputs with the odd pad at the end / the
    beginning, like onnxruntime; ``VALID`` no padding; ``NOTSET`` the explicit ``pads``.
    """
    r = len(spatial)
    strides = _ints(attrs.get("strides"), r, 1, "strides")
    dilations = _ints(attrs.get("dilations"), r, 1, "dilations")
    for what, vals in (("strides", strides), ("dilations", dilations)):
        if isinstance(vals, str):
            return vals
        if any(v < 1 for v in vals):
            return f"{what} {list(vals)} must be >= 1"
    assert not isinstance(strides, str) and not isinstance(dilations, str)
    kernel = tuple(int(k) for k in kernel)
    if len(kernel) != r or any(k < 1 for k in kernel):
        return f"kernel_shape {list(kernel)} does not fit {r} spatial axes"
    auto_pad = attrs.get("auto_pad") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in AUTO_PADS:
        return f"auto_pad {auto_pad!r} is not one of {', '.join(AUTO_PADS)}"
    if auto_pad == "NOTSET":
        pads = _ints(attrs.get("pads"), 2 * r, 0, "pads")
        if isinstance(pads, str):
            return pads
        if any(p < 0 for p in pads):
            return f"negative pads {list(pads)} are not supported"
        begin, end = pads[:r], pads[r:]
    elif auto_pad == "VALID":
        begin = end = (0,) * r
    else:
        b, e = [], []
        for n, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
            small, big = total // 2, total - total // 2
            b.append(small if auto_pad == "SAME_UPPER" else big)
            e.append(big if auto_pad == "SAME_UPPER" else small)
        begin, end = tuple(b), tuple(e)
    return Window(kernel, strides, dilations, tuple(begin), tuple(end))


def pad_spatial(
    x: np.ndarray, begin: Sequence[int], end: Sequence[int], value: float = 0.0
) -> np.ndarray:
    """``x`` ``[N, C, *spatial]`` padded with ``value`` (negative amounts crop)."""
    crop = tuple(
        slice(max(0, -b), n - max(0, -e) if e < 0 else None)
        for n, b, e in zip(x.shape[2:], begin, end)
    )
    x = x[(slice(None), slice(None), *crop)]
    widths = [(max(0, b), max(0, e)) for b, e in zip(begin, end)]
    if not any(b or e for b, e in widths):
        return x
    # What np.pad(constant) produces, without its per-call Python overhead (kernels call this on
    # every launch).
    shape = (*x.shape[:2], *(n + b + e for n, (b, e) in zip(x.shape[2:], widths)))
    out = np.full(shape, value, dtype=x.dtype) if value else np.zeros(shape, dtype=x.dtype)
    out[
        (slice(None), slice(None), *(slice(b, b + n) for n, (b, _) in zip(x.shape[2:], widths)))
    ] = x
    return out


def windows(xp: np.ndarray, window: Window, out: Sequence[int]) -> np.ndarray:
    """Every window of the padded ``xp`` ``[N, C, *spatial]`` as a read-only strided view
    ``[N, C, *out, *kernel]`` (stride and dilation applied; no copy)."""
    spatial, steps = xp.shape[2:], xp.strides[2:]
    if len(out) != window.rank or any(
        o < 0 or (o > 0 and (o - 1) * s + e > n)
        for o, s, e, n in zip(out, window.strides, window.effective, spatial)
    ):
        raise ValueError(f"{list(out)} windows of {window} do not fit spatial size {spatial}")
    # Window (o, t) of axis i starts at element o * stride + t * dilation: one strided view.
    shape = (*xp.shape[:2], *out, *window.kernel)
    strides = (
        *xp.strides[:2],
        *(st * s for st, s in zip(steps, window.strides)),
        *(st * d for st, d in zip(steps, window.dilations)),
    )
    return np.lib.stride_tricks.as_strided(xp, shape, strides, writeable=False)


def zero_insert(x: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """``x`` ``[N, C, *spatial]`` with ``f - 1`` zeros between neighbours along each spatial axis
    (the input of a strided ConvTranspose expressed as a stride-1 convolution)."""
    if all(f == 1 for f in factors):
        return x
    shape = (*x.shape[:2], *((n - 1) * f + 1 for n, f in zip(x.shape[2:], factors)))
    out = np.zeros(shape, dtype=x.dtype)
    out[(slice(None), slice(None), *(slice(None, None, f) for f in factors))] = x
    return out


def crop_real(x: np.ndarray, real_shape: Sequence[int] | None) -> np.ndarray:
    """The real block of a possibly padded tensor (a view)."""
    if real_shape is None:
        return x
    return x[tuple(slice(0, n) for n in real_shape)]
