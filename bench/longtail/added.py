"""Adding classes by text alone, scored exactly as the service scores them.

Path (the one the service takes): description sentences ─► text encoder ─► `build_added_class_anchors`
(image-free anchor rule) ─► `ClassTable.with_added` ─► `calibrated_probabilities` with `added_class_bias` γ.
All scoring here goes through `service.head` (numpy), so the numbers are the service's numbers.

γ is chosen without held-out labels: some *trained* classes are treated as pseudo-new (their head is
retrained without them, then they are added by text) and γ is picked on their validation images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.head import LGRHead
from service.head import (
    ClassEntry,
    ClassTable,
    HeadParams,
    build_added_class_anchors,
    calibrated_probabilities,
    log_prior_from_counts,
)
from service.registry import unit_mean

GAMMA_GRID = np.round(np.arange(-8.0, 16.01, 0.25), 2)


def head_params(head: LGRHead) -> tuple[HeadParams, np.ndarray, np.ndarray]:
    """The service's view of a trained torch head: `HeadParams`, anchors `[C, M, D]` and mask `[C, M]`."""
    arrays = {
        "ln_q_weight": head.ln_q.weight, "ln_q_bias": head.ln_q.bias, "w_q": head.w_q.weight,
        "ln_k_weight": head.ln_k.weight, "ln_k_bias": head.ln_k.bias, "w_k": head.w_k.weight,
        "mlp_w1": head.mlp[0].weight, "mlp_b1": head.mlp[0].bias, "mlp_w2": head.mlp[2].weight,
        "mlp_b2": head.mlp[2].bias,
    }
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in arrays.items()}
    params = HeadParams.from_arrays(arrays, logit_scale=float(head.logit_scale), ln_eps=head.ln_q.eps)
    mask = head.anchor_mask.cpu().numpy()
    anchors = (head.anchors.detach().cpu() * head.anchor_mask.unsqueeze(-1)).numpy().astype(np.float32)
    return params, anchors, mask


def added_entries(sentence_feats: list[torch.Tensor], names: list[str], num_anchors: int, *,
                  name_feats: torch.Tensor | None = None,
                  served: np.ndarray | None = None) -> tuple[list[ClassEntry], list[np.ndarray]]:
    """Class-table entries built from description features only; also returns the chosen sentence indices.

    With `name_feats` `[A, D]` (each added class's name-prompt feature) and `served` `[K, D]` (the unit
    directions of the classes already served, see `class_directions`), the rule is the service's: close to
    its own name, far from every served class; the classes are added one after another, so each earlier one
    joins `served`, as in `service.registry`. Without them, the centroid rule."""
    entries, chosen = [], []
    others = None if served is None else np.asarray(served, dtype=np.float32)
    for i, (feats, name) in enumerate(zip(sentence_feats, names)):
        kw = {}
        if name_feats is not None:
            kw = {"reference": name_feats[i:i + 1].numpy(), "others": others if others is not None and len(others)
                  else None}
        anchors, mask, idx = build_added_class_anchors(feats.numpy(), num_anchors, **kw)
        entries.append(ClassEntry(name=name, anchors=anchors, mask=mask))
        chosen.append(idx)
        if others is not None:
            others = np.concatenate([others, unit_mean(anchors[mask])[None]])
    return entries, chosen


def class_directions(anchors: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`[C, D]` unit mean of each class's anchors: what `service.registry` keeps per served class."""
    return np.stack([unit_mean(a[m]) for a, m in zip(anchors, mask)])


@dataclass
class TableScores:
    """Raw branch outputs for a set of images against a table of trained + added classes."""

    z_vis: np.ndarray  # [B, S]
    z_lin: np.ndarray  # [B, S + A]
    num_trained: int


def score_table(head: LGRHead, trained_names: list[str], entries: list[ClassEntry],
                feats: torch.Tensor) -> TableScores:
    """Vision and language logits of `feats` against trained classes plus `entries`, via `service.head`."""
    params, anchors, mask = head_params(head)
    table = ClassTable.build(anchors, mask, params, trained_names).with_added(entries, params)
    f = feats.numpy().astype(np.float32)
    return TableScores(params.vision_logits(f), table.language_logits(params.queries(f), f), len(trained_names))


def predict(scores: TableScores, log_prior: np.ndarray, *, alpha: float, tau: float, gamma: float,
            vision: str = "standardised") -> np.ndarray:
    """Argmax of the served calibrated probabilities (`vision`: how added classes enter the vision branch)."""
    probs = calibrated_probabilities(scores.z_vis, scores.z_lin, log_prior, alpha=alpha, tau=tau,
                                     added_class_bias=gamma, added_class_vision=vision)
    return probs.argmax(axis=1)


def class_mean_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class accuracy (percent) over the classes present in `labels`."""
    if len(labels) == 0:
        return float("nan")
    accs = [float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)]
    return 100.0 * float(np.mean(accs))


@dataclass
class GammaFit:
    """The chosen γ and the pseudo-new curve it came from."""

    gamma: float
    seen_at_zero_added: float
    curve: list[dict]
    rule: str


def choose_gamma(seen: TableScores, seen_labels: np.ndarray, new: TableScores, new_labels: np.ndarray,
                 log_prior: np.ndarray, *, alpha: float, tau: float, max_seen_drop: float,
                 vision: str = "standardised") -> GammaFit:
    """Pick γ on pseudo-new classes: the γ with the best new-class accuracy among those that cost the seen
    classes at most `max_seen_drop` points (relative to scoring them with no class added); if none qualifies,
    the γ with the smallest seen cost."""
    s = seen.num_trained
    base_pred = (alpha * _softmax(seen.z_vis - tau * log_prior) +
                 (1 - alpha) * _softmax(seen.z_lin[:, :s] - tau * log_prior)).argmax(1)
    seen_base = class_mean_accuracy(base_pred, seen_labels)
    curve = []
    for g in GAMMA_GRID:
        a_seen = class_mean_accuracy(predict(seen, log_prior, alpha=alpha, tau=tau, gamma=float(g), vision=vision),
                                     seen_labels)
        a_new = class_mean_accuracy(predict(new, log_prior, alpha=alpha, tau=tau, gamma=float(g), vision=vision),
                                    new_labels)
        curve.append({"gamma": float(g), "seen": a_seen, "new": a_new,
                      "h": 0.0 if a_seen + a_new == 0 else 2 * a_seen * a_new / (a_seen + a_new)})
    ok = [c for c in curve if seen_base - c["seen"] <= max_seen_drop]
    if ok:
        best = max(ok, key=lambda c: (c["new"], c["seen"]))
        rule = f"max pseudo-new accuracy with seen-class cost <= {max_seen_drop} points"
    else:
        best = min(curve, key=lambda c: seen_base - c["seen"])
        rule = "no γ met the seen-cost limit; smallest seen cost"
    return GammaFit(best["gamma"], seen_base, curve, rule)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def trained_log_prior(counts: np.ndarray) -> np.ndarray:
    """The service's log prior of the trained classes."""
    return log_prior_from_counts(counts)
