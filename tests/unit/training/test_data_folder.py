"""Folder datasets (`data.format: folder`): without a class names file the classes are the train split's
sub-folders, sorted, as torchvision's ImageFolder names them; class text is found by `{name}` or `{id}`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from vlltr.errors import DataError
from vlltr.training.config import DataCfg, load_config
from vlltr.training.data.classes import load_class_names, load_heldout
from vlltr.training.data.datasets import build_split
from vlltr.training.data.text import load_class_texts

CLASSES = {"zebra": 4, "ant": 3, "Bee": 2, "cat": 1}  # name -> training images


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, 255 - shade, 40)).save(path)


def folder_dataset(root: Path) -> Path:
    """train/<class>/*.png, val/ and test/ with one image per class, text/<class>.txt; no classes.txt."""
    for i, (name, n) in enumerate(CLASSES.items()):
        for k in range(n):
            _png(root / "train" / name / f"{k}.png", 20 * i + k)
        _png(root / "val" / name / "v.png", 20 * i)
        _png(root / "test" / name / "t.png", 20 * i + 1)
        (root / "text").mkdir(parents=True, exist_ok=True)
        (root / "text" / f"{name}.txt").write_text(f"A {name} is an animal. It is often seen outdoors.\n")
    return root


def _cfg(root: Path, **kw) -> DataCfg:
    values = dict(root=str(root), format="folder", train="train", val="val", test="test", text_pattern="{name}.txt")
    values.update(kw)
    return DataCfg(**values)


def test_class_names_are_the_sorted_train_folders(tmp_path):
    cfg = _cfg(folder_dataset(tmp_path))
    assert not (tmp_path / "classes.txt").exists()
    names = load_class_names(cfg)
    assert names == sorted(CLASSES) == ["Bee", "ant", "cat", "zebra"]  # ImageFolder's order (code points)
    train = build_split(cfg, "train", None)
    by_id = {y: Path(p).parent.name for p, y in train.samples}
    assert by_id == dict(enumerate(names))  # class id = position in sorted order
    assert train.class_counts().tolist() == [CLASSES[n] for n in names]
    assert len(build_split(cfg, "test", None)) == len(CLASSES)


def test_torchvision_imagefolder_names_the_same_classes(tmp_path):
    from torchvision import datasets

    cfg = _cfg(folder_dataset(tmp_path))
    reference = datasets.ImageFolder(str(tmp_path / "train"))
    assert load_class_names(cfg) == reference.classes
    ours = sorted(
        (Path(p).relative_to(tmp_path / "train").as_posix(), y) for p, y in build_split(cfg, "train", None).samples
    )
    theirs = sorted((Path(p).relative_to(tmp_path / "train").as_posix(), y) for p, y in reference.samples)
    assert ours == theirs


def test_class_text_is_found_by_name_or_id(tmp_path):
    root = folder_dataset(tmp_path)
    cfg = _cfg(root, templates="none")
    names = load_class_names(cfg)
    pools = load_class_texts(cfg, names, list(range(len(names))))
    assert [p[0] for p in pools] == [f"A {n} is an animal." for n in names]
    for i, name in enumerate(names):
        (root / "text" / f"{name}.txt").rename(root / "text" / f"desc_{i}.txt")
    pools = load_class_texts(_cfg(root, templates="none", text_pattern="desc_{id}.txt"), names, [0, 3])
    assert [p[0] for p in pools] == ["A Bee is an animal.", "A zebra is an animal."]


def test_held_out_ids_refer_to_the_sorted_folders(tmp_path):
    root = folder_dataset(tmp_path)
    (root / "heldout.txt").write_text("3\n")
    assert load_heldout(_cfg(root, heldout="heldout.txt")) == [3]  # zebra


def test_a_names_file_still_wins_when_it_exists(tmp_path):
    root = folder_dataset(tmp_path)
    (root / "classes.txt").write_text("zebra\nant\nBee\ncat\n")
    cfg = _cfg(root)
    assert load_class_names(cfg) == ["zebra", "ant", "Bee", "cat"]
    train = build_split(cfg, "train", None)
    assert {Path(p).parent.name for p, y in train.samples if y == 0} == {"zebra"}


def test_an_explicitly_named_file_must_exist(tmp_path):
    cfg = _cfg(folder_dataset(tmp_path), class_names="names.txt")
    with pytest.raises(DataError, match=r"class names file '.*names\.txt' does not exist"):
        load_class_names(cfg)


def test_a_folder_without_class_folders_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    _png(tmp_path / "train" / "loose.png", 1)
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_class_names(_cfg(tmp_path))
    with pytest.raises(DataError, match=r"image folder '.*nowhere' does not exist"):
        load_class_names(_cfg(tmp_path, train="nowhere"))


def test_a_val_folder_naming_an_unknown_class_is_refused(tmp_path):
    root = folder_dataset(tmp_path)
    _png(root / "val" / "yak" / "y.png", 9)
    with pytest.raises(DataError, match="'yak'"):
        build_split(_cfg(root), "val", None)


def test_a_run_reads_a_folder_dataset_without_classes_txt(tmp_path):
    from vlltr.training.inputs import prepare_inputs

    root = folder_dataset(tmp_path / "data")
    cfg = load_config(
        "digits-lt-tiny",
        [
            f"data.root={root}",
            "data.format=folder",
            "data.train=train",
            "data.val=val",
            "data.test=test",
            "data.text_pattern='{name}.txt'",
            "data.templates=simple",
        ],
    )
    inputs = prepare_inputs(cfg, None)
    assert inputs.class_names == sorted(CLASSES)
    assert inputs.train_counts.tolist() == [CLASSES[n] for n in sorted(CLASSES)]
