"""Class-name formats (ImageNet-LT, Places-LT, iNat 2018, plain lines) and held-out class lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlltr.training.config import DataCfg
from vlltr.training.data.classes import load_class_names, load_heldout, trained_class_ids
from vlltr.training.data.errors import DataError


def _cfg(root: Path, name: str, fmt: str, **kw) -> DataCfg:
    return DataCfg(root=str(root), class_names=name, class_names_format=fmt, **kw)


def test_lines(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\n  great white shark \n\n")
    assert load_class_names(_cfg(tmp_path, "classes.txt", "lines")) == ["tench", "goldfish", "great white shark"]


def test_lines_blank_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("tench\n\ngoldfish\n")
    with pytest.raises(DataError, match="line 2"):
        load_class_names(_cfg(tmp_path, "classes.txt", "lines"))


def test_imagenet_labels_sorted_by_index(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text(
        "n01443537 1 goldfish\nn01440764 0 tench\nn01491361 3 tiger_shark\nn01484850 2 great_white_shark\n"
    )
    names = load_class_names(_cfg(tmp_path, "labels.txt", "imagenet_labels"))
    assert names == ["tench", "goldfish", "great white shark", "tiger shark"]


def test_imagenet_labels_gap_and_duplicate(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("n1 0 a\nn2 2 b\n")
    with pytest.raises(DataError, match="missing \\[1\\]"):
        load_class_names(_cfg(tmp_path, "labels.txt", "imagenet_labels"))
    (tmp_path / "labels.txt").write_text("n1 0 a\nn2 0 b\n")
    with pytest.raises(DataError, match="appears twice"):
        load_class_names(_cfg(tmp_path, "labels.txt", "imagenet_labels"))


def test_places_labels(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text(
        "/a/abbey 0\n/a/airport_terminal 1\n/a/apartment_building/outdoor 2\nbamboo_forest 3\n"
    )
    names = load_class_names(_cfg(tmp_path, "labels.txt", "places_labels"))
    assert names == ["abbey", "airport terminal", "apartment building outdoor", "bamboo forest"]


def test_inat_categories_by_id_and_by_position(tmp_path: Path) -> None:
    cats = [{"id": 1, "name": "Panthera leo", "kingdom": "Animalia"}, {"id": 0, "name": "Felis catus"}]
    (tmp_path / "categories.json").write_text(json.dumps(cats))
    assert load_class_names(_cfg(tmp_path, "categories.json", "inat_categories")) == ["Felis catus", "Panthera leo"]
    (tmp_path / "categories.json").write_text(json.dumps({"categories": [{"name": "A b"}, {"name": "C d"}]}))
    assert load_class_names(_cfg(tmp_path, "categories.json", "inat_categories")) == ["A b", "C d"]


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown class_names_format 'yaml'"):
        load_class_names(_cfg(tmp_path, "classes.txt", "yaml"))
    with pytest.raises(DataError, match="nope.txt"):
        load_class_names(_cfg(tmp_path, "nope.txt", "lines"))


def test_heldout(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("a\nb\nc\nd\n")
    cfg = _cfg(tmp_path, "classes.txt", "lines")
    assert load_heldout(cfg) == []
    (tmp_path / "heldout.txt").write_text("3\n1\n")
    cfg.heldout = "heldout.txt"
    assert load_heldout(cfg) == [3, 1]
    assert trained_class_ids(cfg) == [0, 2]
    (tmp_path / "heldout.txt").write_text("3\n4\n")
    with pytest.raises(DataError, match="class id 4 outside"):
        load_heldout(cfg)
