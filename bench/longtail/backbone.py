"""Backbone training on in-memory tensors: image-only fine-tuning and VL-LTR stage 1 (CVLP).

The benchmark's images are tiny and fit in memory, so these loops skip file loaders and run on preprocessed
float tensors `[N, 3, S, S]` (the service's evaluation preprocessing), augmented per batch.
Every loop shares one budget (epochs, batch, lr schedule, augmentation) so the arms compare fairly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from vlltr.training.features import encode_text, encode_token_table
from vlltr.training.losses import contrastive_logits, stage1_loss
from vlltr.training.stage1 import split_towers


@dataclass(frozen=True)
class Budget:
    """The training budget every backbone arm gets."""

    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.1


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Light augmentation for tiny images: random horizontal flip and a random shift of up to `shift` px."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + s, dx : dx + s]


@torch.no_grad()
def encode_images(clip: open_clip.CLIP, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Raw (un-normalised) image features `[N, D]` of preprocessed images, eval mode."""
    clip.eval()
    out = [clip.encode_image(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, int(clip.text_projection.shape[1]))


def encode_tokens(clip: open_clip.CLIP, tokens: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Raw text features `[N, D]` of pre-tokenised sentences, eval mode."""
    clip.eval()
    return encode_token_table(clip, tokens, batch_size=batch_size, progress=False)


def sampler_weights(labels: np.ndarray, counts: np.ndarray, kind: str) -> np.ndarray:
    """Per-image draw weights: instance (uniform), sqrt (class drawn ∝ sqrt n_c) or balanced."""
    n = counts[labels].astype(float)
    if kind == "instance":
        w = np.ones_like(n)
    elif kind == "sqrt":
        w = 1.0 / np.sqrt(n)
    elif kind == "balanced":
        w = 1.0 / n
    else:
        raise ValueError(f"unknown sampler {kind!r}; use instance, sqrt or balanced")
    return w / w.sum()


def epoch_batches(
    labels: np.ndarray, counts: np.ndarray, kind: str, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """One epoch (len(labels) draws) of index batches; instance sampling is a permutation, others draw with
    replacement as the original's weighted sampler does."""
    n = len(labels)
    if kind == "instance":
        order = rng.permutation(n)
    else:
        order = rng.choice(n, size=n, replace=True, p=sampler_weights(labels, counts, kind))
    return [order[i : i + batch_size] for i in range(0, n, batch_size) if len(order[i : i + batch_size]) > 1]


def _optimizer(
    params: list[nn.Parameter],
    budget: Budget,
    scaled: tuple[list[nn.Parameter], float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW; `scaled` is (parameters, lr multiplier) for a group that trains at a fraction of the lr."""
    # No weight decay on 1-D parameters (norms, biases, scales), as in the original.
    groups = []
    for ps, scale in ((params, 1.0),) + ((scaled,) if scaled else ()):
        groups += [
            {"params": [p for p in ps if p.ndim >= 2], "weight_decay": budget.weight_decay, "lr_scale": scale},
            {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=budget.lr)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _lr_at(step: int, total: int, budget: Budget) -> float:
    warm = max(1, int(budget.warmup_frac * total))
    if step < warm:
        return budget.lr * (step + 1) / warm
    return 0.5 * budget.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def balanced_softmax_loss(
    logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted CE (Balanced Softmax at tau = 1): CE on `logits + tau * log prior`."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), labels)


def finetune_image_only(
    clip: open_clip.CLIP,
    images: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    *,
    loss: str,
    budget: Budget,
    seed: int,
) -> tuple[open_clip.CLIP, nn.Linear]:
    """Fine-tune the image tower with a linear classifier on its raw features.

    Args:
        loss: `ce` (plain cross-entropy, instance sampling) or `balanced_softmax` (logit-adjusted loss).
    Returns the tuned CLIP (a copy) and the linear classifier.
    """
    if loss not in ("ce", "balanced_softmax"):
        raise ValueError(f"unknown image-only loss {loss!r}; use ce or balanced_softmax")
    torch.manual_seed(seed)
    clip = copy.deepcopy(clip)
    dim = int(clip.text_projection.shape[1])
    fc = nn.Linear(dim, len(counts))
    params = list(clip.visual.parameters()) + list(fc.parameters())
    opt = _optimizer(params, budget)
    log_prior = torch.log(torch.as_tensor(counts, dtype=torch.float32) / counts.sum())
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    steps_per_epoch = math.ceil(len(labels) / budget.batch_size)
    total, step = budget.epochs * steps_per_epoch, 0
    clip.train()
    for _ in range(budget.epochs):
        for idx in epoch_batches(labels, counts, "instance", budget.batch_size, rng):
            _set_lr(opt, _lr_at(step, total, budget))
            x = augment(images[idx], gen)
            logits = fc(clip.encode_image(x))
            y = y_all[idx]
            out = F.cross_entropy(logits, y) if loss == "ce" else balanced_softmax_loss(logits, y, log_prior)
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            step += 1
    clip.eval()
    return clip, fc


def train_stage1(
    clip: open_clip.CLIP,
    images: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    class_tokens: list[torch.Tensor],
    *,
    budget: Budget,
    seed: int,
    beta: float = 0.5,
    smoothing: float = 0.1,
    sampler: str = "sqrt",
    text_lr_scale: float = 1.0,
) -> open_clip.CLIP:
    """VL-LTR stage 1 (CVLP): fine-tune both towers; each image is paired with one sentence drawn uniformly from
    its class pool; the frozen starting model is the distillation teacher. Returns the tuned copy.

    `text_lr_scale` multiplies the text tower's lr (0 freezes it; the image tower and logit scale keep the lr).
    """
    if any(len(t) == 0 for t in class_tokens):
        empty = [c for c, t in enumerate(class_tokens) if len(t) == 0][:10]
        raise ValueError(f"classes {empty} have no sentences for stage 1")
    torch.manual_seed(seed)
    teacher = copy.deepcopy(clip).eval().requires_grad_(False) if beta > 0 else None
    student = copy.deepcopy(clip)
    image_side, text_side = ([p for _, p in side] for side in split_towers(student))
    if text_lr_scale == 0.0:
        for p in text_side:
            p.requires_grad_(False)
    opt = _optimizer(image_side, budget, scaled=(text_side, text_lr_scale) if text_lr_scale > 0.0 else None)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    steps_per_epoch = math.ceil(len(labels) / budget.batch_size)
    total, step = budget.epochs * steps_per_epoch, 0
    student.train()
    for _ in range(budget.epochs):
        for idx in epoch_batches(labels, counts, sampler, budget.batch_size, rng):
            _set_lr(opt, _lr_at(step, total, budget))
            y = y_all[idx]
            tok = torch.stack([class_tokens[c][rng.integers(len(class_tokens[c]))] for c in y.tolist()])
            x = augment(images[idx], gen)
            img = F.normalize(student.encode_image(x), dim=-1)
            txt = F.normalize(encode_text(student, tok), dim=-1)
            logits = contrastive_logits(img, txt, student.logit_scale.exp())
            teacher_logits = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = contrastive_logits(
                        F.normalize(teacher.encode_image(x), dim=-1),
                        F.normalize(encode_text(teacher, tok), dim=-1),
                        teacher.logit_scale.exp(),
                    )
            loss = stage1_loss(
                logits,
                y,
                smoothing=smoothing,
                distill_beta=beta if teacher is not None else 0.0,
                teacher_logits=teacher_logits,
            )["total_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    student.eval()
    return student
