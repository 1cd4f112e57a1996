"""Class-aware samplers for long-tailed training, deterministic and shardable across processes.

- `sqrt`: each image weighted 1/sqrt(n_c), drawn with replacement, so class c is drawn with probability
  proportional to sqrt(n_c) (VL-LTR's square-root re-sampling, both stages).
- `balanced`: each image weighted 1/n_c, with replacement: every class present is equally likely.
- `instance`: a random permutation, without replacement: classes in proportion to n_c.

One epoch is `num_samples` draws (default: the dataset size) split across `num_replicas` processes: every
rank draws the same global stream from `seed + epoch` and keeps every `num_replicas`-th index starting at its
rank, so the ranks' shares are disjoint and need no communication.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Sampler

from vlltr.errors import DataError

SamplerKind = Literal["sqrt", "balanced", "instance"]
SAMPLER_KINDS: tuple[str, ...] = ("sqrt", "balanced", "instance")


def sampling_weights(kind: str, labels: np.ndarray) -> np.ndarray:
    """Per-image weights (float64, unnormalised) of a with-replacement sampler kind."""
    counts = np.bincount(labels).astype(np.float64)
    per_class = {"sqrt": 1.0 / np.sqrt(np.maximum(counts, 1.0)), "balanced": 1.0 / np.maximum(counts, 1.0)}
    if kind not in per_class:
        raise DataError(f"sampler {kind!r} has no per-image weights; weighted kinds: {sorted(per_class)}")
    weights: np.ndarray = per_class[kind][labels]
    return weights


def class_probabilities(kind: str, counts: np.ndarray) -> np.ndarray:
    """The probability that one draw of sampler `kind` picks each class, given per-class image counts."""
    counts = np.asarray(counts, dtype=np.float64)
    if kind == "sqrt":
        mass = np.sqrt(counts)
    elif kind == "balanced":
        mass = (counts > 0).astype(np.float64)
    elif kind == "instance":
        mass = counts
    else:
        raise DataError(f"unknown sampler {kind!r}; known: {list(SAMPLER_KINDS)}")
    probabilities: np.ndarray = mass / mass.sum()
    return probabilities


class ShardedSampler(Sampler[int]):
    """Shared epoch/rank bookkeeping: subclasses produce the global index stream of one epoch."""

    def __init__(self, dataset_size: int, num_samples: int | None, num_replicas: int, rank: int, seed: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise DataError(f"sampler rank {rank} is not in [0, num_replicas={num_replicas})")
        total = dataset_size if num_samples is None else int(num_samples)
        if total < num_replicas:
            raise DataError(f"sampler needs at least one draw per replica: {total} draws for {num_replicas} replicas")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.per_rank = total // num_replicas
        self.total = self.per_rank * num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream `__iter__` yields (seed + epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def _global_stream(self, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        stream = self._global_stream(self._generator())
        return iter(stream[self.rank : self.total : self.num_replicas].tolist())


class WeightedReplacementSampler(ShardedSampler):
    """Draws image indices with replacement in proportion to per-image weights."""

    def __init__(
        self,
        weights: np.ndarray,
        *,
        num_samples: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(len(weights), num_samples, num_replicas, rank, seed)
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))

    def _global_stream(self, gen: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.weights, self.total, replacement=True, generator=gen)


class PermutationSampler(ShardedSampler):
    """Random permutations of the dataset, concatenated when an epoch asks for more draws than images."""

    def _global_stream(self, gen: torch.Generator) -> torch.Tensor:
        rounds = -(-self.total // self.dataset_size)
        return torch.cat([torch.randperm(self.dataset_size, generator=gen) for _ in range(rounds)])[: self.total]


def make_sampler(
    kind: str,
    labels: np.ndarray,
    *,
    num_samples: int | None = None,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
) -> ShardedSampler:
    """A sampler over a dataset with these `labels` (see the module docstring).

    Args:
        kind: `sqrt`, `balanced` or `instance`.
        labels: the dataset's integer labels, one per image.
        num_samples: draws per epoch over all replicas (default: number of images); each rank yields
            `num_samples // num_replicas`.
        num_replicas, rank: data-parallel world size and this process's rank.
        seed: base seed; epoch e draws from `seed + e` (call `set_epoch`).

    Raises:
        DataError: unknown kind, empty or negative labels, bad rank.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise DataError(f"sampler needs a non-empty 1-d label array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError("sampler labels must be non-negative integers")
    if kind == "instance":
        return PermutationSampler(labels.size, num_samples, num_replicas, rank, seed)
    if kind in ("sqrt", "balanced"):
        return WeightedReplacementSampler(
            sampling_weights(kind, labels), num_samples=num_samples, num_replicas=num_replicas, rank=rank, seed=seed
        )
    raise DataError(f"unknown sampler {kind!r}; known: {list(SAMPLER_KINDS)}")
