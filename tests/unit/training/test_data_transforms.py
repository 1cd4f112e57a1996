"""Training augmentations and the evaluation transform (the service's preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlltr.model.runtime.preprocess import preprocess_image
from vlltr.training.config import DataCfg
from vlltr.training.data.errors import DataError
from vlltr.training.data.transforms import eval_transform, preprocess_spec, train_transform


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))


def test_preprocess_spec() -> None:
    spec = preprocess_spec(DataCfg(), 224)
    assert (spec.size, spec.resize_size, spec.interpolation) == (224, 256, "bicubic")
    assert spec.mean == tuple(DataCfg().mean)
    assert preprocess_spec(DataCfg(resize_ratio=1.0), 32).resize_size == 32


def test_eval_transform_is_the_service_preprocessing() -> None:
    cfg = DataCfg()
    out = eval_transform(cfg, 32)(_image())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out.numpy(), preprocess_image(_image(), preprocess_spec(cfg, 32)))


@pytest.mark.parametrize("augment", ["original", "clip", "light", "none"])
def test_train_transform_shapes(augment: str) -> None:
    torch.manual_seed(0)
    out = train_transform(DataCfg(augment=augment), 32)(_image())
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_none_is_eval_and_light_is_random() -> None:
    cfg = DataCfg(augment="none")
    assert torch.equal(train_transform(cfg, 32)(_image()), eval_transform(cfg, 32)(_image()))
    light = train_transform(DataCfg(augment="light"), 32)
    torch.manual_seed(0)
    first = light(_image())
    assert any(not torch.equal(first, light(_image())) for _ in range(5))


def test_unknown_augment() -> None:
    with pytest.raises(DataError, match="unknown augment 'heavy'"):
        train_transform(DataCfg(augment="heavy"), 32)


@pytest.mark.parametrize("jpeg_draft", [False, True])
def test_dataset_decodes_large_jpegs_as_the_service_does(tmp_path, jpeg_draft: bool) -> None:
    """With `data.jpeg_draft`, training's evaluation reads a large JPEG at reduced size, exactly as the service
    decodes the uploaded bytes for a bundle with that spec; without it both decode in full."""
    from sklearn.datasets import load_sample_images

    from vlltr.model.runtime.preprocess import decode_image
    from vlltr.training.data.datasets import ImageListDataset

    photo = Image.fromarray(load_sample_images().images[0]).resize((1600, 1068))
    path = tmp_path / "photo.jpg"
    photo.save(path, "JPEG", quality=90)
    cfg = DataCfg(jpeg_draft=jpeg_draft)
    transform = eval_transform(cfg, 32)
    assert transform.spec.jpeg_draft is jpeg_draft
    trained_view = ImageListDataset([(str(path), 0)], 1, transform)[0][0].numpy()
    served = decode_image(path.read_bytes(), max_pixels=10**8, draft_min_side=transform.spec.draft_min_side)
    assert served.size == ((200, 134) if jpeg_draft else (1600, 1068))  # 1/8 scale keeps the short side >= 74
    np.testing.assert_array_equal(trained_view, preprocess_image(served, transform.spec))
    full = preprocess_image(decode_image(path.read_bytes(), max_pixels=10**8), transform.spec)
    assert np.array_equal(trained_view, full) is not jpeg_draft


def test_original_augmentation_is_timms_with_pixel_noise_erasing() -> None:
    from timm.data.random_erasing import RandomErasing

    transform = train_transform(DataCfg(augment="original"), 32)
    steps = [type(t).__name__ for t in transform.transforms]
    assert steps[0] == "RandomResizedCropAndInterpolation" and "RandAugment" in steps
    erasing = next(t for t in transform.transforms if isinstance(t, RandomErasing))
    assert erasing.probability == 0.25 and erasing.mode == "pixel" and erasing.max_count == 1
    augment = next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
    assert augment.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in augment.ops)
    assert any(op.name.endswith("Increasing") for op in augment.ops)  # `inc1`
    torch.manual_seed(0)
    outs = [transform(_image()) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outs) and not torch.equal(outs[0], outs[1])


def test_original_augmentation_survives_its_strongest_posterize() -> None:
    """`rand-m9-mstd0.5-inc1` draws magnitude 10 now and then, where posterize keeps 0 bits: a black image, as the
    published code's Pillow gave; current Pillow raises on it, which stopped `augment: original` training."""
    transform = train_transform(DataCfg(augment="original"), 32)
    (rand,) = [t for t in transform.transforms if hasattr(t, "ops")]
    (posterize,) = [op for op in rand.ops if op.name == "PosterizeIncreasing"]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    img = _image()
    assert np.asarray(posterize(img)).max() == 0
    posterize.magnitude = 5  # keeps 2 bits: Pillow's own posterize
    np.testing.assert_array_equal(np.asarray(posterize(img)), np.asarray(img) & 0b11000000)
