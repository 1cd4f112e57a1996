"""Shapes-LT: procedural shapes (shape x colour x pattern = 108 classes), long-tailed like CIFAR-100-LT.

- Classes: every combination of 6 shapes, 6 colours and 3 fill patterns, in a seeded order. The first 100
  are trained, the last 8 are held out (listed in `heldout.txt`): they have test images and a description
  but no training images, to be added later from text alone. Each held-out attribute occurs in trained
  classes, and every attribute value occurs among the many-shot classes, so tail and held-out words are
  learned from the head.
- Training counts exactly as CIFAR-100-LT: n_i = int(n_max * (1/IR) ** (i / (C - 1))) for trained class
  i = 0..C-1 (class 0 most frequent); n_max 500 and IR 100 give 10,847 images.
- Val: 20 per trained class (`val.txt`); the held-out classes' 20 each go to `val_heldout.txt`, so the
  calibration split never contains them. Test: 100 per class, held-out classes included.
- Photo sessions (optional, `monochrome_prob`, default 0: all in colour): a class's training images come in
  sessions (shoots) of :data:`SESSION_SIZE`, and each session is in black and white with that probability (old
  plates, night cameras). A few-shot class (under 20 images) is a single session, so at 1/3 about a third of
  the tail is only ever seen in training without its colour, which its descriptions still name; a many-shot
  class has many sessions, most in colour. Val and test are always in colour. This makes the descriptions say
  something the few images cannot show, as they do for real rare classes.
- Images: 64x64 RGB PNGs (see `render_shapes`), each drawn from its own seed (seed, split, class, index),
  so the output is identical whatever the number of worker processes.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from vlltr.errors import DataError
from vlltr.training.benchmarks import FORMAT_VERSIONS
from vlltr.training.benchmarks.layout import (
    cifar_lt_counts,
    finish_out,
    image_relpath,
    prepare_out,
    save_png,
    shot_groups,
    shot_thresholds,
    write_lines,
    write_list,
    write_meta,
)
from vlltr.training.benchmarks.render_shapes import COLOURS, PATTERNS, SHAPES, render
from vlltr.training.benchmarks.shapes_text import class_names, shapes_document

log = logging.getLogger(__name__)

NUM_HELDOUT = 8
# The class order puts every attribute value among the first HEAD_CLASSES classes (all many-shot at IR 100),
# independent of n_max and IR so that one seed names the same classes at every size.
HEAD_CLASSES = 30
IMAGE_SIZE = 64
MANY_THRESHOLD, FEW_THRESHOLD = 100, 20  # OLTR's rule, as used for CIFAR-100-LT (35/35/30 classes at IR 100)
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
SESSION_SIZE = 25
_PARALLEL_MIN_IMAGES = 2000  # below this, worker start-up costs more than it saves


def class_order(seed: int, n_head: int = HEAD_CLASSES) -> list[tuple[str, str, str]]:
    """All attribute combinations in a seeded order whose first `n_head` classes use every attribute value
    and whose last :data:`NUM_HELDOUT` classes only use values that also occur in trained classes."""
    combos = list(itertools.product(SHAPES, COLOURS, PATTERNS))
    rng = np.random.default_rng([seed, 1])
    for _ in range(1000):
        order = [combos[i] for i in rng.permutation(len(combos))]
        head, trained = order[:n_head], order[:-NUM_HELDOUT]
        if all(
            {c[k] for c in head} == set(values) and {c[k] for c in trained} == set(values)
            for k, values in enumerate((SHAPES, tuple(COLOURS), PATTERNS))
        ):
            return order
    raise DataError(f"no class order puts every attribute among the first {n_head} classes")


def monochrome_sessions(seed: int, cid: int, count: int, prob: float) -> list[bool]:
    """Whether each of class `cid`'s `count` training sessions (of :data:`SESSION_SIZE` images) is black and
    white; drawn per class from the seed, so a class keeps its sessions at every n_max."""
    sessions = -(-count // SESSION_SIZE)
    draws = np.random.default_rng([seed, 5, cid]).random(sessions)
    return [bool(d < prob) for d in draws]


def _in_monochrome_session(sessions: tuple[bool, ...], n: int) -> bool:
    """Whether a class's training image `n` falls in one of its black-and-white sessions (`sessions`: the class's
    `monochrome_sessions`, empty for val, test and colour-only data)."""
    return bool(sessions) and sessions[n // SESSION_SIZE]


def _render_chunk(job: tuple[str, int, str, int, tuple[str, str, str], int, int, tuple[bool, ...]]) -> None:
    out, seed, split, cid, (shape, colour, pattern), start, count, mono = job
    for n in range(start, start + count):
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], cid, n])
        image = render(shape, colour, pattern, rng, IMAGE_SIZE, monochrome=_in_monochrome_session(mono, n))
        save_png(image, Path(out) / image_relpath(split, cid, n))


def _render_all(jobs: list[tuple[Any, ...]], workers: int, min_parallel: int = _PARALLEL_MIN_IMAGES) -> None:
    total = sum(j[6] for j in jobs)
    if workers <= 1 or total < min_parallel:
        for job in jobs:
            _render_chunk(job)
        return
    # spawn: the caller may have started threads (torch), which fork does not copy safely.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for _ in pool.map(_render_chunk, jobs, chunksize=4):
            pass


def generate_shapes_lt(
    out: str | Path,
    *,
    seed: int = 0,
    imbalance: float = 100.0,
    n_max: int = 500,
    val_per_class: int = 20,
    test_per_class: int = 100,
    workers: int | None = None,
    names: str = "attributes",
    monochrome_prob: float = 0.0,
) -> dict[str, Any]:
    """Write Shapes-LT to `out` (layout in `vlltr.training.benchmarks.layout`) and return its meta.json content.

    Args:
        out: output directory (created; an existing one must be empty or hold an earlier benchmark).
        seed: everything drawn (class order, images, text) derives from it; same seed, same bytes.
        imbalance: IR = n_max / n_min of the training profile.
        n_max, val_per_class, test_per_class: sizes (smaller values give a quick, same-shaped dataset).
        workers: processes for drawing images (default: CPU count).
        names: `attributes` ("striped red triangle": the name says everything the descriptions say) or
            `epithet` ("velmor triangle": the colour and pattern are only in the descriptions, as with many
            rare classes' names); see `vlltr.training.benchmarks.shapes_text.class_names`.
        monochrome_prob: chance that a training session is black and white (0: every image in colour).
    """
    if not 0.0 <= monochrome_prob <= 1.0:
        raise DataError(f"monochrome_prob must be in [0, 1], got {monochrome_prob}")
    started = time.perf_counter()
    combos_total = len(SHAPES) * len(COLOURS) * len(PATTERNS)
    num_trained = combos_total - NUM_HELDOUT
    train_counts = cifar_lt_counts(num_trained, n_max, imbalance) + [0] * NUM_HELDOUT
    classes = class_order(seed, HEAD_CLASSES)
    trained = list(range(num_trained))
    heldout = list(range(num_trained, combos_total))
    class_labels = class_names(classes, seed, names)

    final, partial = prepare_out(out)
    lists: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "val_heldout": [], "test": []}
    jobs: list[tuple[Any, ...]] = []
    mono = {cid: tuple(monochrome_sessions(seed, cid, train_counts[cid], monochrome_prob)) for cid in trained}
    for cid in range(combos_total):
        plan = [
            ("train", "train", train_counts[cid]),
            ("val", "val" if cid in trained else "val_heldout", val_per_class),
            ("test", "test", test_per_class),
        ]
        for split, list_name, count in plan:
            lists[list_name] += [(image_relpath(split, cid, n), cid) for n in range(count)]
            for start in range(0, count, 50):
                jobs.append(
                    (
                        str(partial),
                        seed,
                        split,
                        cid,
                        classes[cid],
                        start,
                        min(50, count - start),
                        mono.get(cid, ()) if split == "train" else (),
                    )
                )
    _render_all(jobs, workers if workers is not None else (os.cpu_count() or 1))

    for list_name, entries in lists.items():
        write_list(partial / f"{list_name}.txt", entries)
    write_lines(partial / "classes.txt", class_labels)
    write_lines(partial / "heldout.txt", heldout)
    class_meta = []
    for cid in range(combos_total):
        doc = shapes_document(cid, classes, seed, class_labels)
        (partial / "text" / f"desc_{cid}.txt").write_text(doc.render(), encoding="utf-8")
        shape, colour, pattern = classes[cid]
        class_meta.append(
            {
                "id": cid,
                "name": class_labels[cid],
                "attributes": {"shape": shape, "colour": colour, "pattern": pattern},
                "heldout": cid in heldout,
                "train_count": train_counts[cid],
                "train_monochrome": sum(_in_monochrome_session(mono.get(cid, ()), n) for n in range(train_counts[cid])),
                "val_count": val_per_class,
                "test_count": test_per_class,
                "sentences": [s.to_dict() for s in doc.sentences()],
                "dropped_sections": [title for title, _ in doc.dropped],
            }
        )
    meta = {
        "generator": "shapes-lt",
        "format_version": FORMAT_VERSIONS["shapes-lt"],
        "seed": seed,
        "imbalance": imbalance,
        "n_max": n_max,
        "name_style": names,
        "image_size": IMAGE_SIZE,
        "sessions": {"size": SESSION_SIZE, "monochrome_prob": monochrome_prob},
        "num_classes": combos_total,
        "trained_classes": trained,
        "heldout_classes": heldout,
        "train_counts": train_counts,
        "splits": {k: len(v) for k, v in lists.items()},
        "shot_thresholds": shot_thresholds(MANY_THRESHOLD, FEW_THRESHOLD),
        "shot_groups": shot_groups(train_counts, MANY_THRESHOLD, FEW_THRESHOLD),
        "notes": (
            "val.txt holds trained classes only; val_heldout.txt holds the held-out classes' val images "
            "(never use them to calibrate a model that is evaluated on held-out classes as unseen). "
            "Training images come in sessions of sessions.size; a session is black and white with "
            "probability sessions.monochrome_prob (train_monochrome counts a class's such images); val "
            "and test are in colour. "
            "Sentence lists exclude the dropped sections (See also, References)."
        ),
        "classes": class_meta,
    }
    write_meta(partial / "meta.json", meta)
    finish_out(final, partial)
    log.info("shapes-lt written to %s in %.1f s: %s", final, time.perf_counter() - started, meta["splits"])
    return meta
