"""Distinct photo-like JPEG files for the load generator (the benchmark never sends the same bytes twice in a
row from one client, and, with enough files, never hits a cache by accident)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFAULT_SIZE = (640, 480)


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth background, a few blurred shapes and sensor-like noise: compresses like a photo (a pure
    noise image would be several times larger than a real JPEG of the same size, a flat one far smaller)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        a, b, d = rng.uniform(-0.3, 0.3, 3)
        base[..., c] = 128 + 90 * np.sin(a * xx / 37 + b * yy / 53 + d * 6.28)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
        else:
            draw.rectangle([x0 - r, y0 - r * 0.6, x0 + r, y0 + r * 0.6], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def write_jpegs(
    out_dir: Path, count: int, *, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0, quality: int = 90
) -> list[Path]:
    """`count` distinct JPEG files under `out_dir` (reused when already there); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"img{seed}-{i:05d}_{size[0]}x{size[1]}_q{quality}.jpg"
        if not path.is_file():
            img = photo_like(np.random.default_rng([seed, i]), size)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths
