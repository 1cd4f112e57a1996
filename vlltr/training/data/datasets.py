"""Image datasets over `(path, label)` lists, built from list files, iNaturalist JSON or class folders.

Every split is checked when it is built: all image files exist (a failure says how many are missing and
shows the first few) and every label lies in [0, num_classes). Labels can be remapped to a model's class
order with `class_ids` (held-out classes dropped from training, for instance).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from vlltr.errors import DataError
from vlltr.model.runtime.preprocess import apply_exif_orientation, draft_jpeg, to_rgb
from vlltr.training.config import DataCfg
from vlltr.training.data.classes import data_path, load_class_names

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATA_FORMATS = ("listfile", "inat", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SHOW_MISSING = 5


def load_rgb(path: str, draft_min_side: int | None = None) -> Image.Image:
    """An image file as 8-bit RGB, EXIF orientation applied, with the service's conversion rules.

    Sharing `vlltr.model.runtime.preprocess.to_rgb` means a transparent or palette image looks the same in
    training as when the service classifies it (transparency composited on white); `draft_min_side` decodes
    large JPEGs at reduced size exactly as the service does for a bundle with `jpeg_draft`
    (`vlltr.model.runtime.preprocess.draft_jpeg`).
    """
    try:
        with Image.open(path) as img:
            draft_jpeg(img, draft_min_side)
            img.load()
            return to_rgb(apply_exif_orientation(img))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path!r}: {exc}") from exc


class ImageListDataset(torch.utils.data.Dataset[tuple[Any, int]]):
    """`(transform(RGB image), label)` pairs over a list of `(path, label)` samples.

    Attributes:
        samples: `(absolute or root-relative path, label)` in dataset order.
        labels: int64 array of the labels, aligned with `samples`.
        num_classes: size of the label space (labels lie in [0, num_classes)).
        transform: callable applied to the PIL image (None returns the PIL image).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        num_classes: int,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        source: str = "image list",
        check_files: bool = True,
    ) -> None:
        """Build and validate.

        Args:
            samples: `(path, label)` pairs.
            num_classes: number of classes; every label must be in [0, num_classes).
            transform: applied to each RGB PIL image.
            source: what the samples came from, named in error messages (a list file path, say).
            check_files: verify that every path is an existing file.

        Raises:
            DataError: missing files (count and the first few paths) or labels out of range.
        """
        if num_classes < 1:
            raise DataError(f"{source}: num_classes must be positive, got {num_classes}")
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.labels = np.asarray([y for _, y in self.samples], dtype=np.int64)
        self.num_classes = int(num_classes)
        self.transform = transform
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.num_classes))
        if bad.size:
            first = [f"{self.samples[i][0]} -> {self.samples[i][1]}" for i in bad[:_SHOW_MISSING]]
            raise DataError(f"{source}: {bad.size} label(s) outside [0, {self.num_classes}), first: {first}")
        if check_files:
            missing = [p for p, _ in self.samples if not Path(p).is_file()]
            if missing:
                raise DataError(
                    f"{source}: {len(missing)} of {len(self.samples)} image file(s) missing, "
                    f"first: {missing[:_SHOW_MISSING]}"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        # The evaluation transform says how the service decodes; training augmentation decodes in full.
        img = load_rgb(path, getattr(self.transform, "draft_min_side", None))
        return (self.transform(img) if self.transform is not None else img), label

    def class_counts(self) -> np.ndarray:
        """Images per class, int64 `[num_classes]` (zeros for classes absent from this split)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)


def split_file(cfg: DataCfg, split: str) -> str:
    """The configured file (or folder) name of `split`; a split the config leaves unset is a DataError."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {list(SPLITS)}")
    name = getattr(cfg, split)
    if not name:
        raise DataError(f"dataset {cfg.name!r} has no {split} split configured (data.{split} is empty)")
    return str(name)


def read_samples(cfg: DataCfg, split: str, class_names: list[str]) -> tuple[list[tuple[str, int]], str]:
    """The raw `(path, dataset label)` pairs of a split and a description of where they came from."""
    if cfg.format not in DATA_FORMATS:
        raise DataError(f"unknown data format {cfg.format!r}; known: {list(DATA_FORMATS)}")
    name = split_file(cfg, split)
    image_root = Path(cfg.root) / cfg.image_root
    if cfg.format == "listfile":
        return _listfile(data_path(cfg, name), image_root), str(data_path(cfg, name))
    if cfg.format == "inat":
        return _inat(data_path(cfg, name), image_root), str(data_path(cfg, name))
    folder = image_root / name
    return _folder(folder, class_names), str(folder)


def _listfile(path: Path, image_root: Path) -> list[tuple[str, int]]:
    if not path.is_file():
        raise DataError(f"list file {str(path)!r} does not exist")
    samples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)  # paths may contain spaces; the label is the last field
            if len(parts) != 2:
                raise DataError(f"{str(path)!r} line {lineno}: expected `relpath label`, got {line!r}")
            try:
                label = int(parts[1])
            except ValueError:
                raise DataError(f"{str(path)!r} line {lineno}: label {parts[1]!r} is not an integer") from None
            # List paths are relative to the image root even with a leading `/` (Places-LT style lines);
            # joining an absolute-looking path would silently discard the root.
            samples.append((str(image_root / parts[0].lstrip("/")), label))
    if not samples:
        raise DataError(f"list file {str(path)!r} has no samples")
    return samples


def _inat(path: Path, image_root: Path) -> list[tuple[str, int]]:
    # Annotations are joined to images by image_id: the original zipped the two lists by position, which is
    # only right while a file keeps them in the same order.
    if not path.is_file():
        raise DataError(f"iNat annotation file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{str(path)!r}: expected an object with an `images` list")
    annotations = data.get("annotations")
    if not isinstance(annotations, list) or not annotations:
        raise DataError(f"{str(path)!r} has no annotations (an unlabelled test file cannot be a labelled split)")
    label_of: dict[Any, int] = {}
    for pos, ann in enumerate(annotations):
        try:
            image_id, category = ann["image_id"], ann["category_id"]
        except (TypeError, KeyError):
            raise DataError(f"{str(path)!r}: annotation {pos} lacks image_id or category_id") from None
        if image_id in label_of:
            raise DataError(f"{str(path)!r}: image id {image_id!r} has more than one annotation")
        if not isinstance(category, int) or isinstance(category, bool):
            raise DataError(f"{str(path)!r}: annotation {pos} has a non-integer category_id {category!r}")
        label_of[image_id] = category
    samples = []
    seen = set()
    for pos, img in enumerate(data["images"]):
        try:
            image_id, file_name = img["id"], img["file_name"]
        except (TypeError, KeyError):
            raise DataError(f"{str(path)!r}: image entry {pos} lacks id or file_name") from None
        if image_id not in label_of:
            raise DataError(f"{str(path)!r}: image {file_name!r} (id {image_id!r}) has no annotation")
        seen.add(image_id)
        samples.append((str(image_root / str(file_name).lstrip("/")), label_of[image_id]))
    orphans = [i for i in label_of if i not in seen]
    if orphans:
        raise DataError(f"{str(path)!r}: {len(orphans)} annotation(s) name unknown image ids, first: {orphans[:5]}")
    return samples


def _folder(folder: Path, class_names: list[str]) -> list[tuple[str, int]]:
    if not folder.is_dir():
        raise DataError(f"image folder {str(folder)!r} does not exist")
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in index)
    if unknown:
        raise DataError(f"{str(folder)!r}: sub-folder(s) {unknown[:5]} match no class name in the class list")
    samples: list[tuple[str, int]] = []
    for name, label in index.items():
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        samples.extend((str(p), label) for p in files)
    if not samples:
        raise DataError(f"image folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def remap_samples(
    samples: list[tuple[str, int]], class_ids: Sequence[int], num_classes: int, source: str
) -> list[tuple[str, int]]:
    """Keep samples of `class_ids` and relabel each to its position in `class_ids`."""
    position: dict[int, int] = {}
    for pos, cid in enumerate(class_ids):
        cid = int(cid)
        if not 0 <= cid < num_classes:
            raise DataError(f"{source}: class id {cid} in class_ids is outside [0, {num_classes})")
        if cid in position:
            raise DataError(f"{source}: class id {cid} appears twice in class_ids")
        position[cid] = pos
    return [(p, position[y]) for p, y in samples if y in position]


def build_split(
    cfg: DataCfg,
    split: str,
    transform: Callable[[Image.Image], Any] | None,
    *,
    class_ids: list[int] | None = None,
) -> ImageListDataset:
    """The dataset of one split (`train`, `val` or `test`).

    Args:
        cfg: the data config (root, format, split file names, class names).
        split: which split; its file name is `cfg.train` / `cfg.val` / `cfg.test`.
        transform: applied to each RGB PIL image.
        class_ids: dataset class ids to keep, in model index order; labels become positions in this list.
            None keeps every class with its dataset id.

    Raises:
        DataError: unset split, missing or malformed files, missing images, labels out of range.
    """
    class_names = load_class_names(cfg)
    num_classes = len(class_names)
    samples, source = read_samples(cfg, split, class_names)
    # Validate against the dataset's own label space before any remapping hides a bad label.
    ImageListDataset(samples, num_classes, None, source=source, check_files=False)
    if class_ids is not None:
        samples = remap_samples(samples, class_ids, num_classes, source)
        if not samples:
            raise DataError(f"{source}: no samples left after keeping classes {list(class_ids)[:10]}...")
        num_classes = len(class_ids)
    dataset = ImageListDataset(samples, num_classes, transform, source=source)
    log.info("%s %s: %d images, %d classes (%s)", cfg.name, split, len(dataset), num_classes, source)
    return dataset


def build_train_val_test(
    cfg: DataCfg,
    train_transform: Callable[[Image.Image], Any] | None,
    eval_transform: Callable[[Image.Image], Any] | None,
    *,
    class_ids: list[int] | None = None,
    eval_class_ids: list[int] | None = None,
) -> tuple[ImageListDataset, ImageListDataset | None, ImageListDataset | None]:
    """`(train, val, test)`; val/test are None when the config leaves them unset.

    `class_ids` applies to train and val; `eval_class_ids` (default: `class_ids`) to test, so a test set
    can keep held-out classes that training never saw.
    """
    train = build_split(cfg, "train", train_transform, class_ids=class_ids)
    val = build_split(cfg, "val", eval_transform, class_ids=class_ids) if cfg.val else None
    test_ids = class_ids if eval_class_ids is None else eval_class_ids
    test = build_split(cfg, "test", eval_transform, class_ids=test_ids) if cfg.test else None
    return train, val, test
