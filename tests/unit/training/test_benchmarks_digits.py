"""Digits-LT: the long-tailed profile over scikit-learn's digits, layout, text and determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from vlltr.training.benchmarks import write_benchmark
from vlltr.training.benchmarks.digits import digit_png
from vlltr.training.config import DataCfg
from vlltr.training.data.classes import load_class_names, load_heldout
from vlltr.training.data.datasets import build_split
from vlltr.training.data.text import load_class_texts, parse_wiki_text, split_sentences


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits") / "digits-lt"
    return out, write_benchmark("digits-lt", out, seed=0)


def test_profile_and_splits(digits: tuple[Path, dict]) -> None:
    out, meta = digits
    cfg = DataCfg(root=str(out), templates="simple")
    assert load_class_names(cfg) == [f"digit {w}" for w in "zero one two three four five six seven eight nine".split()]
    assert load_heldout(cfg) == []
    train = build_split(cfg, "train", None)
    counts = train.class_counts().tolist()
    assert sorted(counts, reverse=True) == [100, 69, 48, 34, 23, 16, 11, 8, 5, 4]
    assert counts == meta["train_counts"]
    assert [counts[c] for c in np.argsort([c["rank"] for c in meta["classes"]])] == sorted(counts, reverse=True)
    assert counts != sorted(counts, reverse=True)  # the rank order is shuffled, not digit order
    assert build_split(cfg, "val", None).class_counts().tolist() == [20] * 10
    assert build_split(cfg, "test", None).class_counts().tolist() == [50] * 10
    assert meta["shot_groups"] == {"many": 3, "medium": 3, "few": 4}
    assert meta["shot_thresholds"]["many_threshold"] == 40 and meta["shot_thresholds"]["few_threshold"] == 15
    assert meta["shortfall"] == {}
    # No image is used twice across splits.
    paths = [p for s in ("train", "val", "test") for p, _ in build_split(cfg, s, None).samples]
    assert len(paths) == len(set(paths)) == 318 + 200 + 500


def test_images(digits: tuple[Path, dict]) -> None:
    out, _ = digits
    train = build_split(DataCfg(root=str(out)), "train", None)
    img, _ = train[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    raw = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(train.samples[0][0]))
    assert raw.shape == (32, 32) and raw.dtype == np.uint8 and raw.max() > 200
    flat = digit_png(np.full((8, 8), 16.0))
    assert flat.shape == (32, 32) and flat.min() == 255


def test_text(digits: tuple[Path, dict]) -> None:
    out, meta = digits
    drop = DataCfg().drop_sections
    for c in meta["classes"]:
        text = (out / "text" / f"desc_{c['id']}.txt").read_text(encoding="utf-8")
        sentences = split_sentences(parse_wiki_text(text, drop))
        assert sentences == [s["text"] for s in c["sentences"]]
        kinds = [s["distractor_kind"] or s["kind"] for s in c["sentences"]]
        assert 6 <= kinds.count("descriptive") <= 10
        assert 2 <= kinds.count("trivia") + kinds.count("other_class") <= 3
        assert kinds.count("trivia") >= 1 and kinds.count("other_class") == 1
    pools = load_class_texts(
        DataCfg(root=str(out), templates="simple"), [c["name"] for c in meta["classes"]], list(range(10))
    )
    assert pools[3][0] == "itap of a digit three."


def test_deterministic(digits: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = digits
    write_benchmark("digits-lt", tmp_path / "again", seed=0)

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }

    assert digest(tmp_path / "again") == digest(out)
