"""Pillow's resampler, bit for bit, in array arithmetic on any array namespace (NumPy here, CuPy on a device).

The service's pixels are the ones training evaluated on: `preprocess.resize_and_crop` runs Pillow. Decoding and
resizing on a GPU must give the same pixels, and Pillow's resampler is fixed-point, so a float port differs by
±1 on a few pixels. This module ports the integer arithmetic of Pillow's `libImaging/Resample.c` instead:

- the filter weights are computed in float64 exactly as `precompute_coeffs` does (same expressions, same
  summation order), then rounded to 22-bit fixed point as `normalize_coeffs_8bpc` does;
- each pass (horizontal over the rows the vertical pass needs, then vertical) accumulates `uint8 * int32`
  products from `1 << 21` and shifts right by 22 with clipping to 0..255, as `ResampleHorizontal_8bpc` and
  `ResampleVertical_8bpc` do, so the intermediate image is 8-bit as in Pillow.

Only the crop's output pixels are computed: each output pixel of Pillow's resize depends on its own weights
alone, so computing the `size x size` window of the resized image gives the same values as resizing everything
and cropping (what torchvision does) at a fraction of the work.

The weights are host-side NumPy (small, cached per geometry); the pixel passes run on whatever namespace the
image array belongs to (`xp`), which is how a CuPy array on a GPU gets the same pixels as Pillow on a CPU.
`tests/unit/runtime/test_resample.py` checks equality with Pillow on noise, gradients and photographs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np
import PIL

from vlltr.model.runtime.preprocess import (
    EXACT_MAX_ASPECT,
    PreprocessSpec,
    crop_offset,
    resized_size,
)

_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])
PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8 bits of pixel, 2 of headroom for the negative lobes
_HALF = 1 << (PRECISION_BITS - 1)


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


def _bicubic(x: float) -> float:
    a = -0.5  # Resample.c's bicubic_filter, the same expressions in the same order
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


# name -> (filter, support), as Resample.c's filter structs
_FILTERS: dict[str, tuple[Callable[[float], float], float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}


def supports(spec: PreprocessSpec) -> bool:
    """Whether this module reproduces `spec`'s resampling (Pillow's `nearest` takes another path; use Pillow)."""
    return spec.interpolation in _FILTERS


@lru_cache(maxsize=256)
def coefficients(in_size: int, in0: float, in1: float, out_size: int, interpolation: str) -> tuple[Any, Any]:
    """Resample.c's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.

    Returns `(xmin, weights)`: int64 `[out_size]` first source index per output pixel, and int64
    `[out_size, ksize]` fixed-point weights (zero past each pixel's own window). NumPy arrays, read-only.
    """
    filt, filter_support = _FILTERS[interpolation]
    # C receives the box corners as float32 and subtracts them in float32 before widening.
    filterscale = scale = float(np.float32(in1) - np.float32(in0)) / out_size
    in0 = float(np.float32(in0))
    if filterscale < 1.0:
        filterscale = 1.0
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xmins = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, ksize), dtype=np.int64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero, as int() does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:  # summed in order, as the C loop does (not NumPy's pairwise sum)
            ww += w
        if ww != 0.0:
            k = [w / ww for w in k]
        # `(int)(±0.5 + w * 2^22)`: rounds half away from zero, truncating the rest toward zero
        weights[xx, :xmax] = [
            int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << PRECISION_BITS)) for w in k
        ]
        xmins[xx] = xmin
    xmins.setflags(write=False)
    weights.setflags(write=False)
    return xmins, weights


def _pass(xp: ModuleType, src: Any, xmins: Any, weights: Any, axis: int) -> Any:
    """One 8-bit pass along `axis` (1: columns, 0: rows) of an `[H, W, 3]` uint8 array."""
    ksize = weights.shape[1]
    length = src.shape[axis]
    acc = None
    for x in range(ksize):
        # Past a pixel's window its weight is 0, so reading a clamped index there adds nothing.
        idx = xp.minimum(xp.asarray(xmins + x), length - 1)
        taken = xp.take(src, idx, axis=axis).astype(xp.int64)
        w = xp.asarray(weights[:, x])
        term = taken * (w[None, :, None] if axis == 1 else w[:, None, None])
        acc = term if acc is None else acc + term
    assert acc is not None
    return xp.clip((acc + _HALF) >> PRECISION_BITS, 0, 255).astype(xp.uint8)


def _horizontal_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    # Pillow 13 runs the vertical pass first when the height shrinks more than twice as much as the width (for
    # speed); the 8-bit intermediate makes the order visible in the pixels, so it is followed. Older Pillow
    # always went horizontal first.
    if _PILLOW_MAJOR < 13:
        return True
    return not (height - out_h > 0 and height - out_h > (width - out_w) * 2)


def _resample_window(
    xp: ModuleType,
    rgb: Any,
    box: tuple[float, float, float, float],
    out_w: int,
    out_h: int,
    window: tuple[int, int, int, int],
    interpolation: str,
) -> Any:
    """Pillow's `resize((out_w, out_h), box=box)`, computed only for output `window` = (left, top, w, h)."""
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    left, top, win_w, win_h = window
    need_horizontal = out_w != width or box[0] != 0 or box[2] != out_w
    need_vertical = out_h != height or box[1] != 0 or box[3] != out_h
    hx, hw = coefficients(width, box[0], box[2], out_w, interpolation)
    vy, vw = coefficients(height, box[1], box[3], out_h, interpolation)
    hx, hw = hx[left : left + win_w], hw[left : left + win_w]
    vy, vw = vy[top : top + win_h], vw[top : top + win_h]
    img = rgb
    # Only the source rows (columns) that the second pass reads go through the first; each output pixel
    # depends on its own weights alone, so the values are Pillow's.
    if need_horizontal and need_vertical:
        if _horizontal_first(width, height, out_w, out_h):
            first, last = int(vy.min()), int(min(vy.max() + vw.shape[1], height))
            img = _pass(xp, img[first:last], hx, hw, axis=1)
            return _pass(xp, img, vy - first, vw, axis=0)
        first, last = int(hx.min()), int(min(hx.max() + hw.shape[1], width))
        img = _pass(xp, img[:, first:last], vy, vw, axis=0)
        return _pass(xp, img, hx - first, hw, axis=1)
    if need_horizontal:
        return _pass(xp, img[top : top + win_h], hx, hw, axis=1)
    if need_vertical:
        return _pass(xp, img[:, left : left + win_w], vy, vw, axis=0)
    return img[top : top + win_h, left : left + win_w]


def resize_and_crop_array(rgb: Any, spec: PreprocessSpec, xp: ModuleType = np) -> Any:
    """`preprocess.resize_and_crop` on an `[H, W, 3]` uint8 array of namespace `xp`: the same pixels, exactly.

    Raises:
        ValueError: `spec.interpolation` is one this module does not reproduce (see `supports`).
    """
    if not supports(spec):
        raise ValueError(f"interpolation {spec.interpolation!r} is not reproduced here; use Pillow")
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    new_w, new_h = resized_size(width, height, spec.resize_size)
    size = spec.size
    if new_w >= size and new_h >= size:
        left, top = crop_offset(new_w, size), crop_offset(new_h, size)
        if max(new_w, new_h) > EXACT_MAX_ASPECT * min(new_w, new_h):
            # Pillow's box path, whose corners C reads as float32 (see `resize_and_crop`).
            sx, sy = width / new_w, height / new_h
            box32 = np.asarray([left * sx, top * sy, (left + size) * sx, (top + size) * sy], dtype=np.float32)
            b = tuple(float(v) for v in box32.astype(np.float64))
            return _resample_window(
                xp, rgb, (b[0], b[1], b[2], b[3]), size, size, (0, 0, size, size), spec.interpolation
            )
        if (new_w, new_h) == (width, height):
            return rgb[top : top + size, left : left + size]
        box = (0.0, 0.0, float(width), float(height))
        return _resample_window(xp, rgb, box, new_w, new_h, (left, top, size, size), spec.interpolation)
    # Smaller than the crop on a side: resize everything, then pad with black as torchvision's crop does.
    box = (0.0, 0.0, float(width), float(height))
    resized = (
        rgb
        if (new_w, new_h) == (width, height)
        else _resample_window(xp, rgb, box, new_w, new_h, (0, 0, new_w, new_h), spec.interpolation)
    )
    pad_l = (size - new_w) // 2 if size > new_w else 0
    pad_t = (size - new_h) // 2 if size > new_h else 0
    pad_r = (size - new_w + 1) // 2 if size > new_w else 0
    pad_b = (size - new_h + 1) // 2 if size > new_h else 0
    padded = xp.zeros((new_h + pad_t + pad_b, new_w + pad_l + pad_r, 3), dtype=xp.uint8)
    padded[pad_t : pad_t + new_h, pad_l : pad_l + new_w] = resized
    ph, pw = padded.shape[:2]
    left, top = crop_offset(pw, size), crop_offset(ph, size)
    return padded[top : top + size, left : left + size]


def normalize_array(crop: Any, spec: PreprocessSpec, xp: ModuleType = np) -> Any:
    """`preprocess.normalize` on an `[S, S, 3]` uint8 array of namespace `xp`: float32 `[3, S, S]`, the same
    float32 operations in the same order."""
    arr = crop.astype(xp.float32) / xp.float32(255.0)
    mean = xp.asarray(spec.mean, dtype=xp.float32)
    std = xp.asarray(spec.std, dtype=xp.float32)
    return xp.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))
