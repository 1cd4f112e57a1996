"""How well the `unknown` verdict flags images far from every class, measured through a bundle (no torch).

    python -m bench.unknown --bundle BUNDLE --data DATA [--other DIR ...] [--photos] [--noise N]

DATA is the benchmark the bundle was trained on (`vlltr data shapes-lt|digits-lt --out DATA`). For each
candidate score (`vlltr.model.runtime.unknown`: `vision_energy`, `language_cosine`, `probability`,
`mahalanobis`, and `typicality` of `vision_energy` and `mahalanobis`; and three references a bundle does
not compute: `train_centroid`, the largest cosine to a trained class's mean training image feature,
`relative_mahalanobis`, the class distance less the distance to all training images together, and `knn`,
the cosine to the 10th nearest of those training images) the
threshold is fitted as training fits it, keeping 95% of the in-set validation images (`val.txt`),
`typicality`'s quantiles on the same images. `mahalanobis` uses the bundle's prototypes where it has them, else
prototypes fitted here on up to 100 training images per class, as `vlltr train` fits them. The threshold is
then applied to:

- out-of-set data a score is chosen on: `val_heldout` (validation images of the held-out classes, where the
  benchmark has them), the validation split of each `--other` benchmark and, with `--noise`, a draw of noise
  of its own;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlltr.model.runtime.bundle import load_bundle
from vlltr.model.runtime.manifest import COMPONENT_SCORES, UNKNOWN_SCORES
from vlltr.model.runtime.predictor import BundlePredictor, probabilities_and_nearness
from vlltr.model.runtime.unknown import (
    DEFAULT_COMPONENTS,
    DEFAULT_KEEP,
    TYPICALITY_LEVELS,
    Prototypes,
    fit_threshold,
    prototype_sample,
    score_values,
    typicality,
    unit_rows,
)

BATCH = 128
PROTOTYPE_IMAGES = 100  # training images per class for the references, as `eval.prototype_images`
SCORES = (*UNKNOWN_SCORES, "train_centroid", "relative_mahalanobis", "knn")
# Sun et al., 2022 (deep nearest neighbours) take the k-th neighbour, not the first, so one stray training
# image near an out-of-set one does not make it typical.
KNN_K = 10


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


def kth_nearest_cosine(features: np.ndarray, train_unit: np.ndarray, k: int) -> np.ndarray:
    """`[N]` each image's cosine to its `k`-th nearest of the unit training features (the last one when there
    are fewer)."""
    k = min(k, len(train_unit))
    cosines = unit_rows(features) @ train_unit.T
    kth: np.ndarray = -np.partition(-cosines, k - 1, axis=1)[:, k - 1]
    return kth


@dataclass
class Reference:
    """What the reference scores measure against, from the bundle's trained classes' training images."""

    centres: np.ndarray  # [S, D] unit mean of each class's unit features (`train_centroid`)
    train: np.ndarray  # [N, D] the unit features themselves (`knn`)
    prototypes: Prototypes  # the bundle's own where it has them, else fitted here as training fits them
    background: Prototypes  # one Gaussian over all of them (`relative_mahalanobis`)


def reference(predictor: BundlePredictor, train: list[tuple[Path, int]]) -> Reference:
    """The reference statistics from `train` (labels are the bundle's trained-class indices)."""
    feats = features(predictor, load(train))
    labels = np.array([label for _, label in train])
    classes = sorted(set(labels.tolist()))
    index = np.searchsorted(classes, labels)
    unit = unit_rows(feats)
    centres = unit_rows(np.stack([unit[index == i].mean(axis=0) for i in range(len(classes))]))
    own = predictor.bundle.prototypes
    prototypes = own if own is not None else Prototypes.fit(feats, index, len(classes))
    return Reference(centres, unit, prototypes, Prototypes.fit(feats, np.zeros(len(feats), dtype=np.int64), 1))


def scores(predictor: BundlePredictor, images: list[Image.Image], ref: Reference) -> dict[str, np.ndarray]:
    """Each candidate score of each image, `{score: [N]}`."""
    b = predictor.bundle
    feats = features(predictor, images)
    probs, near = probabilities_and_nearness(
        feats, b.head, predictor.table, b.log_prior, b.calibration, b.alpha, prototypes=ref.prototypes
    )
    out = {s: score_values(s, near, probs.max(axis=1)) for s in COMPONENT_SCORES}
    out["train_centroid"] = (unit_rows(feats) @ ref.centres.T).max(axis=1)
    # Ren et al., 2021: the class distance less the distance to everything the model was trained on.
    out["relative_mahalanobis"] = ref.prototypes.score(feats) - ref.background.score(feats)
    out["knn"] = kth_nearest_cosine(feats, ref.train, KNN_K)
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
    if args.noise:  # a draw of its own, apart from the reported one
        groups["choice: uniform noise"] = noise(args.noise, bundle.preprocess.size, rng)
    groups["test: trained classes"] = load(sample([t for t in test if t[1] not in heldout], args.per_split, rng))
    if heldout:
        groups["test: held-out classes"] = load(sample([t for t in test if t[1] in heldout], args.per_split, rng))
    for root, name in others:
        groups[f"other dataset: {name} test"] = load(sample(read_split(root, "test"), args.per_split, rng))
    if args.photos:
        groups["other dataset: 2 photographs + 64 crops"] = photos(64, rng)
    if args.noise:
        groups["uniform noise"] = noise(args.noise, bundle.preprocess.size, rng)
    train = read_split(data, "train")
    # As `vlltr train` draws them for the prototypes.
    ref = reference(
        predictor, [train[i] for i in prototype_sample([label for _, label in train], PROTOTYPE_IMAGES, rng)]
    )
    measured = {name: scores(predictor, images, ref) for name, images in groups.items()}
    in_set = next(iter(measured.values()))
    # `typicality` as training fits it, on the same in-set images as every other column's threshold; with
    # --typicality, other combinations beside the default one.
    levels = np.linspace(0.0, 1.0, TYPICALITY_LEVELS)
    combinations = {"typicality": DEFAULT_COMPONENTS}
    combinations.update({f"typicality({'+'.join(c)})": c for c in args.typicality if c != DEFAULT_COMPONENTS})
    for column, combination in combinations.items():
        components = {c: tuple(np.quantile(in_set[c], levels)) for c in combination}
        for values in measured.values():
            values[column] = typicality(components, values)
    columns = (*SCORES, *(c for c in combinations if c != "typicality"))
    rules = {s: fit_threshold(in_set[s], DEFAULT_KEEP) for s in columns}
    own = bundle.calibration.unknown
    report: dict[str, Any] = {
        "bundle": str(args.bundle),
        "bundle_rule": None if own is None else own.to_dict(),
        "scores": list(columns),
        "thresholds": rules,
        "groups": {},
    }
    for name, values in measured.items():
        entry: dict[str, Any] = {"images": int(len(values[SCORES[0]]))}
        for s in columns:
            entry[f"flagged_{s}"] = float(np.mean(values[s] < rules[s]))
            entry[f"auroc_{s}"] = auroc(in_set[s], values[s])
        if own is not None:
            own_values = typicality(own.components, values) if own.components else values[own.score]
            entry["flagged_bundle_rule"] = float(np.mean(own_values < own.threshold))
        report["groups"][name] = entry
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a table: per image group and score, the flagged rate (AUROC against the in-set
    validation images in brackets); the bundle's own rule last."""
    columns = report.get("scores", SCORES)
    head = " | ".join(f"`{s}`" for s in columns)
    lines = [f"| images | n | {head} | bundle's rule |", "|---|---:|" + "---:|" * (len(columns) + 1)]
    for name, g in report["groups"].items():
        cells = " | ".join(f"{100 * g[f'flagged_{s}']:.1f}% ({g[f'auroc_{s}']:.2f})" for s in columns)
        own = g.get("flagged_bundle_rule")
        lines.append(f"| {name} | {g['images']} | {cells} | {'-' if own is None else f'{100 * own:.1f}%'} |")
    return "\n".join(lines)


def _combination(text: str) -> tuple[str, ...]:
    names = tuple(text.split("+"))
    if not names or len(set(names)) != len(names) or not set(names) <= set(COMPONENT_SCORES):
        raise argparse.ArgumentTypeError(f"give distinct scores of {COMPONENT_SCORES} joined by '+', got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.unknown", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="the bundle to measure")
    parser.add_argument("--data", required=True, help="the benchmark it was trained on")
    parser.add_argument("--other", action="append", default=[], help="another benchmark's directory (repeatable)")
    parser.add_argument("--photos", action="store_true", help="add scikit-learn's sample photographs and crops")
    parser.add_argument("--noise", type=int, default=0, help="add this many uniform-noise images")
    parser.add_argument(
        "--typicality",
        action="append",
        default=[],
        type=_combination,
        metavar="A+B",
        help="also the typicality of these scores, as a column of its own (repeatable; the default "
        f"combination, {'+'.join(DEFAULT_COMPONENTS)}, is always shown)",
    )
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
