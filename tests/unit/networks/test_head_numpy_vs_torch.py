"""vlltr.model.runtime.head (numpy) equals vlltr.model.networks.head (torch): both branches, added classes,
calibrated fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vlltr.model.runtime.head as H
from vlltr.model.networks.head import LGRHead
from vlltr.model.networks.head import calibrated_probabilities as torch_calibrated
from vlltr.model.runtime.head import (
    ClassEntry,
    ClassTable,
    HeadParams,
    calibrated_probabilities,
)

STATE_TO_NPZ = {
    "ln_q.weight": "ln_q_weight",
    "ln_q.bias": "ln_q_bias",
    "w_q.weight": "w_q",
    "ln_k.weight": "ln_k_weight",
    "ln_k.bias": "ln_k_bias",
    "w_k.weight": "w_k",
    "mlp.0.weight": "mlp_w1",
    "mlp.0.bias": "mlp_b1",
    "mlp.2.weight": "mlp_w2",
    "mlp.2.bias": "mlp_b2",
}


def random_head(c: int, m: int, d: int, seed: int = 0) -> LGRHead:
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.randn(c, m, d, generator=gen) * 2
    mask = torch.rand(c, m, generator=gen) > 0.4
    mask[:, 0] = True
    anchors[~mask] = 0
    head = LGRHead(anchors, mask, logit_scale=17.0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return head.eval()


def params_of(head: LGRHead) -> HeadParams:
    arrays = {STATE_TO_NPZ[k]: v.numpy() for k, v in head.state_dict().items() if k in STATE_TO_NPZ}
    return HeadParams.from_arrays(arrays, logit_scale=float(head.logit_scale), ln_eps=head.ln_q.eps)


def table_of(head: LGRHead, params: HeadParams) -> ClassTable:
    names = [f"c{i}" for i in range(head.num_classes)]
    return ClassTable.build(head.anchors.numpy(), head.anchor_mask.numpy(), params, names)


def close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    scale = max(1.0, float(np.abs(b).max()))
    assert float(np.abs(a - b).max()) <= rel * scale, float(np.abs(a - b).max())


@pytest.mark.parametrize("c,m,d", [(7, 5, 16), (50, 8, 32), (3, 1, 8)])
def test_branches_match_torch(c, m, d):
    head = random_head(c, m, d)
    params = params_of(head)
    table = table_of(head, params)
    f = torch.randn(11, d, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        z_vis, z_lin = head(f)
        z_direct = head.language_logits_direct(f)
    x = f.numpy()
    close(params.vision_logits(x), z_vis.numpy())
    ours = table.language_logits(params.queries(x), x)
    close(ours, z_lin.numpy())
    close(ours, z_direct.numpy())


@pytest.mark.parametrize(
    "tau,temperature,bias,alpha",
    [(0.0, 1.0, 0.0, 0.2), (1.0, 1.7, 0.5, 0.4), (0.35, 0.6, -1.2, 0.0), (2.0, 3.0, 2.0, 1.0)],
)
@pytest.mark.parametrize("added", [0, 3])
@pytest.mark.parametrize("vision", ["none", "standardised"])
@pytest.mark.parametrize("temperature_on", ["fused", "branches"])
def test_calibrated_probabilities_match_torch(tau, temperature, bias, alpha, added, vision, temperature_on):
    rng = np.random.default_rng(7)
    s = 9
    z_vis = (rng.standard_normal((13, s)) * 4).astype(np.float32)
    z_lin = (rng.standard_normal((13, s + added)) * 10).astype(np.float32)
    counts = rng.integers(1, 500, s)
    log_prior = H.log_prior_from_counts(counts)
    from vlltr.training.calibration import log_prior_from_counts as torch_prior

    np.testing.assert_allclose(log_prior, torch_prior(counts).numpy(), rtol=0, atol=1e-7)
    ours = calibrated_probabilities(
        z_vis,
        z_lin,
        log_prior,
        alpha=alpha,
        tau=tau,
        temperature=temperature,
        temperature_on=temperature_on,
        added_class_bias=bias,
        added_class_vision=vision,
    )
    ref = torch_calibrated(
        torch.from_numpy(z_vis),
        torch.from_numpy(z_lin),
        torch.from_numpy(log_prior),
        alpha=alpha,
        tau=tau,
        temperature=temperature,
        temperature_on=temperature_on,
        added_class_bias=bias,
        added_class_vision=vision,
    ).numpy()
    assert ours.shape == (13, s + added)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)


def test_added_classes_match_torch_head_over_all_anchors():
    trained = random_head(6, 4, 16, seed=2)
    params = params_of(trained)
    table = table_of(trained, params)
    gen = torch.Generator().manual_seed(9)
    extra = torch.randn(3, 4, 16, generator=gen)
    extra_mask = torch.tensor([[True, True, False, False], [True, False, False, False], [True] * 4])
    extra[~extra_mask] = 0
    entries = [ClassEntry(f"new{i}", extra[i].numpy(), extra_mask[i].numpy()) for i in range(3)]
    bigger = table.with_added(entries, params)
    # Reference: a torch head with the same attention weights over trained + added anchors.
    ref = LGRHead(
        torch.cat([trained.anchors, extra]), torch.cat([trained.anchor_mask, extra_mask]), float(trained.logit_scale)
    )
    state = {
        k: v
        for k, v in trained.state_dict().items()
        if not k.startswith("mlp.") and k not in ("anchors", "anchor_mask", "logit_scale")
    }
    ref.load_state_dict(state, strict=False)
    f = torch.randn(8, 16, generator=gen) * 2
    x = f.numpy()
    with torch.no_grad():
        expected = ref.language_logits(f).numpy()
    got = bigger.language_logits(params.queries(x), x)
    close(got, expected)
    assert bigger.names[-3:] == ("new0", "new1", "new2")
    assert (bigger.num_trained, bigger.num_added, bigger.num_classes) == (6, 3, 9)
    # The original table is untouched, and trained_only() goes back to it.
    assert table.num_classes == 6
    close(table.language_logits(params.queries(x), x), expected[:, :6])
    np.testing.assert_array_equal(bigger.trained_only().keys, table.keys)
    # Full served path with added classes: numpy vs torch.
    z_vis = params.vision_logits(x)
    log_prior = H.log_prior_from_counts(np.arange(1, 7))
    ours = calibrated_probabilities(z_vis, got, log_prior, alpha=0.3, tau=0.5, temperature=1.2, added_class_bias=0.7)
    theirs = torch_calibrated(
        torch.from_numpy(z_vis),
        torch.from_numpy(expected),
        torch.from_numpy(log_prior),
        alpha=0.3,
        tau=0.5,
        temperature=1.2,
        added_class_bias=0.7,
    ).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
