"""Losses of both VL-LTR stages. Each public loss returns a dict of named `*_loss` tensors.

Stage 1 (CVLP): class-wise contrastive soft-target CE with label smoothing over the global batch, both
directions, plus logit distillation from a frozen teacher; total `(1 - beta) * L_con + beta * L_dis`.

Stage 2 (LGR): `SoftTargetCE(z_vis, y) + SoftTargetCE(z_lin, y)` with `y` the mixed, smoothed label
(the published recipe), or the logit-adjusted variant (Balanced Softmax when tau = 1): `z + tau * log prior`
inside the CE during training only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`mean_i -sum_j target_ij * log softmax(logits_i)_j`."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def smoothed_soft_target_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """The original's `smoothCE`: `(1 - eps) * soft CE + eps * mean_j(-log softmax_j)`.

    The smoothing term is uniform over the columns of `logits` (the B_g texts or images of the global batch).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = -(target * logp).sum(dim=-1)
    uniform = -logp.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def classwise_targets(labels: torch.Tensor) -> torch.Tensor:
    """Row-normalised label-equality mask: `Q_ij = 1[y_i = y_j] / #{k: y_k = y_i}`.

    The mask is symmetric with a unit diagonal because image i and text i share a label, so one matrix
    serves as the target of both directions.
    """
    positive = (labels.view(-1, 1) == labels.view(1, -1)).float()
    return positive / positive.sum(dim=1, keepdim=True)


def classwise_contrastive_loss(
    logits_per_image: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1
) -> dict[str, torch.Tensor]:
    """Class-wise contrastive loss on global logits `Z [B_g, B_g]` (rows images, columns texts).

    Returns `img2txt_loss`, `txt2img_loss` and their mean `contrastive_loss`.
    """
    if logits_per_image.shape[0] != logits_per_image.shape[1] or logits_per_image.shape[0] != labels.numel():
        raise ValueError(
            f"contrastive logits must be [B, B] with B labels, got {tuple(logits_per_image.shape)} "
            f"and {labels.numel()} labels"
        )
    target = classwise_targets(labels)
    img2txt = smoothed_soft_target_ce(logits_per_image, target, smoothing)
    txt2img = smoothed_soft_target_ce(logits_per_image.t(), target.t(), smoothing)
    return {"img2txt_loss": img2txt, "txt2img_loss": txt2img, "contrastive_loss": 0.5 * (img2txt + txt2img)}


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`0.5 * [softCE(Z, softmax(Z_t)) + softCE(Z^T, softmax(Z_t^T))]`, temperature 1 (as the original)."""
    teacher_logits = teacher_logits.detach().float()
    rows = soft_target_ce(student_logits, teacher_logits.softmax(dim=-1))
    cols = soft_target_ce(student_logits.t(), teacher_logits.t().softmax(dim=-1))
    return 0.5 * (rows + cols)


def stage1_loss(
    logits_per_image: torch.Tensor,
    labels: torch.Tensor,
    *,
    smoothing: float = 0.1,
    distill_beta: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CVLP loss `(1 - beta) * L_con + beta * L_dis` on the global batch; `total_loss` is what to optimise.

    With `distill_beta == 0` no teacher is needed and `total_loss == contrastive_loss`.
    """
    parts = classwise_contrastive_loss(logits_per_image, labels, smoothing)
    if distill_beta <= 0.0:
        parts["total_loss"] = parts["contrastive_loss"]
        return parts
    if teacher_logits is None:
        raise ValueError("distill_beta > 0 needs teacher logits (a frozen teacher model)")
    parts["distill_loss"] = logit_distillation_loss(logits_per_image, teacher_logits)
    parts["total_loss"] = (1.0 - distill_beta) * parts["contrastive_loss"] + distill_beta * parts["distill_loss"]
    return parts


def contrastive_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """`s * f_img @ f_txt^T` for L2-normalised features (rows images, columns texts), in fp32."""
    return logit_scale.float() * image_features.float() @ text_features.float().t()


def stage2_loss(
    vision_logits: torch.Tensor,
    language_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "ce",
    log_prior: torch.Tensor | None = None,
    tau: float = 1.0,
    language_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Two-branch LGR loss: `SoftTargetCE(z_vis, y) + language_weight * SoftTargetCE(z_lin, y)` (published: the
    unweighted sum, `language_weight` 1; 0 trains the vision branch alone).

    Args:
        target: `[B, C]` soft targets (mixup/cutmix mixed and smoothed one-hot labels).
        kind: `ce` (published) or `logit_adjusted` (adds `tau * log prior` to both branches' logits inside
            the loss only; inference uses the raw logits).
        log_prior: `[C]` log training prior, required by `logit_adjusted`.
    """
    if kind not in ("ce", "logit_adjusted"):
        raise ValueError(f"stage-2 loss must be 'ce' or 'logit_adjusted', got {kind!r}")
    if kind == "logit_adjusted":
        if log_prior is None:
            raise ValueError("the logit-adjusted loss needs the log training prior")
        shift = tau * log_prior.to(vision_logits.device, torch.float32)
        vision_logits = vision_logits.float() + shift
        language_logits = language_logits.float() + shift
    vision = soft_target_ce(vision_logits, target)
    language = soft_target_ce(language_logits, target)
    if language_weight < 0:
        raise ValueError(f"the language branch's loss weight must be >= 0, got {language_weight}")
    total = vision + language_weight * language if language_weight != 1.0 else vision + language
    return {"vision_loss": vision, "language_loss": language, "total_loss": total}
