"""Stage 1's optimizer: the text tower's lr multiplier (`stage1.text_lr_scale`)."""

from __future__ import annotations

import pytest
import torch

from vlltr.model.networks.factory import clip_dims, create_clip
from vlltr.training.config import load_config
from vlltr.training.stage1 import build_stage1_model, stage1_optimizer


def _model_and_optimizer(*overrides: str):
    cfg = load_config("digits-lt-tiny", list(overrides))
    torch.manual_seed(0)
    model = build_stage1_model(cfg, create_clip(cfg.model.arch))
    return cfg, model, stage1_optimizer(model, cfg)


def _step(model, opt) -> None:
    clip = model.clip
    size = clip_dims(clip).image_size
    images = torch.randn(4, 3, size, size)
    tokens = torch.randint(1, 100, (4, int(clip.positional_embedding.shape[0])))
    loss = clip.encode_image(images).square().mean() + clip.encode_text(tokens).square().mean() + clip.logit_scale
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_default_is_one_shared_lr():
    cfg, model, opt = _model_and_optimizer()
    assert {g["lr"] for g in opt.param_groups} == {cfg.stage1.lr}
    trainable = {id(p) for p in model.clip.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_text_tower_gets_its_own_scaled_lr():
    cfg, model, opt = _model_and_optimizer("stage1.text_lr_scale=0.1")
    by_group = {g["name"]: g for g in opt.param_groups}
    assert by_group["image"]["lr"] == pytest.approx(cfg.stage1.lr)
    assert by_group["text"]["lr"] == pytest.approx(0.1 * cfg.stage1.lr)
    text = {id(p) for g in opt.param_groups if g["name"].startswith("text") for p in g["params"]}
    assert id(model.clip.token_embedding.weight) in text
    assert not text & {id(p) for p in model.clip.visual.parameters()}
    assert id(model.clip.logit_scale) not in text
    # Every student parameter is optimised exactly once.
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.clip.parameters()))


def test_zero_freezes_the_text_tower_only():
    _, model, opt = _model_and_optimizer("stage1.text_lr_scale=0")
    text_before = {
        k: v.clone() for k, v in model.clip.named_parameters() if not k.startswith("visual.") and k != "logit_scale"
    }
    visual_before = [p.clone() for p in model.clip.visual.parameters()]
    _step(model, opt)
    for k, p in model.clip.named_parameters():
        if k in text_before:
            assert torch.equal(p, text_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(visual_before, model.clip.visual.parameters()))


def test_negative_scale_is_refused():
    with pytest.raises(ValueError, match="text_lr_scale"):
        _model_and_optimizer("stage1.text_lr_scale=-0.5")
