"""One benchmark seed: every arm as a `vlltr train` run, the controls, AnSS precision and the added classes.

Every trained arm is `vlltr.training.pipeline.run_training` with the recipe's bundled config plus the arm's
overrides (`bench.longtail.protocol`): the product's stage 1, AnSS, stage 2, calibration and added-class fit, on
the same pretrained starting point, the same training images (`fit.txt`) and the same selection images
(`select.txt`, from the training sessions). This module trains nothing itself; it reads each finished run back
with `vlltr.training.checkpoint.load_final_model` and scores the test images through the served formulas.

Arms:
- `zero_shot`: the pretrained CLIP with class-name prompts (no training).
- `image_ce`, `image_bs`: no class text anywhere: stage 1 skipped, stage 2 fine-tunes the image tower with the
  vision branch alone (`stage2.language_weight=0`, `stage2.alpha=1`), cross-entropy or the logit-adjusted
  (Balanced Softmax) loss, instance sampling; the stage-1 backbone budget. `image_ce_posthoc_la` and
  `image_bs_posthoc_la` add the post-hoc logit adjustment τ (and temperature) the product fits on the
  selection split (`eval.calibrate`), the decoupled-adjustment baseline of the long-tail literature.
- `image_crt`: decoupled classifier re-training (cRT): `image_ce`'s fine-tuned image tower frozen (its CLIP is
  this run's `model.pretrained`) and a new vision branch trained on class-balanced batches; with and without the
  post-hoc adjustment.
- `lift_style`: LIFT's idea in the product's terms: the class-name prompts' embeddings initialise the classifier
  (the language branch's anchors, no descriptions, trained at `stage2.anchor_lr`), the image tower fine-tuned
  under it with the logit-adjusted loss (deviations in `bench.longtail.protocol.arm_plans`).
- `vlltr_faithful`: the published recipe: the recommended run's stage 1 and AnSS (same settings), then the
  published stage 2 (CE on both branches, mixup 0.8 / cutmix 1.0 on pixels, smoothing 0.1, sqrt sampling),
  fusion α = 0.2, no post-hoc adjustment.
- `text_recommended`: the bundled recipe itself (`shapes-lt-pretrained`), scored as served (its calibration).
- Controls on the recommended recipe, each a full run on its own text (so the text is removed everywhere it
  enters, stage 1 included): `control_shuffled` (descriptions permuted across classes) keeps the name prompts;
  with `--all-controls` also `control_distractors` (distractor sentences only, name prompts kept) and
  `control_text_shuffled` (names and descriptions permuted together).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.longtail import added as added_mod
from bench.longtail.anchors import anss_anchors, base_rate, image_free_anchors, precision
from bench.longtail.backbone import encode_images, encode_tokens
from bench.longtail.data import Benchmark
from bench.longtail.metrics import ShotGroups, harmonic_mean, split_accuracies
from bench.longtail.protocol import (
    SELECT_FILE,
    ArmPlan,
    Recipe,
    arm_config,
    arm_plans,
    config_fingerprint,
    write_text_variant,
)
from vlltr.model.networks.factory import get_tokenizer
from vlltr.model.networks.head import calibrated_probabilities
from vlltr.model.runtime.head import log_prior_from_counts
from vlltr.model.runtime.manifest import Calibration
from vlltr.model.runtime.prompts import SIMPLE_TEMPLATES, name_prompts
from vlltr.training.checkpoint import CONFIG_FILE, TrainedRun, load_final_model
from vlltr.training.config import Config, load_config
from vlltr.training.pipeline import run_training
from vlltr.training.pretrain import load_pretrained

log = logging.getLogger(__name__)

SHARED_STAGE_DIRS = ("stage1", "anss")
# Seconds each arm's run took when it was trained, kept beside the runs: a rerun that finds an arm finished
# reports what training it cost, not the instant of reloading it.
ARM_SECONDS_FILE = "arm-seconds.json"
# Config sections that must agree for an arm to reuse another's stage 1 and AnSS.
STAGE1_SECTIONS = ("model", "data", "stage1", "anss", "run")


@dataclass
class SeedConfig:
    """What one seed runs with: the recipe (a bundled config and this scale's overrides) and the added-class
    evaluation's settings."""

    recipe: Recipe = field(default_factory=lambda: Recipe("shapes-lt-pretrained"))
    text_lr_scale: float = 1.0  # the recommended recipe's stage-1 text-tower lr multiplier (1: published)
    all_controls: bool = False  # also the protocol's EXTRA_CONTROLS (two more full runs per seed)


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


def _selection_split(bm: Benchmark, remap: dict[int, int]) -> Split:
    """The selection images (`select.txt`, a subset of train), as preprocessed tensors and model labels."""
    train_lines = [ln for ln in (bm.root / "train.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    position = {ln: i for i, ln in enumerate(train_lines)}
    chosen = [position[ln] for ln in (bm.root / SELECT_FILE).read_text(encoding="utf-8").splitlines() if ln.strip()]
    idx = torch.as_tensor(chosen, dtype=torch.long)
    return Split(bm.images["train"][idx], np.array([remap[int(bm.labels["train"][i])] for i in chosen]))


def _pred_metrics(pred: np.ndarray, labels: np.ndarray, groups: ShotGroups) -> dict[str, float]:
    return {k: round(v, 3) for k, v in split_accuracies(pred, labels, groups).items()}


def black_and_white_only(bm: Benchmark) -> np.ndarray | None:
    """Per dataset class id: seen in training only in black and white (None for data drawn all in colour)."""
    if not bm.meta.get("sessions", {}).get("monochrome_prob"):
        return None
    return np.array(
        [bool(c["train_count"]) and c.get("train_monochrome") == c["train_count"] for c in bm.meta["classes"]]
    )


@torch.no_grad()
def run_logits(run: TrainedRun, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """`(z_vis, z_lin)` of a finished run's classifier on preprocessed images (eval mode, in batches)."""
    run.classifier.eval()
    vis, lin = [], []
    for i in range(0, len(images), batch_size):
        a, b = run.classifier(images[i : i + batch_size])
        vis.append(a)
        lin.append(b)
    return torch.cat(vis), torch.cat(lin)


def _run_log_prior(run: TrainedRun) -> torch.Tensor:
    counts = np.asarray([c["train_count"] for c in run.classes])
    return torch.as_tensor(log_prior_from_counts(counts), dtype=torch.float32)


def served_pred(run: TrainedRun, z_vis: torch.Tensor, z_lin: torch.Tensor, *, calibrated: bool) -> np.ndarray:
    """The run's prediction: with its fitted τ and temperature (as served) or without (the raw fusion)."""
    options = Calibration.from_dict(run.calibration).scoring_options() if calibrated else {}
    probs = calibrated_probabilities(z_vis, z_lin, _run_log_prior(run), alpha=run.alpha, **options)
    return probs.argmax(1).numpy()


def _share_stage1(source: Path, target: Path) -> None:
    """Start `target` with `source`'s finished stage 1 and AnSS (the caller checked the settings agree)."""
    for name in SHARED_STAGE_DIRS:
        if (source / name / "done.json").is_file() and not (target / name).exists():
            shutil.copytree(source / name, target / name)


def keep_earlier_eval_split(cfg: Config, run_dir: Path) -> Config:
    """`cfg`, with the `eval.split` of the run already in `run_dir` where that differs: an arm run started by an
    earlier harness, whose `vlltr train` also evaluated the test split, then resumes or reloads instead of being
    refused as a run with another config (the split only decides what the run reports, which the harness does not
    read)."""
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        return cfg
    split = load_config(saved).eval.split
    return cfg if split == cfg.eval.split else replace(cfg, eval=replace(cfg.eval, split=split))


def train_arm(
    name: str, plan: ArmPlan, bm: Benchmark, pretrained: Path, seed: int, cfg: SeedConfig, runs_dir: Path
) -> tuple[TrainedRun, float]:
    """Run (or resume, or reload) one arm's `vlltr train`; returns the finished run and the seconds its training
    took (for an arm found finished, the seconds recorded when it was trained, `ARM_SECONDS_FILE`)."""
    text = write_text_variant(bm, plan.text_variant, seed)
    recipe = cfg.recipe
    if cfg.text_lr_scale != 1.0 and not plan.image_only:
        scale = 1.0 if name == "vlltr_faithful" else cfg.text_lr_scale
        recipe = replace(recipe, overrides=(*recipe.overrides, f"stage1.text_lr_scale={scale}"))
    if plan.starts_from is not None:
        # The earlier arm's trained CLIP as a state dict, the file format `model.pretrained` loads.
        start = runs_dir / f"{plan.starts_from}-clip.pt"
        if not start.is_file():
            torch.save(load_final_model(runs_dir / plan.starts_from).classifier.clip.state_dict(), start)
        pretrained = start
    run_dir = runs_dir / name
    arm_cfg = keep_earlier_eval_split(arm_config(recipe, plan, bm, pretrained, seed, text), run_dir)
    if plan.shares_stage1_with is not None:
        source = runs_dir / plan.shares_stage1_with
        src_cfg = load_final_model(source).config
        if config_fingerprint(src_cfg, STAGE1_SECTIONS) == config_fingerprint(arm_cfg, STAGE1_SECTIONS):
            run_dir.mkdir(parents=True, exist_ok=True)
            _share_stage1(source, run_dir)
    record_path = runs_dir / ARM_SECONDS_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    finished_before = (run_dir / "metrics.json").is_file()  # run_training's mark of a finished run
    t = time.perf_counter()
    run_training(arm_cfg, run_dir)
    seconds = time.perf_counter() - t
    if finished_before and name in record:
        seconds = float(record[name])
    elif finished_before:
        log.warning("%s was finished before its training time was recorded: its time counts as reloading it", name)
    else:
        # An arm resumed after an interruption counts from its resumption: its record is a lower bound.
        record[name] = round(seconds, 1)
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return load_final_model(run_dir), seconds


def _test_split_and_groups(bm: Benchmark) -> tuple[Split, ShotGroups]:
    """The trained classes' test images, and their shot groups by the benchmark's training counts (fit +
    select, as its meta.json defines them), with the few-shot classes split by what their training images show
    where some were trained only in black and white."""
    trained = bm.trained
    remap = {int(c): i for i, c in enumerate(trained)}
    counts = np.bincount(np.array([remap[int(v)] for v in bm.labels["train"]]), minlength=len(trained))
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
    return _split(bm, "test", trained, remap), groups


def ablation_arm(overrides: tuple[str, ...]) -> str:
    """The run directory name of the recipe with `overrides` (`ablation-data.augment_original`)."""
    return "ablation-" + "+".join(o.replace("=", "_") for o in overrides)


def run_ablation(
    bm: Benchmark, pretrained_path: Path, seed: int, cfg: SeedConfig, runs_dir: Path, overrides: tuple[str, ...]
) -> dict[str, Any]:
    """The recommended recipe and the recipe with `overrides`, for one training seed, each a full `vlltr train`
    run from the same pretrained build on the same data, scored as served (calibrated). `text_recommended`
    is the benchmark's own run of the recipe (found finished when the benchmark ran on these inputs)."""
    test, groups = _test_split_and_groups(bm)
    arms: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    for name, plan in (("text_recommended", ArmPlan()), (ablation_arm(overrides), ArmPlan(overrides=overrides))):
        run, timings[name] = train_arm(name, plan, bm, pretrained_path, seed, cfg, runs_dir)
        zv, zl = run_logits(run, test.x)
        arms[name] = _pred_metrics(served_pred(run, zv, zl, calibrated=True), test.y, groups)
        log.info("seed %d %s: %s", seed, name, arms[name])
    return {
        "arms": arms,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "groups": {k: int(len(getattr(groups, k))) for k in ("many", "medium", "few")},
    }


def run_seed(bm: Benchmark, pretrained_path: Path, seed: int, cfg: SeedConfig, runs_dir: Path) -> dict[str, Any]:
    """Run every arm for one training seed; returns a JSON-ready dict of metrics, precisions and timings.

    `runs_dir` holds one `vlltr train` run directory per arm (resumed when the benchmark is rerun)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    trained = bm.trained
    remap = {int(c): i for i, c in enumerate(trained)}
    held_map = {int(c): len(trained) + i for i, c in enumerate(bm.heldout)}
    test, groups = _test_split_and_groups(bm)
    select = _selection_split(bm, remap)
    held = _split(bm, "test", bm.heldout, held_map) if len(bm.heldout) else None
    names = [bm.names[c] for c in trained]
    arms: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}

    # Zero-shot: the pretrained CLIP, class names in CLIP's 7 prompt templates.
    t = time.perf_counter()
    arch = arm_config(cfg.recipe, ArmPlan(), bm, pretrained_path, seed, {}).model.arch
    pretrained = load_pretrained(pretrained_path, arch)
    tokenizer = get_tokenizer(arch)
    with torch.no_grad():
        txt = encode_tokens(pretrained, tokenizer([p for n in names for p in name_prompts(n)]))
        txt = F.normalize(txt, dim=-1).view(len(names), len(SIMPLE_TEMPLATES), -1)
        protos = F.normalize(txt.mean(1), dim=-1)
        img = F.normalize(encode_images(pretrained, test.x), dim=-1)
    arms["zero_shot"] = _pred_metrics((img @ protos.t()).argmax(1).numpy(), test.y, groups)
    timings["zero_shot"] = time.perf_counter() - t
    del pretrained

    runs: dict[str, TrainedRun] = {}
    reloaded_s = 0.0  # the training time of arms found finished, which this call did not spend
    for name, plan in arm_plans(cfg.recipe.faithful_alpha, all_controls=cfg.all_controls).items():
        t = time.perf_counter()
        run, seconds = train_arm(name, plan, bm, pretrained_path, seed, cfg, runs_dir)
        reloaded_s += max(0.0, seconds - (time.perf_counter() - t))
        timings[name] = seconds
        ids = [c["dataset_id"] for c in run.classes]
        if ids != [int(c) for c in trained]:
            raise RuntimeError(f"{name}: the run's classes {ids[:5]}... are not the benchmark's trained classes")
        zv, zl = run_logits(run, test.x)
        if plan.image_only:
            arms[name] = _pred_metrics(served_pred(run, zv, zl, calibrated=False), test.y, groups)
            arms[f"{name}_posthoc_la"] = _pred_metrics(served_pred(run, zv, zl, calibrated=True), test.y, groups)
            arms[f"{name}_posthoc_la"]["tau"] = float(run.calibration.get("tau", 0.0))
        elif name == "vlltr_faithful":
            arms[name] = _pred_metrics(served_pred(run, zv, zl, calibrated=False), test.y, groups)
            arms[f"{name}_language_branch"] = _pred_metrics(zl.argmax(1).numpy(), test.y, groups)
            arms[f"{name}_vision_branch"] = _pred_metrics(zv.argmax(1).numpy(), test.y, groups)
        else:
            arms[name] = _pred_metrics(served_pred(run, zv, zl, calibrated=True), test.y, groups)
            arms[name]["alpha"] = run.alpha
            arms[name]["tau"] = float(run.calibration.get("tau", 0.0))
        runs[name] = run
        log.info("seed %d %s: %s", seed, name, arms[name])

    rec = runs["text_recommended"]
    t = time.perf_counter()
    extra["anss"] = _anss_precision(bm, rec, select, cfg)
    if held is not None:
        extra["added"] = _added_classes(bm, rec, test, held, names)
    timings["added"] = time.perf_counter() - t
    # What the seed costs from scratch (builds apart): this call's time plus the recorded training time of the
    # arms it found finished.
    timings["total"] = time.perf_counter() - t_start + reloaded_s
    return {
        "arms": arms,
        **extra,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "groups": {k: int(len(getattr(groups, k))) for k in ("many", "medium", "few")},
    }


def _class_sentence_features(clip: torch.nn.Module, tokenizer: Any, sentences: list[list[str]]) -> list[torch.Tensor]:
    """Raw text features of every class's sentences, encoded in one pass and split per class."""
    flat = [s for sents in sentences for s in sents]
    feats = encode_tokens(clip, tokenizer(flat))
    return list(torch.split(feats, [len(s) for s in sentences]))


def _anss_precision(bm: Benchmark, run: TrainedRun, select: Split, cfg: SeedConfig) -> dict[str, float]:
    """How well anchors are chosen on the descriptions alone (where the truth is known), with the recommended
    run's stage-1 model and the selection images: AnSS (the product's scoring), the text-only centroid rule, the
    distractor base rate, and how many of the product run's anchors are name prompts."""
    clip = run.classifier.clip
    tokenizer = get_tokenizer(run.arch)
    m = run.config.anss.num_anchors
    desc = _class_sentence_features(clip, tokenizer, [bm.sentences[c] for c in bm.trained])
    flags = [bm.descriptive[c] for c in bm.trained]
    with torch.no_grad():
        ref = encode_images(clip, select.x)
    anchors, _ = anss_anchors(desc, ref, select.y, float(run.classifier.head.logit_scale), m)
    templates = {t.format(c["name"]) for c in run.classes for t in SIMPLE_TEMPLATES}
    prompt_anchors = [sum(a in templates for a in c["anchors"]) for c in run.classes]
    return {
        "anss_precision": round(precision(anchors.chosen, flags), 3),
        "base_rate": round(base_rate(flags, m), 3),
        "text_only_precision": round(precision(image_free_anchors(desc, m).chosen, flags), 3),
        "prompt_anchors_per_class": round(float(np.mean(prompt_anchors)), 2),
    }


def _added_classes(bm: Benchmark, run: TrainedRun, test: Split, held: Split, names: list[str]) -> dict[str, Any]:
    """Add the held-out classes by their descriptions to the recommended run, with the γ and vision stand-in the
    product fitted on pseudo-new trained classes (`eval.fit_added_classes`), scored with the service's code."""
    clip = run.classifier.clip
    head = run.classifier.head
    tokenizer = get_tokenizer(run.arch)
    num_trained = len(names)
    m = run.config.anss.num_anchors
    held_names = [bm.names[c] for c in bm.heldout]
    held_feats = _class_sentence_features(clip, tokenizer, [bm.sentences[c] for c in bm.heldout])
    prompts = _class_sentence_features(clip, tokenizer, [name_prompts(n) for n in held_names])
    name_feats = torch.stack([F.normalize(F.normalize(p, dim=-1).mean(0), dim=0) for p in prompts])
    served = added_mod.served_directions(head)
    entries, chosen = added_mod.added_entries(held_feats, held_names, m, name_feats=name_feats, served=served)
    _, centroid_chosen = added_mod.added_entries(held_feats, held_names, m)
    held_flags = [bm.descriptive[c] for c in bm.heldout]
    cal = run.calibration
    fit = cal.get("added_class_fit", {})
    gamma = float(cal.get("added_class_bias", 0.0))
    vision = str(cal.get("added_class_vision", "standardised"))
    tau = float(cal.get("tau", 0.0))
    log_prior = _run_log_prior(run).numpy()
    with torch.no_grad():
        test_feats, held_img = encode_images(clip, test.x), encode_images(clip, held.x)
    seen_t = added_mod.score_table(head, names, entries, test_feats)
    new_t = added_mod.score_table(head, names, entries, held_img)

    def acc(table: Any, labels: np.ndarray, g: float, v: str, t: float = tau) -> float:
        pred = added_mod.predict(table, log_prior, alpha=run.alpha, tau=t, gamma=g, vision=v)
        return float(added_mod.class_mean_accuracy(pred, labels))

    before = acc(added_mod.score_table(head, names, [], test_feats), test.y, 0.0, vision)
    alone = added_mod.class_mean_accuracy(new_t.z_lin[:, num_trained:].argmax(1) + num_trained, held.y)
    out: dict[str, Any] = {
        "num_added": len(entries),
        "alpha": run.alpha,
        "image_free_precision": round(precision(chosen, held_flags), 3),
        "centroid_rule_precision": round(precision(centroid_chosen, held_flags), 3),
        "base_rate": round(base_rate(held_flags, m), 3),
        "added_alone": round(float(alone), 3),
        "trained_before": round(before, 3),
        "gamma": gamma,
        "gamma_rule": str(fit.get("rule", fit.get("skipped", "not fitted"))),
        "pseudo_new_classes": list(fit.get("pseudo_new", [])),
    }

    def on_test(g: float, v: str) -> dict[str, float]:
        a_seen, a_new = acc(seen_t, test.y, g, v), acc(new_t, held.y, g, v)
        return {
            "trained_after": round(a_seen, 3),
            "added_among_all": round(a_new, 3),
            "harmonic_mean": round(harmonic_mean(a_seen, a_new), 3),
            "trained_cost": round(before - a_seen, 3),
        }

    # "published": added classes get no vision-branch mass (the paper's fusion), γ = 0; "uncalibrated": the
    # served vision stand-in, γ = 0; "calibrated": the same with the product's γ.
    for label, g, v in (("published", 0.0, "none"), ("uncalibrated", 0.0, vision), ("calibrated", gamma, vision)):
        out[label] = on_test(g, v)
    # Not a method (it reads the held-out test labels): the best any single γ could do within the 2-point
    # budget, which separates a wrong choice of γ from a model that cannot get there at all.
    curve = [(float(g), on_test(float(g), vision)) for g in added_mod.GAMMA_GRID]
    within = [(g, r) for g, r in curve if r["trained_cost"] <= 2.0] or [min(curve, key=lambda x: x[1]["trained_cost"])]
    g_best, r_best = max(within, key=lambda x: (x[1]["added_among_all"], -x[1]["trained_cost"]))
    out["oracle_within_2_points"] = {**r_best, "gamma": g_best}
    return out
