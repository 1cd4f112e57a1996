"""What both training stages share: seeding, loaders, optimiser groups, AMP and resumable epoch checkpoints.

Determinism across an interruption: every epoch reseeds Python, numpy and torch from
`(run seed, stage, epoch, rank)` and builds its loader with a generator seeded the same way (worker
augmentation seeds derive from it). An epoch therefore draws the same samples, sentences, augmentations and
mixing decisions whether the run got there directly or by resuming from the previous epoch's checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlltr.training.checkpoint import atomic_torch_save

log = logging.getLogger(__name__)

EpochHook = Callable[[str, int], None]  # (stage name, finished epoch index)
EpochStats = dict[str, float]  # one epoch's numbers (losses, lr, steps, seconds, ...), a row of history.json
# An optimiser parameter group: torch's own format ({"params": [...], "lr": ..., ...}).
ParamGroup = dict[str, Any]
T = TypeVar("T")


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, for checkpoints."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_worker(worker_id: int) -> None:
    # torch seeds itself and `random` in each worker from the loader's generator; numpy needs it done here.
    np.random.seed(torch.initial_seed() % (2**32))


def train_loader(
    dataset: Dataset[T], sampler: Sampler[int], batch_size: int, num_workers: int, seed: int
) -> DataLoader[T]:
    """A training loader over `sampler` that drops the last incomplete batch (equal sizes across ranks)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker,
        generator=generator,
        persistent_workers=False,
    )


def eval_loader(dataset: Dataset[T], batch_size: int, num_workers: int) -> DataLoader[T]:
    """A deterministic, unshuffled loader for feature extraction."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def effective_batch_size(requested: int, per_rank_samples: int, *, even: bool = False) -> int:
    """The requested batch, shrunk (with a warning) when one rank's epoch holds fewer samples."""
    batch = min(requested, per_rank_samples)
    if even and batch % 2:
        batch -= 1
    if batch < 1:
        raise ValueError(f"an epoch has only {per_rank_samples} samples per process: too few to train")
    if batch != requested:
        log.warning(
            "batch size %d shrunk to %d: an epoch has %d samples per process", requested, batch, per_rank_samples
        )
    return batch


def decay_groups(
    named: Iterator[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float, tag: str
) -> list[ParamGroup]:
    """Two AdamW groups: weight decay on matrices, none on 1-D params and biases (as the original)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{tag}"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{tag}_no_decay"})
    return groups


def adamw(groups: list[ParamGroup], lr: float, eps: float) -> torch.optim.AdamW:
    """AdamW with the fused kernel (several times faster than the per-tensor loop on CPU as well)."""
    return torch.optim.AdamW(groups, lr=lr, eps=eps, fused=True)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """fp16 autocast on CUDA when enabled; a no-op on CPU (bf16 autocast is slower than fp32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only with CUDA fp16 autocast."""
    return torch.amp.GradScaler("cuda", enabled=enabled and device.type == "cuda")


def save_epoch_checkpoint(
    path: Path,
    *,
    epoch: int,
    model_state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    history: list[EpochStats],
    extra: dict[str, Any] | None = None,
) -> None:
    """Everything needed to continue after `epoch` finished (atomic write)."""
    atomic_torch_save(
        {
            "epoch": epoch,
            "sampler_epoch": epoch + 1,
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            "history": history,
            "extra": extra or {},
        },
        path,
    )


def load_epoch_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None when there is none yet."""
    if not path.is_file():
        return None
    # RNG states hold numpy/python objects, so this file is not loadable with weights_only.
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return checkpoint


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    if hasattr(model, "module"):
        inner = model.module
        assert isinstance(inner, torch.nn.Module)
        return inner
    return model
