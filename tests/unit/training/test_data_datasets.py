"""Datasets from ImageNet-LT-style list files, iNaturalist JSON and class folders; validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlltr.training.config import DataCfg
from vlltr.training.data.datasets import ImageListDataset, build_split, build_train_val_test, load_rgb
from vlltr.training.data.errors import DataError
from vlltr.training.data.text import load_class_texts


def _png(path: Path, colour: tuple[int, int, int] = (200, 10, 10), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 8), colour).convert(mode).save(path)


def _imagenet_lt(root: Path) -> DataCfg:
    """A stand-in ImageNet-LT: VL-LTR's layout (labels.txt, wiki/desc_k.txt, ImageNet_LT_*.txt lists)."""
    (root / "labels.txt").write_text("n01440764 0 tench\nn01443537 1 goldfish\nn01484850 2 great_white_shark\n")
    (root / "wiki").mkdir(parents=True)
    for k, text in enumerate(["The tench is a fish.", "A goldfish is orange.", "It is a large shark."]):
        (root / "wiki" / f"desc_{k}.txt").write_text(f"{text}\n\n== References ==\nA book.\n")
    train, val = [], []
    for label, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        for n in range(3 - label):
            rel = f"train/{wnid}/{wnid}_{n}.JPEG"
            _png(root / rel, (80 * label, 10, 10))
            train.append(f"{rel} {label}")
        rel = f"val/ILSVRC2012_val_{label:08d}.JPEG"
        _png(root / rel)
        val.append(f"{rel} {label}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageNet_LT_val.txt").write_text("\n".join(val) + "\n")
    return DataCfg(
        name="imagenet-lt-standin",
        root=str(root),
        format="listfile",
        train="ImageNet_LT_train.txt",
        val="ImageNet_LT_val.txt",
        test=None,
        class_names="labels.txt",
        class_names_format="imagenet_labels",
        text_dir="wiki",
        templates="simple",
    )


def test_imagenet_lt_standin(tmp_path: Path) -> None:
    cfg = _imagenet_lt(tmp_path)
    train = build_split(cfg, "train", None)
    assert len(train) == 6 and train.num_classes == 3
    assert train.class_counts().tolist() == [3, 2, 1]
    assert train.labels.dtype == np.int64
    img, label = train[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 2
    assert train.samples[0][0] == str(tmp_path / "train/n01440764/n01440764_0.JPEG")
    pools = load_class_texts(cfg, ["tench", "goldfish", "great white shark"], [0, 1, 2])
    assert pools[2][-1] == "It is a large shark."
    with pytest.raises(DataError, match="no test split configured"):
        build_split(cfg, "test", None)
    tr, va, te = build_train_val_test(cfg, None, None)
    assert len(tr) == 6 and len(va) == 3 and te is None


def test_class_ids_remap(tmp_path: Path) -> None:
    cfg = _imagenet_lt(tmp_path)
    train = build_split(cfg, "train", None, class_ids=[2, 0])
    assert train.num_classes == 2
    assert sorted(train.labels.tolist()) == [0, 1, 1, 1]
    assert all(("n01484850" in p) == (y == 0) for p, y in train.samples)
    with pytest.raises(DataError, match="class id 5"):
        build_split(cfg, "train", None, class_ids=[5])


def test_missing_images_are_counted_and_listed(tmp_path: Path) -> None:
    cfg = _imagenet_lt(tmp_path)
    for n in range(3):
        (tmp_path / f"train/n01440764/n01440764_{n}.JPEG").unlink()
    with pytest.raises(DataError) as err:
        build_split(cfg, "train", None)
    msg = str(err.value)
    assert "ImageNet_LT_train.txt" in msg and "3 of 6 image file(s) missing" in msg
    assert "n01440764_0.JPEG" in msg


def test_label_out_of_range(tmp_path: Path) -> None:
    cfg = _imagenet_lt(tmp_path)
    with (tmp_path / "ImageNet_LT_train.txt").open("a") as fh:
        fh.write("train/n01440764/n01440764_0.JPEG 7\n")
    with pytest.raises(DataError, match=r"ImageNet_LT_train.txt.*1 label\(s\) outside \[0, 3\)"):
        build_split(cfg, "train", None)


def test_malformed_list_line(tmp_path: Path) -> None:
    cfg = _imagenet_lt(tmp_path)
    (tmp_path / "ImageNet_LT_val.txt").write_text("val/a.JPEG zero\n")
    with pytest.raises(DataError, match="line 1: label 'zero'"):
        build_split(cfg, "val", None)


def test_places_lt_standin(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("/a/abbey 0\n/a/airport_terminal 1\n")
    _png(tmp_path / "data_256/a/abbey/00000001.jpg")
    _png(tmp_path / "data_256/a/airport_terminal/00000002.jpg")
    (tmp_path / "Places_LT_train.txt").write_text("/a/abbey/00000001.jpg 0\n/a/airport_terminal/00000002.jpg 1\n")
    cfg = DataCfg(
        root=str(tmp_path),
        train="Places_LT_train.txt",
        class_names="labels.txt",
        class_names_format="places_labels",
        image_root="data_256",
    )
    # Paths starting with `/` are still relative to the image root.
    ds = build_split(cfg, "train", None)
    assert ds.class_counts().tolist() == [1, 1]
    assert ds.samples[0][0] == str(tmp_path / "data_256/a/abbey/00000001.jpg")


def test_inat_joins_annotations_by_image_id(tmp_path: Path) -> None:
    cats = [{"id": i, "name": f"Species {i}"} for i in range(3)]
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    images, annotations = [], []
    for image_id, label in [(10, 2), (11, 0), (12, 1), (13, 2)]:
        rel = f"train_val2018/Plantae/{label}/{image_id}.jpg"
        _png(tmp_path / rel, (label * 100, 0, 0))
        images.append({"id": image_id, "file_name": rel, "width": 12, "height": 8})
        annotations.append({"id": image_id + 1000, "image_id": image_id, "category_id": label})
    annotations = annotations[::-1]  # a different order than images: zipping by position would mislabel
    (tmp_path / "train2018.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats})
    )
    cfg = DataCfg(
        root=str(tmp_path),
        format="inat",
        train="train2018.json",
        val=None,
        test=None,
        class_names="categories.json",
        class_names_format="inat_categories",
    )
    ds = build_split(cfg, "train", None)
    assert ds.labels.tolist() == [2, 0, 1, 2]
    for path, label in ds.samples:
        assert f"/{label}/" in path
    (tmp_path / "test2018.json").write_text(json.dumps({"images": images, "annotations": []}))
    cfg.test = "test2018.json"
    with pytest.raises(DataError, match="has no annotations"):
        build_split(cfg, "test", None)


def test_folder_format(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    _png(tmp_path / "images/train/dog/b.png")
    _png(tmp_path / "images/train/dog/a.jpg")
    _png(tmp_path / "images/train/cat/c.png")
    (tmp_path / "images/train/dog/notes.txt").write_text("not an image")
    cfg = DataCfg(root=str(tmp_path), format="folder", image_root="images", train="train")
    ds = build_split(cfg, "train", None)
    assert [(Path(p).name, y) for p, y in ds.samples] == [("c.png", 0), ("a.jpg", 1), ("b.png", 1)]
    _png(tmp_path / "images/train/bird/d.png")
    with pytest.raises(DataError, match="'bird'"):
        build_split(cfg, "train", None)


def test_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        build_split(DataCfg(root=str(tmp_path), format="csv"), "train", None)


@pytest.mark.parametrize("mode", ["P", "RGBA", "L", "CMYK", "LA"])
def test_images_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    _png(path, (200, 10, 10), mode)
    img = load_rgb(str(path))
    assert img.mode == "RGB" and img.size == (12, 8)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (12, 8), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(str(tmp_path / "rot.jpg")).size == (8, 12)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ds = ImageListDataset([(str(tmp_path / "bad.png"), 0)], 1)
    with pytest.raises(DataError, match="bad.png"):
        ds[0]
