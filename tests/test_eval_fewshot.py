"""Few-shot episode sampling, SimpleShot / logreg classifiers and confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellssl.errors import DataError
from cellssl.eval.features import FeatureSet
from cellssl.eval.fewshot import cl2n, mean_ci95, prototype_classify, run_fewshot, sample_episodes


def _labels(counts: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def test_episodes_disjoint_and_exact_counts():
    labels = _labels([30, 25, 40, 22])
    eps = sample_episodes(labels, ways=3, shots=5, queries=7, episodes=50, seed=1)
    assert len(eps) == 50
    for ep in eps:
        assert len(ep.support_idx) == 3 * 5 and len(ep.query_idx) == 3 * 7
        assert not set(ep.support_idx.tolist()) & set(ep.query_idx.tolist())
        assert len(set(ep.support_idx.tolist())) == 15 and len(set(ep.query_idx.tolist())) == 21
        # labels are the true labels of the indices
        assert (labels[ep.support_idx] == ep.support_y).all() and (labels[ep.query_idx] == ep.query_y).all()
        for c in ep.classes:
            assert (ep.support_y == c).sum() == 5 and (ep.query_y == c).sum() == 7
        assert len(set(ep.classes.tolist())) == 3


def test_episodes_deterministic_per_seed():
    labels = _labels([20, 20, 20, 20, 20])
    a = sample_episodes(labels, 5, 1, 5, 10, seed=3)
    b = sample_episodes(labels, 5, 1, 5, 10, seed=3)
    c = sample_episodes(labels, 5, 1, 5, 10, seed=4)
    assert all((x.support_idx == y.support_idx).all() and (x.query_idx == y.query_idx).all() for x, y in zip(a, b))
    assert any((x.support_idx != y.support_idx).any() for x, y in zip(a, c))


def test_too_small_class_is_named():
    labels = _labels([30, 8, 30])
    with pytest.raises(DataError, match=r"'tiny' has 8.*need 15|need 15.*'tiny' has 8"):
        sample_episodes(labels, None, 5, 10, 5, class_names=["big", "tiny", "large"])


def test_small_class_skipped_with_fewer_ways():
    labels = _labels([30, 8, 30, 30])
    with pytest.warns(UserWarning, match="sampling only the other 3"):
        eps = sample_episodes(labels, 3, 5, 10, 20, seed=0)
    assert all(1 not in ep.classes for ep in eps)


def test_mean_ci95_hand_computation():
    accs = [0.5, 0.7, 0.6, 0.9]
    mean = sum(accs) / 4
    var = sum((a - mean) ** 2 for a in accs) / 3
    m, h = mean_ci95(accs)
    assert m == pytest.approx(0.675)
    assert h == pytest.approx(3.1824 * math.sqrt(var) / 2, rel=1e-4)  # Student-t, 3 degrees of freedom
    assert mean_ci95([0.3]) == (0.3, 0.0)


def test_cl2n_centres_and_normalises():
    rng = np.random.default_rng(0)
    s, q = rng.normal(5, 1, (10, 8)), rng.normal(5, 1, (4, 8))
    zs, zq = cl2n(s, q)
    np.testing.assert_allclose(np.linalg.norm(zs, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(zq, axis=1), 1, atol=1e-5)
    mu = s.mean(0)
    np.testing.assert_allclose(zs[0], (s[0] - mu) / np.linalg.norm(s[0] - mu), atol=1e-5)


def _fs(x: np.ndarray, y: np.ndarray) -> FeatureSet:
    k = int(y.max()) + 1
    return FeatureSet(x.astype(np.float32), y, [f"{i}.png" for i in range(len(y))], [f"c{i}" for i in range(k)])


def test_simpleshot_separated_clusters_perfect():
    rng = np.random.default_rng(0)
    k, n, d = 5, 40, 32
    centres = rng.normal(0, 10, (k, d))
    x = np.concatenate([centres[c] + rng.normal(0, 0.5, (n, d)) for c in range(k)])
    y = np.repeat(np.arange(k), n)
    for clf in ("prototype", "logreg"):
        r = run_fewshot(_fs(x, y), ways=5, shots=(1, 5), queries=10, episodes=30 if clf == "prototype" else 10,
                        classifier=clf)
        for key in ("1", "5"):
            assert r["results"][key]["mean"] == 1.0
            assert set(r["results"][key]["per_class_accuracy"]) == {f"c{i}" for i in range(k)}


def test_simpleshot_noise_near_chance():
    rng = np.random.default_rng(1)
    k, n, d = 5, 60, 64
    x = rng.normal(0, 1, (k * n, d))
    y = np.repeat(np.arange(k), n)
    r = run_fewshot(_fs(x, y), ways=5, shots=(1, 5), queries=15, episodes=300)
    for key in ("1", "5"):
        # chance = 0.2; 300 episodes x 75 queries gives a standard error of ~0.005
        assert abs(r["results"][key]["mean"] - 0.2) < 0.04, r["results"][key]["mean"]
        assert r["results"][key]["ci95"] < 0.02


def test_prototype_label_space():
    s = np.array([[0.0, 1], [0, 2], [1, 0], [2, 0]])
    y = np.array([7, 7, 3, 3])
    pred = prototype_classify(s, y, np.array([[0, 5.0], [5.0, 0]]))
    assert pred.tolist() == [7, 3]
