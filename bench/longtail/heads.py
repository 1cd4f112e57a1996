"""Classifier heads trained on cached image features (the backbone is frozen, so each head trains in seconds).

- `LinearHead`: the image-only probe.
- `vlltr.model.networks.head.LGRHead`: VL-LTR's language-guided head, as published (frozen anchors).
- `TunableAnchorHead`: the same head whose anchors are a parameter initialised from the class text, i.e. a
  text-initialised cosine classifier with attention over anchors (the LIFT idea inside the LGR form). Its state
  dict has the same keys as `LGRHead`, so the exporter and the service read it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.longtail.backbone import epoch_batches
from vlltr.model.networks.head import LGRHead
from vlltr.training.losses import stage2_loss
from vlltr.training.mixing import smoothed_one_hot


class TunableAnchorHead(LGRHead):
    """`LGRHead` with trainable anchors (initialised from the text anchors)."""

    def __init__(self, anchors: torch.Tensor, anchor_mask: torch.Tensor, logit_scale: float, **kwargs) -> None:
        super().__init__(anchors, anchor_mask, logit_scale, **kwargs)
        init = self._buffers.pop("anchors")
        self.anchors = nn.Parameter(init.clone())

    def language_logits(self, f: torch.Tensor) -> torch.Tensor:
        # Padded slots must stay exactly zero while the real anchors move.
        masked = self.anchors * self.anchor_mask.unsqueeze(-1).to(self.anchors.dtype)
        return _language_logits(self, masked, f)


def _language_logits(head: LGRHead, anchors: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """`LGRHead.language_logits` with an explicit anchor tensor (the Gram-matrix form)."""
    q = head.w_q(head.ln_q(f))
    keys = head.w_k(head.ln_k(anchors))
    scores = torch.einsum("bd,cmd->bcm", q, keys) / math.sqrt(head.embed_dim)
    a = scores.masked_fill(~head.anchor_mask.unsqueeze(0), float("-inf")).softmax(dim=-1)
    f_hat = F.normalize(f, dim=-1)
    numerator = (a * torch.einsum("bd,cmd->bcm", f_hat, anchors)).sum(-1)
    gram = torch.einsum("cmd,cnd->cmn", anchors, anchors)
    norm = torch.einsum("bcm,cmn,bcn->bc", a, gram, a).clamp_min(1e-12).sqrt()
    return head.logit_scale * numerator / norm


class LinearHead(nn.Module):
    """A linear classifier on raw features (the image-only probe)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)


@dataclass
class HeadRecipe:
    """How a two-branch head is trained on cached features.

    The published stage 2 is `loss="ce"`, sqrt sampler, mixup 0.8 (here in feature space: the backbone is
    frozen and its features cached), smoothing 0.1, MLP lr 1e-3, attention lr 1e-6, fusion alpha 0.2.
    """

    loss: str = "ce"  # ce | logit_adjusted
    la_tau: float = 1.0
    sampler: str = "sqrt"
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    attn_lr: float = 1e-6
    anchor_lr: float = 0.0  # > 0 makes the anchors trainable (TunableAnchorHead)
    weight_decay: float = 0.05
    mixup: float = 0.8
    smoothing: float = 0.1
    branch_weights: tuple[float, float] = (1.0, 1.0)  # (vision, language) loss weights
    extra: dict = field(default_factory=dict)


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1 + math.cos(math.pi * step / max(1, total)))


def train_lgr_head(
    feats: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    anchors: torch.Tensor,
    mask: torch.Tensor,
    logit_scale: float,
    recipe: HeadRecipe,
    seed: int,
) -> LGRHead:
    """Train an LGR head (frozen anchors) or a `TunableAnchorHead` (`recipe.anchor_lr > 0`) on cached features."""
    torch.manual_seed(seed)
    num_classes = len(counts)
    cls = TunableAnchorHead if recipe.anchor_lr > 0 else LGRHead
    head = cls(anchors, mask, logit_scale)
    groups = [
        {"params": [head.mlp[0].weight, head.mlp[2].weight], "lr": recipe.lr, "weight_decay": recipe.weight_decay},
        {"params": [head.mlp[0].bias, head.mlp[2].bias], "lr": recipe.lr, "weight_decay": 0.0},
        {"params": [head.w_q.weight, head.w_k.weight], "lr": recipe.attn_lr, "weight_decay": recipe.weight_decay},
        {
            "params": list(head.ln_q.parameters()) + list(head.ln_k.parameters()),
            "lr": recipe.attn_lr,
            "weight_decay": 0.0,
        },
    ]
    if recipe.anchor_lr > 0:
        groups.append({"params": [head.anchors], "lr": recipe.anchor_lr, "weight_decay": 0.0})
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups)
    log_prior = torch.log(torch.as_tensor(counts, dtype=torch.float32) / float(np.sum(counts)))
    rng = np.random.default_rng(seed)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    steps = recipe.epochs * math.ceil(len(labels) / recipe.batch_size)
    step = 0
    head.train()
    for _ in range(recipe.epochs):
        for idx in epoch_batches(labels, counts, recipe.sampler, recipe.batch_size, rng):
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(g["base_lr"], step, steps)
            f, y = feats[idx], y_all[idx]
            target = smoothed_one_hot(y, num_classes, recipe.smoothing)
            if recipe.mixup > 0:
                lam = float(rng.beta(recipe.mixup, recipe.mixup))
                f = lam * f + (1 - lam) * f.flip(0)
                target = lam * target + (1 - lam) * target.flip(0)
            z_vis, z_lin = head(f)
            parts = stage2_loss(z_vis, z_lin, target, kind=recipe.loss, log_prior=log_prior, tau=recipe.la_tau)
            wv, wl = recipe.branch_weights
            loss = wv * parts["vision_loss"] + wl * parts["language_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def train_linear_head(
    feats: torch.Tensor,
    labels: np.ndarray,
    counts: np.ndarray,
    *,
    loss: str,
    epochs: int,
    seed: int,
    lr: float = 1e-2,
    batch_size: int = 256,
) -> LinearHead:
    """A linear probe on cached features with CE or the logit-adjusted (Balanced Softmax) loss."""
    torch.manual_seed(seed)
    head = LinearHead(feats.shape[1], len(counts))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    log_prior = torch.log(torch.as_tensor(counts, dtype=torch.float32) / float(np.sum(counts)))
    rng = np.random.default_rng(seed)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    steps = epochs * math.ceil(len(labels) / batch_size)
    step = 0
    for _ in range(epochs):
        for idx in epoch_batches(labels, counts, "instance", batch_size, rng):
            for g in opt.param_groups:
                g["lr"] = _cosine_lr(lr, step, steps)
            z = head(feats[idx])
            if loss == "logit_adjusted":
                z = z + log_prior
            out = F.cross_entropy(z, y_all[idx])
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            step += 1
    return head.eval()


@torch.no_grad()
def head_logits(head: LGRHead, feats: torch.Tensor, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`(z_vis, z_lin)` of a trained head over cached features, in batches."""
    vis, lin = [], []
    for i in range(0, len(feats), batch_size):
        a, b = head(feats[i : i + batch_size])
        vis.append(a)
        lin.append(b)
    return torch.cat(vis), torch.cat(lin)
