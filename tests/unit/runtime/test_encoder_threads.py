"""The CPU image encoder's choice between onnxruntime's default intra-op threads and one thread
(`vlltr.model.runtime.encoder_threads`), on the committed bundle's real encoder (no torch)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.encoder_threads import keep_one_thread_unless_slower
from vlltr.model.runtime.sessions import ImageEncoder


class DelayedEncoder(ImageEncoder):
    """The real encoder, 20 ms late on every run (as a model that splits badly over its threads would be)."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        time.sleep(0.02)
        return super().encode(pixels)


@pytest.fixture(scope="module")
def bundle(bundle_v1):
    return load_bundle(bundle_v1)


def _default(bundle, cls=ImageEncoder):
    return cls(bundle.image_encoder_path, "cpu", None)


def _one(bundle, cls=ImageEncoder):
    return lambda: cls(bundle.image_encoder_path, "cpu", 1)


def test_the_faster_session_is_kept_whichever_it_is(bundle):
    size = bundle.preprocess.size
    default = _default(bundle)
    kept, choice = keep_one_thread_unless_slower(default, _one(bundle, DelayedEncoder), size, budget_s=0.0)
    assert kept is default and choice.threads is None and kept.threads is None
    assert choice.one_thread_ms > choice.default_ms + 15  # the delay was measured, not assumed

    kept, choice = keep_one_thread_unless_slower(_default(bundle, DelayedEncoder), _one(bundle), size, budget_s=0.0)
    assert choice.threads == 1 and kept.threads == 1
    assert choice.default_ms > choice.one_thread_ms + 15
    assert "one intra-op thread" in choice.describe()


def test_either_choice_computes_the_same_features(bundle):
    size = bundle.preprocess.size
    default = _default(bundle)
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
    expected = default.encode(x)
    kept, choice = keep_one_thread_unless_slower(default, _one(bundle), size, budget_s=0.05)
    assert kept.threads == choice.threads
    assert choice.default_ms > 0 and choice.one_thread_ms > 0
    np.testing.assert_allclose(kept.encode(x), expected, rtol=1e-5, atol=1e-6)
