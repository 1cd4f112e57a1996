"""The head's shortlist: exact scoring for small tables, near-exact rankings for large ones."""

from __future__ import annotations

import numpy as np
import pytest

from vlltr.model.runtime.head import ClassEntry, ClassTable, HeadParams, Shortlist

M, TRAINED = 4, 12


def _params(rng: np.random.Generator, D: int) -> HeadParams:
    arrays = {
        "ln_q_weight": 1 + 0.1 * rng.standard_normal(D),
        "ln_q_bias": 0.1 * rng.standard_normal(D),
        "w_q": rng.standard_normal((D, D)) / np.sqrt(D),
        "ln_k_weight": 1 + 0.1 * rng.standard_normal(D),
        "ln_k_bias": 0.1 * rng.standard_normal(D),
        "w_k": rng.standard_normal((D, D)) / np.sqrt(D),
        "mlp_w1": rng.standard_normal((4 * D, D)),
        "mlp_b1": np.zeros(4 * D),
        "mlp_w2": rng.standard_normal((TRAINED, 4 * D)),
        "mlp_b2": np.zeros(TRAINED),
    }
    return HeadParams.from_arrays(arrays, logit_scale=30.0)


def _table(rng: np.random.Generator, params: HeadParams, num_added: int) -> tuple[ClassTable, np.ndarray]:
    D = params.embed_dim
    """Classes whose anchors scatter around one direction each (as descriptions of one class do); some
    classes have padded anchor slots. Returns the table and the class directions."""
    total = TRAINED + num_added
    centres = rng.standard_normal((total, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    anchors = centres[:, None, :] + 0.6 * rng.standard_normal((total, M, D)).astype(np.float32) / np.sqrt(D)
    mask = np.ones((total, M), dtype=bool)
    mask[::3, -1] = False
    anchors[~mask] = 0.0
    trained = ClassTable.build(anchors[:TRAINED], mask[:TRAINED], params, [f"t{i}" for i in range(TRAINED)])
    added = [ClassEntry(f"a{i}", anchors[TRAINED + i], mask[TRAINED + i]) for i in range(num_added)]
    return trained.with_added(added, params), centres


def _images(rng: np.random.Generator, centres: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    D = centres.shape[1]
    labels = rng.integers(0, len(centres), n)
    feats = 3.0 * centres[labels] + 1.2 * rng.standard_normal((n, D)).astype(np.float32) / np.sqrt(D)
    return feats.astype(np.float32), labels


def _setup(seed: int, num_added: int, num_images: int, dim: int = 32):
    """A table, images, their queries and labels, and the exact language logits."""
    rng = np.random.default_rng(seed)
    params = _params(rng, dim)
    table, centres = _table(rng, params, num_added=num_added)
    f, labels = _images(rng, centres, num_images)
    q = params.queries(f)
    return table, f, q, labels, table.language_logits(q, f)


def test_small_tables_are_scored_exactly_with_a_shortlist_configured() -> None:
    table, f, q, _, exact = _setup(0, num_added=300, num_images=16)
    assert not Shortlist(size=64, min_added=300).applies(table.num_added)
    np.testing.assert_array_equal(table.language_logits(q, f, Shortlist(size=64, min_added=300)), exact)


@pytest.mark.parametrize("dim", [32, 256])  # 256: the cheap ranking runs in a 128-dimensional sketch
def test_large_tables_keep_the_exact_ranking_at_the_top(dim: int) -> None:
    table, f, q, labels, exact = _setup(1, num_added=6000, num_images=64, dim=dim)
    shortlist = Shortlist(size=64, min_added=1000)
    assert shortlist.applies(table.num_added)
    short = table.language_logits(q, f, shortlist)

    # Trained classes are always exact.
    np.testing.assert_allclose(short[:, :TRAINED], exact[:, :TRAINED], rtol=1e-5, atol=1e-5)
    # Every image's best class is the exact one with its exact score; without a sketch (dim 32) so are its
    # five best. (With random 256-dim classes, ranks 2-5 are ties among unrelated classes, cosines within
    # about 0.06 of each other, finer than the sketch resolves; related classes are far apart from those.)
    k = 5 if dim == 32 else 1
    top_exact = np.argsort(-exact, axis=1)[:, :k]
    top_short = np.argsort(-short, axis=1)[:, :k]
    np.testing.assert_array_equal(top_short, top_exact)
    rows = np.arange(len(f))[:, None]
    np.testing.assert_allclose(short[rows, top_short], exact[rows, top_exact], rtol=1e-5, atol=1e-5)
    # The setting is not trivial: the images' own classes win most of the time, and some classes keep the
    # cheaper (different) score.
    assert np.mean(exact.argmax(1) == labels) > 0.9
    assert np.any(np.abs(short - exact) > 1e-3)


def test_shortlist_rejects_nonsense_sizes() -> None:
    with pytest.raises(ValueError, match="shortlist size"):
        Shortlist(size=0)
    with pytest.raises(ValueError, match="shortlist size"):
        Shortlist(size=8, min_added=-1)


def test_prototypes_follow_added_and_removed_classes() -> None:
    rng = np.random.default_rng(2)
    params = _params(rng, 32)
    table, _ = _table(rng, params, num_added=5)
    assert table.prototypes.shape == (TRAINED + 5, 32)
    np.testing.assert_allclose(np.linalg.norm(table.prototypes, axis=1), 1.0, rtol=1e-5)
    base = table.trained_only()
    assert base.prototypes.shape == (TRAINED, 32)
    np.testing.assert_array_equal(base.prototypes, table.prototypes[:TRAINED])
