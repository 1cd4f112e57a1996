"""Photos and encodings the preprocessing tests share (no torch)."""

from __future__ import annotations

import io

from PIL import Image

from vlltr.model.runtime.preprocess import PreprocessSpec

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPEC_224 = PreprocessSpec(224, 256, CLIP_MEAN, CLIP_STD)
SPEC_32 = PreprocessSpec(32, 37, CLIP_MEAN, CLIP_STD)
MAX_PIXELS = 50_000_000


def sample_photos() -> list[Image.Image]:
    """Two real photos, 640x427: scikit-learn's china.jpg and flower.jpg (scikit-learn is in the `test` extra)."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    """`img` saved as `fmt` (PNGs at the fastest compression)."""
    buf = io.BytesIO()
    if fmt == "PNG":
        kw.setdefault("compress_level", 1)
    img.save(buf, fmt, **kw)
    return buf.getvalue()
