"""Everything a run reads, loaded and checked before any training starts.

Bad input fails here with a message that names the problem: an unknown architecture or missing pretrained
file, missing images, labels out of range, a class without text, a trained class without training images,
an evaluation split that is not configured.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from vlltr.errors import ConfigError, DataError, MissingFileError, UnknownArchitectureError
from vlltr.model.networks.factory import get_tokenizer, list_architectures
from vlltr.model.runtime.manifest import COMPONENT_SCORES
from vlltr.training.config import Config
from vlltr.training.data.classes import load_class_names, load_heldout
from vlltr.training.data.datasets import ImageListDataset, build_split
from vlltr.training.data.text import load_class_texts, tokenize_class_texts
from vlltr.training.data.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


@dataclass
class PreparedInputs:
    """Classes, text and datasets of a run. Model class index i is dataset class `class_ids[i]`."""

    all_class_names: list[str]
    class_ids: list[int]
    heldout: list[int]
    sentences: list[list[str]]
    tokens: torch.Tensor
    offsets: np.ndarray
    image_size: int
    train: ImageListDataset
    train_eval: ImageListDataset
    val: ImageListDataset | None
    test: ImageListDataset | None

    @property
    def class_names(self) -> list[str]:
        return [self.all_class_names[c] for c in self.class_ids]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def flat_sentences(self) -> list[str]:
        return [s for pool in self.sentences for s in pool]

    @property
    def train_counts(self) -> np.ndarray:
        return self.train.class_counts()

    def split(self, name: str) -> ImageListDataset:
        """The eval-transform dataset of `train`, `val` or `test`."""
        ds = {"train": self.train_eval, "val": self.val, "test": self.test}.get(name)
        if ds is None:
            raise DataError(f"split {name!r} is not configured for dataset (data.{name} is empty or unknown)")
        return ds


def check_model_config(cfg: Config) -> int:
    """Check the architecture and pretrained source; return the model's input image size."""
    arch = cfg.model.arch
    if arch not in list_architectures():
        close = [a for a in list_architectures() if arch.lower() in a.lower()][:8]
        raise UnknownArchitectureError(f"unknown architecture {arch!r} (model.arch); close matches: {close}")
    pretrained = cfg.model.pretrained or ""  # None and "" both mean random init
    if pretrained == "openai" and not cfg.model.quick_gelu:
        # open_clip switches QuickGELU on by itself for this tag, but a finished run is rebuilt from the config
        # without the tag, so the flag must be explicit or the reloaded model would use the wrong activation.
        raise ConfigError("model.pretrained 'openai' needs model.quick_gelu: true")
    is_path = bool(pretrained) and (os.sep in pretrained or bool(Path(pretrained).suffix) or Path(pretrained).exists())
    if is_path and not Path(pretrained).is_file():
        raise MissingFileError(f"model.pretrained file {pretrained!r} does not exist")
    if pretrained and not is_path and pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        raise ConfigError(
            f"model.pretrained {pretrained!r} is neither a file nor an open_clip tag of {arch!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(arch)})"
        )
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _check_train_counts(train: ImageListDataset, class_ids: list[int], names: list[str]) -> None:
    counts = train.class_counts()
    empty = [f"{class_ids[i]} ({names[class_ids[i]]!r})" for i in np.flatnonzero(counts == 0)[:10]]
    if empty:
        raise DataError(
            f"trained classes without any training image: {', '.join(empty)}; "
            f"list them in data.heldout to add them by text instead"
        )


def _check_eval_splits(cfg: Config) -> None:
    for key, split in (("eval.split", cfg.eval.split), ("eval.calibration_split", cfg.eval.calibration_split)):
        if key == "eval.calibration_split" and not cfg.eval.calibrate:
            continue
        if split not in ("train", "val", "test"):
            raise DataError(f"{key} must be train, val or test, got {split!r}")
        if split != "train" and not getattr(cfg.data, split):
            raise DataError(f"{key} is {split!r} but data.{split} is not configured")
    if cfg.anss.reference_split == "val" and not cfg.data.val:
        raise DataError("anss.reference_split is 'val' but data.val is not configured")
    if not 0 < cfg.eval.unknown_keep <= 1:
        raise ConfigError(f"eval.unknown_keep must lie in (0, 1], got {cfg.eval.unknown_keep}")
    components = cfg.eval.unknown_components
    if cfg.eval.unknown_score == "typicality" and (
        not components or len(set(components)) != len(components) or not set(components) <= set(COMPONENT_SCORES)
    ):
        raise ConfigError(
            f"eval.unknown_components must name distinct scores of {list(COMPONENT_SCORES)}, got {components}"
        )
    if cfg.eval.prototype_images < 1:
        raise ConfigError(f"eval.prototype_images must be at least 1, got {cfg.eval.prototype_images}")


def _check_stage_settings(cfg: Config) -> None:
    # Found here rather than at the first stage-2 step, after stage 1 has trained.
    if cfg.stage2.language_weight < 0:
        raise ConfigError(
            f"stage2.language_weight must be >= 0 (0 trains the vision branch alone), got {cfg.stage2.language_weight}"
        )
    for key, epochs in (("stage1.epochs", cfg.stage1.epochs), ("stage2.epochs", cfg.stage2.epochs)):
        if epochs < 0:
            raise ConfigError(f"{key} must be >= 0, got {epochs}")


def prepare_inputs(cfg: Config, cache_dir: str | Path | None) -> PreparedInputs:
    """Load and validate classes, held-out ids, every split and the class text; tokenize the sentences."""
    image_size = check_model_config(cfg)
    _check_eval_splits(cfg)
    _check_stage_settings(cfg)
    names = load_class_names(cfg.data)
    heldout = load_heldout(cfg.data, num_classes=len(names))
    class_ids = [c for c in range(len(names)) if c not in set(heldout)]
    if not class_ids:
        raise DataError("every class is held out: nothing to train")
    train = build_split(cfg.data, "train", train_transform(cfg.data, image_size), class_ids=class_ids)
    _check_train_counts(train, class_ids, names)
    evalt = eval_transform(cfg.data, image_size)
    train_eval = build_split(cfg.data, "train", evalt, class_ids=class_ids)
    val = build_split(cfg.data, "val", evalt, class_ids=class_ids) if cfg.data.val else None
    test = build_split(cfg.data, "test", evalt, class_ids=class_ids) if cfg.data.test else None
    sentences = load_class_texts(cfg.data, names, class_ids)
    tokens, offsets = tokenize_class_texts(
        sentences, get_tokenizer(cfg.model.arch), Path(cache_dir) if cache_dir else None
    )
    log.info(
        "%d trained classes (%d held out), %d training images, %d sentences",
        len(class_ids),
        len(heldout),
        len(train),
        tokens.shape[0],
    )
    return PreparedInputs(
        names, class_ids, heldout, sentences, tokens, offsets, image_size, train, train_eval, val, test
    )
