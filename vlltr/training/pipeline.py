"""`vlltr train`: stage 1 -> AnSS -> stage 2 -> calibration -> evaluation, resumable at every step.

Each stage leaves a `done.json` marker in its folder and epoch checkpoints while it runs, so calling
`run_training` again on the same run directory continues where an interrupted run stopped (and returns the
stored metrics when the run is complete). The resolved config is written to RUN/config.yaml at the start; a
later call must bring the same config (up to paths and worker counts that do not change results). Every start
appends the software versions and the machine to RUN/environment.json (`vlltr.training.environment`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vlltr.errors import ConfigError
from vlltr.model.networks.factory import get_tokenizer
from vlltr.model.runtime.prompts import name_prompts
from vlltr.training.added_classes import fit_added_class_calibration, numpy_head, pick_pseudo_new
from vlltr.training.anss import SavedSelection, run_anss
from vlltr.training.calibration import fit_calibration, fit_unknown, identity_calibration
from vlltr.training.checkpoint import (
    CALIBRATION_FILE,
    CLASSES_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    PROTOTYPES_FILE,
    TrainedRun,
    atomic_write_json,
    load_final_model,
)
from vlltr.training.config import Config, load_config, save_config
from vlltr.training.data.text import templates_for
from vlltr.training.distributed import DistEnv, barrier, init_distributed
from vlltr.training.environment import record_environment
from vlltr.training.evaluate import build_eval_split, collect_features, evaluate_run, head_logits
from vlltr.training.features import encode_token_table
from vlltr.training.inputs import PreparedInputs, check_model_config, prepare_inputs
from vlltr.training.prototypes import fit_run_prototypes, write_prototypes
from vlltr.training.runtime import EpochHook, derive_seed, seed_everything
from vlltr.training.stage1 import train_stage1
from vlltr.training.stage2 import build_classifier, train_stage2

log = logging.getLogger(__name__)

# Keys that may differ when resuming: where things are and how fast they load, not what is computed.
RESUME_FREE_KEYS = {"data.root", "data.num_workers", "run.device", "run.log_every"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


# What a run writes once a stage has begun; a directory holding none of these has nothing to resume.
STAGE_DIRS = ("stage1", "anss", "stage2")


def _has_started(run_dir: Path) -> bool:
    return any((run_dir / name).is_dir() and any((run_dir / name).iterdir()) for name in STAGE_DIRS)


def prepare_run_dir(cfg: Config, run_dir: Path, env: DistEnv) -> None:
    """Write config.yaml, or check that a resumed run uses the same config.

    A directory whose run stopped before any stage began (bad input found while the inputs were checked) takes
    the new config: there is nothing to resume, and a user fixing a setting reruns the same command line."""
    path = run_dir / CONFIG_FILE
    if path.is_file() and not _has_started(run_dir):
        log.info("%s holds no trained stage yet; starting it with the given config", run_dir)
    elif path.is_file():
        # Through load_config, so settings added since the run was written compare at their defaults.
        old = _flatten(yaml.safe_load(yaml.safe_dump(load_config(path).to_dict())))
        new = _flatten(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_FREE_KEYS)
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with a different config (changed: {changed}); "
                f"use a new --out directory or the same settings to resume"
            )
        log.info("resuming the run in %s", run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, path)
    barrier()


def write_classes(run_dir: Path, inputs: PreparedInputs, selection: SavedSelection) -> None:
    """classes.json: trained classes in model index order, with train counts and chosen anchor sentences."""
    sentences = inputs.flat_sentences
    counts = inputs.train_counts
    classes = []
    for i, (cid, name) in enumerate(zip(inputs.class_ids, inputs.class_names)):
        chosen = [sentences[j] for j in selection["indices"][i].tolist() if j >= 0]
        classes.append(
            {
                "name": name,
                "dataset_id": int(cid),
                "train_count": int(counts[i]),
                "source": "trained",
                "anchors": chosen,
            }
        )
    atomic_write_json(classes, run_dir / CLASSES_FILE)


def calibrate(cfg: Config, run_dir: Path, env: DistEnv, inputs: PreparedInputs) -> dict[str, Any]:
    """Fit tau and temperature on the calibration split, then the added-class bias; write calibration.json."""
    path = run_dir / CALIBRATION_FILE
    if path.is_file():
        written: dict[str, Any] = json.loads(path.read_text())
        return written
    run = load_final_model(run_dir, env.device)
    counts = np.asarray([c["train_count"] for c in run.classes])
    if not cfg.eval.calibrate:
        result = identity_calibration(counts, run.alpha, "calibration switched off (eval.calibrate: false)")
    else:
        split = cfg.eval.calibration_split
        feats, labels = collect_features(
            run.classifier,
            build_eval_split(run, split),
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            device=env.device,
            desc=f"calibration features ({split})",
        )
        z_vis, z_lin = head_logits(run.classifier, feats, env.device)
        result = fit_calibration(
            z_vis,
            z_lin,
            labels,
            counts,
            run.alpha,
            fitted_on=split,
            stage2_loss=cfg.stage2.loss,
            tau_max=cfg.eval.tau_max,
            tau_step=cfg.eval.tau_step,
        )
        if cfg.eval.unknown_score != "none":
            prototypes = None
            scores = cfg.eval.unknown_components if cfg.eval.unknown_score == "typicality" else [cfg.eval.unknown_score]
            if "mahalanobis" in scores:
                prototypes = fit_run_prototypes(run, env.device)
                write_prototypes(prototypes, run_dir / PROTOTYPES_FILE)  # before calibration.json marks the step done
            result.update(
                fit_unknown(
                    z_vis,
                    z_lin,
                    counts,
                    result,
                    float(run.classifier.head.logit_scale),
                    score=cfg.eval.unknown_score,
                    keep=cfg.eval.unknown_keep,
                    fitted_on=split,
                    features=feats.numpy(),
                    prototypes=prototypes,
                    components=cfg.eval.unknown_components,
                )
            )
        if cfg.eval.fit_added_classes:
            result.update(fit_added_classes(cfg, run, inputs, feats, labels, result, env.device))
    atomic_write_json(result, path)
    return result


def fit_added_classes(
    cfg: Config,
    run: TrainedRun,
    inputs: PreparedInputs,
    feats: torch.Tensor,
    labels: torch.Tensor,
    calibration: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    """`added_class_bias` (γ) and `added_class_vision` for classes added by text to this model, fitted on
    rare trained classes treated as new (`vlltr.training.added_classes`); their descriptions are their text pool
    without the prompt-template sentences, as a user would upload."""
    counts = np.asarray([c["train_count"] for c in run.classes])
    names = [c["name"] for c in run.classes]
    n_templates = len(templates_for(cfg.data.templates))
    has_text = np.diff(inputs.offsets) > n_templates
    pseudo = pick_pseudo_new(
        np.where(has_text, counts, np.iinfo(np.int64).max),
        labels.numpy(),
        cfg.eval.pseudo_new,
        derive_seed(cfg.run.seed, "pseudo-new"),
    )
    pseudo = pseudo[has_text[pseudo]]
    if len(pseudo) == 0:
        log.warning("added-class bias not fitted: no rare class with descriptions and calibration images")
        return {"added_class_fit": {"skipped": "no rare trained class with descriptions and calibration images"}}
    clip = run.classifier.clip
    tokenizer = get_tokenizer(cfg.model.arch)

    def encode(tokens: torch.Tensor) -> np.ndarray:
        return encode_token_table(clip, tokens, device=device, progress=False).numpy()

    descriptions = {
        int(c): encode(inputs.tokens[inputs.offsets[c] + n_templates : inputs.offsets[c + 1]]) for c in pseudo
    }
    prompts = {int(c): encode(tokenizer(name_prompts(names[c]))) for c in pseudo}
    params, anchors, mask = numpy_head(run.classifier.head)
    return fit_added_class_calibration(
        feats.numpy(),
        labels.numpy(),
        params,
        anchors,
        mask,
        names,
        counts,
        descriptions,
        prompts,
        alpha=run.alpha,
        tau=float(calibration["tau"]),
        pseudo=pseudo,
        max_seen_drop=cfg.eval.added_class_max_cost,
    )


def evaluate(cfg: Config, run_dir: Path, env: DistEnv) -> dict[str, Any]:
    """Evaluate the finished run on eval.split (and the calibration split); write metrics.json and reports."""
    run = load_final_model(run_dir, env.device)
    splits = [cfg.eval.split]
    # Also report val, unless it is the evaluation split itself or the same file (iNat's test is val2018).
    if cfg.data.val and "val" != cfg.eval.split and cfg.data.val != getattr(cfg.data, cfg.eval.split, None):
        splits.append("val")
    metrics = {split: evaluate_run(run, split, run_dir, device=env.device) for split in splits}
    atomic_write_json(metrics, run_dir / METRICS_FILE)
    return metrics


def run_training(cfg: Config, out_dir: str | Path, *, epoch_hook: EpochHook | None = None) -> dict[str, Any]:
    """Train, calibrate and evaluate into `out_dir`; resume it when it holds an unfinished run.

    Args:
        cfg: the resolved config.
        out_dir: the run directory (layout in `vlltr.training.checkpoint`).
        epoch_hook: called as `hook(stage, epoch)` after every finished and checkpointed epoch (tests use it
            to interrupt a run).

    Returns:
        metrics per evaluated split (the content of RUN/metrics.json).
    """
    run_dir = Path(out_dir)
    if cfg.run.num_threads > 0:
        torch.set_num_threads(cfg.run.num_threads)
    env = init_distributed(cfg.run.device)
    check_model_config(cfg)
    prepare_run_dir(cfg, run_dir, env)
    if (run_dir / METRICS_FILE).is_file():
        log.info("%s is a finished run; returning its metrics", run_dir)
        finished: dict[str, Any] = json.loads((run_dir / METRICS_FILE).read_text())
        return finished
    if env.is_main:
        record_environment(run_dir, env.device)
    seed_everything(derive_seed(cfg.run.seed, "pipeline"))
    inputs = prepare_inputs(cfg, run_dir / "cache")
    stage1 = train_stage1(cfg, inputs, run_dir / "stage1", env, epoch_hook)
    selection = run_anss(cfg, inputs, stage1, run_dir / "anss", env)
    if env.is_main:
        write_classes(run_dir, inputs, selection)
    if not (run_dir / "stage2" / "done.json").is_file():
        classifier = build_classifier(cfg, stage1, selection["anchors"], selection["mask"])
        train_stage2(cfg, inputs, classifier, run_dir, env, epoch_hook)
    metrics: dict[str, Any] = {}
    if env.is_main:
        calibrate(cfg, run_dir, env, inputs)
        metrics = evaluate(cfg, run_dir, env)
    barrier()
    return metrics
