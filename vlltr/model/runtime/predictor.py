"""Offline, torch-free prediction through a bundle: preprocess -> image encoder -> head -> calibrated fusion.

The service's batcher calls the same pieces (`preprocess_batch`, `ImageEncoder.encode`, `scores`); this class
puts them together for scripts, the exporter's verification and tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlltr.model.runtime.bundle import Bundle
from vlltr.model.runtime.head import ClassTable, HeadParams, Shortlist, calibrated_probabilities
from vlltr.model.runtime.manifest import Calibration
from vlltr.model.runtime.preprocess import preprocess_batch
from vlltr.model.runtime.sessions import ImageEncoder, ProviderName, TextEncoder
from vlltr.model.runtime.unknown import Nearness, Prototypes


@dataclass(frozen=True)
class Prediction:
    """One ranked class of one image."""

    class_id: int
    label: str
    score: float


def probabilities(
    features: np.ndarray,
    head: HeadParams,
    table: ClassTable,
    log_prior: np.ndarray,
    calibration: Calibration,
    alpha: float,
    shortlist: Shortlist | None = None,
) -> np.ndarray:
    """Calibrated fused probabilities `[B, C]` over `table`'s classes for raw image features `[B, D]`
    (`shortlist`: see `vlltr.model.runtime.head.Shortlist`; None scores every class exactly)."""
    return probabilities_and_nearness(features, head, table, log_prior, calibration, alpha, shortlist)[0]


def probabilities_and_nearness(
    features: np.ndarray,
    head: HeadParams,
    table: ClassTable,
    log_prior: np.ndarray,
    calibration: Calibration,
    alpha: float,
    shortlist: Shortlist | None = None,
    prototypes: Prototypes | None = None,
) -> tuple[np.ndarray, Nearness]:
    """`probabilities`, and the scores of the `unknown` verdict (`vlltr.model.runtime.unknown`; `mahalanobis`
    only with the bundle's `prototypes`)."""
    features = np.asarray(features, dtype=np.float32)
    z_vis = head.vision_logits(features)
    z_lin = table.language_logits(head.queries(features), features, shortlist)
    probs = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=alpha, **calibration.scoring_options())
    return probs, Nearness.of(z_vis, z_lin, head.logit_scale, features, prototypes)


def top_k_of(probs: np.ndarray, names: Sequence[str], k: int) -> list[list[Prediction]]:
    """The `k` best classes of each row, best first (ties: lower class id first)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, probs.shape[1])
    out = []
    for row in probs:
        best = np.argsort(-row, kind="stable")[:k]
        out.append([Prediction(int(i), names[int(i)], float(row[i])) for i in best])
    return out


class BundlePredictor:
    """Predict with a bundle on CPU or CUDA (onnxruntime + numpy, no torch).

    Args:
        bundle: a loaded bundle.
        provider: `cpu`, `cuda` or `auto` (see `vlltr.model.runtime.sessions`).
        threads: onnxruntime intra-op threads (None: its default).
        table: the class table to score against (default: the bundle's trained classes).
    """

    def __init__(
        self,
        bundle: Bundle,
        provider: ProviderName = "cpu",
        threads: int | None = None,
        table: ClassTable | None = None,
    ) -> None:
        self.bundle = bundle
        self._fp16 = bundle.precision == "fp16"
        self.image_encoder = ImageEncoder(bundle.image_encoder_path, provider, threads, fp16=self._fp16)
        self.provider = self.image_encoder.provider
        self._provider_request = provider
        self._threads = threads
        self._text_encoder: TextEncoder | None = None
        self.table = table if table is not None else bundle.class_table()

    @property
    def text_encoder(self) -> TextEncoder:
        """The text encoder, created on first use (only adding classes needs it)."""
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(
                self.bundle.text_encoder_path,
                self.bundle.tokenizer(),
                self._provider_request,
                self._threads,
                fp16=self._fp16,
            )
        return self._text_encoder

    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Raw image features `[N, D]` of PIL images."""
        return self.image_encoder.encode(preprocess_batch(list(images), self.bundle.preprocess))

    def probabilities_from_features(self, features: np.ndarray) -> np.ndarray:
        """Calibrated probabilities `[N, C]` over the current table for raw image features."""
        b = self.bundle
        return probabilities(features, b.head, self.table, b.log_prior, b.calibration, b.alpha)

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Calibrated probabilities `[N, C]` of PIL images over the current table's classes."""
        return self.probabilities_from_features(self.image_features(images))

    def top_k(self, images: Sequence[Image.Image], k: int = 5) -> list[list[Prediction]]:
        """The `k` most probable classes of each image, best first."""
        return top_k_of(self.predict_images(images), self.table.names, k)
