"""Class names and held-out class ids, read from the files a :class:`DataCfg` points at.

Formats of `cfg.class_names_format`:

- `lines`: one name per line; line index = class id.
- `imagenet_labels`: `wnid idx name` lines (VL-LTR's `labels.txt`); the name is everything after the index
  with `_` read as a space, classes ordered by idx.
- `places_labels`: `name idx` lines (Places365 `categories_places365.txt` / VL-LTR's `labels.txt`); a leading
  `/a/` letter folder is dropped and `_` and `/` are read as spaces (`/a/apartment_building/outdoor` ->
  "apartment building outdoor"), classes ordered by idx.
- `inat_categories`: the official iNaturalist 2018 `categories.json` (a list of objects, or an object with a
  `categories` list); the name is the `name` field, the class id is `id` when every entry has one, else the
  position in the list.

Ids must be exactly 0..C-1, each once: a gap or a duplicate is a :class:`DataError`.

A folder dataset (`data.format: folder`) without a class names file takes its classes from the sub-folders of
its train split, sorted, as torchvision's `ImageFolder` does: class id = position in sorted order. That applies
when `class_names` is left at its default (`classes.txt`) and no such file exists; a file named explicitly must
exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from vlltr.errors import DataError
from vlltr.training.config import DataCfg

log = logging.getLogger(__name__)

CLASS_NAME_FORMATS = ("lines", "imagenet_labels", "places_labels", "inat_categories")
DEFAULT_CLASS_NAMES = DataCfg.class_names  # `classes.txt`
_PLACES_LETTER_DIR = re.compile(r"^/[a-z]/")


def data_path(cfg: DataCfg, relpath: str) -> Path:
    """`relpath` resolved under the dataset root."""
    return Path(cfg.root) / relpath


def read_text_file(path: Path, what: str) -> str:
    """A text file's content as UTF-8; a missing or unreadable file is a :class:`DataError` naming it."""
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} file {str(path)!r} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{what} file {str(path)!r} cannot be read: {exc}") from exc


def load_class_names(cfg: DataCfg) -> list[str]:
    """Class names in class-id order, parsed per `cfg.class_names_format` (see the module docstring).

    A folder dataset without the default names file takes the sorted folder names of its train split
    (:func:`folder_class_names`).

    Raises:
        DataError: unknown format, missing file, malformed line, empty name, or ids that are not 0..C-1.
    """
    fmt = cfg.class_names_format
    if fmt not in CLASS_NAME_FORMATS:
        raise DataError(f"unknown class_names_format {fmt!r}; known: {list(CLASS_NAME_FORMATS)}")
    path = data_path(cfg, cfg.class_names)
    if cfg.format == "folder" and cfg.class_names == DEFAULT_CLASS_NAMES and not path.exists():
        return folder_class_names(cfg)
    text = read_text_file(path, "class names")
    if fmt == "inat_categories":
        names = _inat_categories(text, path)
    elif fmt == "lines":
        names = _lines(text, path)
    else:
        names = _indexed(text, path, fmt)
    if not names:
        raise DataError(f"class names file {str(path)!r} lists no classes")
    return names


def folder_class_names(cfg: DataCfg) -> list[str]:
    """The sub-folder names of a folder dataset's train split, sorted (class id = position), as
    torchvision's `ImageFolder.find_classes`.

    Raises:
        DataError: the train folder does not exist or has no sub-folders.
    """
    folder = Path(cfg.root) / cfg.image_root / cfg.train
    if not folder.is_dir():
        raise DataError(
            f"image folder {str(folder)!r} does not exist (a folder dataset without {DEFAULT_CLASS_NAMES} takes "
            f"its class names from the sub-folders of data.train)"
        )
    names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not names:
        raise DataError(
            f"image folder {str(folder)!r} has no class sub-folders: put each class's images in "
            f"{str(folder / '<class name>')!r}, or list the classes in {str(data_path(cfg, cfg.class_names))!r}"
        )
    log.info("%s: %d classes named by the folders of %s", cfg.name, len(names), folder)
    return names


def _lines(text: str, path: Path) -> list[str]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            # A blank line in the middle would shift every later class id by one.
            raise DataError(f"{str(path)!r} line {lineno}: empty class name (class id {lineno - 1})")
        names.append(name)
    return names


def _indexed(text: str, path: Path, fmt: str) -> list[str]:
    by_idx: dict[int, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if fmt == "imagenet_labels":
            if len(parts) < 3:
                raise DataError(f"{str(path)!r} line {lineno}: expected `wnid idx name`, got {line.strip()!r}")
            raw_idx, name = parts[1], " ".join(parts[2:]).replace("_", " ")
        else:
            if len(parts) < 2:
                raise DataError(f"{str(path)!r} line {lineno}: expected `name idx`, got {line.strip()!r}")
            raw_idx, name = parts[-1], _places_name(" ".join(parts[:-1]))
        try:
            idx = int(raw_idx)
        except ValueError:
            raise DataError(f"{str(path)!r} line {lineno}: class index {raw_idx!r} is not an integer") from None
        if idx in by_idx:
            raise DataError(f"{str(path)!r} line {lineno}: class index {idx} appears twice")
        name = " ".join(name.split())
        if not name:
            raise DataError(f"{str(path)!r} line {lineno}: empty class name for index {idx}")
        by_idx[idx] = name
    return _contiguous(by_idx, path)


def _places_name(raw: str) -> str:
    return _PLACES_LETTER_DIR.sub("", raw).replace("_", " ").replace("/", " ")


def _inat_categories(text: str, path: Path) -> list[str]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = data.get("categories")
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r}: expected a list of categories (or an object with a `categories` list)")
    for pos, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise DataError(f"{str(path)!r}: category at position {pos} has no `name`")
    if data and all("id" in e for e in data):
        by_idx: dict[int, str] = {}
        for entry in data:
            idx = entry["id"]
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise DataError(f"{str(path)!r}: category {entry['name']!r} has a non-integer id {idx!r}")
            if idx in by_idx:
                raise DataError(f"{str(path)!r}: category id {idx} appears twice")
            by_idx[idx] = entry["name"].strip()
        return _contiguous(by_idx, path)
    return [e["name"].strip() for e in data]


def _contiguous(by_idx: dict[int, str], path: Path) -> list[str]:
    if not by_idx:
        return []
    expected = set(range(len(by_idx)))
    if set(by_idx) != expected:
        missing = sorted(expected - set(by_idx))[:5]
        extra = sorted(set(by_idx) - expected)[:5]
        raise DataError(
            f"{str(path)!r}: class indices must be 0..{len(by_idx) - 1}; missing {missing}, out of range {extra}"
        )
    return [by_idx[i] for i in range(len(by_idx))]


def load_heldout(cfg: DataCfg, *, num_classes: int | None = None) -> list[int]:
    """Class ids kept out of training (one integer per line of `cfg.heldout`), in file order.

    Empty when `cfg.heldout` is None. `num_classes` defaults to the length of :func:`load_class_names`.

    Raises:
        DataError: missing file, a line that is not an integer, a duplicate, or an id outside [0, num_classes).
    """
    if cfg.heldout is None:
        return []
    path = data_path(cfg, cfg.heldout)
    text = read_text_file(path, "held-out classes")
    if num_classes is None:
        num_classes = len(load_class_names(cfg))
    ids: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        raw = line.strip()
        if not raw:
            continue
        try:
            cid = int(raw)
        except ValueError:
            raise DataError(f"{str(path)!r} line {lineno}: {raw!r} is not a class id") from None
        if not 0 <= cid < num_classes:
            raise DataError(f"{str(path)!r} line {lineno}: class id {cid} outside [0, {num_classes})")
        if cid in ids:
            raise DataError(f"{str(path)!r} line {lineno}: class id {cid} listed twice")
        ids.append(cid)
    return ids


def trained_class_ids(cfg: DataCfg, *, num_classes: int | None = None) -> list[int]:
    """All class ids except the held-out ones, ascending: the model's class index order for training."""
    if num_classes is None:
        num_classes = len(load_class_names(cfg))
    held = set(load_heldout(cfg, num_classes=num_classes))
    return [c for c in range(num_classes) if c not in held]
