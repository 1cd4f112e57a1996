"""The long-tail benchmark measures the product: it has no training loop, optimiser, schedule or sampler of its
own, its arms are `vlltr train` configs, every arm trains and selects on the same images (the selection images
from the training sessions), and the control texts read back through the product's text loader unchanged."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.longtail.data import load_benchmark
from bench.longtail.protocol import (
    EXTRA_CONTROLS,
    FIT_FILE,
    SELECT_FILE,
    Recipe,
    arm_config,
    arm_plans,
    write_selection_split,
    write_text_variant,
)
from support.paths import REPO
from vlltr.model.runtime.prompts import SIMPLE_TEMPLATES, name_prompts
from vlltr.training.config import load_config
from vlltr.training.data.classes import load_class_names
from vlltr.training.data.text import load_class_texts

BENCH = REPO / "bench" / "longtail"
# What training looks like in code: any of these in bench/longtail means it trains something itself.
TRAINING_CALLS = {"backward", "zero_grad", "step", "clip_grad_norm_"}
TRAINING_NAMES = {"optim", "lr_scheduler", "DataLoader", "WeightedRandomSampler", "GradScaler", "CosineSchedule"}


def _modules() -> list[tuple[Path, ast.Module]]:
    files = sorted(BENCH.glob("*.py"))
    assert len(files) >= 8  # the scan sees the package
    return [(f, ast.parse(f.read_text(encoding="utf-8"))) for f in files]


def test_the_bench_defines_no_training_loop():
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in TRAINING_CALLS:
                    found.append(f"{path.name}:{node.lineno} .{node.func.attr}(")
            if isinstance(node, ast.Attribute) and node.attr in TRAINING_NAMES:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.Name) and node.id in TRAINING_NAMES:
                found.append(f"{path.name}:{node.lineno} {node.id}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in TRAINING_NAMES or n.startswith("torch.optim") for n in names):
                    found.append(f"{path.name}:{node.lineno} import {names}")
    assert not found, f"bench/longtail trains something itself: {found}"


def test_the_scan_would_see_a_training_loop():
    loop = ast.parse("opt = torch.optim.AdamW(p)\nfor x in xs:\n    loss(x).backward()\n    opt.step()\n")
    calls = {n.func.attr for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {"backward", "step"} <= calls & TRAINING_CALLS
    assert any(isinstance(n, ast.Attribute) and n.attr in TRAINING_NAMES for n in ast.walk(loop))


def test_the_arms_are_trained_by_the_products_pipeline():
    tree = dict((p.name, t) for p, t in _modules())["runner.py"]
    imported = {
        (node.module, a.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names
    }
    assert ("vlltr.training.pipeline", "run_training") in imported
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_training"]
    assert calls, "runner.py imports run_training but never calls it"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from vlltr.training.benchmarks import write_benchmark

    root = tmp_path_factory.mktemp("data") / "shapes"
    write_benchmark(
        "shapes-lt", root, seed=0, imbalance=4.0, n_max=12, val_per_class=1, test_per_class=1, monochrome_prob=0.5
    )
    return load_benchmark(root, image_size=8)


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_selection_images_come_out_of_each_class_training_images(bench):
    counts = write_selection_split(bench, seed=3)
    train, fit, select = (_lines(bench.root / n) for n in ("train.txt", FIT_FILE, SELECT_FILE))
    assert sorted(fit + select) == sorted(train) and not set(fit) & set(select)
    assert counts == {"fit": len(fit), "select": len(select)}
    label = {ln: int(ln.rsplit(maxsplit=1)[1]) for ln in train}
    # Every trained class is in both, so every arm trains on it and selects on it.
    assert {label[ln] for ln in select} == {label[ln] for ln in fit} == set(bench.trained.tolist())
    # The selection images are training images: a class trained only in black and white is selected on in black
    # and white too (the benchmark's val split would show it in colour).
    meta = {c: e for c, e in enumerate(bench.meta["classes"])}
    greyed = {c for c, e in meta.items() if e["train_count"] and e["train_monochrome"] == e["train_count"]}
    assert greyed and {label[ln] for ln in select} & greyed
    assert write_selection_split(bench, seed=3) == counts and _lines(bench.root / SELECT_FILE) == select


def test_every_arm_is_a_valid_product_config(bench, tmp_path):
    write_selection_split(bench, seed=0)
    pre = tmp_path / "pre.pt"
    recipe = Recipe("shapes-lt-pretrained")
    plans = arm_plans(0.2, all_controls=True)
    assert set(plans) >= {"text_recommended", "vlltr_faithful", "image_ce", "image_bs", "control_shuffled"}
    # The page's command leaves out only the extra controls (each a full run); the shuffled one always runs.
    assert set(plans) - set(arm_plans(0.2)) == set(EXTRA_CONTROLS) and "control_shuffled" in arm_plans(0.2)
    configs = {name: arm_config(recipe, plan, bench, pre, 1, {}) for name, plan in plans.items()}
    rec = configs["text_recommended"]
    bundled = load_config("shapes-lt-pretrained")
    # The recommended arm is the bundled recipe; only where the data and the start point are differs.
    assert rec.stage1 == bundled.stage1 and rec.stage2 == bundled.stage2 and rec.anss == bundled.anss
    assert rec.model.pretrained == str(pre) and rec.run.seed == 1
    for cfg in configs.values():  # the same images for every arm
        assert (cfg.data.root, cfg.data.train, cfg.data.val) == (str(bench.root), FIT_FILE, SELECT_FILE)
        assert cfg.anss.reference_split == "val" and cfg.eval.calibration_split == "val"
        assert cfg.eval.split == "val"  # the harness scores the test images itself, once
    for name in ("image_ce", "image_bs"):
        s2 = configs[name].stage2
        assert configs[name].stage1.epochs == 0 and s2.train_backbone and s2.language_weight == 0 and s2.alpha == 1
        assert (s2.epochs, s2.batch_size, s2.backbone_lr) == (rec.stage1.epochs, rec.stage1.batch_size, rec.stage1.lr)
    assert configs["image_bs"].stage2.loss == "logit_adjusted" and configs["image_ce"].stage2.loss == "ce"
    crt = configs["image_crt"].stage2  # decoupled: a frozen tower (image_ce's, set by the runner), balanced batches
    assert not crt.train_backbone and crt.sampler == "balanced" and crt.language_weight == 0 and crt.alpha == 1
    assert plans["image_crt"].starts_from == "image_ce" and configs["image_crt"].stage1.epochs == 0
    lift = configs["lift_style"]  # text-initialised classifier over the pretrained CLIP, both trained
    assert lift.stage1.epochs == 0 and lift.stage2.train_backbone and lift.stage2.alpha == 0.0
    assert lift.stage2.anchor_lr > 0 and rec.stage2.anchor_lr == 0  # LIFT's classifier trains; the recipe's not
    assert lift.stage2.epochs == rec.stage1.epochs and lift.stage2.loss == "logit_adjusted"
    faithful = configs["vlltr_faithful"]
    assert faithful.stage1 == rec.stage1 and faithful.anss == rec.anss  # so it may share the stage-1 run
    assert (faithful.stage2.loss, faithful.stage2.sampler, faithful.stage2.alpha) == ("ce", "sqrt", 0.2)


def test_the_lift_arms_pool_is_the_name_prompts_alone(bench):
    overrides = write_text_variant(bench, "names_only", seed=0)
    cfg = load_config(
        "shapes-lt-pretrained", [f"data.root={bench.root}", f"data.text_dir={overrides['data.text_dir']}"]
    )
    trained = [int(c) for c in bench.trained]
    pools = load_class_texts(cfg.data, bench.names, trained)
    assert all(p == name_prompts(bench.names[c]) for p, c in zip(pools, trained))


@pytest.mark.parametrize("variant", ["shuffled", "distractors", "text_shuffled"])
def test_control_text_reads_back_through_the_products_loader(bench, variant):
    overrides = write_text_variant(bench, variant, seed=5)
    cfg = load_config("shapes-lt-pretrained", [f"data.root={bench.root}", *(f"{k}={v}" for k, v in overrides.items())])
    names = load_class_names(cfg.data)
    trained = [int(c) for c in bench.trained]
    pools = load_class_texts(cfg.data, names, trained)
    n_prompts = len(SIMPLE_TEMPLATES)  # the recipe's `data.templates: simple`, before the descriptions
    assert pools[0][:n_prompts] == name_prompts(names[trained[0]])
    descriptions = [p[n_prompts:] for p in pools]
    moved = [d != bench.sentences[c] for d, c in zip(descriptions, trained)]
    if variant == "distractors":
        for d, c in zip(descriptions, trained):
            assert d == [s for s, f in zip(bench.sentences[c], bench.descriptive[c]) if not f]
    else:
        assert all(moved)  # a derangement: no class keeps its own text
        assert sorted(map(tuple, descriptions)) == sorted(tuple(bench.sentences[c]) for c in trained)
        assert (names == bench.names) == (variant == "shuffled")  # only the whole-text control moves the names
    for c in bench.heldout:  # classes added by text keep their own descriptions
        assert load_class_texts(cfg.data, names, [int(c)])[0][n_prompts:] == bench.sentences[int(c)]


@pytest.mark.parametrize("dataset", ["shapes-lt", "digits-lt"])
@pytest.mark.parametrize("quick", [False, True])
def test_every_scale_builds_every_arms_config(dataset, quick, tmp_path):
    from types import SimpleNamespace

    from bench.longtail.__main__ import settings

    _, pre_cfg, seed_cfg = settings(dataset, quick)
    bm = SimpleNamespace(root=tmp_path)
    for name, plan in arm_plans(seed_cfg.recipe.faithful_alpha, all_controls=True).items():
        cfg = arm_config(seed_cfg.recipe, plan, bm, tmp_path / "pre.pt", 0, {})  # a ConfigError names a bad key
        assert cfg.model.arch == pre_cfg.arch, name  # every arm starts from the pretraining build's architecture
        no_stage1 = "stage1.epochs=0" in plan.overrides
        assert cfg.stage1.epochs == (
            0
            if no_stage1
            else 1
            if quick
            else load_config(seed_cfg.recipe.config, list(seed_cfg.recipe.overrides)).stage1.epochs
        ), name


def test_an_arm_run_started_by_an_earlier_harness_keeps_its_evaluation_split(bench, tmp_path):
    from dataclasses import replace

    from bench.longtail.runner import keep_earlier_eval_split
    from vlltr.training.config import save_config

    cfg = arm_config(Recipe("shapes-lt-pretrained"), arm_plans(0.2)["image_ce"], bench, tmp_path / "pre.pt", 0, {})
    run = tmp_path / "image_ce"
    assert keep_earlier_eval_split(cfg, run) == cfg  # a new run takes the harness's split
    run.mkdir()
    save_config(replace(cfg, eval=replace(cfg.eval, split="test")), run / "config.yaml")
    kept = keep_earlier_eval_split(cfg, run)
    assert kept.eval.split == "test" and replace(kept, eval=cfg.eval) == cfg  # nothing else changes
