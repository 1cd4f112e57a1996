"""Process-group setup and autograd-aware gathers for multi-process training.

Launch with `torchrun --nproc_per_node N` (or `python -m torch.distributed.run`): the environment variables
it sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) select distributed mode; without them the
code runs as a single process and every collective here is the identity.

The stage-1 loss is computed on the GLOBAL batch by every rank: image features, text features and labels are
all-gathered (features with gradients), so each rank holds the same loss. The gather's backward sums the
gradient of every rank's copy of the loss and keeps the local slice; DDP then averages parameter gradients
over ranks, which yields exactly the gradient of the global loss.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA when available; `cuda` without a GPU is an error rather than a silent CPU run."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device is 'cuda' but torch sees no CUDA device")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group described by torchrun's environment, or return a single-process env.

    The backend follows the device: NCCL for CUDA, gloo for CPU. Calling it twice reuses the group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistEnv(device=dev)
    rank = int(os.environ["RANK"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces (sums) the incoming gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        ctx.size = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.size
        return grad[start : start + ctx.size]


def _check_equal_sizes(tensor: torch.Tensor) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device))
    found = [int(s.item()) for s in sizes]
    if len(set(found)) != 1:
        raise RuntimeError(f"all_gather needs the same batch size on every rank, got {found} (use drop_last)")


def all_gather_with_grad(tensor: torch.Tensor, *, check_sizes: bool = False) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping gradients to the local part.

    Every rank must pass the same batch size (training loaders drop the last incomplete batch).
    """
    if not _active():
        return tensor
    if check_sizes:
        _check_equal_sizes(tensor)
    gathered: torch.Tensor = _GatherWithGrad.apply(tensor)  # autograd.Function.apply is typed Any
    return gathered


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, without gradients (labels, indices)."""
    if not _active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: float, device: torch.device | str = "cpu") -> float:
    """Mean of a Python number over ranks (for logging)."""
    if not _active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / dist.get_world_size()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank `src` to every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
