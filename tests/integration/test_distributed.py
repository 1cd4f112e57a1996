"""Two CPU processes (gloo) computing one stage-1 step on halves of a batch give the same loss and the same
(DDP-averaged) gradients as one process on the whole batch.

Run by pytest; the same file is the worker that `python -m torch.distributed.run` starts. The single-process
case is tests/unit/training/test_distributed.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ARCH = "vlltr-tiny-vit"
GLOBAL_BATCH = 8


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    tokens = torch.zeros(GLOBAL_BATCH, 77, dtype=torch.long)
    for i in range(GLOBAL_BATCH):
        n = 4 + i
        tokens[i, 0] = 49406
        tokens[i, 1:n] = torch.randint(1, 40000, (n - 1,), generator=g)
        tokens[i, n] = 49407
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])  # same-class pairs across the two halves
    return images, tokens, labels


def build_model(distill: bool):
    from vlltr.model.networks.factory import create_clip
    from vlltr.training.stage1 import Stage1Model

    torch.manual_seed(0)
    clip = create_clip(ARCH)
    teacher = None
    if distill:
        teacher = Stage1Model.frozen_copy(clip)
        with torch.no_grad():  # a teacher that differs from the student, so distillation has a gradient
            for p in teacher.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return Stage1Model(clip, teacher)


def step(model, images, tokens, labels, distill: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from vlltr.training.runtime import unwrap
    from vlltr.training.stage1 import stage1_losses

    losses = stage1_losses(model, images, tokens, labels, smoothing=0.1, distill_beta=0.5 if distill else 0.0)
    losses["total_loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in unwrap(model).clip.named_parameters() if p.grad is not None}
    return float(losses["total_loss"].detach()), grads


def worker(out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from vlltr.training.distributed import init_distributed, shutdown_distributed

    env = init_distributed("cpu")
    images, tokens, labels = global_batch()
    part = slice(env.rank * GLOBAL_BATCH // env.world_size, (env.rank + 1) * GLOBAL_BATCH // env.world_size)
    for distill in (False, True):
        model = DistributedDataParallel(build_model(distill))
        loss, grads = step(model, images[part], tokens[part], labels[part], distill)
        torch.save(
            {"loss": loss, "grads": grads, "backend": env.backend, "local_batch": part.stop - part.start},
            Path(out_dir) / f"rank{env.rank}-distill{int(distill)}.pt",
        )
    shutdown_distributed()


def test_two_process_step_equals_single_process(tmp_path):
    # The checkout, found without tests/support: torchrun runs this file as a script, where that is not importable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch.set_num_threads(1)
    for distill in (False, True):
        ref_loss, ref_grads = step(build_model(distill), *global_batch(), distill)
        for rank in range(2):
            r = torch.load(tmp_path / f"rank{rank}-distill{int(distill)}.pt", weights_only=True)
            assert r["backend"] == "gloo" and r["local_batch"] == GLOBAL_BATCH // 2
            assert abs(r["loss"] - ref_loss) < 1e-5, (distill, r["loss"], ref_loss)
            assert set(r["grads"]) == set(ref_grads)
            for name, g in ref_grads.items():
                assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-6), (distill, name)


if __name__ == "__main__":
    worker(sys.argv[1])
