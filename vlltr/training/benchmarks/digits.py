"""Digits-LT: scikit-learn's bundled handwritten digits (1,797 8x8 images), made long-tailed, with text.

Per class a balanced test set (50) and val set (20) are held out first; the rest is the training pool, from
which class of rank r keeps int(n_max * (1/IR) ** (r / 9)) images (n_max 100, IR 25: 100, 69, 48, 34, 23,
16, 11, 8, 5, 4 = 318). Which digit gets which rank is a seeded shuffle. Images are written as 32x32
greyscale PNGs (the 0-16 values scaled to 0-255, bilinear upsampling). Shot groups are rescaled for ten
classes: many > 40, few < 15 (3 / 3 / 4 classes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlltr.training.benchmarks import FORMAT_VERSIONS
from vlltr.training.benchmarks.digits_text import digit_name, digits_document
from vlltr.training.benchmarks.layout import (
    cifar_lt_counts,
    finish_out,
    image_relpath,
    prepare_out,
    save_png,
    shot_groups,
    shot_thresholds,
    write_lines,
    write_list,
    write_meta,
)

log = logging.getLogger(__name__)

NUM_CLASSES = 10
IMAGE_SIZE = 32
MANY_THRESHOLD, FEW_THRESHOLD = 40, 15


def digit_png(image: np.ndarray) -> np.ndarray:
    """An 8x8 array of 0-16 values as a uint8 `[32, 32]` greyscale image (bilinear)."""
    small = Image.fromarray(np.rint(np.asarray(image, dtype=np.float64) * 255.0 / 16.0).astype(np.uint8), "L")
    return np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))


def generate_digits_lt(
    out: str | Path,
    *,
    seed: int = 0,
    imbalance: float = 25.0,
    n_max: int = 100,
    val_per_class: int = 20,
    test_per_class: int = 50,
) -> dict[str, Any]:
    """Write Digits-LT to `out` (layout in `vlltr.training.benchmarks.layout`) and return its meta.json content.

    A class with fewer images than val + test + its train count gets what is left, in that order (test
    first), and meta.json's `shortfall` records it.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng([seed, 3])
    rank_of = [int(r) for r in rng.permutation(NUM_CLASSES)]  # class -> rank in the profile
    profile = cifar_lt_counts(NUM_CLASSES, n_max, imbalance)

    final, partial = prepare_out(out)
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    counts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    shortfall: dict[str, dict[str, int]] = {}
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(targets == c)
        idx = idx[np.random.default_rng([seed, 5, c]).permutation(idx.size)]
        wanted = {"test": test_per_class, "val": val_per_class, "train": profile[rank_of[c]]}
        start = 0
        for split in ("test", "val", "train"):
            take = idx[start : start + wanted[split]]
            start += take.size
            if take.size < wanted[split]:
                shortfall.setdefault(str(c), {})[split] = int(wanted[split] - take.size)
            for n, i in enumerate(take):
                rel = image_relpath(split, c, n)
                save_png(digit_png(images[i]), partial / rel)
                lists[split].append((rel, c))
            counts[split].append(int(take.size))
    for split, entries in lists.items():
        write_list(partial / f"{split}.txt", entries)
    names = [digit_name(c) for c in range(NUM_CLASSES)]
    write_lines(partial / "classes.txt", names)
    class_meta = []
    for c in range(NUM_CLASSES):
        doc = digits_document(c, seed)
        (partial / "text" / f"desc_{c}.txt").write_text(doc.render(), encoding="utf-8")
        class_meta.append(
            {
                "id": c,
                "name": names[c],
                "rank": rank_of[c],
                "heldout": False,
                "train_count": counts["train"][c],
                "val_count": counts["val"][c],
                "test_count": counts["test"][c],
                "sentences": [s.to_dict() for s in doc.sentences()],
                "dropped_sections": [title for title, _ in doc.dropped],
            }
        )
    meta = {
        "generator": "digits-lt",
        "format_version": FORMAT_VERSIONS["digits-lt"],
        "seed": seed,
        "imbalance": imbalance,
        "n_max": n_max,
        "image_size": IMAGE_SIZE,
        "num_classes": NUM_CLASSES,
        "trained_classes": list(range(NUM_CLASSES)),
        "heldout_classes": [],
        "train_counts": counts["train"],
        "splits": {k: len(v) for k, v in lists.items()},
        "shot_thresholds": shot_thresholds(MANY_THRESHOLD, FEW_THRESHOLD),
        "shot_groups": shot_groups(counts["train"], MANY_THRESHOLD, FEW_THRESHOLD),
        "shortfall": shortfall,
        "notes": "Shot thresholds are rescaled for ten classes. Sentence lists exclude the References section.",
        "classes": class_meta,
    }
    write_meta(partial / "meta.json", meta)
    finish_out(final, partial)
    log.info("digits-lt written to %s: %s", final, meta["splits"])
    return meta
