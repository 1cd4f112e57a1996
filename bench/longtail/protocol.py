"""How the benchmark runs its arms: each one is `vlltr train` (`vlltr.training.pipeline.run_training`) with a
bundled config plus the arm's overrides, so every number is the product's own training code (its loops,
schedule, sampler, augmentation, AnSS, calibration and added-class fit). This module only writes files the
configs point at and builds the configs; it trains nothing itself.

Equal terms. Every arm trains on `fit.txt` and makes every choice that needs labelled images (AnSS's reference
images, the post-hoc logit adjustment τ and temperature, the added-class γ) on `select.txt`; both are carved
out of the benchmark's training list, class by class (:func:`write_selection_split`), so the selection images
come from the same photo sessions as training: a class seen in training only in black and white is selected on
in black and white too. The benchmark's colour `val.txt` is not used by any arm; `test.txt` only to report.

Text controls get their own description folders (and, for the whole-text shuffle, their own class-name file),
written next to the benchmark by :func:`write_text_variant`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.longtail.data import Benchmark
from vlltr.training.config import Config, load_config

FIT_FILE = "fit.txt"
SELECT_FILE = "select.txt"
# Share of each trained class's training images kept for selection (at least one; a class needs two images).
SELECT_FRACTION = 0.1


@dataclass(frozen=True)
class ArmPlan:
    """One arm: its config overrides on top of the recipe, and what the bench reads from its run."""

    overrides: tuple[str, ...] = ()
    text_variant: str = "real"  # real | shuffled | distractors | text_shuffled | names_only
    image_only: bool = False
    backbone_budget: bool = False  # stage 2 fine-tunes the image tower with stage 1's epochs, batch and lr
    shares_stage1_with: str | None = None  # an arm whose stage 1 and AnSS this one reuses (same settings)
    starts_from: str | None = None  # an arm whose trained CLIP is this one's `model.pretrained` (decoupled stages)


@dataclass(frozen=True)
class Recipe:
    """The bundled config the arms start from and the overrides of this scale (full, or `--quick`)."""

    config: str
    overrides: tuple[str, ...] = ()
    faithful_alpha: float = 0.2
    extra: dict[str, str] = field(default_factory=dict)


def write_selection_split(bm: Benchmark, seed: int, fraction: float = SELECT_FRACTION) -> dict[str, int]:
    """Write `fit.txt` and `select.txt` into the benchmark folder: per trained class, `max(1, round(fraction * n))`
    of its `n` training images (drawn with `seed`) go to selection, the rest to training. Returns the counts."""
    lines = [ln for ln in (bm.root / "train.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    labels = np.array([int(ln.rsplit(maxsplit=1)[1]) for ln in lines])
    rng = np.random.default_rng([seed, 22])
    select = np.zeros(len(lines), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} training image: a selection split needs two per class")
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        select[rng.choice(idx, size=k, replace=False)] = True
    (bm.root / FIT_FILE).write_text("\n".join(ln for ln, s in zip(lines, select) if not s) + "\n", encoding="utf-8")
    (bm.root / SELECT_FILE).write_text("\n".join(ln for ln, s in zip(lines, select) if s) + "\n", encoding="utf-8")
    return {"fit": int((~select).sum()), "select": int(select.sum())}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of n items with none kept in place."""
    while True:
        perm = rng.permutation(n)
        if n < 2 or not np.any(perm == np.arange(n)):
            return perm


def write_text_variant(bm: Benchmark, variant: str, seed: int) -> dict[str, str]:
    """Write a control's text next to the benchmark; returns the `data.*` overrides that point at it.

    - `shuffled`: every trained class gets another trained class's descriptions (a derangement);
    - `distractors`: every trained class keeps only its distractor sentences;
    - `text_shuffled`: the same derangement for the descriptions and the class names (so the name prompts move
      too): what the class text gives at all;
    - `names_only`: no descriptions at all (empty files): the pool is the class name in the prompt templates.
    Held-out classes keep their own text. One sentence per line, which the text loader splits back unchanged.
    """
    if variant == "real":
        return {}
    trained = [int(c) for c in bm.trained]
    perm = derangement(len(trained), np.random.default_rng(seed))
    source = {c: c for c in range(len(bm.names))}
    if variant in ("shuffled", "text_shuffled"):
        source.update({c: trained[p] for c, p in zip(trained, perm)})
    elif variant not in ("distractors", "names_only"):
        raise ValueError(f"unknown text variant {variant!r}")
    folder = bm.root / f"text-{variant}-{seed}"
    folder.mkdir(exist_ok=True)
    for c in range(len(bm.names)):
        sentences = [] if variant == "names_only" else bm.sentences[source[c]]
        if variant == "distractors" and c in set(trained):
            sentences = [s for s, d in zip(sentences, bm.descriptive[c]) if not d]
            if not sentences:
                raise ValueError(f"class {c} has no distractor sentence; the distractor-only control needs one")
        (folder / f"desc_{c}.txt").write_text("".join(f"{t}\n" for t in sentences), encoding="utf-8")
    out = {"data.text_dir": folder.name}
    if variant == "text_shuffled":
        names = bm.root / f"classes-{variant}-{seed}.txt"
        names.write_text("\n".join(bm.names[source[c]] for c in range(len(bm.names))) + "\n", encoding="utf-8")
        out["data.class_names"] = names.name
    return out


# Controls beyond the shuffled descriptions, which the page's command leaves out to stay within its time budget
# (each is a full run, stage 1 included): the distractor sentences alone, and names shuffled with descriptions.
EXTRA_CONTROLS = ("control_distractors", "control_text_shuffled")


def arm_plans(faithful_alpha: float, *, all_controls: bool = False) -> dict[str, ArmPlan]:
    """Every trained arm, as overrides of the recipe (`text_recommended` is the recipe itself); the
    `EXTRA_CONTROLS` only with `all_controls`."""
    image_only = (
        "stage1.epochs=0",  # no contrastive stage: the pretrained CLIP goes straight to stage 2
        "stage2.train_backbone=true",
        "stage2.language_weight=0",  # no text in the loss ...
        "stage2.alpha=1.0",  # ... nor in the prediction
        "stage2.sampler=instance",
        "stage2.mixup=0",
        "stage2.cutmix=0",
        "stage2.smoothing=0",
        "eval.fit_added_classes=false",
    )
    plans = {
        "text_recommended": ArmPlan(),
        "vlltr_faithful": ArmPlan(
            overrides=(
                "stage2.loss=ce",
                "stage2.sampler=sqrt",
                "stage2.mixup=0.8",
                "stage2.cutmix=1.0",
                "stage2.smoothing=0.1",
                f"stage2.alpha={faithful_alpha}",
            ),
            shares_stage1_with="text_recommended",
        ),
        "image_ce": ArmPlan(overrides=(*image_only, "stage2.loss=ce"), image_only=True, backbone_budget=True),
        "image_bs": ArmPlan(
            overrides=(*image_only, "stage2.loss=logit_adjusted"), image_only=True, backbone_budget=True
        ),
        # cRT (decoupled classifier re-training): image_ce's fine-tuned image tower, frozen, and a new classifier
        # (the vision branch) trained on class-balanced batches.
        "image_crt": ArmPlan(
            overrides=(
                *(o for o in image_only if o != "stage2.train_backbone=true"),
                "stage2.train_backbone=false",
                "stage2.sampler=balanced",
                "stage2.loss=ce",
            ),
            image_only=True,
            starts_from="image_ce",
        ),
        # LIFT-style: the pretrained CLIP's embeddings of the class-name prompts initialise the classifier (the
        # language branch's anchors, no descriptions), which trains (`stage2.anchor_lr`, a text-initialised cosine
        # classifier) with the image tower under it, logit-adjusted loss, prediction from that branch alone.
        # Deviations from LIFT: the whole image tower trains instead of an adapter, the classifier is the
        # attention-weighted mean of the class's 7 prompt vectors, and the vision branch's loss also reaches the
        # tower. (With the classifier fixed, as a first version had it, classes whose names share a shape could
        # not be told apart: 9 % overall.)
        "lift_style": ArmPlan(
            overrides=(
                "stage1.epochs=0",
                "stage2.train_backbone=true",
                "stage2.anchor_lr=1.0e-3",
                "stage2.alpha=0.0",
                "stage2.loss=logit_adjusted",
                "stage2.sampler=instance",
                "stage2.mixup=0",
                "stage2.cutmix=0",
                "stage2.smoothing=0",
                "eval.fit_added_classes=false",
            ),
            text_variant="names_only",
            backbone_budget=True,
        ),
        "control_shuffled": ArmPlan(text_variant="shuffled"),
        "control_distractors": ArmPlan(text_variant="distractors"),
        "control_text_shuffled": ArmPlan(text_variant="text_shuffled"),
    }
    return {name: plan for name, plan in plans.items() if all_controls or name not in EXTRA_CONTROLS}


def _yaml_float(x: float) -> str:
    # YAML 1.1 (PyYAML) reads `1e-06` as text; a mantissa with a point reads as a number.
    return f"{x:.12e}"


def image_only_backbone(base: Config) -> tuple[str, ...]:
    """The arms without a stage 1 fine-tune the image tower in stage 2 with stage 1's backbone budget (epochs,
    batch, lr, warmup, schedule unit)."""
    s1 = base.stage1
    return (
        f"stage2.epochs={s1.epochs}",
        f"stage2.batch_size={s1.batch_size}",
        f"stage2.backbone_lr={_yaml_float(s1.lr)}",
        f"stage2.warmup_epochs={s1.warmup_epochs}",
        f"stage2.warmup_lr={_yaml_float(s1.warmup_lr)}",
        f"stage2.lr_unit={s1.lr_unit}",
    )


def arm_config(
    recipe: Recipe, plan: ArmPlan, bm: Benchmark, pretrained: Path, seed: int, text: dict[str, str]
) -> Config:
    """The config of one arm for one training seed on benchmark `bm`, starting from `pretrained`."""
    common = [
        f"data.root={bm.root}",
        f"data.train={FIT_FILE}",
        f"data.val={SELECT_FILE}",  # AnSS's reference and the calibration split (both read `val`)
        "anss.reference_split=val",
        "eval.calibration_split=val",
        # The harness scores the test images itself, in memory and through every branch it reports, so the
        # run's own evaluation reads only the selection split: a second pass over the 10,800 test images per
        # arm would cost minutes of the benchmark's time budget and tell nothing the harness does not.
        "eval.split=val",
        f"model.pretrained={pretrained}",
        f"run.seed={seed}",
        *recipe.overrides,
        *(f"{k}={v}" for k, v in text.items()),
    ]
    base = load_config(recipe.config, common)
    extra = image_only_backbone(base) if plan.backbone_budget else ()
    return load_config(recipe.config, [*common, *plan.overrides, *extra])


def config_fingerprint(cfg: Config, sections: tuple[str, ...]) -> str:
    """The listed sections of a config as one string (two arms may share a stage when these agree)."""
    values = cfg.to_dict()
    return json.dumps({k: values[k] for k in sections}, sort_keys=True)
