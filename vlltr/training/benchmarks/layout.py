"""The on-disk layout shared by the bundled benchmarks (the same layout real datasets use):

```
OUT/classes.txt                 one class name per line (line index = class id)
OUT/train.txt val.txt test.txt  `relpath label` lines, relpath relative to OUT
OUT/images/<split>/<id>_<n>.png
OUT/text/desc_<id>.txt          wiki-like text: summary paragraph, then `== Section ==` blocks
OUT/heldout.txt                 (when a benchmark holds classes out) one class id per line
OUT/meta.json                   generator, seed, counts, shot thresholds, every sentence with its label
```

A benchmark is written into `OUT.partial` and renamed to OUT when complete, so an interrupted run never
leaves a half-written dataset where a finished one is expected.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlltr.errors import DataError

DESCRIPTIVE = "descriptive"
DISTRACTOR = "distractor"


@dataclass(frozen=True)
class Sentence:
    """One sentence of a class description and what it is.

    `kind` is `descriptive` (true of the class's images) or `distractor`; `distractor_kind` says which
    distractor (`trivia`: nothing visual; `other_class`: uses the visual words of `other_class`).
    """

    text: str
    kind: str = DESCRIPTIVE
    distractor_kind: str | None = None
    other_class: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "kind": self.kind,
            "distractor_kind": self.distractor_kind,
            "other_class": self.other_class,
        }


@dataclass
class WikiDoc:
    """A description file: summary paragraphs, then titled sections of paragraphs of sentences.

    `dropped` sections (e.g. References) are written but are removed by the loader's default
    `drop_sections`, so their lines are not part of the sentence list.
    """

    summary: list[list[Sentence]] = field(default_factory=list)
    sections: list[tuple[str, list[list[Sentence]]]] = field(default_factory=list)
    dropped: list[tuple[str, list[str]]] = field(default_factory=list)

    def render(self) -> str:
        lines = [" ".join(s.text for s in para) for para in self.summary]
        for title, paras in self.sections:
            lines += ["", f"== {title} ==", ""]
            lines += [" ".join(s.text for s in para) for para in paras]
        for title, raw in self.dropped:
            lines += ["", f"== {title} ==", ""] + raw
        return "\n".join(lines) + "\n"

    def sentences(self) -> list[Sentence]:
        """The kept sentences in file order (what `split_sentences(parse_wiki_text(...))` must return)."""
        paras = list(self.summary) + [p for _, ps in self.sections for p in ps]
        return [s for para in paras for s in para]


def prepare_out(out: str | Path) -> tuple[Path, Path]:
    """`(final, partial)` directories. An existing OUT must be empty or a benchmark written before (it holds
    `meta.json`); anything else is refused rather than overwritten."""
    final = Path(out)
    if final.exists():
        if not final.is_dir():
            raise DataError(f"output {str(final)!r} exists and is not a directory")
        if any(final.iterdir()) and not (final / "meta.json").is_file():
            raise DataError(
                f"output directory {str(final)!r} is not empty and holds no benchmark; refusing to overwrite"
            )
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    for sub in ("images/train", "images/val", "images/test", "text"):
        (partial / sub).mkdir(parents=True)
    return final, partial


def finish_out(final: Path, partial: Path) -> None:
    """Swap the completed `partial` directory into place."""
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def image_relpath(split: str, class_id: int, n: int) -> str:
    return f"images/{split}/{class_id}_{n}.png"


def save_png(arr: np.ndarray, path: Path) -> None:
    """uint8 `[H, W]` or `[H, W, 3]` as PNG (Pillow writes no timestamp, so equal pixels give equal bytes)."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def write_list(path: Path, entries: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in entries), encoding="utf-8")


def write_lines(path: Path, items: list[Any]) -> None:
    path.write_text("".join(f"{x}\n" for x in items), encoding="utf-8")


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def shot_thresholds(many: int, few: int) -> dict[str, Any]:
    """The shot rule as `DataCfg` reads it: many if n > many_threshold, few if n < few_threshold."""
    return {
        "many_threshold": many,
        "few_threshold": few,
        "rule": "many: train count > many_threshold; few: train count < few_threshold; else medium",
    }


def shot_groups(train_counts: list[int], many: int, few: int) -> dict[str, int]:
    """How many classes fall in each group (classes with no train images are not counted)."""
    trained = [n for n in train_counts if n > 0]
    return {
        "many": sum(n > many for n in trained),
        "medium": sum(few <= n <= many for n in trained),
        "few": sum(n < few for n in trained),
    }


def cifar_lt_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """CIFAR-LT training counts: `int(n_max * (1/imbalance) ** (i / (num_classes - 1)))` for i = 0..C-1."""
    if imbalance < 1:
        raise DataError(f"imbalance must be >= 1 (n_max / n_min), got {imbalance}")
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]
