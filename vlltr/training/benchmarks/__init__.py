"""Bundled long-tailed benchmarks written in the same on-disk layout real datasets use
(see `vlltr.training.benchmarks.layout`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict, Unpack

from vlltr.errors import DataError

BENCHMARKS = ("digits-lt", "shapes-lt")
# meta.json's format_version per benchmark; bumped when what a generator writes changes (shapes-lt 2: the
# training sessions in meta.json, optionally black and white), so caches written by an older one are not reused.
FORMAT_VERSIONS = {"digits-lt": 1, "shapes-lt": 2}


class ShapesOptions(TypedDict, total=False):
    """Keyword options of shapes-lt's generator (`generate_shapes_lt`) that `write_benchmark` passes on."""

    n_max: int
    val_per_class: int
    test_per_class: int
    monochrome_prob: float


def write_benchmark(
    name: str,
    out: str | Path,
    *,
    seed: int = 0,
    imbalance: float | None = None,
    names: str | None = None,
    **options: Unpack[ShapesOptions],
) -> dict[str, Any]:
    """Write benchmark `name` (`digits-lt` or `shapes-lt`) to `out` and return its meta.json content.

    `imbalance` (n_max / n_min of the training profile) defaults to 25 for digits-lt and 100 for shapes-lt.
    `names` is the shapes-lt class-name style (`attributes`, the default, or `epithet`); `options` are shapes-lt's
    `n_max`, `val_per_class` and `test_per_class` (smaller values give a quick, same-shaped dataset) and
    `monochrome_prob` (the chance that a training session is black and white).
    """
    if name == "digits-lt":
        from vlltr.training.benchmarks.digits import generate_digits_lt

        if names is not None:
            raise DataError("digits-lt classes are named by their digit; a name style applies to shapes-lt only")
        if options:
            raise DataError(f"digits-lt has no options; {sorted(options)} apply to shapes-lt only")
        return generate_digits_lt(out, seed=seed, imbalance=25.0 if imbalance is None else imbalance)
    if name == "shapes-lt":
        from vlltr.training.benchmarks.shapes import generate_shapes_lt

        return generate_shapes_lt(
            out, seed=seed, imbalance=100.0 if imbalance is None else imbalance, names=names or "attributes", **options
        )
    raise DataError(f"unknown benchmark {name!r}; known: {list(BENCHMARKS)}")


__all__ = ["BENCHMARKS", "FORMAT_VERSIONS", "write_benchmark"]
