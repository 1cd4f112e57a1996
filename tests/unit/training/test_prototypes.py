"""The `mahalanobis` unknown score's prototypes: drawn per class from a run's training images, fitted on their
features with the serving preprocessing, and carried by the exported bundle to the runtime that scores them."""

from __future__ import annotations

import numpy as np
import torch

from support.runs import make_run
from vlltr.model.runtime.bundle import PROTOTYPES, load_bundle
from vlltr.model.runtime.predictor import BundlePredictor, probabilities_and_nearness
from vlltr.training.checkpoint import PROTOTYPES_FILE, load_final_model
from vlltr.training.data.datasets import ImageListDataset
from vlltr.training.evaluate import build_eval_split
from vlltr.training.export import export_bundle
from vlltr.training.prototypes import fit_run_prototypes, prototype_images, read_prototypes, write_prototypes


def test_prototype_images_keep_at_most_n_of_each_class_and_all_of_a_smaller_one() -> None:
    samples = [(f"{c}-{i}.png", c) for c, n in enumerate([50, 3, 10]) for i in range(n)]
    dataset = ImageListDataset(samples, 3, check_files=False)
    chosen = prototype_images(dataset, 10, seed=0)
    assert np.bincount(chosen.labels).tolist() == [10, 3, 10]
    assert prototype_images(dataset, 10, seed=0).samples == chosen.samples  # seeded
    assert prototype_images(dataset, 10, seed=1).samples != chosen.samples


def test_a_runs_prototypes_are_its_training_features_and_travel_in_its_bundle(tmp_path) -> None:
    rule = {"unknown": {"score": "mahalanobis", "threshold": -50.0, "keep": 0.95, "fitted_on": "val"}}
    run_dir = make_run(tmp_path / "run", num_classes=6, n_test=96, calibration=rule)
    run = load_final_model(run_dir)
    run.config.eval.prototype_images = 1000
    prototypes = fit_run_prototypes(run, torch.device("cpu"))
    train = build_eval_split(run, "train")
    with torch.no_grad():
        feats = run.classifier.image_features(torch.stack([train[i][0] for i in range(len(train))]))
    unit = (feats / feats.norm(dim=-1, keepdim=True)).numpy()
    means = np.stack([unit[train.labels == c].mean(axis=0) for c in range(6)])
    np.testing.assert_allclose(prototypes.means, means, atol=1e-5)

    write_prototypes(prototypes, run_dir / PROTOTYPES_FILE)
    np.testing.assert_array_equal(read_prototypes(run_dir / PROTOTYPES_FILE).whitening, prototypes.whitening)
    bundle = load_bundle(export_bundle(run_dir, tmp_path / "bundle"))
    assert PROTOTYPES in bundle.manifest.files and bundle.prototypes is not None
    np.testing.assert_array_equal(bundle.prototypes.means, prototypes.means)
    # The runtime scores the bundle's images with them: a training image is nearer its classes than noise is.
    predictor = BundlePredictor(bundle)
    served = predictor.image_features(_images(train, 8))
    _, near = probabilities_and_nearness(
        served,
        bundle.head,
        predictor.table,
        bundle.log_prior,
        bundle.calibration,
        bundle.alpha,
        None,
        bundle.prototypes,
    )
    assert near.distance is not None and near.distance.shape == (8,)
    noise = predictor.image_features(_noise(8))
    assert np.median(near.distance) > np.median(bundle.prototypes.score(noise))


def _images(dataset: ImageListDataset, n: int) -> list:
    from PIL import Image

    return [Image.open(path).convert("RGB") for path, _ in dataset.samples[:n]]


def _noise(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(n)]
