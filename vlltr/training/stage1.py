"""Stage 1, CVLP: fine-tune both CLIP towers with the class-wise contrastive loss (+ logit distillation).

Per step: images come from the square-root sampler; each image gets one sentence drawn uniformly from its
class pool; image and text features (and labels) are gathered over all processes and every process computes
the loss of the global batch. The logit scale is learnable and never clamped. After the last epoch the raw
text features of every sentence (`txt_embed`) and the learned logit scale are cached for AnSS and stage 2.

Files in RUN/stage1/: `checkpoint.pt` (after every epoch), `clip.pt` (final CLIP weights),
`text_features.pt` ({"features" [N, D] raw, "logit_scale" (log value), "scale" (exp)}), `history.json`,
`done.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlltr.model.networks.factory import create_clip
from vlltr.model.networks.stage1 import CVLP
from vlltr.training.checkpoint import atomic_torch_save, atomic_write_json
from vlltr.training.config import Config
from vlltr.training.data.samplers import ShardedSampler, make_sampler
from vlltr.training.distributed import DistEnv, all_gather_tensor, all_gather_with_grad, all_reduce_mean, barrier
from vlltr.training.features import encode_images, encode_text, encode_token_table
from vlltr.training.inputs import PreparedInputs
from vlltr.training.losses import contrastive_logits, stage1_loss
from vlltr.training.runtime import (
    EpochHook,
    EpochStats,
    adamw,
    autocast,
    decay_groups,
    derive_seed,
    effective_batch_size,
    eval_loader,
    grad_scaler,
    load_epoch_checkpoint,
    save_epoch_checkpoint,
    seed_everything,
    set_rng_state,
    train_loader,
    unwrap,
)
from vlltr.training.schedule import CosineSchedule

log = logging.getLogger(__name__)


class Stage1Model(CVLP):
    """CVLP whose text tower runs on token rows trimmed to the batch's longest sentence (exact, faster)."""

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "image_features": F.normalize(self.clip.encode_image(images), dim=-1),
            "text_features": F.normalize(encode_text(self.clip, tokens), dim=-1),
            "logit_scale": self.clip.logit_scale.exp(),
        }
        if self.teacher is not None:
            with torch.no_grad():
                out["teacher_image_features"] = F.normalize(self.teacher.encode_image(images), dim=-1)
                out["teacher_text_features"] = F.normalize(encode_text(self.teacher, tokens), dim=-1)
                out["teacher_logit_scale"] = self.teacher.logit_scale.exp()
        return out


@dataclass
class Stage1Result:
    """The fine-tuned CLIP, raw features of every sentence and the learned scale (log value)."""

    clip: open_clip.CLIP
    text_features: torch.Tensor
    logit_scale: float


def build_clip(cfg: Config, device: torch.device) -> open_clip.CLIP:
    """The initial CLIP: `model.pretrained` weights, or a random init drawn from `run.seed`."""
    seed_everything(derive_seed(cfg.run.seed, "init"))
    return create_clip(cfg.model.arch, cfg.model.pretrained, quick_gelu=cfg.model.quick_gelu, device=device)


def build_stage1_model(cfg: Config, clip: open_clip.CLIP) -> Stage1Model:
    """Student = `clip`; teacher = a frozen copy of it when distillation is on (beta > 0)."""
    teacher = None
    if cfg.stage1.distill_beta > 0:
        if not cfg.model.pretrained:
            log.warning(
                "distillation from a randomly initialised teacher teaches nothing useful; set "
                "model.pretrained or stage1.distill_beta=0"
            )
        teacher = CVLP.frozen_copy(clip)
    return Stage1Model(clip, teacher, bn_train_mode=cfg.stage1.bn_train_mode)


def split_towers(
    clip: torch.nn.Module,
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    """(image side, text side) named parameters of a CLIP; the logit scale counts as image side."""
    image: list[tuple[str, torch.nn.Parameter]] = []
    text: list[tuple[str, torch.nn.Parameter]] = []
    for name, p in clip.named_parameters():
        (image if name.startswith("visual.") or name == "logit_scale" else text).append((name, p))
    return image, text


def stage1_optimizer(model: Stage1Model, cfg: Config) -> torch.optim.AdamW:
    """AdamW over the student; no decay on 1-D params.

    With `stage1.text_lr_scale` = 1 (the original, whose text_lr = 0 means "shared") one lr trains both towers and
    the logit scale. Another value puts the text tower in its own groups at `lr * text_lr_scale`; 0 freezes it.
    """
    scale = cfg.stage1.text_lr_scale
    if not scale >= 0.0:
        raise ValueError(f"stage1.text_lr_scale must be >= 0 (0 freezes the text tower), got {scale}")
    if scale == 1.0:
        # Kept as the two "clip" groups it always was, so optimizer states saved by earlier runs still resume.
        groups = decay_groups(model.clip.named_parameters(), cfg.stage1.lr, cfg.stage1.weight_decay, "clip")
        return adamw(groups, cfg.stage1.lr, cfg.stage1.eps)
    image_side, text_side = split_towers(model.clip)
    if scale == 0.0:
        for _, p in text_side:
            p.requires_grad_(False)
    groups = decay_groups(iter(image_side), cfg.stage1.lr, cfg.stage1.weight_decay, "image")
    groups += decay_groups(iter(text_side), cfg.stage1.lr * scale, cfg.stage1.weight_decay, "text")
    return adamw(groups, cfg.stage1.lr, cfg.stage1.eps)


def sample_sentences(labels: torch.Tensor, offsets: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """For each label, a sentence index drawn uniformly from that class's pool."""
    offsets_t = torch.as_tensor(offsets, dtype=torch.long)
    start, count = offsets_t[labels], offsets_t[labels + 1] - offsets_t[labels]
    return start + (torch.rand(labels.shape, generator=generator) * count).long().clamp_max(count - 1)


def stage1_losses(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float,
    distill_beta: float,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """Forward one local batch, gather features and labels over processes, return the global loss parts."""
    with autocast(images.device, amp):
        out = model(images, tokens)
    img = all_gather_with_grad(out["image_features"])
    txt = all_gather_with_grad(out["text_features"])
    y = all_gather_tensor(labels)
    logits = contrastive_logits(img, txt, out["logit_scale"])
    teacher = None
    if distill_beta > 0 and "teacher_image_features" in out:
        teacher = contrastive_logits(
            all_gather_tensor(out["teacher_image_features"]),
            all_gather_tensor(out["teacher_text_features"]),
            out["teacher_logit_scale"],
        )
    return stage1_loss(logits, y, smoothing=smoothing, distill_beta=distill_beta, teacher_logits=teacher)


def _train_epoch(
    model: torch.nn.Module,
    loader: DataLoader[tuple[Any, int]],
    tokens: torch.Tensor,
    offsets: np.ndarray,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: CosineSchedule,
    epoch: int,
    cfg: Config,
    env: DistEnv,
) -> EpochStats:
    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "stage1-sentences", epoch, env.rank))
    student = unwrap(model)
    assert isinstance(student, Stage1Model)
    sums: dict[str, float] = {}
    steps = 0
    bar = tqdm(loader, desc=f"stage 1 epoch {epoch + 1}/{cfg.stage1.epochs}", disable=not env.is_main, leave=False)
    for step, (images, labels) in enumerate(bar):
        schedule.step(epoch, step)
        labels = torch.as_tensor(labels).long()
        sent = tokens[sample_sentences(labels, offsets, gen)]
        losses = stage1_losses(
            model,
            images.to(env.device, non_blocking=True),
            sent.to(env.device),
            labels.to(env.device),
            smoothing=cfg.stage1.smoothing,
            distill_beta=cfg.stage1.distill_beta,
            amp=cfg.stage1.amp,
        )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total_loss"]).backward()  # type: ignore[no-untyped-call]  # torch: unannotated
        scaler.step(optimizer)
        scaler.update()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        steps += 1
        scale = float(student.clip.logit_scale.detach().exp())
        bar.set_postfix(loss=f"{sums['total_loss'] / steps:.3f}", scale=f"{scale:.1f}")
    stats = {k: all_reduce_mean(v / max(1, steps), env.device) for k, v in sums.items()}
    stats.update(steps=steps, lr=optimizer.param_groups[0]["lr"])
    return stats


@torch.no_grad()
def monitor(clip: open_clip.CLIP, inputs: PreparedInputs, cfg: Config, device: torch.device) -> dict[str, float]:
    """Nearest-sentence and class-prototype accuracy of val images against all sentences (monitoring only)."""
    assert inputs.val is not None  # only called when there is a val split (`_should_monitor`)
    clip.eval()
    txt = F.normalize(
        encode_token_table(clip, inputs.tokens, batch_size=cfg.eval.batch_size, device=device, desc="monitor text"),
        dim=-1,
    )
    loader = eval_loader(inputs.val, cfg.eval.batch_size, cfg.data.num_workers)
    img, y = encode_images(clip.encode_image, loader, device=device, desc="monitor images", total=len(loader))
    img = F.normalize(img, dim=-1)
    sent_cls = torch.from_numpy(np.repeat(np.arange(inputs.num_classes), np.diff(inputs.offsets)))
    nearest = sent_cls[(img @ txt.t()).argmax(dim=1)]
    protos = F.normalize(torch.zeros(inputs.num_classes, txt.shape[1]).index_add_(0, sent_cls, txt), dim=-1)
    proto = (img @ protos.t()).argmax(dim=1)
    return {
        "val_nearest_sentence_acc": float((nearest == y).float().mean()),
        "val_class_text_acc": float((proto == y).float().mean()),
    }


def _should_monitor(epoch: int, cfg: Config, inputs: PreparedInputs) -> bool:
    every = cfg.stage1.monitor_every
    last = epoch + 1 == cfg.stage1.epochs
    return inputs.val is not None and every > 0 and ((epoch + 1) % every == 0 or last)


def _setup(
    cfg: Config, inputs: PreparedInputs, env: DistEnv
) -> tuple[Stage1Model, torch.optim.AdamW, torch.amp.GradScaler, ShardedSampler, int, CosineSchedule]:
    clip = build_clip(cfg, env.device)
    model = build_stage1_model(cfg, clip).to(env.device)
    optimizer = stage1_optimizer(model, cfg)
    scaler = grad_scaler(env.device, cfg.stage1.amp)
    sampler = make_sampler(
        cfg.stage1.sampler, inputs.train.labels, num_replicas=env.world_size, rank=env.rank, seed=cfg.run.seed
    )
    batch = effective_batch_size(cfg.stage1.batch_size, len(sampler))
    steps = len(sampler) // batch
    schedule = CosineSchedule(
        optimizer,
        cfg.stage1.epochs,
        warmup_epochs=cfg.stage1.warmup_epochs,
        warmup_lr=cfg.stage1.warmup_lr,
        min_lr=cfg.stage1.min_lr,
        steps_per_epoch=steps,
        unit=cfg.stage1.lr_unit,
    )
    return model, optimizer, scaler, sampler, batch, schedule


def _resume(
    path: Path, model: Stage1Model, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[int, list[EpochStats]]:
    state = load_epoch_checkpoint(path)
    if state is None:
        return 0, []
    model.clip.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    log.info("stage 1: resuming after epoch %d from %s", state["epoch"] + 1, path)
    return state["epoch"] + 1, state["history"]


def train_stage1(
    cfg: Config, inputs: PreparedInputs, out_dir: Path, env: DistEnv, hook: EpochHook | None = None
) -> Stage1Result:
    """Run (or resume, or reload when finished) stage 1 and cache the text features."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "done.json").is_file():
        return load_stage1_result(cfg, out_dir, env.device)
    model, optimizer, scaler, sampler, batch, schedule = _setup(cfg, inputs, env)
    start, history = _resume(out_dir / "checkpoint.pt", model, optimizer, scaler)
    net = (
        DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        if env.is_distributed
        else model
    )
    tokens = inputs.tokens
    for epoch in range(start, cfg.stage1.epochs):
        seed_everything(derive_seed(cfg.run.seed, "stage1", epoch, env.rank))
        sampler.set_epoch(epoch)
        loader = train_loader(
            inputs.train,
            sampler,
            batch,
            cfg.data.num_workers,
            derive_seed(cfg.run.seed, "stage1-loader", epoch, env.rank),
        )
        net.train()
        t0 = time.time()
        stats = _train_epoch(net, loader, tokens, inputs.offsets, optimizer, scaler, schedule, epoch, cfg, env)
        stats.update(
            epoch=epoch + 1,
            seconds=round(time.time() - t0, 2),
            logit_scale=float(model.clip.logit_scale.detach().exp()),
        )
        if env.is_main and _should_monitor(epoch, cfg, inputs):
            stats.update(monitor(model.clip, inputs, cfg, env.device))
        history.append(stats)
        log.info("stage 1 epoch %d/%d: %s", epoch + 1, cfg.stage1.epochs, _fmt(stats))
        if env.is_main and ((epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.stage1.epochs):
            save_epoch_checkpoint(
                out_dir / "checkpoint.pt",
                epoch=epoch,
                model_state=model.clip.state_dict(),
                optimizer=optimizer,
                scaler=scaler,
                history=history,
            )
        barrier()
        if hook is not None:
            hook("stage1", epoch)
    return _finish(cfg, inputs, model.clip, history, out_dir, env)


def _fmt(stats: EpochStats) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())


def _finish(
    cfg: Config, inputs: PreparedInputs, clip: open_clip.CLIP, history: list[EpochStats], out_dir: Path, env: DistEnv
) -> Stage1Result:
    clip.eval()
    if env.is_main:
        feats = encode_token_table(
            clip, inputs.tokens, batch_size=cfg.eval.batch_size, device=env.device, desc="caching text features"
        )
        scale = float(clip.logit_scale.detach().cpu())
        atomic_torch_save(clip.state_dict(), out_dir / "clip.pt")
        atomic_torch_save(
            {
                "features": feats,
                "logit_scale": scale,
                "scale": float(np.exp(scale)),
                "num_sentences": int(feats.shape[0]),
            },
            out_dir / "text_features.pt",
        )
        (out_dir / "history.json").write_text(json.dumps(history, indent=2))
        atomic_write_json({"epochs": cfg.stage1.epochs, "final": history[-1] if history else {}}, out_dir / "done.json")
    barrier()
    return load_stage1_result(cfg, out_dir, env.device)


def load_stage1_result(cfg: Config, out_dir: Path, device: torch.device) -> Stage1Result:
    """Reload a finished stage 1 from RUN/stage1/."""
    clip = create_clip(cfg.model.arch, None, quick_gelu=cfg.model.quick_gelu, device=device)
    clip.load_state_dict(torch.load(out_dir / "clip.pt", map_location=device, weights_only=True))
    cached = torch.load(out_dir / "text_features.pt", map_location="cpu", weights_only=True)
    return Stage1Result(clip.eval(), cached["features"], float(cached["logit_scale"]))
