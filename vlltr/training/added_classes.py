"""How classes added by text after training compete with the trained ones: γ, fitted on pseudo-new classes.

A class added at serving time has descriptions and a name but no images and no vision-branch weights. The
service scores it with `vlltr.model.runtime.head` (anchors from `build_added_class_anchors`, the language branch, and a
standardised vision stand-in) and adds `added_class_bias` γ to its language logit. Too small a γ and added
classes never win; too large and they take trained classes' images. γ is chosen here without any added
class's labels: some trained tail classes are treated as new (their vision logits dropped, their anchors
re-chosen from their descriptions by the service's image-free rule, the others left as they are) and γ is
the value where they are recognised best at a bounded cost to the remaining classes, on the calibration split.

`vlltr train` fits it on argmaxes, which the temperature does not move (it tempers the fused distribution), so
at T = 1 (`fit_added_class_calibration`), and without retraining the head
for the pseudo-new classes, so the head has seen them: its estimate is optimistic, which a conservative cost
bound offsets. The long-tail benchmark (`bench.longtail`) retrains the head without them and measures the
result on classes that were really held out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np

from vlltr.model.networks.head import LGRHead, served_head_arrays
from vlltr.model.runtime.head import (
    ClassEntry,
    ClassTable,
    HeadParams,
    build_added_class_anchors,
    calibrated_probabilities,
    class_directions,
    log_prior_from_counts,
    unit_mean,
)

log = logging.getLogger(__name__)

GAMMA_GRID = np.round(np.arange(-8.0, 16.01, 0.25), 2)
ADDED_CLASS_VISION = "standardised"


def numpy_head(head: LGRHead) -> tuple[HeadParams, np.ndarray, np.ndarray]:
    """The service's view of a trained `vlltr.model.networks.head.LGRHead`: `HeadParams`, anchors `[C, M, D]` (padding
    zeroed) and mask `[C, M]`."""
    arrays = served_head_arrays(head)
    params = HeadParams.from_arrays(arrays, logit_scale=float(head.logit_scale), ln_eps=head.ln_q.eps)
    mask = head.anchor_mask.detach().cpu().numpy().astype(bool)
    anchors = (head.anchors.detach().float().cpu() * head.anchor_mask.unsqueeze(-1).cpu()).numpy()
    return params, anchors.astype(np.float32), mask


def text_entries(
    descriptions: Sequence[np.ndarray],
    names: Sequence[str],
    num_anchors: int,
    *,
    references: Sequence[np.ndarray] | None = None,
    served: np.ndarray | None = None,
) -> tuple[list[ClassEntry], list[np.ndarray]]:
    """Class-table entries for classes added one after another, as `vlltr.service.registry` adds them.

    Args:
        descriptions: per class, `[n, D]` raw text features of its description sentences.
        names: the classes' names.
        num_anchors: M.
        references: per class, `[r, D]` features of its name prompts; None uses the centroid rule.
        served: `[K, D]` unit directions of the classes served before the first one is added; each added
            class then joins them.
    Returns the entries and each class's chosen sentence indices.
    """
    entries, chosen = [], []
    others = None if served is None else np.asarray(served, dtype=np.float32)
    for i, (feats, name) in enumerate(zip(descriptions, names)):
        kw = {}
        if references is not None:
            kw = {"reference": references[i], "others": others if others is not None and len(others) else None}
        anchors, mask, idx = build_added_class_anchors(feats, num_anchors, **kw)
        entries.append(ClassEntry(name=name, anchors=anchors, mask=mask))
        chosen.append(idx)
        if others is not None:
            others = np.concatenate([others, unit_mean(anchors[mask])[None]])
    return entries, chosen


@dataclass
class TableScores:
    """Raw branch outputs for a set of images against a table of trained + added classes."""

    z_vis: np.ndarray  # [B, S]
    z_lin: np.ndarray  # [B, S + A]
    num_trained: int


def score_table(
    params: HeadParams,
    anchors: np.ndarray,
    mask: np.ndarray,
    trained_names: Sequence[str],
    entries: Sequence[ClassEntry],
    feats: np.ndarray,
) -> TableScores:
    """Vision and language logits of image features `[B, D]` against trained classes plus `entries`."""
    table = ClassTable.build(anchors, mask, params, list(trained_names)).with_added(entries, params)
    f = np.asarray(feats, dtype=np.float32)
    return TableScores(params.vision_logits(f), table.language_logits(params.queries(f), f), len(trained_names))


def predict(
    scores: TableScores,
    log_prior: np.ndarray,
    *,
    alpha: float,
    tau: float,
    gamma: float,
    vision: str = ADDED_CLASS_VISION,
) -> np.ndarray:
    """Argmax of the served calibrated probabilities (`vision`: how added classes enter the vision branch)."""
    probs = calibrated_probabilities(
        scores.z_vis,
        scores.z_lin,
        log_prior,
        alpha=alpha,
        tau=tau,
        added_class_bias=gamma,
        added_class_vision=vision,
    )
    pred: np.ndarray = probs.argmax(axis=1)
    return pred


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
    curve: list[dict[str, float]]  # per γ of the grid: gamma, seen, new, h
    rule: str


class _PredictOptions(TypedDict):
    """`predict`'s keyword arguments for one γ."""

    alpha: float
    tau: float
    gamma: float
    vision: str


def choose_gamma(
    seen: TableScores,
    seen_labels: np.ndarray,
    new: TableScores,
    new_labels: np.ndarray,
    log_prior: np.ndarray,
    *,
    alpha: float,
    tau: float,
    max_seen_drop: float,
    vision: str = ADDED_CLASS_VISION,
) -> GammaFit:
    """Pick γ on pseudo-new classes: the γ with the best new-class accuracy among those that cost the seen
    classes at most `max_seen_drop` points (relative to scoring them with no class added); if none qualifies,
    the γ with the smallest seen cost."""
    s = seen.num_trained
    alone = TableScores(seen.z_vis, seen.z_lin[:, :s], s)
    seen_base = class_mean_accuracy(
        predict(alone, log_prior, alpha=alpha, tau=tau, gamma=0.0, vision=vision), seen_labels
    )
    curve: list[dict[str, float]] = []
    for g in GAMMA_GRID:
        kw: _PredictOptions = {
            "alpha": alpha,
            "tau": tau,
            "gamma": float(g),
            "vision": vision,
        }
        a_seen = class_mean_accuracy(predict(seen, log_prior, **kw), seen_labels)
        a_new = class_mean_accuracy(predict(new, log_prior, **kw), new_labels)
        curve.append(
            {
                "gamma": float(g),
                "seen": a_seen,
                "new": a_new,
                "h": 0.0 if a_seen + a_new == 0 else 2 * a_seen * a_new / (a_seen + a_new),
            }
        )
    ok = [c for c in curve if seen_base - c["seen"] <= max_seen_drop]
    if ok:
        best = max(ok, key=lambda c: (c["new"], c["seen"]))
        rule = f"max pseudo-new accuracy with seen-class cost <= {max_seen_drop} points"
    else:
        best = min(curve, key=lambda c: seen_base - c["seen"])
        rule = "no γ met the seen-class cost limit; smallest seen cost"
    return GammaFit(best["gamma"], seen_base, curve, rule)


def pick_pseudo_new(train_counts: np.ndarray, labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Up to `count` of the rarest trained classes that have calibration images (at most a fifth of all
    classes, at least one kept class), chosen at random among the rarest third; sorted ids."""
    counts = np.asarray(train_counts)
    present = np.flatnonzero(np.bincount(labels, minlength=len(counts)) > 0)
    k = min(count, len(counts) // 5, len(present) - 1)
    if k < 1:
        return np.zeros(0, dtype=np.int64)
    rare = present[np.argsort(counts[present], kind="stable")][: max(k, len(present) // 3)]
    return np.sort(np.random.default_rng(seed).choice(rare, size=k, replace=False))


def fit_added_class_calibration(
    features: np.ndarray,
    labels: np.ndarray,
    params: HeadParams,
    anchors: np.ndarray,
    mask: np.ndarray,
    names: Sequence[str],
    train_counts: np.ndarray,
    descriptions: dict[int, np.ndarray],
    name_prompts: dict[int, np.ndarray],
    *,
    alpha: float,
    tau: float,
    pseudo: np.ndarray,
    max_seen_drop: float,
) -> dict[str, Any]:
    """γ for classes added by text, from the trained classes `pseudo` treated as new (see the module doc).

    Args:
        features, labels: raw image features `[N, D]` and labels of the calibration split.
        params, anchors, mask: the trained head (numpy, `vlltr.model.runtime.head` layout).
        names, train_counts: the trained classes.
        descriptions, name_prompts: for each pseudo-new class id, the text features of its description
            sentences and of its name prompts.
        alpha, tau: the served fusion and logit adjustment.
        pseudo: the trained class ids treated as new.
        max_seen_drop: points of the other classes' balanced accuracy γ may cost.
    Returns the calibration fields to merge: `added_class_bias`, `added_class_vision`, `added_class_fit`.
    """
    keep = np.setdiff1d(np.arange(len(names)), pseudo)
    arrays = params.arrays()
    arrays["mlp_w2"], arrays["mlp_b2"] = arrays["mlp_w2"][keep], arrays["mlp_b2"][keep]
    sub = HeadParams.from_arrays(arrays, logit_scale=params.logit_scale, ln_eps=params.ln_eps)
    entries, _ = text_entries(
        [descriptions[int(c)] for c in pseudo],
        [names[int(c)] for c in pseudo],
        anchors.shape[1],
        references=[name_prompts[int(c)] for c in pseudo],
        served=class_directions(anchors[keep], mask[keep]),
    )
    position = {int(c): i for i, c in enumerate(keep)} | {int(c): len(keep) + i for i, c in enumerate(pseudo)}
    seen_rows = np.isin(labels, keep)
    scores = score_table(sub, anchors[keep], mask[keep], [names[int(c)] for c in keep], entries, features)

    def rows(sel: np.ndarray) -> TableScores:
        return TableScores(scores.z_vis[sel], scores.z_lin[sel], scores.num_trained)

    remap = np.array([position[int(v)] for v in labels])
    fit = choose_gamma(
        rows(seen_rows),
        remap[seen_rows],
        rows(~seen_rows),
        remap[~seen_rows],
        log_prior_from_counts(np.asarray(train_counts)[keep]),
        alpha=alpha,
        tau=tau,
        max_seen_drop=max_seen_drop,
    )
    chosen = next(c for c in fit.curve if c["gamma"] == fit.gamma)
    log.info(
        "added-class bias: gamma=%.2f (pseudo-new %d classes: %.1f%% among all, other classes %.1f%% -> %.1f%%)",
        fit.gamma,
        len(pseudo),
        chosen["new"],
        fit.seen_at_zero_added,
        chosen["seen"],
    )
    return {
        "added_class_bias": float(fit.gamma),
        "added_class_vision": ADDED_CLASS_VISION,
        "added_class_fit": {
            "pseudo_new": [names[int(c)] for c in pseudo],
            "rule": fit.rule,
            "max_seen_drop": max_seen_drop,
            "seen_before": round(fit.seen_at_zero_added, 3),
            "seen_after": round(chosen["seen"], 3),
            "pseudo_new_accuracy": round(chosen["new"], 3),
            "head_retrained": False,
            "curve": [{k: round(v, 3) for k, v in c.items()} for c in fit.curve],
        },
    }
