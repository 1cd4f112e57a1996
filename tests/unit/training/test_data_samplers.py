"""Samplers: class frequencies match the theory, streams are deterministic, ranks are disjoint."""

from __future__ import annotations

import numpy as np
import pytest

from vlltr.training.data.errors import DataError
from vlltr.training.data.samplers import class_probabilities, make_sampler

COUNTS = np.array([400, 100, 25, 4, 1])
LABELS = np.repeat(np.arange(COUNTS.size), COUNTS)


def _class_freq(indices: list[int]) -> np.ndarray:
    return np.bincount(LABELS[np.asarray(indices)], minlength=COUNTS.size) / len(indices)


@pytest.mark.parametrize(
    ("kind", "mass"),
    [("sqrt", np.sqrt(COUNTS)), ("balanced", np.ones(COUNTS.size)), ("instance", COUNTS.astype(float))],
)
def test_class_frequencies_match_theory(kind: str, mass: np.ndarray) -> None:
    expected = mass / mass.sum()
    np.testing.assert_allclose(class_probabilities(kind, COUNTS), expected)
    draws = 60_000
    sampler = make_sampler(kind, LABELS, num_samples=draws, seed=3)
    indices = list(sampler)
    assert len(indices) == len(sampler) == draws
    freq = _class_freq(indices)
    # 5 standard errors of a binomial proportion: fails only on a real bias.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) <= tolerance), (freq, expected)


def test_sqrt_head_to_tail_ratio() -> None:
    indices = list(make_sampler("sqrt", LABELS, num_samples=50_000, seed=0))
    freq = _class_freq(indices)
    # Class 0 has 400x the images of class 4, so sqrt sampling draws it about 20x as often.
    assert 16 < freq[0] / freq[4] < 25


def test_default_epoch_length_and_instance_is_a_permutation() -> None:
    sampler = make_sampler("instance", LABELS, seed=1)
    indices = list(sampler)
    assert sorted(indices) == list(range(LABELS.size))
    assert len(list(make_sampler("sqrt", LABELS))) == LABELS.size


@pytest.mark.parametrize("kind", ["sqrt", "balanced", "instance"])
def test_deterministic_and_epoch_dependent(kind: str) -> None:
    a, b = make_sampler(kind, LABELS, seed=7), make_sampler(kind, LABELS, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(make_sampler(kind, LABELS, seed=8)) != first


@pytest.mark.parametrize("kind", ["sqrt", "instance"])
def test_replicas_split_one_stream(kind: str) -> None:
    total = LABELS.size  # 530: 176 per rank, 2 draws dropped
    single = list(make_sampler(kind, LABELS, num_samples=3 * (total // 3), seed=5))
    shards = [make_sampler(kind, LABELS, num_replicas=3, rank=r, seed=5) for r in range(3)]
    for s in shards:
        s.set_epoch(0)
    streams = [list(s) for s in shards]
    assert all(len(s) == total // 3 for s in streams)
    # Interleaving the ranks' shares gives back the single-process stream (so the shares are disjoint slots).
    merged = [streams[i % 3][i // 3] for i in range(3 * (total // 3))]
    assert merged == single
    if kind == "instance":
        flat = sum(streams, [])
        assert len(set(flat)) == len(flat)


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown sampler 'cb'"):
        make_sampler("cb", LABELS)
    with pytest.raises(DataError, match="rank 3"):
        make_sampler("sqrt", LABELS, num_replicas=2, rank=3)
    with pytest.raises(DataError, match="non-empty"):
        make_sampler("sqrt", np.array([], dtype=np.int64))
    with pytest.raises(DataError, match="non-negative"):
        make_sampler("sqrt", np.array([0, -1]))
