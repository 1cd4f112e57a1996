"""The array port of Pillow's resampler gives Pillow's pixels exactly (`vlltr.model.runtime.resample`).

Noise stresses the rounding (every fixed-point sum lands somewhere different), gradients and flat areas the
clipping, photographs the ordinary case; geometries cover downscaling by non-integer factors, upscaling, both
orientations, odd sizes, an image already at the resize size, one smaller than the crop (padding) and a strip
past the exact-aspect bound (Pillow's box path).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlltr.model.runtime.preprocess import PreprocessSpec, normalize, resize_and_crop
from vlltr.model.runtime.resample import coefficients, normalize_array, resize_and_crop_array, supports

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIZES = [(640, 480), (480, 640), (257, 999), (224, 224), (256, 300), (31, 17), (3, 5), (1000, 40), (20, 900)]


def _images(width: int, height: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx + yy) % 256], -1)
    # Hard edges between black and white: the negative lobes push sums below 0 and above 255 (clipping).
    edges = np.where(((xx // 3) + (yy // 5)) % 2 == 0, 255, 0)[..., None].repeat(3, -1)
    return [noise, gradient.astype(np.uint8), edges.astype(np.uint8)]


def _spec(interpolation: str, size: int = 224, resize_size: int = 224) -> PreprocessSpec:
    return PreprocessSpec(size=size, resize_size=resize_size, mean=MEAN, std=STD, interpolation=interpolation)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos"])
@pytest.mark.parametrize("width,height", SIZES)
def test_the_crop_equals_pillows_pixel_for_pixel(interpolation, width, height):
    for spec in (_spec(interpolation), _spec(interpolation, size=224, resize_size=256)):
        for i, rgb in enumerate(_images(width, height, seed=width * 31 + height)):
            expected = np.asarray(resize_and_crop(Image.fromarray(rgb), spec))
            got = resize_and_crop_array(rgb, spec)
            assert got.dtype == np.uint8 and got.shape == expected.shape == (224, 224, 3)
            diff = np.abs(got.astype(int) - expected.astype(int))
            assert diff.max() == 0, (interpolation, width, height, spec.resize_size, i, int((diff > 0).sum()))


def test_a_photograph_gives_the_same_network_input():
    from sklearn.datasets import load_sample_images

    for photo in load_sample_images().images:  # 427 x 640 JPEG photographs
        spec = _spec("bicubic", resize_size=224)
        expected = normalize(resize_and_crop(Image.fromarray(photo), spec), spec)
        got = normalize_array(resize_and_crop_array(np.ascontiguousarray(photo), spec), spec)
        assert got.dtype == np.float32 and np.array_equal(got, expected)


def test_a_float_port_would_not_pass():
    # The check can tell: resampling the same geometry in float arithmetic (what a naive device port does) is
    # off by one grey level on some pixels of noise, and the comparison above would see it.
    rgb = _images(640, 480, seed=1)[0]
    spec = _spec("bicubic")
    expected = np.asarray(resize_and_crop(Image.fromarray(rgb), spec)).astype(int)
    new_w = 298  # 640 x 480 -> 298 x 224
    xmin_h, w_h = coefficients(640, 0.0, 640.0, new_w, "bicubic")
    xmin_v, w_v = coefficients(480, 0.0, 480.0, 224, "bicubic")
    cols = np.minimum(xmin_h[:, None] + np.arange(w_h.shape[1]), 639)
    rows = np.minimum(xmin_v[:, None] + np.arange(w_v.shape[1]), 479)
    fh, fv = w_h / float(1 << 22), w_v / float(1 << 22)
    horizontal = np.einsum("hwkc,wk->hwc", rgb[:, cols].astype(float), fh)
    both = np.einsum("hkwc,hk->hwc", horizontal[rows], fv)
    left = (new_w - 224) // 2
    floated = np.clip(np.rint(both), 0, 255).astype(int)[:, left : left + 224]
    assert np.abs(floated - expected).max() >= 1


def test_nearest_is_left_to_pillow():
    assert not supports(_spec("nearest"))
    with pytest.raises(ValueError, match="nearest"):
        resize_and_crop_array(np.zeros((10, 10, 3), np.uint8), _spec("nearest"))
