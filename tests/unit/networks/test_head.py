"""The LGR head's Gram-matrix language logits equal the direct computation, masks and v_detach included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlltr.model.networks.head import LGRHead, calibrated_probabilities, fuse_probabilities


def make_head(v_detach: bool = False, seed: int = 0) -> tuple[LGRHead, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    C, M, D = 4, 5, 8
    anchors = torch.randn(C, M, D, generator=g) * 2.0
    mask = torch.ones(C, M, dtype=torch.bool)
    mask[1, 3:] = False  # class 1 has 3 anchors
    mask[2, 1:] = False  # class 2 has one anchor
    anchors[~mask] = 0.0
    head = LGRHead(anchors, mask, logit_scale=30.0, v_detach=v_detach).double()
    with torch.no_grad():  # move away from the identity init so the attention matters
        head.w_q.weight.add_(0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))
        head.w_k.weight.add_(0.3 * torch.randn(D, D, generator=g, dtype=torch.float64))
        head.ln_q.weight.mul_(1.5)
    f = torch.randn(6, D, generator=g, dtype=torch.float64) * 3.0
    return head, f


def loop_logits(head: LGRHead, f: torch.Tensor) -> torch.Tensor:
    """The textbook form, one class and one image at a time."""
    out = torch.zeros(f.shape[0], head.num_classes, dtype=f.dtype)
    keys = head.keys()
    for b in range(f.shape[0]):
        q = head.w_q(head.ln_q(f[b]))
        for c in range(head.num_classes):
            m = head.anchor_mask[c]
            a = torch.softmax(keys[c][m] @ q / math.sqrt(head.embed_dim), dim=0)
            v = (a[:, None] * head.anchors[c][m]).sum(0)
            out[b, c] = head.logit_scale * F.cosine_similarity(v, f[b], dim=0)
    return out


@pytest.mark.parametrize("v_detach", [False, True])
def test_gram_equals_direct_and_loop(v_detach):
    head, f = make_head(v_detach)
    gram = head.language_logits(f)
    assert torch.allclose(gram, head.language_logits_direct(f), atol=1e-10)
    assert torch.allclose(gram, loop_logits(head, f), atol=1e-10)


@pytest.mark.parametrize("v_detach", [False, True])
def test_gram_gradients_equal_direct_gradients(v_detach):
    head, f = make_head(v_detach)
    params = [head.w_q.weight, head.w_k.weight, head.ln_q.weight, head.ln_q.bias, head.ln_k.weight]
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(fn):
        x = f.clone().requires_grad_(True)
        out = (fn(x) * weights).sum()
        return torch.autograd.grad(out, [x] + params)

    for g_gram, g_direct in zip(grads(head.language_logits), grads(head.language_logits_direct)):
        assert torch.allclose(g_gram, g_direct, atol=1e-9)


def test_v_detach_changes_gradient_not_value():
    plain, f = make_head(False)
    detached, _ = make_head(True)
    assert torch.allclose(plain.language_logits(f), detached.language_logits(f), atol=1e-12)
    gp = torch.autograd.grad(plain.language_logits(f).sum(), plain.w_k.weight)[0]
    gd = torch.autograd.grad(detached.language_logits(f).sum(), detached.w_k.weight)[0]
    assert not torch.allclose(gp, gd, atol=1e-6)


def test_padded_anchor_values_are_ignored():
    head, f = make_head()
    before = head.language_logits(f)
    with torch.no_grad():
        head.anchors[1, 3:] = 1e3  # garbage under the mask
    assert torch.allclose(head.language_logits(f), before, atol=1e-9)


def test_class_without_anchor_is_rejected():
    anchors = torch.randn(3, 2, 4)
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        LGRHead(anchors, mask, 10.0)


def test_identity_init_and_forward_shapes():
    head = LGRHead(torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool), 10.0)
    assert torch.equal(head.w_q.weight, torch.eye(4)) and torch.equal(head.w_k.weight, torch.eye(4))
    z_vis, z_lin = head(torch.randn(5, 4))
    assert z_vis.shape == (5, 3) and z_lin.shape == (5, 3)
    assert (z_lin.abs() <= 10.0 + 1e-5).all()  # a scaled cosine


def test_trainable_anchors_are_a_text_initialised_classifier_with_the_same_state():
    anchors, mask = torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool)
    frozen = LGRHead(anchors, mask, 10.0)
    trained = LGRHead(anchors, mask, 10.0, trainable_anchors=True)
    assert "anchors" in dict(frozen.named_buffers()) and "anchors" not in dict(frozen.named_parameters())
    assert torch.equal(dict(trained.named_parameters())["anchors"], anchors)
    # One state-dict layout: a trained head's anchors load into a frozen head (how a finished run is read back).
    assert frozen.state_dict().keys() == trained.state_dict().keys()
    trained.load_state_dict(frozen.state_dict())
    f = torch.randn(5, 4)
    trained.language_logits(f).sum().backward()
    assert trained.anchors.grad is not None and trained.anchors.grad.abs().sum() > 0
    with torch.no_grad():
        trained.anchors.add_(0.5)
    frozen.load_state_dict(trained.state_dict())
    assert torch.equal(frozen.anchors, trained.anchors.detach())
    assert torch.allclose(frozen.language_logits(f), trained.language_logits(f))


def test_calibrated_probabilities_reduce_to_fusion_and_handle_added_classes():
    g = torch.Generator().manual_seed(0)
    z_vis, z_lin = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    log_prior = torch.tensor([0.6, 0.3, 0.1]).log()
    plain = calibrated_probabilities(z_vis, z_lin[:, :3], log_prior, alpha=0.3)
    assert torch.allclose(plain, fuse_probabilities(z_vis, z_lin[:, :3], 0.3), atol=1e-7)
    options = {"tau": 1.0, "temperature": 2.0, "added_class_bias": -1.0}
    p = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.3, **options)
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-6)
    adjusted_lin = torch.cat([(z_lin[:, :3] - log_prior), z_lin[:, 3:] - 1.0], 1)
    mixture = 0.7 * adjusted_lin.softmax(1)
    mixture[:, :3] += 0.3 * (z_vis - log_prior).softmax(1)
    tempered = mixture.sqrt() / mixture.sqrt().sum(1, keepdim=True)  # m ** (1 / T), T = 2, renormalised
    assert torch.allclose(p, tempered, atol=1e-6)
    assert torch.equal(p.argmax(1), mixture.argmax(1))
    # The format-1 rule: every logit divided by T before the softmaxes (an added class gets no vision term).
    old = calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.3, temperature_on="branches", **options)
    assert torch.allclose(old[:, 3:], 0.7 * adjusted_lin.div(2.0).softmax(1)[:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="temperature_on"):
        calibrated_probabilities(z_vis, z_lin, log_prior, alpha=0.3, temperature_on="logits")
