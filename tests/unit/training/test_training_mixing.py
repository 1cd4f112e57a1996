"""Batch-mode mixup / cutmix with smoothed targets (timm's semantics, explicit RNG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlltr.training.mixing import Mixer, cutmix_box, mix_targets, smoothed_one_hot


def test_smoothed_one_hot_values():
    # smoothing 0.1 over 4 classes: off = 0.025, on = 0.9 + 0.025 = 0.925
    t = smoothed_one_hot(torch.tensor([2]), 4, 0.1)
    assert torch.allclose(t, torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def test_mix_targets_pair_with_reversed_batch():
    t = mix_targets(torch.tensor([0, 1]), 2, 0.75, 0.0)
    # image 0 is mixed with image 1 (the reversed batch) and vice versa
    assert torch.allclose(t, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))


def test_no_mixing_only_smooths():
    mixer = Mixer(3, mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.1)
    x = torch.randn(4, 3, 8, 8)
    out, t = mixer(x, torch.tensor([0, 1, 2, 0]), np.random.default_rng(0))
    assert torch.equal(out, x)
    assert torch.allclose(t, smoothed_one_hot(torch.tensor([0, 1, 2, 0]), 3, 0.1))


def test_mixup_blends_images_with_the_drawn_lambda():
    mixer = Mixer(2, mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.0)
    x = torch.randn(2, 3, 4, 4)
    lam, cut = mixer.draw(np.random.default_rng(5))
    out, t = mixer(x, torch.tensor([0, 1]), np.random.default_rng(5))
    assert not cut
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert t[0, 0].item() == pytest.approx(lam, abs=1e-6)


def test_cutmix_pastes_a_box_and_corrects_lambda():
    mixer = Mixer(2, mixup_alpha=0.0, cutmix_alpha=1.0, smoothing=0.0)
    x = torch.stack([torch.zeros(1, 10, 10), torch.ones(1, 10, 10)])
    out, t = mixer(x, torch.tensor([0, 1]), np.random.default_rng(3))
    pasted = out[0].mean().item()  # fraction of image 0 now taken from image 1
    assert t[0, 1].item() == pytest.approx(pasted, abs=1e-6)
    assert torch.equal(out[1], 1 - out[0])


def test_cutmix_box_is_clipped_to_the_image():
    for seed in range(20):
        yl, yh, xl, xh = cutmix_box(7, 9, 0.3, np.random.default_rng(seed))
        assert 0 <= yl <= yh <= 7 and 0 <= xl <= xh <= 9


def test_same_rng_same_mix_and_odd_batch_rejected():
    mixer = Mixer(3)
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 1])
    a = mixer(x, y, np.random.default_rng(11))
    b = mixer(x, y, np.random.default_rng(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="even batch"):
        mixer(torch.randn(3, 3, 6, 6), torch.tensor([0, 1, 2]), np.random.default_rng(0))
