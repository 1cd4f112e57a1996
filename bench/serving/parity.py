"""Pixel and prediction parity of a candidate decode + preprocess path against the service's CPU path.

    python -m bench.serving.parity --bundle B --candidate array-numpy [--count 1000] [--out parity.json]

A faster path (the array port of Pillow's resampler, libjpeg-turbo through another binding, a GPU decoder)
may serve only if it gives the pixels training evaluated on, or if its difference is measured and small. This
measures it, on a set the project makes itself (`parity_set`): crops of scikit-learn's two sample photographs
at random scales, offsets and colour shifts, and rendered photo-like images, saved as JPEG at several qualities
and all three chroma subsamplings. Reported per candidate:

- the histogram of per-pixel absolute differences of the uint8 crop (0, 1, 2, 3, 4+ grey levels) and the
  largest one;
- through the bundle's image encoder and head: the smallest and mean feature cosine and the top-1 agreement.

The reference is the service's own code: `decode_image` + `preprocess_image` (Pillow). Candidates:
`array-numpy` (Pillow decode, `vlltr.model.runtime.resample` on NumPy: it must be exact), `simplejpeg`
(libjpeg-turbo without Pillow at Pillow's draft size, then Pillow's resize: `pip install simplejpeg`) and, on a
GPU machine with nvImageCodec and CuPy, `nvimgcodec` (device decode, the same resampler on CuPy). Each also gets
its time per image, one thread, beside the reference's.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.serving.images import photo_like
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor
from vlltr.model.runtime.preprocess import (
    PreprocessSpec,
    apply_exif_orientation,
    decode_image,
    draft_jpeg,
    normalize,
    resize_and_crop,
    to_rgb,
)
from vlltr.model.runtime.resample import normalize_array, resize_and_crop_array

MAX_PIXELS = 64_000_000
QUALITIES = (70, 85, 90, 95)
SUBSAMPLINGS = (0, 1, 2)  # Pillow's 4:4:4, 4:2:2, 4:2:0
DIFF_BINS = ("0", "1", "2", "3", "4+")

# bytes -> uint8 [S, S, 3] crop (what the encoder's input is normalised from)
Candidate = Callable[[bytes, PreprocessSpec], np.ndarray]


def parity_set(count: int, seed: int = 0) -> list[bytes]:
    """`count` photo-like JPEGs: sample-photograph crops and rendered images, varied size, colour, quality
    and chroma subsampling (deterministic for a seed)."""
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(p) for p in load_sample_images().images]
    out = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        if i % 4 == 3:  # a quarter rendered, the rest cut from the photographs
            w, h = int(rng.integers(240, 1100)), int(rng.integers(240, 1100))
            img = photo_like(rng, (w, h))
        else:
            photo = photos[i % len(photos)]
            ph, pw = photo.shape[:2]
            cw, ch = int(rng.integers(pw // 3, pw + 1)), int(rng.integers(ph // 3, ph + 1))
            x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
            crop = photo[y0 : y0 + ch, x0 : x0 + cw].astype(np.float32)
            gain, offset = rng.uniform(0.8, 1.2, 3), rng.uniform(-20, 20, 3)
            crop = np.clip(crop * gain + offset, 0, 255).astype(np.uint8)
            scale = rng.uniform(0.5, 1.6)
            img = Image.fromarray(crop).resize(
                (max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BILINEAR
            )
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(QUALITIES[i % len(QUALITIES)]), subsampling=SUBSAMPLINGS[i % 3])
        out.append(buf.getvalue())
    return out


def reference_crop(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """The service's CPU path up to the crop (Pillow decode, EXIF, RGB, resize, crop)."""
    img = to_rgb(apply_exif_orientation(decode_image(data, max_pixels=MAX_PIXELS, draft_min_side=spec.draft_min_side)))
    return np.asarray(resize_and_crop(img, spec))


def array_numpy_crop(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Pillow's decode, then the array port of its resampler on NumPy."""
    img = to_rgb(apply_exif_orientation(decode_image(data, max_pixels=MAX_PIXELS, draft_min_side=spec.draft_min_side)))
    return np.asarray(resize_and_crop_array(np.asarray(img), spec))


def nvimgcodec_crop(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """nvImageCodec's device decode, then the array port of Pillow's resampler on CuPy (GPU machines only)."""
    import cupy as cp  # type: ignore[import-not-found]
    from nvidia import nvimgcodec  # type: ignore[import-not-found]

    decoder = _NV_DECODER.setdefault("decoder", nvimgcodec.Decoder())
    decoded = decoder.decode(data)  # device image, interleaved RGB uint8
    rgb = cp.asarray(decoded)
    return cp.asnumpy(resize_and_crop_array(rgb, spec, xp=cp))


def simplejpeg_crop(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """libjpeg-turbo through simplejpeg (JPEGs only, accurate DCT and upsampling as Pillow decodes) at the size
    Pillow's draft would give, then the service's Pillow resize and crop."""
    import simplejpeg  # type: ignore[import-not-found]

    size = _draft_size(data, spec) or simplejpeg.decode_jpeg_header(data)[:2]
    rgb = simplejpeg.decode_jpeg(
        data, colorspace="RGB", fastdct=False, fastupsample=False, min_width=size[0], min_height=size[1]
    )
    return np.asarray(resize_and_crop(Image.fromarray(rgb), spec))


def _draft_size(data: bytes, spec: PreprocessSpec) -> tuple[int, int] | None:
    """The size Pillow decodes `data` at under the bundle's draft rule (None: in full)."""
    img = Image.open(io.BytesIO(data))
    full = img.size
    draft_jpeg(img, spec.draft_min_side)  # the draft size rule is Pillow's: read it off the header
    return img.size if img.size != full else None


_NV_DECODER: dict[str, Any] = {}
CANDIDATES: dict[str, Candidate] = {
    "array-numpy": array_numpy_crop,
    "nvimgcodec": nvimgcodec_crop,
    "simplejpeg": simplejpeg_crop,
}


def compare(
    images: Sequence[bytes], spec: PreprocessSpec, candidate: Candidate, predictor: BundlePredictor | None = None
) -> dict[str, Any]:
    """Pixel differences of `candidate` against the reference on `images`, and, given a predictor, feature
    cosines and top-1 agreement through its encoder and head."""
    hist = np.zeros(len(DIFF_BINS), dtype=np.int64)
    worst = 0
    differing_images = 0
    ref_inputs, cand_inputs = [], []
    ref_s = cand_s = 0.0
    for data in images:
        t0 = time.perf_counter()
        ref = reference_crop(data, spec)
        t1 = time.perf_counter()
        cand = candidate(data, spec)
        ref_s, cand_s = ref_s + t1 - t0, cand_s + time.perf_counter() - t1
        diff = np.abs(ref.astype(np.int16) - cand.astype(np.int16))
        hist += np.bincount(np.minimum(diff, 4).ravel(), minlength=5)[:5]
        worst = max(worst, int(diff.max()))
        differing_images += int(diff.any())
        if predictor is not None:
            ref_inputs.append(normalize(Image.fromarray(ref), spec))
            cand_inputs.append(normalize_array(cand, spec))
    out: dict[str, Any] = {
        "images": len(images),
        "pixels": int(hist.sum()),
        "diff_histogram": dict(zip(DIFF_BINS, (int(v) for v in hist), strict=True)),
        "max_diff": worst,
        "images_with_any_difference": differing_images,
        # One thread, the images one after another: the cost per image of each path up to the crop.
        "reference_ms_per_image": 1000 * ref_s / len(images),
        "candidate_ms_per_image": 1000 * cand_s / len(images),
    }
    if predictor is not None:
        f_ref = _features(predictor, np.stack(ref_inputs)).astype(np.float64)
        f_cand = _features(predictor, np.stack(cand_inputs)).astype(np.float64)
        cos = np.sum(f_ref * f_cand, axis=1) / (np.linalg.norm(f_ref, axis=1) * np.linalg.norm(f_cand, axis=1))
        top_ref = predictor.probabilities_from_features(f_ref.astype(np.float32)).argmax(1)
        top_cand = predictor.probabilities_from_features(f_cand.astype(np.float32)).argmax(1)
        out |= {
            "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean()),
            "top1_agreement": float((top_ref == top_cand).mean()),
        }
    return out


def _features(predictor: BundlePredictor, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([predictor.image_encoder.encode(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="the bundle whose preprocessing and encoder to use")
    parser.add_argument("--candidate", choices=sorted(CANDIDATES), action="append", required=True)
    parser.add_argument("--count", type=int, default=1000, help="images in the parity set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    predictor = BundlePredictor(bundle)
    images = parity_set(args.count, args.seed)
    report = {
        "bundle": bundle.bundle_id,
        "set": {"count": args.count, "seed": args.seed, "qualities": QUALITIES, "subsamplings": SUBSAMPLINGS},
        "candidates": {
            name: compare(images, bundle.preprocess, CANDIDATES[name], predictor) for name in args.candidate
        },
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
