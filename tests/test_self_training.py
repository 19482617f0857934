"""Self-training (fpl, ifpl, grip): pseudo-label selection, quotas, accuracy, estimators, edge cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import check_estimator

import zsadapt
from zsadapt.solvers.self_training import largest_remainder, select_pseudo_labels


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_selection(probs: np.ndarray, quotas: np.ndarray) -> dict:
    """Plain-Python reading of the rule: round r offers each unlabelled image to its r-th most
    probable class; each class takes its most confident offers (ties: lower index) up to quota."""
    n, c = probs.shape
    ranked = [sorted(range(c), key=lambda j: (-probs[i, j], j)) for i in range(n)]
    label, remaining = {}, list(quotas)
    for r in range(c):
        offers = {}
        for i in range(n):
            if i not in label and remaining[ranked[i][r]] > 0:
                offers.setdefault(ranked[i][r], []).append(i)
        for cls, images in offers.items():
            for i in sorted(images, key=lambda i: (-probs[i, cls], i))[: remaining[cls]]:
                label[i] = cls
            remaining[cls] -= min(len(images), remaining[cls])
    return label


@pytest.mark.parametrize("seed,quota", [(0, 3), (1, 1), (2, 7)])
def test_selection_matches_the_reference(seed, quota):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(5, 0.5), size=40).astype(np.float32)
    probs[:, 0] *= 3  # one popular class, so offers spill over to later choices
    probs /= probs.sum(1, keepdims=True)
    quotas = np.array([quota, quota, quota + 1, 0, quota])
    index, labels = select_pseudo_labels(torch.as_tensor(probs), torch.as_tensor(quotas))
    expected = reference_selection(probs, quotas)
    assert dict(zip(index.tolist(), labels.tolist())) == expected
    assert np.all(np.bincount(labels.numpy(), minlength=5) <= quotas)


@pytest.mark.parametrize("growth,n,expected", [(0.1, 1635, [164, 327, 491, 654, 818, 981, 1145, 1308, 1472, 1635]),
                                                (0.25, 10, [3, 5, 8, 10]), (0.3, 7, [3, 5, 7, 7])])
def test_grip_budget_is_the_decimal_schedule(growth, n, expected):
    from zsadapt.solvers.self_training import grip_budget

    assert [grip_budget(r, growth, n) for r in range(1, len(expected) + 1)] == expected


def test_largest_remainder():
    q = largest_remainder(10, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    assert q.tolist() == [5, 3, 2]
    q = largest_remainder(7, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    assert q.tolist() == [3, 2, 2] and int(q.sum()) == 7


def _acc(result, pool):
    return zsadapt.accuracy(result.labels, pool.labels)


@pytest.mark.parametrize("strategy", ["fpl", "ifpl", "grip"])
def test_each_strategy_beats_zero_shot(strategy):
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, imbalance=0.0, seed=5)
    zs = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    for quota in ("mixture", "balanced"):
        res = zsadapt.refine(pool.image_features, pool.text_features, "self_training", strategy=strategy,
                             rounds=4, growth=0.25, quota=quota)
        assert _acc(res, pool) > _acc(zs, pool) + 3, quota
    expected_rounds = {"fpl": 1, "ifpl": 4, "grip": 4}[strategy]
    assert res.info["iterations"] == expected_rounds
    if strategy == "grip":  # the pseudo-labelled set grows by a quarter of the pool per round
        assert [r["pseudo_labels"] for r in res.info["rounds"]] == [150, 300, 450, 600]


@pytest.mark.parametrize("quota", ["mixture", "proportional"])
def test_grip_estimated_quotas_beat_balanced_quotas_on_an_imbalanced_pool(quota):
    """The published GRIP quota is balanced; following the estimated class proportions keeps the
    pseudo-labels of an imbalanced (Zipf) pool closer to its true class sizes."""
    pool = zsadapt.make_pool(n_images=800, n_classes=8, dim=32, imbalance=1.2, seed=4)
    kwargs = dict(strategy="grip", growth=0.25)
    est = zsadapt.refine(pool.image_features, pool.text_features, "self_training", quota=quota, **kwargs)
    bal = zsadapt.refine(pool.image_features, pool.text_features, "self_training", quota="balanced", **kwargs)
    true_sizes = np.bincount(pool.labels, minlength=8)
    err = lambda r: np.abs(np.bincount(r.labels, minlength=8) - true_sizes).sum()  # noqa: E731
    assert err(est) < err(bal)
    assert _acc(est, pool) > _acc(bal, pool)


def test_mixture_quotas_are_balanced_on_a_balanced_pool():
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, imbalance=0.0, text_noise=1.0, seed=5)
    kwargs = dict(strategy="grip", growth=0.25)
    mixture = zsadapt.refine(pool.image_features, pool.text_features, "self_training", **kwargs)
    balanced = zsadapt.refine(pool.image_features, pool.text_features, "self_training", quota="balanced", **kwargs)
    assert np.array_equal(mixture.probs, balanced.probs)


def test_inductive_predict_is_the_student(small_pool):
    X = torch.as_tensor(small_pool.image_features)
    T = torch.as_tensor(small_pool.text_features)
    solver = zsadapt.make_solver("self_training", strategy="fpl", k=8)
    out = solver.fit(zsadapt.solvers.Problem(X, T))
    again = solver.predict(X[:50])
    assert torch.allclose(out.probs[:50], again.probs, atol=1e-6)
    with pytest.raises(zsadapt.solvers.NotFittedError):
        zsadapt.make_solver("self_training").predict(X)


def test_minibatches_adapter_and_determinism(small_pool):
    kwargs = dict(strategy="ifpl", rounds=2, k=8, batch_size=16, adapter=True, epochs=20)
    a = zsadapt.refine(small_pool.image_features, small_pool.text_features, "self_training", seed=1, **kwargs)
    b = zsadapt.refine(small_pool.image_features, small_pool.text_features, "self_training", seed=1, **kwargs)
    assert np.array_equal(a.probs, b.probs)
    assert np.allclose(a.probs.sum(1), 1, atol=1e-5)


def test_init_inmap_for_self_training(small_pool):
    res = zsadapt.refine(small_pool.image_features, small_pool.text_features, "self_training",
                         strategy="fpl", initial="inmap", initial_params={"max_iter": 50})
    assert res.params["initial"] == "inmap" and res.labels.shape == (400,)


@pytest.mark.parametrize("n_images,n_classes,dim", [(2, 5, 8), (30, 3, 1), (40, 50, 4), (3, 2, 2)])
def test_edge_shapes(n_images, n_classes, dim):
    """Tiny pools (no hold-out), d = 1, C > N: finite probabilities, rows sum to 1."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n_images, dim)).astype(np.float32)
    T = rng.standard_normal((n_classes, dim)).astype(np.float32)
    for strategy in ("fpl", "grip"):
        res = zsadapt.refine(X, T, "self_training", strategy=strategy, epochs=5)
        assert res.probs.shape == (n_images, n_classes)
        assert np.isfinite(res.probs).all() and np.allclose(res.probs.sum(1), 1, atol=1e-5)


def test_rounds_stop_at_a_fixed_point_of_the_pseudo_labels():
    """C >> N: every quota is at least one, so each round pseudo-labels the whole pool; once a
    round's labels repeat the previous round's, later rounds would retrain on the same set, and
    the fit stops there with the previous student (the same output as asking for that many rounds).
    A pool of many images per class grows its set every round and runs them all."""
    rng = np.random.default_rng(0)
    T = rng.standard_normal((300, 32)).astype(np.float32)
    X = (T[rng.integers(0, 300, 12)] + rng.standard_normal((12, 32))).astype(np.float32)
    res = zsadapt.refine(X, T, "self_training", strategy="ifpl", rounds=10, epochs=5)
    assert res.info["iterations"] < 10 and len(res.info["rounds"]) == res.info["iterations"]
    assert all(r["pseudo_labels"] == 12 for r in res.info["rounds"])
    same = zsadapt.refine(X, T, "self_training", strategy="ifpl", rounds=res.info["iterations"], epochs=5)
    np.testing.assert_array_equal(res.probs, same.probs)
    pool = zsadapt.make_pool(n_images=400, n_classes=4, dim=16, seed=1)
    grown = zsadapt.refine(pool.image_features, pool.text_features, "self_training", epochs=5)
    assert grown.info["iterations"] == 10
    # grip's schedule, a tenth of the pool more each round: ceil(r x 0.1 x 400) in decimal
    # (binary floating point made round 3's 120 images 121)
    assert [r["pseudo_labels"] for r in grown.info["rounds"]] == [40 * r for r in range(1, 11)]


def test_one_class_pool():
    """All images from one class: proportional quotas let that class take the whole pool."""
    pool = zsadapt.make_pool(n_images=400, n_classes=4, dim=16, imbalance=0.0, seed=2)
    X = pool.image_features[pool.labels == 1]
    zs = zsadapt.refine(X, pool.text_features, "zeroshot")
    res = zsadapt.refine(X, pool.text_features, "self_training", strategy="grip", growth=0.25)
    assert (res.labels == 1).mean() >= (zs.labels == 1).mean() - 0.05


def test_bad_parameters_are_one_line():
    with pytest.raises(ValueError, match="strategy must be one of"):
        zsadapt.make_solver("self_training", strategy="fixmatch")
    with pytest.raises(ValueError, match="quota must be one of"):
        zsadapt.make_solver("self_training", quota="half")


@pytest.mark.parametrize("estimator", [
    zsadapt.SelfTraining(strategy="fpl", k=4, epochs=5),
    zsadapt.SelfTraining(strategy="grip", growth=0.5, epochs=5),
    zsadapt.InMaP(max_iter=30),
])
def test_check_estimator(estimator):
    check_estimator(estimator)


def test_zlap_estimator_with_inmap_init(small_pool):
    """``initial`` is an estimator parameter too (check_estimator on ZLaP(initial="inmap") passes but
    takes over a minute with InMaP's 2000 default steps, so it is not run here)."""
    model = zsadapt.ZLaP(text_features=small_pool.text_features, initial="inmap").fit(small_pool.image_features)
    res = zsadapt.refine(small_pool.image_features, small_pool.text_features, "zlap", initial="inmap")
    assert np.array_equal(model.transduction_, res.labels)
    assert model.predict(small_pool.image_features[:20]).shape == (20,)


def test_estimators_match_refine(small_pool):
    model = zsadapt.SelfTraining(text_features=small_pool.text_features, strategy="fpl", k=8).fit(small_pool.image_features)
    res = zsadapt.refine(small_pool.image_features, small_pool.text_features, "self_training", strategy="fpl", k=8)
    assert np.array_equal(model.transduction_, res.labels)
    inmap = zsadapt.InMaP(text_features=small_pool.text_features, max_iter=40).fit(small_pool.image_features)
    assert inmap.solver_.proxies_.shape == (8, 32)
    assert np.array_equal(inmap.predict(small_pool.image_features), inmap.transduction_)
    assert set(zsadapt.ESTIMATORS) >= {"self_training", "inmap"}
    assert list(itertools.islice(zsadapt.ESTIMATORS, 2)) == ["zeroshot", "zlap"]
