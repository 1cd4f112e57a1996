"""Shapes-LT: layout, CIFAR-LT profile, held-out classes, determinism, and exactly recoverable sentences."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlltr.cli import main as vlltr_main
from vlltr.training.benchmarks import write_benchmark
from vlltr.training.benchmarks.layout import cifar_lt_counts
from vlltr.training.benchmarks.render_shapes import COLOURS, PATTERNS, SHAPES
from vlltr.training.benchmarks.shapes import _render_all, class_order, generate_shapes_lt
from vlltr.training.benchmarks.shapes_text import NAME_STYLES, class_names
from vlltr.training.config import DataCfg
from vlltr.training.data.classes import load_class_names, load_heldout, trained_class_ids
from vlltr.training.data.datasets import build_split
from vlltr.training.data.errors import DataError
from vlltr.training.data.text import load_class_texts, parse_wiki_text, split_sentences

SMALL = dict(imbalance=10.0, n_max=10, val_per_class=1, test_per_class=2)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes") / "shapes-lt"
    meta = generate_shapes_lt(out, seed=3, **SMALL)
    return out, meta


def _cfg(out: Path) -> DataCfg:
    return DataCfg(name="shapes-lt", root=str(out), heldout="heldout.txt", templates="none")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_cifar_lt_counts() -> None:
    assert sum(cifar_lt_counts(100, 500, 100)) == 10847
    assert sum(cifar_lt_counts(100, 500, 50)) == 12608
    assert sum(cifar_lt_counts(100, 500, 10)) == 19573
    counts = cifar_lt_counts(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and counts == sorted(counts, reverse=True)
    # OLTR groups at IR 100, as in CIFAR-100-LT: 35 many, 35 medium, 30 few.
    assert (sum(n > 100 for n in counts), sum(n < 20 for n in counts)) == (35, 30)
    with pytest.raises(DataError, match="imbalance"):
        cifar_lt_counts(100, 500, 0.5)


def test_class_name_styles() -> None:
    order = class_order(0)
    epithet = class_names(order, 0, "epithet")
    assert len(set(epithet)) == 108 and epithet == class_names(order, 0, "epithet")
    assert epithet != class_names(order, 1, "epithet")
    attribute_words = set(COLOURS) | set(PATTERNS)
    for name, (shape, _, _) in zip(epithet, order, strict=True):
        # The kind is in the name; the looks (colour, pattern) are only in the descriptions.
        word, kind = name.split(" ")
        assert kind == shape and word.isalpha() and not any(w in word for w in attribute_words | set(SHAPES))
    assert class_names(order, 0)[0] == f"{order[0][2]} {order[0][1]} {order[0][0]}"
    with pytest.raises(ValueError, match="name style"):
        class_names(order, 0, "numbers")


def test_epithet_names_reach_files_and_text(tmp_path: Path) -> None:
    meta = generate_shapes_lt(
        tmp_path / "epi", seed=2, imbalance=1.0, n_max=1, val_per_class=1, test_per_class=1, names="epithet"
    )
    names = (tmp_path / "epi" / "classes.txt").read_text().splitlines()
    assert meta["name_style"] == "epithet" and names == [c["name"] for c in meta["classes"]]
    assert names == class_names(class_order(2), 2, "epithet")
    for c in meta["classes"]:
        assert c["sentences"][0]["text"] == f"The {c['name']} is a simple drawn figure."
        # The looks are in the descriptions, not in the name.
        assert c["attributes"]["colour"] not in c["name"]


def test_cli_offers_every_name_style(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI spells the styles out (so `vlltr serve` imports nothing); they must stay the generator's.
    with pytest.raises(SystemExit) as exc:
        vlltr_main(["data", "shapes-lt", "--out", str(tmp_path / "x"), "--names", "numbers"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    offered = err.split("choose from", 1)[1].replace("'", "").replace(")", "").split(",")
    assert "invalid choice" in err and sorted(s.strip() for s in offered) == sorted(NAME_STYLES)
    assert not (tmp_path / "x").exists()
    with pytest.raises(DataError, match="shapes-lt only"):
        write_benchmark("digits-lt", tmp_path / "d", names="epithet")
    with pytest.raises(DataError, match="shapes-lt only"):
        write_benchmark("digits-lt", tmp_path / "d", n_max=12)
    # A user's mistake is one line and status 2, not a traceback.
    assert vlltr_main(["data", "shapes-lt", "--out", str(tmp_path / "m"), "--monochrome-sessions", "1.5"]) == 2
    assert capsys.readouterr().err == "vlltr data shapes-lt: monochrome_prob must be in [0, 1], got 1.5\n"
    assert not (tmp_path / "m").exists()


def test_full_size_meta_without_images() -> None:
    order = class_order(0)
    assert len(order) == len(set(order)) == len(SHAPES) * len(COLOURS) * len(PATTERNS) == 108
    head, trained, held = order[:30], order[:100], order[100:]
    for k, values in enumerate((SHAPES, tuple(COLOURS), PATTERNS)):
        assert {c[k] for c in head} == set(values)
        assert {c[k] for c in held} <= {c[k] for c in trained}


def test_layout(small: tuple[Path, dict]) -> None:
    out, meta = small
    for name in ("classes.txt", "train.txt", "val.txt", "val_heldout.txt", "test.txt", "heldout.txt", "meta.json"):
        assert (out / name).is_file(), name
    assert not out.with_name(out.name + ".partial").exists()
    cfg = _cfg(out)
    names = load_class_names(cfg)
    assert len(names) == 108 and len(set(names)) == 108
    heldout = load_heldout(cfg)
    assert heldout == list(range(100, 108)) == meta["heldout_classes"]
    assert all((out / "text" / f"desc_{c}.txt").is_file() for c in range(108))
    expected = cifar_lt_counts(100, SMALL["n_max"], SMALL["imbalance"])
    assert meta["train_counts"] == expected + [0] * 8
    assert meta["shot_thresholds"]["many_threshold"] == 100 and meta["shot_thresholds"]["few_threshold"] == 20

    train = build_split(cfg, "train", None)
    assert train.class_counts().tolist() == meta["train_counts"]
    img, label = train[0]
    assert img.size == (64, 64) and img.mode == "RGB" and label == 0
    assert all(Path(p).name == f"{y}_{Path(p).stem.split('_')[1]}.png" for p, y in train.samples)
    assert all("/images/train/" in p for p, _ in train.samples)


def test_heldout_only_in_test(small: tuple[Path, dict]) -> None:
    out, meta = small
    cfg = _cfg(out)
    held = set(load_heldout(cfg))
    for split in ("train", "val"):
        assert held.isdisjoint(build_split(cfg, split, None).labels.tolist())
    test = build_split(cfg, "test", None)
    assert test.class_counts().tolist() == [SMALL["test_per_class"]] * 108
    val_held = [int(line.split()[1]) for line in (out / "val_heldout.txt").read_text().splitlines()]
    assert set(val_held) == held
    # Training on trained classes only: labels remapped to 0..99, held-out classes dropped.
    trained = trained_class_ids(cfg)
    remapped = build_split(cfg, "train", None, class_ids=trained)
    assert remapped.num_classes == 100 and remapped.class_counts().tolist() == meta["train_counts"][:100]
    attrs = [c["attributes"] for c in meta["classes"]]
    for c in held:
        for key, value in attrs[c].items():
            assert any(attrs[t][key] == value for t in trained)


def test_sentences_recoverable_from_files(small: tuple[Path, dict]) -> None:
    out, meta = small
    drop = DataCfg().drop_sections
    kinds = {"descriptive": 0, "trivia": 0, "other_class": 0}
    for c in meta["classes"]:
        text = (out / "text" / f"desc_{c['id']}.txt").read_text(encoding="utf-8")
        assert split_sentences(parse_wiki_text(text, drop)) == [s["text"] for s in c["sentences"]]
        labels = [s["distractor_kind"] or s["kind"] for s in c["sentences"]]
        n_dist = sum(s["kind"] == "distractor" for s in c["sentences"])
        assert 6 <= len(labels) - n_dist <= 10
        assert 0.3 <= n_dist / len(labels) <= 0.4
        assert "trivia" in labels and "other_class" in labels
        for s in c["sentences"]:
            kinds[s["distractor_kind"] or s["kind"]] += 1
            if s["distractor_kind"] == "other_class":
                # A hard distractor names a different class's attribute words.
                other = meta["classes"][s["other_class"]]["attributes"]
                mine = c["attributes"]
                foreign = [v for k, v in other.items() if v != mine[k]]
                assert foreign and any(v in s["text"] for v in foreign), s
    pools = load_class_texts(_cfg(out), load_class_names(_cfg(out)), list(range(108)))
    assert [len(p) for p in pools] == [len(c["sentences"]) for c in meta["classes"]]
    assert min(kinds.values()) > 50


def test_deterministic(small: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = small
    again = tmp_path / "again"
    generate_shapes_lt(again, seed=3, **SMALL)
    assert _digest(again) == _digest(out)
    other = tmp_path / "other"
    generate_shapes_lt(other, seed=4, imbalance=1.0, n_max=1, val_per_class=1, test_per_class=1)
    assert (other / "classes.txt").read_bytes() != (out / "classes.txt").read_bytes()
    assert (other / "images/test/0_0.png").read_bytes() != (out / "images/test/0_0.png").read_bytes()


def test_parallel_rendering_gives_the_same_bytes(tmp_path: Path) -> None:
    def jobs(root: str) -> list[tuple]:
        (tmp_path / root / "images" / "test").mkdir(parents=True)
        return [
            (str(tmp_path / root), 9, "test", cid, ("star", "cyan", "dotted"), start, 3, mono)
            for cid, start, mono in ((5, 0, (True,)), (6, 3, ()))
        ]

    _render_all(jobs("one"), workers=1)
    _render_all(jobs("two"), workers=2, min_parallel=0)
    assert len(_digest(tmp_path / "one")) == 6
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


def test_images_show_the_class_colour(small: tuple[Path, dict]) -> None:
    out, meta = small
    # The most saturated pixels of an image are the shape's, and their hue is the class colour's.
    cfg = _cfg(out)
    test = build_split(cfg, "test", None)
    hues = {"red": 0, "yellow": 50, "green": 130, "cyan": 183, "blue": 228, "magenta": 305}
    for path, label in test.samples[::7]:
        arr = np.asarray(Image.open(path).convert("HSV"), dtype=np.float64)
        sat = arr[..., 1]
        top = arr[sat >= np.percentile(sat, 97)]
        hue = np.angle(np.mean(np.exp(1j * top[:, 0] / 255 * 2 * np.pi)), deg=True) % 360
        want = hues[meta["classes"][label]["attributes"]["colour"]]
        assert min(abs(hue - want), 360 - abs(hue - want)) < 25, (path, hue, want)


def _grey(path: str | Path) -> bool:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())


def test_black_and_white_sessions_only_in_training(small: tuple[Path, dict], tmp_path: Path) -> None:
    plain, plain_meta = small
    assert plain_meta["sessions"]["monochrome_prob"] == 0.0
    assert not any(c["train_monochrome"] for c in plain_meta["classes"])
    out = tmp_path / "bw"
    meta = generate_shapes_lt(out, seed=3, monochrome_prob=0.5, **SMALL)
    cfg = _cfg(out)

    train = build_split(cfg, "train", None)
    per_class: dict[int, list[bool]] = {}
    for path, label in train.samples:
        per_class.setdefault(label, []).append(_grey(path))
    # SMALL has n_max 10: every class is one session, in black and white or in colour as a whole.
    assert all(len(set(flags)) == 1 for flags in per_class.values())
    assert {c: sum(f) for c, f in per_class.items()} == {
        c["id"]: c["train_monochrome"] for c in meta["classes"] if c["train_count"]
    }
    assert 0 < sum(f[0] for f in per_class.values()) < len(per_class)
    assert meta["sessions"]["size"] == 25 and meta["format_version"] == 2
    for split in ("val", "test"):
        assert not any(_grey(p) for p, _ in build_split(cfg, split, None).samples)
    # Sessions only turn whole images grey: every other file is the colour benchmark's, byte for byte.
    changed = {k for k, v in _digest(out).items() if _digest(plain).get(k) != v}
    assert changed == {f"images/train/{Path(p).name}" for p, _ in train.samples if _grey(p)} | {"meta.json"}


def test_sessions_follow_the_class_not_n_max() -> None:
    from vlltr.training.benchmarks.shapes import monochrome_sessions

    assert monochrome_sessions(0, 7, 500, 0.5)[:1] == monochrome_sessions(0, 7, 12, 0.5)
    assert len(monochrome_sessions(0, 7, 500, 0.5)) == 20 and len(monochrome_sessions(0, 7, 26, 0.5)) == 2
    assert monochrome_sessions(0, 7, 500, prob=0.0) == [False] * 20


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_benchmark("shapes-lt", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="unknown benchmark 'cifar'"):
        write_benchmark("cifar", tmp_path / "x")


def test_rewrites_an_earlier_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "b"
    generate_shapes_lt(out, seed=5, imbalance=1.0, n_max=1, val_per_class=2, test_per_class=1)
    generate_shapes_lt(out, seed=6, imbalance=1.0, n_max=1, val_per_class=1, test_per_class=1)
    assert json.loads((out / "meta.json").read_text())["seed"] == 6
    # Nothing of the first run is left: every image on disk is listed.
    listed = {
        line.split()[0]
        for name in ("train", "val", "val_heldout", "test")
        for line in (out / f"{name}.txt").read_text().splitlines()
    }
    assert {str(p.relative_to(out)) for p in (out / "images").rglob("*.png")} == listed
    assert len(listed) == 100 + 108 + 108
