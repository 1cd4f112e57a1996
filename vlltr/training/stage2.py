"""Stage 2, LGR: the language-guided head on the stage-1 image tower.

The model is `VLLTRClassifier(stage-1 CLIP, LGRHead(anchors from AnSS, frozen stage-1 scale))`. Trainable:
the MLP branch (lr), the attention's LN_q, LN_k, W_q, W_k (attn_lr, 1e-6 in the paper) and, when
`train_backbone`, the image tower (backbone_lr). The backbone always runs in eval mode (BatchNorm frozen);
with a frozen backbone it still runs every step, because every step sees new augmentations.
Loss: `SoftTargetCE(z_vis, y) + SoftTargetCE(z_lin, y)`, y mixed by mixup/cutmix and smoothed (published), or
the logit-adjusted variant. Cosine lr without warmup by default; the final epoch is the result (no
best-epoch picking, as the original).

Files in RUN/stage2/: `checkpoint.pt` (trainable state after every epoch), `history.json`, `done.json`;
the final model goes to RUN/model.pt through `vlltr.training.checkpoint.save_final_model`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlltr.model.networks.classifier import VLLTRClassifier
from vlltr.model.networks.head import LGRHead
from vlltr.training.calibration import log_prior_from_counts
from vlltr.training.checkpoint import atomic_write_json, save_final_model
from vlltr.training.config import Config
from vlltr.training.data.samplers import ShardedSampler, make_sampler
from vlltr.training.distributed import DistEnv, all_reduce_mean, barrier
from vlltr.training.inputs import PreparedInputs
from vlltr.training.losses import stage2_loss
from vlltr.training.mixing import Mixer
from vlltr.training.runtime import (
    EpochHook,
    EpochStats,
    adamw,
    autocast,
    decay_groups,
    derive_seed,
    effective_batch_size,
    grad_scaler,
    load_epoch_checkpoint,
    save_epoch_checkpoint,
    seed_everything,
    set_rng_state,
    train_loader,
    unwrap,
)
from vlltr.training.schedule import CosineSchedule
from vlltr.training.stage1 import Stage1Result

log = logging.getLogger(__name__)


def build_classifier(cfg: Config, stage1: Stage1Result, anchors: torch.Tensor, mask: torch.Tensor) -> VLLTRClassifier:
    """Stage-1 CLIP + LGR head over the anchors, with `s = exp(stage-1 logit_scale)` frozen.

    The MLP's random init is drawn from `run.seed` alone, so a resumed run builds the same head.
    """
    seed_everything(derive_seed(cfg.run.seed, "stage2-init"))
    head = LGRHead(
        anchors,
        mask,
        float(np.exp(stage1.logit_scale)),
        v_detach=cfg.stage2.v_detach,
        trainable_anchors=cfg.stage2.anchor_lr > 0,
    )
    return VLLTRClassifier(stage1.clip, head, train_backbone=cfg.stage2.train_backbone)


def stage2_optimizer(classifier: VLLTRClassifier, cfg: Config) -> torch.optim.AdamW:
    """AdamW groups: MLP at `lr`, attention at `attn_lr`, the anchors at `anchor_lr` when they train (no weight
    decay: the language branch is a cosine, so their length carries nothing), image tower at `backbone_lr` when
    it trains."""
    s2, head = cfg.stage2, classifier.head
    attention = [
        (f"{m}.{n}", p) for m in ("ln_q", "ln_k", "w_q", "w_k") for n, p in getattr(head, m).named_parameters()
    ]
    groups = decay_groups(head.mlp.named_parameters(), s2.lr, s2.weight_decay, "mlp")
    groups += decay_groups(iter(attention), s2.attn_lr, s2.weight_decay, "attention")
    if s2.anchor_lr > 0:
        groups.append({"params": [head.anchors], "lr": s2.anchor_lr, "weight_decay": 0.0, "name": "anchors"})
    if s2.train_backbone:
        groups += decay_groups(classifier.clip.visual.named_parameters(), s2.backbone_lr, s2.weight_decay, "backbone")
    return adamw(groups, s2.lr, s2.eps)


def trainable_state(classifier: VLLTRClassifier) -> dict[str, dict[str, Any]]:
    """What stage 2 changes: the head, plus the image tower when it trains."""
    state = {"head": classifier.head.state_dict()}
    if classifier.train_backbone:
        state["visual"] = classifier.clip.visual.state_dict()
    return state


def load_trainable_state(classifier: VLLTRClassifier, state: dict[str, dict[str, Any]]) -> None:
    classifier.head.load_state_dict(state["head"])
    if "visual" in state:
        classifier.clip.visual.load_state_dict(state["visual"])


def _train_epoch(
    net: torch.nn.Module,
    loader: DataLoader[tuple[Any, int]],
    mixer: Mixer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: CosineSchedule,
    log_prior: torch.Tensor,
    epoch: int,
    cfg: Config,
    env: DistEnv,
) -> EpochStats:
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "stage2-mix", epoch, env.rank))
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, desc=f"stage 2 epoch {epoch + 1}/{cfg.stage2.epochs}", disable=not env.is_main, leave=False)
    for step, (images, labels) in enumerate(bar):
        schedule.step(epoch, step)
        images = images.to(env.device, non_blocking=True)
        images, target = mixer(images, torch.as_tensor(labels).long().to(env.device), rng)
        with autocast(env.device, cfg.stage2.amp):
            z_vis, z_lin = net(images)
        losses = stage2_loss(
            z_vis.float(),
            z_lin.float(),
            target,
            kind=cfg.stage2.loss,
            log_prior=log_prior,
            tau=cfg.stage2.la_tau,
            language_weight=cfg.stage2.language_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total_loss"]).backward()  # type: ignore[no-untyped-call]  # torch: unannotated
        scaler.step(optimizer)
        scaler.update()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        steps += 1
        bar.set_postfix(loss=f"{sums['total_loss'] / steps:.3f}")
    stats = {k: all_reduce_mean(v / max(1, steps), env.device) for k, v in sums.items()}
    stats.update(steps=steps, lr=optimizer.param_groups[0]["lr"])
    return stats


def _setup(
    cfg: Config, inputs: PreparedInputs, classifier: VLLTRClassifier, env: DistEnv
) -> tuple[torch.optim.AdamW, torch.amp.GradScaler, ShardedSampler, Mixer, int, CosineSchedule]:
    s2 = cfg.stage2
    optimizer = stage2_optimizer(classifier, cfg)
    scaler = grad_scaler(env.device, s2.amp)
    sampler = make_sampler(
        s2.sampler,
        inputs.train.labels,
        num_replicas=env.world_size,
        rank=env.rank,
        seed=derive_seed(cfg.run.seed, "stage2-sampler"),
    )
    mixer = Mixer(
        inputs.num_classes,
        mixup_alpha=s2.mixup,
        cutmix_alpha=s2.cutmix,
        switch_prob=s2.mix_switch_prob,
        prob=s2.mix_prob,
        smoothing=s2.smoothing,
    )
    batch = effective_batch_size(s2.batch_size, len(sampler), even=mixer.active)
    schedule = CosineSchedule(
        optimizer,
        s2.epochs,
        warmup_epochs=s2.warmup_epochs,
        warmup_lr=s2.warmup_lr,
        min_lr=s2.min_lr,
        steps_per_epoch=len(sampler) // batch,
        unit=s2.lr_unit,
    )
    return optimizer, scaler, sampler, mixer, batch, schedule


def _resume(
    path: Path, classifier: VLLTRClassifier, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[int, list[EpochStats]]:
    state = load_epoch_checkpoint(path)
    if state is None:
        return 0, []
    load_trainable_state(classifier, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    log.info("stage 2: resuming after epoch %d from %s", state["epoch"] + 1, path)
    return state["epoch"] + 1, state["history"]


def train_stage2(
    cfg: Config,
    inputs: PreparedInputs,
    classifier: VLLTRClassifier,
    run_dir: Path,
    env: DistEnv,
    hook: EpochHook | None = None,
) -> None:
    """Train (or resume) the head; writes RUN/model.pt and RUN/stage2/done.json at the end."""
    out_dir = run_dir / "stage2"
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier.to(env.device)
    optimizer, scaler, sampler, mixer, batch, schedule = _setup(cfg, inputs, classifier, env)
    start, history = _resume(out_dir / "checkpoint.pt", classifier, optimizer, scaler)
    net = (
        DistributedDataParallel(classifier, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.is_distributed
        else classifier
    )
    log_prior = log_prior_from_counts(inputs.train_counts).to(env.device)
    for epoch in range(start, cfg.stage2.epochs):
        seed_everything(derive_seed(cfg.run.seed, "stage2", epoch, env.rank))
        sampler.set_epoch(epoch)
        loader = train_loader(
            inputs.train,
            sampler,
            batch,
            cfg.data.num_workers,
            derive_seed(cfg.run.seed, "stage2-loader", epoch, env.rank),
        )
        net.train()
        t0 = time.time()
        stats = _train_epoch(net, loader, mixer, optimizer, scaler, schedule, log_prior, epoch, cfg, env)
        stats.update(epoch=epoch + 1, seconds=round(time.time() - t0, 2))
        history.append(stats)
        log.info(
            "stage 2 epoch %d/%d: %s",
            epoch + 1,
            cfg.stage2.epochs,
            ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()),
        )
        if env.is_main and ((epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.stage2.epochs):
            save_epoch_checkpoint(
                out_dir / "checkpoint.pt",
                epoch=epoch,
                model_state=trainable_state(classifier),
                optimizer=optimizer,
                scaler=scaler,
                history=history,
            )
        barrier()
        if hook is not None:
            hook("stage2", epoch)
    unwrap(net).eval()
    if env.is_main:
        save_final_model(run_dir, classifier, cfg.model.arch, cfg.stage2.alpha)
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        atomic_write_json({"epochs": cfg.stage2.epochs, "final": history[-1] if history else {}}, out_dir / "done.json")
    barrier()
