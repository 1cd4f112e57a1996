"""One benchmark seed: every arm, the controls, AnSS precision and the added-class evaluation.

Arms (same pretrained starting point, same backbone budget):
- `zero_shot`: the pretrained CLIP with class-name prompts (no training).
- `image_ce`, `image_bs`: image tower fine-tuned with a linear classifier, cross-entropy or Balanced Softmax.
- `vlltr_faithful`: stage 1 (CVLP: class-wise contrastive + distillation from the pretrained teacher, sqrt
  sampling, one lr for both towers; each class's text pool is its name in CLIP's prompt templates plus its
  descriptions, as in the paper), AnSS over that pool on the val images, LGR head with the published stage-2 loss
  (CE on both branches, mixup, smoothing, sqrt sampling, attention lr 1e-6) on the frozen stage-1 backbone,
  fusion alpha 0.2.
- `text_recommended`: the same stage 1 and AnSS, then the LGR head with its anchors fixed to the chosen
  sentences' embeddings (as published), the logit-adjusted loss with instance sampling, and the fusion weight
  chosen on the balanced val split. `--trained-anchors` trains the anchors from their text initialisation (a
  text-initialised cosine classifier, as in LIFT) instead: on Shapes-LT, whose tail classes are often seen in
  training only in black and white, trained anchors fit those colourless images and forget the colour the text
  gives (docs/benchmarks/shapes-lt.md, findings). Its stage-1 text-tower lr multiplier
  (`SeedConfig.text_lr_scale`, `--text-lr-scale`) is 1 as published; with another value the faithful arm trains
  its own stage 1.
- Controls on the recommended recipe: `control_shuffled` (descriptions permuted across classes) and
  `control_distractors` (each class keeps only its distractor sentences) keep the name prompts, so they
  measure what the descriptions add to the names; `control_text_shuffled` permutes each class's whole text
  pool (name prompts and descriptions, with the same permutation), so it measures what the class text as a
  whole gives. Each reruns stage 1 on its text and then AnSS and the head on that backbone, so it removes the
  text's contribution everywhere it enters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from bench.longtail import added as added_mod
from bench.longtail.anchors import anss_anchors, base_rate, image_free_anchors, precision
from bench.longtail.backbone import Budget, encode_images, encode_tokens, finetune_image_only, train_stage1
from bench.longtail.data import Benchmark
from bench.longtail.heads import HeadRecipe, head_logits, train_lgr_head
from bench.longtail.metrics import ShotGroups, harmonic_mean, split_accuracies
from vlltr.model.networks.factory import get_tokenizer
from vlltr.model.networks.head import fuse_probabilities
from vlltr.model.runtime.head import build_added_class_anchors, class_directions, log_prior_from_counts
from vlltr.model.runtime.prompts import SIMPLE_TEMPLATES, name_prompts

log = logging.getLogger(__name__)

ALPHA_GRID = tuple(round(a, 2) for a in np.arange(0.0, 1.001, 0.1))
FAITHFUL = HeadRecipe()  # the published stage 2, see HeadRecipe's docstring
# The published head (fixed anchors, attention lr 1e-6) trained with the logit-adjusted loss on instance sampling.
RECOMMENDED = HeadRecipe(loss="logit_adjusted", sampler="instance", mixup=0.0, smoothing=0.0)
# `--trained-anchors`: the anchors and attention train from the text initialisation (the page's findings say why
# this is not the recommendation).
TRAINED_ANCHORS = replace(RECOMMENDED, attn_lr=1e-3, anchor_lr=3e-3)


@dataclass
class SeedConfig:
    """What one seed runs with."""

    arch: str = "vlltr-tiny-vit"
    budget: Budget = field(default_factory=Budget)
    num_anchors: int = 8
    head_epochs: int = 30
    faithful_alpha: float = 0.2
    # The recommended recipe's stage-1 text-tower lr multiplier (the published recipe: 1, one lr). Lower values
    # make the recipe depend more on what the class text says, at a cost in accuracy on this benchmark
    # (docs/benchmarks/shapes-lt.md, findings), so the recipe keeps 1.
    text_lr_scale: float = 1.0
    recommended: HeadRecipe = field(default_factory=lambda: RECOMMENDED)  # the recommended arm's (and controls') head
    pseudo_new: int = 8  # trained classes treated as new to pick the added-class bias
    # Points of seen-class accuracy the chosen bias may cost on pseudo-new val: below the 2-point budget, as the
    # val estimate of that cost runs a little under the test one.
    max_seen_drop: float = 1.5


@dataclass
class Split:
    x: torch.Tensor
    y: np.ndarray


def _split(bm: Benchmark, name: str, keep: np.ndarray, remap: dict[int, int]) -> Split:
    labels = bm.labels[name]
    sel = np.flatnonzero(np.isin(labels, keep))
    return Split(
        bm.images[name][torch.as_tensor(sel, dtype=torch.long)],
        np.array([remap[int(v)] for v in labels[sel]], dtype=np.int64),
    )


def _pred_metrics(pred: np.ndarray, labels: np.ndarray, groups: ShotGroups) -> dict[str, float]:
    return {k: round(v, 3) for k, v in split_accuracies(pred, labels, groups).items()}


def _fused_pred(z_vis: torch.Tensor, z_lin: torch.Tensor, alpha: float) -> np.ndarray:
    return fuse_probabilities(z_vis, z_lin, alpha).argmax(1).numpy()


def _choose_alpha(z_vis: torch.Tensor, z_lin: torch.Tensor, labels: np.ndarray, groups: ShotGroups) -> float:
    """The fusion weight with the best balanced val accuracy (ties: smaller alpha, the text branch)."""
    best, best_acc = 0.0, -1.0
    for a in ALPHA_GRID:
        acc = split_accuracies(_fused_pred(z_vis, z_lin, a), labels, groups)["overall"]
        if acc > best_acc + 1e-9:
            best, best_acc = a, acc
    return float(best)


def black_and_white_only(bm: Benchmark) -> np.ndarray | None:
    """Per dataset class id: seen in training only in black and white (None for data drawn all in colour)."""
    if not bm.meta.get("sessions", {}).get("monochrome_prob"):
        return None
    return np.array(
        [bool(c["train_count"]) and c.get("train_monochrome") == c["train_count"] for c in bm.meta["classes"]]
    )


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of n classes with no class kept in place."""
    while True:
        perm = rng.permutation(n)
        if n < 2 or not np.any(perm == np.arange(n)):
            return perm


def _distractors_only(texts: list[list[str]], flags: list[np.ndarray]):
    """Each class keeps only its distractor sentences."""
    out_t, out_f = [], []
    for sents, fl in zip(texts, flags):
        keep = np.flatnonzero(~fl)
        if len(keep) == 0:
            raise ValueError("a class has no distractor sentence; the distractor-only control needs one")
        out_t.append([sents[i] for i in keep])
        out_f.append(np.zeros(len(keep), dtype=bool))
    return out_t, out_f


def _class_sentence_features(clip, tokenizer, sentences: list[list[str]]) -> list[torch.Tensor]:
    """Raw text features of every class's sentences, encoded in one pass and split per class."""
    flat = [s for sents in sentences for s in sents]
    feats = encode_tokens(clip, tokenizer(flat))
    return list(torch.split(feats, [len(s) for s in sentences]))


def run_seed(bm: Benchmark, pretrained: torch.nn.Module, seed: int, cfg: SeedConfig) -> dict:
    """Run every arm for one seed; returns a JSON-ready dict of metrics, precisions and timings."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    trained = bm.trained
    remap = {int(c): i for i, c in enumerate(trained)}
    held_map = {int(c): len(trained) + i for i, c in enumerate(bm.heldout)}
    train = _split(bm, "train", trained, remap)
    val = _split(bm, "val", trained, remap)
    test = _split(bm, "test", trained, remap)
    held = _split(bm, "test", bm.heldout, held_map) if len(bm.heldout) else None
    counts = np.bincount(train.y, minlength=len(trained))
    groups = ShotGroups.from_counts(counts, bm.many_threshold, bm.few_threshold)
    colourless = black_and_white_only(bm)
    if colourless is not None:
        greyed = np.flatnonzero(colourless[trained])
        groups = replace(
            groups,
            subsets={
                "few_colour": np.setdiff1d(groups.few, greyed),
                "few_black_and_white": np.intersect1d(groups.few, greyed),
            },
        )
    names = [bm.names[c] for c in trained]
    tokenizer = get_tokenizer(cfg.arch)
    arms: dict[str, dict] = {}
    extra: dict[str, object] = {}

    # Zero-shot: the pretrained CLIP, class names in CLIP's 7 prompt templates.
    t = time.perf_counter()
    prompt_tokens = tokenizer([p for n in names for p in name_prompts(n)])
    with torch.no_grad():
        txt = F.normalize(encode_tokens(pretrained, prompt_tokens), dim=-1).view(len(names), len(SIMPLE_TEMPLATES), -1)
        protos = F.normalize(txt.mean(1), dim=-1)
        img = F.normalize(encode_images(pretrained, test.x), dim=-1)
    arms["zero_shot"] = _pred_metrics((img @ protos.t()).argmax(1).numpy(), test.y, groups)
    timings["zero_shot"] = time.perf_counter() - t

    # Image-only arms: fine-tune the image tower.
    for arm, loss in (("image_ce", "ce"), ("image_bs", "balanced_softmax")):
        t = time.perf_counter()
        clip, fc = finetune_image_only(pretrained, train.x, train.y, counts, loss=loss, budget=cfg.budget, seed=seed)
        with torch.no_grad():
            logits = fc(encode_images(clip, test.x))
        arms[arm] = _pred_metrics(logits.argmax(1).numpy(), test.y, groups)
        timings[arm] = time.perf_counter() - t
        log.info("seed %d %s: %s", seed, arm, arms[arm])
        del clip, fc

    # Stage 1 (CVLP) on the real class text. As in the paper (and `vlltr train`), a class's text pool is its
    # name in CLIP's prompt templates followed by its description sentences.
    t = time.perf_counter()
    texts = [bm.sentences[c] for c in trained]
    flags = [bm.descriptive[c] for c in trained]
    prompts = [name_prompts(bm.names[c]) for c in trained]

    def pools(descriptions: list[list[str]], name_prompts_per_class: list[list[str]]) -> list[list[str]]:
        return [p + d for p, d in zip(name_prompts_per_class, descriptions)]

    class_tokens = [tokenizer(s) for s in pools(texts, prompts)]  # stage 1 sees the trained classes' text only

    def stage1_on(tokens: list[torch.Tensor], text_lr_scale: float):
        return train_stage1(
            pretrained, train.x, train.y, counts, tokens, budget=cfg.budget, seed=seed, text_lr_scale=text_lr_scale
        )

    def features(model) -> dict[str, torch.Tensor]:
        return {
            "train": encode_images(model, train.x),
            "val": encode_images(model, val.x),
            "test": encode_images(model, test.x),
        }

    stage1 = stage1_on(class_tokens, cfg.text_lr_scale)
    scale = float(stage1.logit_scale.detach().exp())
    feats = features(stage1)
    if held is not None:
        feats["held"] = encode_images(stage1, held.x)
    timings["stage1"] = time.perf_counter() - t

    all_feats = _class_sentence_features(stage1, tokenizer, bm.sentences)  # descriptions of every class
    prompt_feats = _class_sentence_features(stage1, tokenizer, [name_prompts(n) for n in bm.names])
    name_feats = torch.stack([F.normalize(F.normalize(p, dim=-1).mean(0), dim=0) for p in prompt_feats])
    pool_feats = [torch.cat([prompt_feats[c], all_feats[c]]) for c in range(len(bm.names))]  # dataset ids
    perm = _derangement(len(texts), np.random.default_rng(seed))
    shuffled = ([texts[p] for p in perm], [flags[p] for p in perm])
    # (name prompts, descriptions, their flags) of each variant's pools
    variants = {
        "real": (prompts, texts, flags),
        "shuffled": (prompts, *shuffled),
        "distractors": (prompts, *_distractors_only(texts, flags)),
        "text_shuffled": ([prompts[p] for p in perm], *shuffled),
    }
    heads: dict[str, torch.nn.Module] = {}
    for variant, (v_prompts, v_texts, v_flags) in variants.items():
        t = time.perf_counter()
        if variant == "real":
            v_feats, sent_feats, v_scale = feats, [pool_feats[c] for c in trained], scale
        else:
            # A control trains its own stage 1 on its text: the text reaches the tail through the backbone as
            # well as through the anchors, so a control that kept the real-text backbone would measure half.
            v_stage1 = stage1_on([tokenizer(s) for s in pools(v_texts, v_prompts)], cfg.text_lr_scale)
            v_feats = features(v_stage1)
            sent_feats = _class_sentence_features(v_stage1, tokenizer, pools(v_texts, v_prompts))
            v_scale = float(v_stage1.logit_scale.detach().exp())
            del v_stage1
        anchors, _ = anss_anchors(sent_feats, v_feats["val"], val.y, v_scale, cfg.num_anchors)
        if variant == "real":
            # Selection rules are compared on the description sentences alone (the name prompts are known to
            # describe their class): AnSS, the text-only centroid, and the added-class rule applied to each
            # trained class against the other classes' AnSS anchors.
            desc_feats = [all_feats[c] for c in trained]
            desc_anchors, _ = anss_anchors(desc_feats, v_feats["val"], val.y, v_scale, cfg.num_anchors)
            trained_names = name_feats[torch.as_tensor(trained, dtype=torch.long)]
            directions = class_directions(anchors.tensor.numpy(), anchors.mask.numpy())
            named = [
                build_added_class_anchors(
                    f.numpy(),
                    cfg.num_anchors,
                    reference=trained_names[c : c + 1].numpy(),
                    others=np.delete(directions, c, axis=0),
                )[2]
                for c, f in enumerate(desc_feats)
            ]
            extra["anss"] = {
                "anss_precision": round(precision(desc_anchors.chosen, v_flags), 3),
                "base_rate": round(base_rate(v_flags, cfg.num_anchors), 3),
                "text_only_precision": round(
                    precision(image_free_anchors(desc_feats, cfg.num_anchors).chosen, v_flags), 3
                ),
                # How many of the M anchors AnSS takes from the name prompts when they are in the pool.
                "prompt_anchors_per_class": round(
                    float(np.mean([np.sum(ch < len(SIMPLE_TEMPLATES)) for ch in anchors.chosen])), 2
                ),
                # The image-free rule the added classes use (own name vs other classes' names), on trained classes.
                "name_rule_precision": round(precision(named, v_flags), 3),
            }
            # VL-LTR as published trains both towers at one lr: its own stage 1, AnSS and head.
            t_faithful = time.perf_counter()
            p_stage1, p_feats, p_anchors, p_scale = stage1, v_feats, anchors, scale
            if cfg.text_lr_scale != 1.0:
                p_stage1 = stage1_on(class_tokens, 1.0)
                p_feats, p_scale = features(p_stage1), float(p_stage1.logit_scale.detach().exp())
                p_anchors, _ = anss_anchors(
                    _class_sentence_features(p_stage1, tokenizer, pools(texts, prompts)),
                    p_feats["val"],
                    val.y,
                    p_scale,
                    cfg.num_anchors,
                )
            faithful = train_lgr_head(
                p_feats["train"],
                train.y,
                counts,
                p_anchors.tensor,
                p_anchors.mask,
                p_scale,
                _with_epochs(FAITHFUL, cfg.head_epochs),
                seed,
            )
            zv, zl = head_logits(faithful, p_feats["test"])
            del p_stage1
            timings["vlltr_faithful"] = time.perf_counter() - t_faithful
            arms["vlltr_faithful"] = _pred_metrics(_fused_pred(zv, zl, cfg.faithful_alpha), test.y, groups)
            arms["vlltr_faithful_language_branch"] = _pred_metrics(zl.argmax(1).numpy(), test.y, groups)
            arms["vlltr_faithful_vision_branch"] = _pred_metrics(zv.argmax(1).numpy(), test.y, groups)
        head = train_lgr_head(
            v_feats["train"],
            train.y,
            counts,
            anchors.tensor,
            anchors.mask,
            v_scale,
            _with_epochs(cfg.recommended, cfg.head_epochs),
            seed,
        )
        zv, zl = head_logits(head, v_feats["val"])
        alpha = _choose_alpha(zv, zl, val.y, groups)
        zv, zl = head_logits(head, v_feats["test"])
        name = {
            "real": "text_recommended",
            "shuffled": "control_shuffled",
            "distractors": "control_distractors",
            "text_shuffled": "control_text_shuffled",
        }
        arms[name[variant]] = _pred_metrics(_fused_pred(zv, zl, alpha), test.y, groups)
        arms[name[variant]]["alpha"] = alpha
        heads[variant] = head
        timings[name[variant]] = time.perf_counter() - t
        log.info("seed %d %s: %s", seed, name[variant], arms[name[variant]])

    if held is not None:
        t = time.perf_counter()
        extra["added"] = _added_classes(
            bm,
            heads["real"],
            arms["text_recommended"]["alpha"],
            stage1,
            all_feats,
            pool_feats,
            name_feats,
            feats,
            train,
            val,
            test,
            held,
            counts,
            names,
            groups,
            cfg,
            seed,
        )
        timings["added"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return {
        "arms": arms,
        **extra,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "groups": {k: int(len(getattr(groups, k))) for k in ("many", "medium", "few")},
    }


def _with_epochs(recipe: HeadRecipe, epochs: int) -> HeadRecipe:
    return HeadRecipe(**{**asdict(recipe), "epochs": epochs})


def _added_classes(
    bm: Benchmark,
    head,
    alpha: float,
    stage1,
    all_feats: list[torch.Tensor],
    pool_feats: list[torch.Tensor],
    name_feats: torch.Tensor,
    feats: dict,
    train: Split,
    val: Split,
    test: Split,
    held: Split,
    counts: np.ndarray,
    names: list[str],
    groups: ShotGroups,
    cfg: SeedConfig,
    seed: int,
) -> dict:
    """Add the held-out classes by text; pick γ on pseudo-new trained classes; score with the service's code."""
    num_trained = len(names)
    held_names = [bm.names[c] for c in bm.heldout]
    held_feats = [all_feats[c] for c in bm.heldout]

    def by_ids(ids) -> torch.Tensor:
        return name_feats[torch.as_tensor(np.asarray(ids), dtype=torch.long)]

    entries, chosen = added_mod.added_entries(
        held_feats, held_names, cfg.num_anchors, name_feats=by_ids(bm.heldout), served=added_mod.served_directions(head)
    )
    _, centroid_chosen = added_mod.added_entries(held_feats, held_names, cfg.num_anchors)
    image_free_precision = precision(chosen, [bm.descriptive[c] for c in bm.heldout])
    centroid_precision = precision(centroid_chosen, [bm.descriptive[c] for c in bm.heldout])
    log_prior = log_prior_from_counts(counts)

    # γ from pseudo-new classes: drop some few-shot trained classes, retrain the head without them, add them by
    # text, and pick γ on their val images (no held-out label is used).
    rng = np.random.default_rng(seed + 1000)
    pool = groups.few if len(groups.few) >= cfg.pseudo_new else np.arange(num_trained)
    pseudo = np.sort(rng.choice(pool, size=min(cfg.pseudo_new, len(pool) - 1), replace=False))
    keep = np.setdiff1d(np.arange(num_trained), pseudo)
    sub = {int(c): i for i, c in enumerate(keep)}
    tr_sel = np.isin(train.y, keep)
    sub_counts = counts[keep]
    sent_feats = [pool_feats[bm.trained[c]] for c in keep]
    anchors, _ = anss_anchors(
        sent_feats,
        feats["val"][torch.as_tensor(np.isin(val.y, keep))],
        np.array([sub[int(v)] for v in val.y[np.isin(val.y, keep)]]),
        float(stage1.logit_scale.detach().exp()),
        cfg.num_anchors,
    )
    sub_head = train_lgr_head(
        feats["train"][torch.as_tensor(tr_sel)],
        np.array([sub[int(v)] for v in train.y[tr_sel]]),
        sub_counts,
        anchors.tensor,
        anchors.mask,
        float(stage1.logit_scale.detach().exp()),
        _with_epochs(cfg.recommended, cfg.head_epochs),
        seed,
    )
    pseudo_entries, _ = added_mod.added_entries(
        [all_feats[bm.trained[c]] for c in pseudo],
        [names[c] for c in pseudo],
        cfg.num_anchors,
        name_feats=by_ids(bm.trained[pseudo]),
        served=added_mod.served_directions(sub_head),
    )
    keep_names = [names[c] for c in keep]
    v_seen = np.isin(val.y, keep)
    seen_scores = added_mod.score_table(sub_head, keep_names, pseudo_entries, feats["val"][torch.as_tensor(v_seen)])
    new_scores = added_mod.score_table(sub_head, keep_names, pseudo_entries, feats["val"][torch.as_tensor(~v_seen)])
    pos = {int(c): len(keep) + i for i, c in enumerate(pseudo)}
    fit = added_mod.choose_gamma(
        seen_scores,
        np.array([sub[int(v)] for v in val.y[v_seen]]),
        new_scores,
        np.array([pos[int(v)] for v in val.y[~v_seen]]),
        log_prior_from_counts(sub_counts),
        alpha=alpha,
        tau=0.0,
        max_seen_drop=cfg.max_seen_drop,
    )

    # The real held-out classes on test, scored by the service's code path.
    seen_t = added_mod.score_table(head, names, entries, feats["test"])
    new_t = added_mod.score_table(head, names, entries, feats["held"])
    before = added_mod.class_mean_accuracy(
        added_mod.predict(
            added_mod.score_table(head, names, [], feats["test"]), log_prior, alpha=alpha, tau=0.0, gamma=0.0
        ),
        test.y,
    )
    alone = added_mod.class_mean_accuracy(new_t.z_lin[:, num_trained:].argmax(1) + num_trained, held.y)
    out = {
        "num_added": len(entries),
        "alpha": alpha,
        "image_free_precision": round(image_free_precision, 3),
        "centroid_rule_precision": round(centroid_precision, 3),
        "base_rate": round(base_rate([bm.descriptive[c] for c in bm.heldout], cfg.num_anchors), 3),
        "added_alone": round(alone, 3),
        "trained_before": round(before, 3),
        "gamma": fit.gamma,
        "gamma_rule": fit.rule,
        "pseudo_new_classes": [names[c] for c in pseudo],
        "pseudo_new_curve": [{k: round(v, 3) for k, v in c.items()} for c in fit.curve],
    }

    def on_test(gamma: float, vision: str) -> dict[str, float]:
        a_seen = added_mod.class_mean_accuracy(
            added_mod.predict(seen_t, log_prior, alpha=alpha, tau=0.0, gamma=gamma, vision=vision), test.y
        )
        a_new = added_mod.class_mean_accuracy(
            added_mod.predict(new_t, log_prior, alpha=alpha, tau=0.0, gamma=gamma, vision=vision), held.y
        )
        return {
            "trained_after": round(a_seen, 3),
            "added_among_all": round(a_new, 3),
            "harmonic_mean": round(harmonic_mean(a_seen, a_new), 3),
            "trained_cost": round(before - a_seen, 3),
        }

    # "published": added classes get no vision-branch mass (the paper's fusion), γ = 0; "uncalibrated": the
    # served standardised vision stand-in, γ = 0; "calibrated": the same with the pseudo-new γ.
    for label, gamma, vision in (
        ("published", 0.0, "none"),
        ("uncalibrated", 0.0, "standardised"),
        ("calibrated", fit.gamma, "standardised"),
    ):
        out[label] = on_test(gamma, vision)
    # Not a method (it reads the held-out test labels): the best any single γ could do within the 2-point
    # budget, which separates a wrong choice of γ from a model that cannot get there at all.
    curve = [(float(g), on_test(float(g), "standardised")) for g in added_mod.GAMMA_GRID]
    within = [(g, r) for g, r in curve if r["trained_cost"] <= 2.0] or [min(curve, key=lambda x: x[1]["trained_cost"])]
    g_best, r_best = max(within, key=lambda x: (x[1]["added_among_all"], -x[1]["trained_cost"]))
    out["oracle_within_2_points"] = {**r_best, "gamma": g_best}
    return out
