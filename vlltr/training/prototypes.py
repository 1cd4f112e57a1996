"""The class statistics of the `mahalanobis` unknown score (`vlltr.model.runtime.unknown.Prototypes`), fitted on
a finished run's training images with the serving preprocessing, and kept in the run as `prototypes.npz`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from vlltr.model.runtime.unknown import Prototypes, prototype_sample
from vlltr.training.checkpoint import TrainedRun
from vlltr.training.data.datasets import ImageListDataset
from vlltr.training.evaluate import build_eval_split, collect_features
from vlltr.training.runtime import derive_seed

log = logging.getLogger(__name__)


def prototype_images(dataset: ImageListDataset, per_class: int, seed: int) -> ImageListDataset:
    """At most `per_class` images of each class of `dataset`, drawn with `seed` (`prototype_sample`)."""
    chosen = prototype_sample(dataset.labels, per_class, np.random.default_rng(seed))
    samples = [dataset.samples[i] for i in chosen]
    return ImageListDataset(
        samples, dataset.num_classes, dataset.transform, source="prototype images", check_files=False
    )


def fit_run_prototypes(run: TrainedRun, device: torch.device) -> Prototypes:
    """The prototypes of `run`'s trained classes from its training split (`eval.prototype_images` per class)."""
    cfg = run.config
    images = prototype_images(
        build_eval_split(run, "train"), cfg.eval.prototype_images, derive_seed(cfg.run.seed, "prototypes")
    )
    feats, labels = collect_features(
        run.classifier,
        images,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        device=device,
        desc="prototype features (train)",
    )
    prototypes = Prototypes.fit(feats.numpy(), labels.numpy(), len(run.classes))
    log.info("unknown prototypes: %d classes from %d training images", len(run.classes), len(images))
    return prototypes


def write_prototypes(prototypes: Prototypes, path: str | Path) -> None:
    """Write `prototypes.npz` through a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **prototypes.to_arrays())  # type: ignore[arg-type]  # numpy's stub: **dict may bind allow_pickle
    os.replace(tmp, path)


def read_prototypes(path: str | Path) -> Prototypes:
    """Read a run's `prototypes.npz`."""
    with np.load(path, allow_pickle=False) as data:
        return Prototypes.from_arrays({k: data[k] for k in data.files})
