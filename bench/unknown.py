"""How well the `unknown` verdict flags images far from every class, measured through a bundle (no torch).

    python -m bench.unknown --bundle BUNDLE --data DATA [--other DIR ...] [--photos] [--noise N]

DATA is the benchmark the bundle was trained on (`vlltr data shapes-lt|digits-lt --out DATA`). For each
candidate score (`vlltr.model.runtime.unknown`: `vision_energy`, `language_cosine`, `probability`; and, as a
reference the bundle cannot compute, `train_centroid`, the largest cosine to a trained class's mean training
image feature) the threshold is fitted as training fits it, keeping 95% of the in-set validation images
(`val.txt`); it is then applied to:

- validation-derived out-of-set data, on which a score is chosen: `val_heldout` (validation images of the
  held-out classes, where the benchmark has them) and the validation split of each `--other` benchmark;
- the test split's trained-class images (should mostly not be flagged) and held-out-class images;
- other datasets: the test images of each `--other` benchmark, scikit-learn's two sample photographs
  (`--photos`) and 64 random crops of them, and `--noise` uniform-noise images.

The bundle's own fitted rule (manifest `calibration.unknown`) is reported beside the refitted ones. Images
are subsampled (`--per-split`, seeded) to keep the run to a minute or two on two cores. Prints a JSON report
and, with `--markdown`, the table the benchmark pages show.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.manifest import UNKNOWN_SCORES
from vlltr.model.runtime.predictor import BundlePredictor, probabilities_and_nearness
from vlltr.model.runtime.unknown import DEFAULT_KEEP, fit_threshold, score_values

BATCH = 128
CENTROID_IMAGES = 3000  # training images drawn for the reference centroids
SCORES = (*UNKNOWN_SCORES, "train_centroid")


def read_split(root: Path, name: str) -> list[tuple[Path, int]]:
    """`(image path, label)` of a benchmark split file (`images/x.png 3` per line); empty when absent."""
    path = root / f"{name}.txt"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            out.append((root / rel, int(label)))
    return out


def sample(items: list[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """At most `n` of `items`, drawn without replacement (order kept)."""
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


def photos(crops: int, rng: np.random.Generator) -> list[Image.Image]:
    """scikit-learn's sample photographs (a temple, a flower) and `crops` random square crops of them."""
    from sklearn.datasets import load_sample_images

    images = [Image.fromarray(a) for a in load_sample_images().images]
    out = list(images)
    for i in range(crops):
        img = images[i % len(images)]
        side = int(rng.integers(48, min(img.size) // 2))
        x, y = int(rng.integers(0, img.size[0] - side)), int(rng.integers(0, img.size[1] - side))
        out.append(img.crop((x, y, x + side, y + side)))
    return out


def noise(n: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    """`n` RGB images of uniform noise."""
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def features(predictor: BundlePredictor, images: list[Image.Image]) -> np.ndarray:
    """Raw image features `[N, D]`, in batches."""
    return np.concatenate([predictor.image_features(images[lo : lo + BATCH]) for lo in range(0, len(images), BATCH)])


def _unit(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit


def centroids(predictor: BundlePredictor, train: list[tuple[Path, int]]) -> np.ndarray:
    """`[S, D]` unit mean of each trained class's unit training-image features."""
    feats = _unit(features(predictor, load(train)))
    labels = np.array([label for _, label in train])
    return _unit(np.stack([feats[labels == c].mean(axis=0) for c in sorted(set(labels.tolist()))]))


def scores(predictor: BundlePredictor, images: list[Image.Image], centres: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate score of each image, `{score: [N]}`."""
    b = predictor.bundle
    feats = features(predictor, images)
    probs, near = probabilities_and_nearness(feats, b.head, predictor.table, b.log_prior, b.calibration, b.alpha)
    out = {s: score_values(s, near, probs.max(axis=1)) for s in UNKNOWN_SCORES}
    out["train_centroid"] = (_unit(feats) @ centres.T).max(axis=1)
    return out


def load(items: list[tuple[Path, int]]) -> list[Image.Image]:
    """The images of `(path, label)` pairs, as RGB."""
    return [Image.open(p).convert("RGB") for p, _ in items]


def auroc(in_set: np.ndarray, out_set: np.ndarray) -> float:
    """Probability that an in-set image scores above an out-of-set one (ties count half)."""
    a, b = np.asarray(in_set)[:, None], np.asarray(out_set)[None, :]
    return float(np.mean((a > b) + 0.5 * (a == b)))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The report: thresholds per score and the flagged rate of every image group."""
    rng = np.random.default_rng(args.seed)
    bundle = load_bundle(args.bundle)
    predictor = BundlePredictor(bundle, threads=args.threads)
    data = Path(args.data)
    listed = data / "heldout.txt"
    heldout = {int(x) for x in listed.read_text().split()} if listed.is_file() else set()
    test = read_split(data, "test")
    others = [(Path(o), json.loads((Path(o) / "meta.json").read_text())["generator"]) for o in args.other]
    groups: dict[str, list[Image.Image]] = {
        "val (in-set, fits the threshold)": load(sample(read_split(data, "val"), args.per_split, rng)),
    }
    val_heldout = read_split(data, "val_heldout")
    if val_heldout:
        groups["choice: val, held-out classes"] = load(sample(val_heldout, args.per_split, rng))
    for root, name in others:
        groups[f"choice: val of {name}"] = load(sample(read_split(root, "val"), args.per_split, rng))
    groups["test: trained classes"] = load(sample([t for t in test if t[1] not in heldout], args.per_split, rng))
    if heldout:
        groups["test: held-out classes"] = load(sample([t for t in test if t[1] in heldout], args.per_split, rng))
    for root, name in others:
        groups[f"other dataset: {name} test"] = load(sample(read_split(root, "test"), args.per_split, rng))
    if args.photos:
        groups["other dataset: 2 photographs + 64 crops"] = photos(64, rng)
    if args.noise:
        groups["uniform noise"] = noise(args.noise, bundle.preprocess.size, rng)
    centres = centroids(predictor, sample(read_split(data, "train"), CENTROID_IMAGES, rng))
    measured = {name: scores(predictor, images, centres) for name, images in groups.items()}
    in_set = next(iter(measured.values()))
    rules = {s: fit_threshold(in_set[s], DEFAULT_KEEP) for s in SCORES}
    own = bundle.calibration.unknown
    report: dict[str, Any] = {
        "bundle": str(args.bundle),
        "bundle_rule": None if own is None else own.to_dict(),
        "thresholds": rules,
        "groups": {},
    }
    for name, values in measured.items():
        entry: dict[str, Any] = {"images": int(len(values[SCORES[0]]))}
        for s in SCORES:
            entry[f"flagged_{s}"] = float(np.mean(values[s] < rules[s]))
            entry[f"auroc_{s}"] = auroc(in_set[s], values[s])
        if own is not None:
            entry["flagged_bundle_rule"] = float(np.mean(values[own.score] < own.threshold))
        report["groups"][name] = entry
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a table: per image group and score, the flagged rate (AUROC against the in-set
    validation images in brackets); the bundle's own rule last."""
    head = " | ".join(f"`{s}`" for s in SCORES)
    lines = [f"| images | n | {head} | bundle's rule |", "|---|---:|" + "---:|" * (len(SCORES) + 1)]
    for name, g in report["groups"].items():
        cells = " | ".join(f"{100 * g[f'flagged_{s}']:.1f}% ({g[f'auroc_{s}']:.2f})" for s in SCORES)
        own = g.get("flagged_bundle_rule")
        lines.append(f"| {name} | {g['images']} | {cells} | {'-' if own is None else f'{100 * own:.1f}%'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.unknown", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="the bundle to measure")
    parser.add_argument("--data", required=True, help="the benchmark it was trained on")
    parser.add_argument("--other", action="append", default=[], help="another benchmark's directory (repeatable)")
    parser.add_argument("--photos", action="store_true", help="add scikit-learn's sample photographs and crops")
    parser.add_argument("--noise", type=int, default=0, help="add this many uniform-noise images")
    parser.add_argument("--per-split", type=int, default=800, help="most images drawn from each split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads")
    parser.add_argument("--markdown", action="store_true", help="print the table, then the JSON")
    args = parser.parse_args(argv)
    report = measure(args)
    if args.markdown:
        print(markdown(report))
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
