"""A written benchmark (training/benchmarks layout) loaded into memory for the harness.

Images go through the service's evaluation preprocessing once (`vlltr.training.data.transforms.eval_transform`,
the same pixels `vlltr train` evaluates on and the service classifies) and are kept as float tensors; the
per-class sentences and their descriptive/distractor flags come from `meta.json`, which records exactly the
sentences the project's text loader extracts from `text/desc_<id>.txt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlltr.training.config import DataCfg
from vlltr.training.data.transforms import eval_transform

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class Benchmark:
    """Everything the harness needs about one written benchmark.

    Class ids are the dataset's ids (`classes.txt` line numbers). `trained` are the ids with training images,
    `heldout` the ids that exist only as descriptions and test images.
    """

    root: Path
    name: str
    names: list[str]
    trained: np.ndarray
    heldout: np.ndarray
    images: dict[str, torch.Tensor]  # split -> float [N, 3, S, S], preprocessed
    labels: dict[str, np.ndarray]  # split -> dataset class ids
    sentences: list[list[str]]  # per dataset class id
    descriptive: list[np.ndarray]  # per class, bool per sentence
    distractor_kind: list[list[str | None]]
    many_threshold: int
    few_threshold: int
    meta: dict

    @property
    def train_counts(self) -> np.ndarray:
        """Training images per dataset class id (0 for held-out classes)."""
        return np.bincount(self.labels["train"], minlength=len(self.names))


def _read_list(path: Path) -> list[tuple[str, int]]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rel, label = line.rsplit(maxsplit=1)
        try:
            out.append((rel, int(label)))
        except ValueError as exc:
            raise ValueError(f"{path} line {lineno}: label {label!r} is not an integer") from exc
    return out


def _fingerprint(root: Path, image_size: int) -> str:
    h = hashlib.sha256(str(image_size).encode())
    for name in ("meta.json", "train.txt", "val.txt", "test.txt", "classes.txt"):
        p = root / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()[:16]


def _meta_sentences(meta: dict, num_classes: int) -> tuple[list[list[str]], list[np.ndarray], list[list]]:
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != num_classes:
        raise ValueError(f"meta.json must hold a `classes` list of {num_classes} entries with their sentences")
    sentences, flags, kinds = [], [], []
    for c, entry in enumerate(classes):
        sents = entry.get("sentences")
        if not sents:
            raise ValueError(f"meta.json class {c} has no sentences")
        sentences.append([s["text"] for s in sents])
        flags.append(np.array([s["kind"] == "descriptive" for s in sents], dtype=bool))
        kinds.append([s.get("distractor_kind") for s in sents])
    return sentences, flags, kinds


def load_benchmark(root: str | Path, *, image_size: int = 32, cache_dir: str | Path | None = None) -> Benchmark:
    """Load a benchmark written by `vlltr data ...`; preprocessed images are cached under `cache_dir`."""
    root = Path(root)
    for name in ("classes.txt", "train.txt", "val.txt", "test.txt", "meta.json"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing: is {root} a benchmark written by `vlltr data`?")
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    names = [ln.strip() for ln in (root / "classes.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    heldout_path = root / "heldout.txt"
    heldout = np.array(
        sorted(int(x) for x in heldout_path.read_text().split()) if heldout_path.is_file() else [], dtype=np.int64
    )
    sentences, flags, kinds = _meta_sentences(meta, len(names))
    lists = {s: _read_list(root / f"{s}.txt") for s in SPLITS}
    labels = {s: np.array([y for _, y in lists[s]], dtype=np.int64) for s in SPLITS}
    cache = Path(cache_dir) / f"images-{root.name}-{_fingerprint(root, image_size)}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        images = torch.load(cache, weights_only=True)
    else:
        transform = eval_transform(DataCfg(), image_size)
        images = {}
        for s in SPLITS:
            arr = [transform(Image.open(root / rel).convert("RGB")) for rel, _ in lists[s]]
            images[s] = torch.stack(arr) if arr else torch.zeros(0, 3, image_size, image_size)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(images, cache)
    counts = np.bincount(labels["train"], minlength=len(names))
    trained = np.flatnonzero(counts > 0)
    overlap = set(trained.tolist()) & set(heldout.tolist())
    if overlap:
        raise ValueError(f"held-out classes {sorted(overlap)[:10]} have training images")
    shots = meta.get("shot_thresholds", {})
    return Benchmark(
        root=root,
        name=str(meta.get("name", root.name)),
        names=names,
        trained=trained,
        heldout=heldout,
        images=images,
        labels=labels,
        sentences=sentences,
        descriptive=flags,
        distractor_kind=kinds,
        many_threshold=int(shots.get("many_threshold", 100)),
        few_threshold=int(shots.get("few_threshold", 20)),
        meta=meta,
    )
