"""The bundled configs: paper hyper-parameters, known architectures, and real-dataset layouts that load from
small stand-in files (ImageNet-LT / Places-LT list files, iNaturalist JSON) and train end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlltr.model.networks.factory import list_architectures
from vlltr.training.config import BUNDLED_CONFIG_DIR, ConfigError, load_config
from vlltr.training.inputs import check_model_config, prepare_inputs
from vlltr.training.pipeline import run_training
from vlltr.training.stage1 import build_clip, build_stage1_model
from vlltr.training.stage2 import build_classifier, stage2_optimizer

REAL = [
    "imagenet-lt-rn50",
    "imagenet-lt-vitb16",
    "places-lt-rn50",
    "places-lt-vitb16",
    "inat2018-rn50",
    "inat2018-vitb16",
]
# (arch, stage-1 batch, stage-1 lr, stage-1 epochs, MLP lr, alpha, train backbone, v_detach, AnSS reference)
PAPER = {
    "imagenet-lt-rn50": ("RN50", 256, 5e-5, 50, 1e-3, 0.2, False, False, "val"),
    "imagenet-lt-vitb16": ("ViT-B-16", 128, 3.5e-5, 50, 1e-3, 0.2, False, False, "val"),
    "places-lt-rn50": ("RN50", 256, 5e-5, 50, 1e-4, 0.2, False, False, "val"),
    "places-lt-vitb16": ("ViT-B-16", 128, 1e-5, 50, 5e-5, 0.2, False, False, "val"),
    "inat2018-rn50": ("RN50", 256, 5e-4, 100, 2e-5, 0.7, True, True, "train"),
    "inat2018-vitb16": ("ViT-B-16", 128, 3.5e-4, 100, 2e-5, 0.7, True, True, "train"),
}
NAMES = ["tench fish", "goldfish", "great white shark"]


def test_every_bundled_config_loads_and_names_a_known_architecture():
    names = sorted(p.stem for p in BUNDLED_CONFIG_DIR.glob("*.yaml"))
    assert set(REAL) | {"digits-lt-tiny", "shapes-lt-tiny"} <= set(names)
    known = set(list_architectures())
    for name in names:
        cfg = load_config(name)
        assert cfg.model.arch in known, name
    for name in ("digits-lt-tiny", "shapes-lt-tiny"):
        cfg = load_config(name)
        assert cfg.model.arch == "vlltr-tiny-vit" and cfg.stage1.distill_beta == 0.0


@pytest.mark.parametrize("name", REAL)
def test_paper_hyper_parameters(name):
    cfg = load_config(name)
    arch, bs1, lr1, ep1, lr2, alpha, backbone, v_detach, ref = PAPER[name]
    assert (cfg.model.arch, cfg.stage1.batch_size, cfg.stage1.lr, cfg.stage1.epochs) == (arch, bs1, lr1, ep1)
    assert (cfg.stage2.lr, cfg.stage2.alpha, cfg.stage2.train_backbone, cfg.stage2.v_detach) == (
        lr2,
        alpha,
        backbone,
        v_detach,
    )
    assert cfg.anss.reference_split == ref and cfg.anss.num_anchors == 64
    assert cfg.model.pretrained == "openai" and cfg.model.quick_gelu
    assert cfg.stage1.distill_beta == 0.5 and cfg.stage1.warmup_epochs == 5 and cfg.stage2.warmup_epochs == 0
    assert cfg.stage2.attn_lr == 1e-6 and cfg.stage2.batch_size == 128
    assert (cfg.stage2.mixup, cfg.stage2.cutmix, cfg.stage2.smoothing) == (0.8, 1.0, 0.1)
    assert cfg.stage1.bn_train_mode == name.startswith("inat")
    assert cfg.stage2.epochs == (360 if name.startswith("inat") else 50)


def test_openai_weights_need_quick_gelu():
    cfg = load_config("imagenet-lt-rn50", ["model.quick_gelu=false"])
    with pytest.raises(ConfigError, match="quick_gelu"):
        check_model_config(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage2.loss=la", "stage2.loss"),
        ("stage1.sampler=sqrtt", "stage1.sampler"),
        ("data.templates=clip81", "data.templates"),
    ],
)
def test_a_value_outside_a_keys_choices_is_refused_at_load(override, key):
    # Caught when the config loads, not when the value is first used hours into a run.
    with pytest.raises(ConfigError, match=key):
        load_config("digits-lt-tiny", [override])
    assert load_config("digits-lt-tiny", ["stage2.loss=logit_adjusted"]).stage2.loss == "logit_adjusted"


def _image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path.name


def _wiki(root: Path) -> None:
    for i, name in enumerate(NAMES):
        (root / "wiki").mkdir(parents=True, exist_ok=True)
        (root / "wiki" / f"desc_{i}.txt").write_text(
            f"The {name} is a fish. It lives in water.\n\n== Description ==\n\nIt has fins.\n\n"
            f"== References ==\n\n1. A book.\n"
        )


def listfile_standin(root: Path, kind: str) -> None:
    """ImageNet-LT or Places-LT layout: three list files, labels.txt, wiki text."""
    prefix = "ImageNet_LT" if kind == "imagenet" else "Places_LT"
    counts = {"train": [6, 3, 2], "val": [2, 2, 2], "test": [2, 2, 2]}
    for split, per_class in counts.items():
        lines = []
        for c, n in enumerate(per_class):
            for k in range(n):
                rel = f"{split}/c{c}/img_{k}.jpg"
                _image(root / rel, hash((split, c, k)) % 1000)
                lines.append(f"{rel} {c}")
        (root / f"{prefix}_{split}.txt").write_text("\n".join(lines) + "\n")
    if kind == "imagenet":
        labels = [f"n0{i}44 {i} {n.replace(' ', '_')}" for i, n in enumerate(NAMES)]
    else:
        labels = [f"/{n[0]}/{n.replace(' ', '_')} {i}" for i, n in enumerate(NAMES)]
    (root / "labels.txt").write_text("\n".join(labels) + "\n")
    _wiki(root)


def inat_standin(root: Path) -> None:
    """iNaturalist 2018 layout: train2018.json / val2018.json (images + annotations), categories.json."""
    for split, per_class in (("train2018", [5, 3, 2]), ("val2018", [2, 2, 2])):
        images, annotations = [], []
        for c, n in enumerate(per_class):
            for k in range(n):
                image_id = len(images) + 1000 * (split == "val2018")
                rel = f"{split}/{c}/{k}.jpg"
                _image(root / rel, image_id)
                images.append({"id": image_id, "file_name": rel})
                annotations.append({"image_id": image_id, "category_id": c})
        annotations.reverse()  # the join must go by image id, not by position
        (root / f"{split}.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "categories.json").write_text(json.dumps([{"id": i, "name": n} for i, n in enumerate(NAMES)]))
    _wiki(root)


TINY = [
    "model.arch=vlltr-tiny-vit",
    "model.pretrained=null",
    "model.quick_gelu=false",
    "data.num_workers=0",
    "stage1.batch_size=4",
    "stage1.epochs=1",
    "stage1.warmup_epochs=0",
    "stage2.batch_size=4",
    "stage2.epochs=1",
    "eval.batch_size=8",
]


def standin(name: str, root: Path) -> None:
    if name.startswith("inat"):
        inat_standin(root)
    else:
        listfile_standin(root, "imagenet" if name.startswith("imagenet") else "places")


@pytest.mark.parametrize("name", REAL)
def test_real_config_builds_datasets_text_and_models(name, tmp_path):
    standin(name, tmp_path)
    cfg = load_config(name, [f"data.root={tmp_path}", *TINY])
    inputs = prepare_inputs(cfg, tmp_path / "cache")
    assert inputs.class_names == NAMES
    assert inputs.train_counts.tolist() == ([5, 3, 2] if name.startswith("inat") else [6, 3, 2])
    assert len(inputs.test) == 6 and inputs.val is not None
    # 80 CLIP templates + 3 wiki sentences (References dropped) per class
    assert np.diff(inputs.offsets).tolist() == [83, 83, 83]
    assert inputs.sentences[0][-1] == "It has fins."
    model = build_stage1_model(cfg, build_clip(cfg, torch.device("cpu")))
    assert model.teacher is not None and not any(p.requires_grad for p in model.teacher.parameters())
    assert model.bn_train_mode == cfg.stage1.bn_train_mode
    from vlltr.training.stage1 import Stage1Result

    s1 = Stage1Result(model.clip, torch.randn(249, 64), float(np.log(50.0)))
    classifier = build_classifier(cfg, s1, torch.randn(3, 4, 64), torch.ones(3, 4, dtype=torch.bool))
    groups = {g["name"]: g["lr"] for g in stage2_optimizer(classifier, cfg).param_groups}
    assert groups["mlp"] == cfg.stage2.lr and groups["attention"] == 1e-6
    assert ("backbone" in groups) == cfg.stage2.train_backbone
    assert "anchors" not in groups and "anchors" in dict(classifier.head.named_buffers())  # frozen, as published
    lift = load_config(name, [f"data.root={tmp_path}", *TINY, "stage2.anchor_lr=0.001"])
    lifted = build_classifier(lift, s1, torch.randn(3, 4, 64), torch.ones(3, 4, dtype=torch.bool))
    anchor_group = next(g for g in stage2_optimizer(lifted, lift).param_groups if g["name"] == "anchors")
    assert anchor_group["lr"] == 0.001 and anchor_group["weight_decay"] == 0.0
    assert anchor_group["params"] == [lifted.head.anchors]
    assert classifier.head.v_detach == cfg.stage2.v_detach
    assert float(classifier.head.logit_scale) == pytest.approx(50.0)


@pytest.mark.parametrize("name", ["imagenet-lt-vitb16", "inat2018-rn50"])
def test_real_config_trains_end_to_end_on_standin(name, tmp_path):
    standin(name, tmp_path / "data")
    cfg = load_config(name, [f"data.root={tmp_path / 'data'}", *TINY])
    metrics = run_training(cfg, tmp_path / "run")
    assert metrics["test"]["num_images"] == 6
    calibration = json.loads((tmp_path / "run/calibration.json").read_text())
    if name.startswith("inat"):
        assert set(metrics) == {"test"}  # val2018 is the test split: evaluated once
        assert calibration["fitted_on"] is None and calibration["tau"] == 0.0
    else:
        assert set(metrics) == {"test", "val"} and calibration["fitted_on"] == "val"


def test_local_pretrained_checkpoint_loads_through_the_config(tmp_path):
    cfg = load_config("digits-lt-tiny", ["run.seed=5"])
    source = build_clip(cfg, torch.device("cpu"))
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    loaded = build_clip(load_config("digits-lt-tiny", [f"model.pretrained={path}", "run.seed=9"]), torch.device("cpu"))
    other = build_clip(load_config("digits-lt-tiny", ["run.seed=9"]), torch.device("cpu"))
    for (name, a), b, _ in zip(source.state_dict().items(), loaded.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(source.state_dict().values(), other.state_dict().values()))
    missing = load_config("digits-lt-tiny", [f"model.pretrained={tmp_path / 'nope.pt'}"])
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        check_model_config(missing)
    with pytest.raises(ConfigError, match="laion-nonsense"):
        check_model_config(load_config("imagenet-lt-rn50", ["model.pretrained=laion-nonsense"]))
