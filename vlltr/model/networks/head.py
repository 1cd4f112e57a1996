"""The language-guided recognition (LGR) head of VL-LTR stage 2.

Two branches over a raw (un-normalised) image feature `f`:
- vision: an MLP `D -> 4D -> C`;
- language: `f` attends (one head, no value projection) over each class's M frozen anchor sentence
  embeddings; the class logit is `s * cos(f, attended anchor vector)` with `s` the frozen stage-1 scale.

The language branch is computed in the memory-light exact form: with `a_c` the attention of an image over
class c's anchors `T_c` and `G_c = T_c T_c^T`, `cos(f, a_c T_c) = (a_c . T_c f_hat) / sqrt(a_c^T G_c a_c)`,
so the `[B, C, D]` attended vectors are never built (only `[B, C, M]` tensors).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlltr.model.runtime.head import ADDED_CLASS_VISION_MODES, TEMPERATURE_MODES, split_temperature

_EPS = 1e-12


# `LGRHead` state-dict keys -> the served head's array names (`vlltr.model.runtime.head.HEAD_ARRAYS`, head.npz).
_STATE_TO_SERVED = {
    "ln_q.weight": "ln_q_weight",
    "ln_q.bias": "ln_q_bias",
    "w_q.weight": "w_q",
    "ln_k.weight": "ln_k_weight",
    "ln_k.bias": "ln_k_bias",
    "w_k.weight": "w_k",
    "mlp.0.weight": "mlp_w1",
    "mlp.0.bias": "mlp_b1",
    "mlp.2.weight": "mlp_w2",
    "mlp.2.bias": "mlp_b2",
}


def served_head_arrays(head: nn.Module) -> dict[str, np.ndarray]:
    """A trained head's weights as float32 numpy arrays under the served names (what head.npz holds).

    Works for `LGRHead` and subclasses with the same state-dict keys; anchors and mask are not included.
    """
    return {
        _STATE_TO_SERVED[k]: v.detach().float().cpu().numpy()
        for k, v in head.state_dict().items()
        if k in _STATE_TO_SERVED
    }


class LGRHead(nn.Module):
    """LGR head, its anchors frozen as published (or trained from their text, `trainable_anchors`).

    Args:
        anchors: `[C, M, D]` raw stage-1 text features of each class's anchor sentences (zero padded).
        anchor_mask: `[C, M]` bool, True where an anchor exists. Every class needs at least one.
        logit_scale: `s = exp(stage-1 logit_scale)`, frozen.
        v_detach: normalise the attended vector with a stop-gradient norm (the original's iNat variant).
        trainable_anchors: make the anchor vectors a parameter, initialised from the text features: the language
            branch is then a text-initialised cosine classifier (LIFT's classifier). The state dict is the same
            either way.
    """

    # Buffers (register_buffer; `anchors` is a parameter with trainable_anchors), declared for type checkers.
    anchors: torch.Tensor
    anchor_mask: torch.Tensor
    logit_scale: torch.Tensor

    def __init__(
        self,
        anchors: torch.Tensor,
        anchor_mask: torch.Tensor,
        logit_scale: float,
        *,
        v_detach: bool = False,
        trainable_anchors: bool = False,
    ) -> None:
        super().__init__()
        if anchors.dim() != 3:
            raise ValueError(f"anchors must be [C, M, D], got shape {tuple(anchors.shape)}")
        num_classes, _, dim = anchors.shape
        anchor_mask = anchor_mask.bool()
        empty = (~anchor_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty[:10]} have no anchor sentences; every class needs at least one")
        self.embed_dim = dim
        self.num_classes = num_classes
        self.v_detach = v_detach
        if trainable_anchors:
            self.anchors = nn.Parameter(anchors.detach().float().clone())
        else:
            self.register_buffer("anchors", anchors.detach().float().clone())
        self.register_buffer("anchor_mask", anchor_mask.clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.w_q.weight.copy_(torch.eye(dim))
            self.w_k.weight.copy_(torch.eye(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, num_classes))
        for layer in (self.mlp[0], self.mlp[2]):
            assert isinstance(layer, nn.Linear)
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def keys(self) -> torch.Tensor:
        """`K = W_k LN_k(T)`, `[C, M, D]`; constant at inference, so the exporter precomputes it."""
        keys: torch.Tensor = self.w_k(self.ln_k(self.anchors))
        return keys

    def attention(self, f: torch.Tensor) -> torch.Tensor:
        """Attention weights `[B, C, M]` of each image over each class's anchors (padding gets 0)."""
        q = self.w_q(self.ln_q(f))
        scores = torch.einsum("bd,cmd->bcm", q, self.keys()) / math.sqrt(self.embed_dim)
        scores = scores.masked_fill(~self.anchor_mask.unsqueeze(0), float("-inf"))
        return scores.softmax(dim=-1)

    def language_logits(self, f: torch.Tensor) -> torch.Tensor:
        """`s * cos(f, sum_m a_cm T_cm)` for every class, `[B, C]`, via the Gram-matrix form."""
        a = self.attention(f)
        f_hat = F.normalize(f, dim=-1)
        proj = torch.einsum("bd,cmd->bcm", f_hat, self.anchors)  # T_c f_hat
        numerator = (a * proj).sum(-1)
        gram = torch.einsum("cmd,cnd->cmn", self.anchors, self.anchors)
        sq_norm = torch.einsum("bcm,cmn,bcn->bc", a, gram, a).clamp_min(_EPS)
        norm = sq_norm.sqrt()
        if self.v_detach:
            norm = norm.detach()
        return self.logit_scale * numerator / norm

    def language_logits_direct(self, f: torch.Tensor) -> torch.Tensor:
        """The same logits computed the obvious way (builds `[B, C, D]`); for tests and small C."""
        a = self.attention(f)
        v = torch.einsum("bcm,cmd->bcd", a, self.anchors)
        v_norm = v.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        if self.v_detach:
            v_norm = v_norm.detach()
        cos = torch.einsum("bcd,bd->bc", v / v_norm, F.normalize(f, dim=-1))
        return self.logit_scale * cos

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(vision_logits, language_logits)`, each `[B, C]`."""
        return self.mlp(f), self.language_logits(f)


def fuse_probabilities(z_vis: torch.Tensor, z_lin: torch.Tensor, alpha: float) -> torch.Tensor:
    """VL-LTR's test-time fusion `alpha * softmax(z_vis) + (1 - alpha) * softmax(z_lin)`."""
    return alpha * z_vis.softmax(dim=-1) + (1.0 - alpha) * z_lin.softmax(dim=-1)


def _added_vision_logits(vis: torch.Tensor, lin_trained: torch.Tensor, lin_added: torch.Tensor) -> torch.Tensor:
    """Vision-branch stand-in logits of added classes: their language logits mapped, per image, onto the
    vision branch's scale by matching the mean and std of the trained classes' logits in the two branches."""
    mu_v, sd_v = vis.mean(dim=1, keepdim=True), vis.std(dim=1, keepdim=True, unbiased=False)
    mu_l, sd_l = lin_trained.mean(dim=1, keepdim=True), lin_trained.std(dim=1, keepdim=True, unbiased=False)
    return mu_v + (lin_added - mu_l) * (sd_v / sd_l.clamp_min(1e-12))


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature on a distribution's log-probabilities: each row `p ** (1 / T)`, renormalised (keeps the
    ranking; a zero stays zero)."""
    if temperature == 1.0:
        return probs
    return (probs.log() / temperature).softmax(dim=-1)


def calibrated_probabilities(
    z_vis: torch.Tensor,
    z_lin: torch.Tensor,
    log_prior: torch.Tensor,
    *,
    alpha: float,
    tau: float = 0.0,
    temperature: float = 1.0,
    temperature_on: str = "fused",
    added_class_bias: float = 0.0,
    added_class_vision: str = "none",
) -> torch.Tensor:
    """The served prediction: calibrated two-branch fusion over trained and added classes.

    Args:
        z_vis: `[B, S]` vision logits over the S trained classes.
        z_lin: `[B, S + A]` language logits; the last A columns are classes added by text.
        log_prior: `[S]` log training prior of the trained classes.
        alpha: fusion weight of the vision branch.
        tau: post-hoc logit adjustment `z - tau * log prior` on trained classes (0 = off).
        temperature: T of the calibration.
        temperature_on: `"fused"`: the mixture is tempered, `p ** (1 / T)` renormalised, which keeps every
            image's ranking; `"branches"`: every logit is divided by T before the mixture (older bundles' rule,
            which can move the fused argmax; `vlltr.model.runtime.head.TEMPERATURE_MODES`).
        added_class_bias: added to the language logits of added classes (chosen on pseudo-new classes).
        added_class_vision: `"none"`: added classes get no vision-branch mass (the published fusion);
            `"standardised"`: each added class gets a vision logit, its adjusted language logit mapped onto
            the vision scale per image (`mean_v + (l - mean_l) * std_v / std_l`, moments over the trained
            classes), so a class with no vision weights can still win the fused argmax.

    Returns:
        `[B, S + A]` probabilities: `alpha * softmax(vision) + (1 - alpha) * softmax(language)` tempered, the
        vision softmax zero-padded over added classes when `added_class_vision="none"`.
        The service's numpy `model/runtime/head.py` implements exactly this; a test keeps them equal.
    """
    if added_class_vision not in ADDED_CLASS_VISION_MODES:
        raise ValueError(f"unknown added_class_vision {added_class_vision!r}; use one of {ADDED_CLASS_VISION_MODES}")
    if temperature_on not in TEMPERATURE_MODES:
        raise ValueError(f"unknown temperature_on {temperature_on!r}; use one of {TEMPERATURE_MODES}")
    num_trained = z_vis.shape[1]
    adjust = tau * log_prior.to(z_vis.dtype)
    lin = z_lin.clone()
    lin[:, :num_trained] = lin[:, :num_trained] - adjust
    lin[:, num_trained:] = lin[:, num_trained:] + added_class_bias
    vis = z_vis - adjust
    if added_class_vision == "standardised" and lin.shape[1] > num_trained:
        vis = torch.cat([vis, _added_vision_logits(vis, lin[:, :num_trained], lin[:, num_trained:])], dim=1)
    on_branches, on_mixture = split_temperature(temperature, temperature_on)
    vis = (vis / on_branches).softmax(dim=-1)
    lin = (lin / on_branches).softmax(dim=-1)
    vis_full = torch.zeros_like(lin)
    vis_full[:, : vis.shape[1]] = vis
    mixture = alpha * vis_full + (1.0 - alpha) * lin
    return temper(mixture, on_mixture)
