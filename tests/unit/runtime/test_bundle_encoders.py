"""onnxruntime sessions of a bundle's encoders (provider checks) and the offline predictor, on the committed
bundle the previous version exported (no torch)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from support.runs import draw_image
from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.predictor import BundlePredictor, top_k_of
from vlltr.model.runtime.sessions import CUDA, ImageEncoder, ProviderError, TextEncoder, create_session


@pytest.fixture(scope="module")
def bundle(bundle_v1):
    return load_bundle(bundle_v1)


def test_cpu_session(bundle):
    session, provider = create_session(bundle.image_encoder_path, "cpu", threads=1)
    assert provider == "cpu" and session.get_providers()[0] == "CPUExecutionProvider"


def test_cuda_request_without_cuda_fails_clearly(bundle):
    if CUDA not in ort.get_available_providers():  # the `cpu` extra of the README's install line
        with pytest.raises(
            ProviderError, match="cuda requested but this onnxruntime build has no CUDAExecutionProvider"
        ):
            create_session(bundle.image_encoder_path, "cuda")
        _, provider = create_session(bundle.image_encoder_path, "auto")
        assert provider == "cpu"
        return
    # The `gpu` extra: `cuda` runs on CUDA where it really works and is refused, saying so, where it does not;
    # `auto` takes CUDA exactly when `cuda` got it.
    try:
        _, strict = create_session(bundle.image_encoder_path, "cuda")
    except ProviderError as exc:
        assert str(exc).startswith("cuda requested but"), exc
        strict = "cpu"
    assert strict in ("cuda", "cpu")
    _, provider = create_session(bundle.image_encoder_path, "auto")
    assert provider == strict


def test_unknown_provider_is_refused(bundle):
    with pytest.raises(ValueError, match="provider must be"):
        create_session(bundle.image_encoder_path, "tpu")  # type: ignore[arg-type]


def test_image_encoder_checks_shapes(bundle):
    enc = ImageEncoder(bundle.image_encoder_path, "cpu")
    assert enc.image_size == 32
    out = enc.encode(np.zeros((3, 3, 32, 32), np.float32))
    assert out.shape == (3, 16) and out.dtype == np.float32
    assert enc.encode(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 16)
    with pytest.raises(ValueError, match=r"pixels must be \[N, 3, 32, 32\]"):
        enc.encode(np.zeros((1, 3, 40, 40), np.float32))


def test_text_encoder_batches_equal_single_calls(bundle):
    enc = TextEncoder(bundle.text_encoder_path, bundle.tokenizer(), "cpu", batch_size=3)
    texts = [f"sentence number {i} about a thing" for i in range(7)]
    together = enc.encode_texts(texts)
    alone = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert enc.encode_texts([]).shape == (0, 16)
    with pytest.raises(ValueError, match="takes 77 tokens"):
        from vlltr.model.runtime.tokenizer import ClipTokenizer, TextSpec

        TextEncoder(bundle.text_encoder_path, ClipTokenizer(bundle.tokenizer_path, TextSpec(16, 49406, 49407)), "cpu")


def test_predictor_top_k(bundle):
    predictor = BundlePredictor(bundle, provider="cpu")
    rng = np.random.default_rng(0)
    images = [draw_image(rng, i, (50, 40)) for i in range(4)] + [Image.new("RGBA", (5, 90))]
    probs = predictor.predict_images(images)
    assert probs.shape == (5, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    top = predictor.top_k(images, k=3)
    assert [len(t) for t in top] == [3] * 5
    for row, preds in zip(probs, top):
        assert [p.class_id for p in preds] == list(np.argsort(-row, kind="stable")[:3])
        assert preds[0].label == bundle.class_names[preds[0].class_id]
        assert preds[0].score >= preds[1].score >= preds[2].score
    assert len(top_k_of(probs, bundle.class_names, 100)[0]) == 6
    with pytest.raises(ValueError, match="k must be positive"):
        top_k_of(probs, bundle.class_names, 0)
