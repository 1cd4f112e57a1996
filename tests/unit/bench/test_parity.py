"""`bench.serving.parity` tells an exact path from an inexact one, on the set it makes."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from bench.serving.parity import array_numpy_crop, compare, parity_set, reference_crop
from support.paths import REPO
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor

FIXTURE = REPO / "tests" / "fixtures" / "bundle-v1" / "bundle"


def test_the_set_is_varied_jpegs_and_the_same_for_a_seed():
    images = parity_set(12, seed=3)
    assert images == parity_set(12, seed=3) and images != parity_set(12, seed=4)
    sizes = {Image.open(io.BytesIO(b)).size for b in images}
    assert len(sizes) == 12 and all(Image.open(io.BytesIO(b)).format == "JPEG" for b in images)


def test_the_array_port_is_exact_and_a_different_resampler_is_caught():
    bundle = load_bundle(FIXTURE)
    predictor = BundlePredictor(bundle)
    images = parity_set(12)
    exact = compare(images, bundle.preprocess, array_numpy_crop, predictor)
    assert exact["max_diff"] == 0 and exact["images_with_any_difference"] == 0
    assert exact["diff_histogram"]["0"] == exact["pixels"] == 12 * 32 * 32 * 3
    assert exact["min_cosine"] > 1 - 1e-12 and exact["top1_agreement"] == 1.0

    bilinear = dataclasses.replace(bundle.preprocess, interpolation="bilinear")

    def other(data: bytes, spec) -> np.ndarray:
        return reference_crop(data, bilinear)

    off = compare(images, bundle.preprocess, other, predictor)
    assert off["max_diff"] > 0 and off["images_with_any_difference"] > 0
    assert off["diff_histogram"]["0"] < off["pixels"] and off["min_cosine"] < 1.0
