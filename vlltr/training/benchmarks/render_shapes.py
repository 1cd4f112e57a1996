"""Procedural drawing of one Shapes-LT image: a shape of one colour and fill pattern on a noisy background.

Everything random (position, size, rotation, colour jitter, background, noise) comes from the generator
passed in, so one seed gives one image. Shapes are rasterised on a 2x supersampled grid in the shape's own
rotated coordinates (so patterns turn with the shape) and averaged down, which anti-aliases the edges.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 45),
    "blue": (35, 65, 225),
    "yellow": (240, 210, 25),
    "magenta": (215, 35, 200),
    "cyan": (25, 205, 215),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted")
_SUPERSAMPLE = 2
_LUMA = (0.299, 0.587, 0.114)
_STAR_INNER = 0.42


def _star_radius(phi: np.ndarray) -> np.ndarray:
    # Exact boundary of a regular five-pointed star (outer radius 1): the ray at angle phi meets the straight
    # edge between an outer point (angle 0) and the neighbouring inner corner (angle pi/5).
    sector = 2 * math.pi / 5
    t = np.mod(phi, sector)
    t = np.minimum(t, sector - t)
    qx, qy = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    ex, ey = qx - 1.0, qy
    # rho * (cos t, sin t) = (1, 0) + s * (ex, ey)  ->  rho = cross((1,0), e) / cross((cos t, sin t), e)
    rho: np.ndarray = ey / (np.cos(t) * ey - np.sin(t) * ex)  # numpy's ufuncs are typed to return Any
    return rho


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in unit local coordinates (the shape spans roughly [-1, 1])."""
    mask: np.ndarray  # numpy's ufuncs are typed to return Any
    if shape == "circle":
        mask = u * u + v * v <= 1.0
        return mask
    if shape == "ring":
        r2 = u * u + v * v
        mask = (r2 <= 1.0) & (r2 >= 0.55**2)
        return mask
    if shape == "square":
        mask = np.maximum(np.abs(u), np.abs(v)) <= 0.8
        return mask
    if shape == "triangle":
        # Equilateral, circumradius 1.1: inside all three edges (outward normals at -90, 30 and 150 degrees).
        inradius = 0.55
        inside = -v <= inradius
        for angle in (math.radians(30), math.radians(150)):
            inside &= u * math.cos(angle) + v * math.sin(angle) <= inradius
        return inside
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        mask = ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
        return mask
    if shape == "star":
        mask = np.hypot(u, v) <= 1.1 * _star_radius(np.arctan2(v, u) + math.pi / 2)
        return mask
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """True where the pattern shows the pale second colour (stripes or dots), in local coordinates."""
    mask: np.ndarray  # numpy's ufuncs are typed to return Any
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "striped":
        mask = np.mod(u, period) < period / 2
        return mask
    if pattern == "dotted":
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        mask = du * du + dv * dv <= (0.28 * period) ** 2
        return mask
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")


def jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """The colour with small hue, saturation and value changes (never enough to reach a neighbouring hue)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    s = min(1.0, s * rng.uniform(0.8, 1.05))
    v = min(1.0, v * rng.uniform(0.8, 1.05))
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float64)


def render(
    shape: str, colour: str, pattern: str, rng: np.random.Generator, size: int = 64, monochrome: bool = False
) -> np.ndarray:
    """One image, uint8 `[size, size, 3]`; `monochrome` gives the same picture in black and white (luma,
    ITU-R BT.601, in all three channels), like an old plate or a night camera: shape and pattern stay visible,
    the colour only as a grey level."""
    # Background: a low-saturation grey with a tint and a gradient, so colour only comes from the shape.
    grey = rng.uniform(0.25, 0.85)
    tint = rng.uniform(-0.06, 0.06, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = rng.uniform(0.0, 0.15)
    axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gradient = ramp * (axis[None, :] * math.cos(angle) + axis[:, None] * math.sin(angle))
    image = (gradient[:, :, None] + (grey + tint).astype(np.float32)).astype(np.float32)

    radius = rng.uniform(0.2, 0.34) * size
    margin = 0.85 * radius
    cx, cy = rng.uniform(margin, size - margin, size=2)
    theta = rng.uniform(0, 2 * math.pi)
    fill = jitter_colour(COLOURS[colour], rng).astype(np.float32)
    pale = (0.8 + 0.2 * fill).astype(np.float32)
    period = rng.uniform(0.38, 0.5)

    # Rasterise only the shape's bounding box (every shape lies within 1.1 radius of its centre).
    reach = 1.12 * radius
    x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
    y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
    k = _SUPERSAMPLE
    gx = (np.arange(x0 * k, x1 * k, dtype=np.float32) + 0.5) / k - np.float32(cx)
    gy = (np.arange(y0 * k, y1 * k, dtype=np.float32) + 0.5) / k - np.float32(cy)
    c, s = np.float32(math.cos(theta) / radius), np.float32(math.sin(theta) / radius)
    u = c * gx[None, :] + s * gy[:, None]
    v = c * gy[:, None] - s * gx[None, :]
    inside = shape_mask(shape, u, v)
    marks = pattern_mask(pattern, u, v, period) & inside

    h, w = y1 - y0, x1 - x0

    def down(mask: np.ndarray) -> np.ndarray:
        cover: np.ndarray = mask.reshape(h, k, w, k).mean(axis=(1, 3), dtype=np.float32)[:, :, None]
        return cover

    alpha, pale_part = down(inside), down(marks)
    box = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = box * (1 - alpha) + fill * (alpha - pale_part) + pale * pale_part
    image += rng.normal(0.0, rng.uniform(0.02, 0.06), size=image.shape).astype(np.float32)
    if monochrome:
        image[:] = (image @ np.asarray(_LUMA, dtype=np.float32))[:, :, None]
    pixels: np.ndarray = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return pixels
