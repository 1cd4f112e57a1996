"""Image transforms: training augmentation per `DataCfg.augment`, and the evaluation transform, which is the
service's preprocessing (`vlltr.model.runtime.preprocess`), so that training-time evaluation and serving see the
same pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

from vlltr.errors import DataError
from vlltr.model.runtime.preprocess import PreprocessSpec, preprocess_image
from vlltr.training.config import DataCfg

AUGMENTS = ("original", "clip", "light", "none")


def preprocess_spec(cfg: DataCfg, image_size: int) -> PreprocessSpec:
    """The evaluation/serving preprocessing of a run: shorter side to `round(image_size * resize_ratio)`,
    centre crop `image_size`, bicubic, the config's mean and std, JPEG draft decoding per `data.jpeg_draft`."""
    return PreprocessSpec(
        size=int(image_size),
        resize_size=int(round(image_size * cfg.resize_ratio)),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation="bicubic",
        jpeg_draft=bool(cfg.jpeg_draft),
    )


class EvalTransform:
    """PIL image -> float32 tensor `[3, S, S]` through `vlltr.model.runtime.preprocess.preprocess_image` (picklable, so
    DataLoader workers can use it). `draft_min_side` tells the dataset how to decode (see `load_rgb`)."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.draft_min_side = spec.draft_min_side

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(img, self.spec))

    def __repr__(self) -> str:
        return f"EvalTransform({self.spec})"


def eval_transform(cfg: DataCfg, image_size: int) -> EvalTransform:
    """The evaluation transform: exactly the service's preprocessing for :func:`preprocess_spec`."""
    return EvalTransform(preprocess_spec(cfg, image_size))


def train_transform(cfg: DataCfg, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation named by `cfg.augment`.

    - `original`: the published code's transform, timm's `create_transform` (DeiT's recipe: RandomResizedCrop
      0.08-1 bicubic, flip, colour jitter 0.4, RandAugment `rand-m9-mstd0.5-inc1`, normalise, random erasing
      p=0.25 with per-pixel noise).
    - `clip`: RandomResizedCrop(scale 0.08-1, bicubic), horizontal flip, RandAugment(2 ops, magnitude 9),
      normalise, RandomErasing(p=0.25) with zeros: torchvision's approximation of `original` (not the same
      operations, magnitudes or erasing fill).
    - `light`: RandomResizedCrop(scale 0.5-1, bicubic), horizontal flip, normalise; no colour operations,
      for data whose classes are defined by colour (RandAugment's solarize/posterize change colours).
    - `none`: the evaluation transform.
    """
    normalize = T.Normalize(mean=list(cfg.mean), std=list(cfg.std))
    bicubic = T.InterpolationMode.BICUBIC
    augment: Callable[[Image.Image], torch.Tensor]  # torchvision is untyped
    if cfg.augment == "original":
        from timm.data.transforms_factory import create_transform

        original: Callable[[Image.Image], torch.Tensor] = create_transform(
            image_size,
            is_training=True,
            color_jitter=0.4,
            auto_augment="rand-m9-mstd0.5-inc1",
            interpolation="bicubic",
            re_prob=0.25,
            re_mode="pixel",
            re_count=1,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )
        _posterize_as_published(original)
        return original
    if cfg.augment == "clip":
        augment = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                T.RandAugment(num_ops=2, magnitude=9, interpolation=bicubic),
                T.ToTensor(),
                normalize,
                T.RandomErasing(p=0.25),
            ]
        )
        return augment
    if cfg.augment == "light":
        augment = T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
        return augment
    if cfg.augment == "none":
        return eval_transform(cfg, image_size)
    raise DataError(f"unknown augment {cfg.augment!r}; known: {list(AUGMENTS)}")


# timm's posterize ops: each can be asked to keep 0 bits (PosterizeIncreasing at magnitude 10, which
# `rand-m9-mstd0.5-inc1` reaches when its magnitude noise is clipped, Posterize at magnitudes below 2.5).
_POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def _black_at_zero_bits(
    posterize: Callable[..., Image.Image], img: Image.Image, bits_to_keep: int, **kwargs: object
) -> Image.Image:
    """timm's `posterize`, with 0 bits kept giving a black image, as Pillow gave when the published code ran;
    the Pillow installed here (13) raises on 0 bits, which stopped `augment: original` training at the first
    such draw (about one posterize draw in 40)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def _posterize_as_published(transform: Callable[[Image.Image], torch.Tensor]) -> None:
    """Wrap the posterize ops of the RandAugment inside timm's training transform in `_black_at_zero_bits`."""
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):
            if getattr(op, "name", None) in _POSTERIZE_OPS:
                op.aug_fn = functools.partial(_black_at_zero_bits, op.aug_fn)
