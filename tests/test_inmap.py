"""InMaP: Sinkhorn marginals, the closed-form gradient, accuracy, initial="inmap", edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.initial import initial_problem
from zsadapt.solvers.inmap import column_targets, harden, proxy_gradient, proxy_loss, sinkhorn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _softmax_scores(seed=0, n=300, c=7, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


def test_sinkhorn_matches_uniform_and_estimated_marginals():
    log_p = _softmax_scores()
    n, c = log_p.shape
    uniform = column_targets(torch.softmax(log_p, 1), 0.0)
    pseudo = sinkhorn(log_p, uniform, 200)
    assert torch.allclose(pseudo.sum(1), torch.ones(n), atol=1e-5)  # rows are distributions
    assert torch.allclose(pseudo.sum(0), torch.full((c,), n / c), rtol=1e-3)
    estimated = torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05])
    pseudo = sinkhorn(log_p, estimated, 200)
    assert torch.allclose(pseudo.sum(0), n * estimated, rtol=1e-3)


def test_sinkhorn_survives_underflow():
    """Similarities / 0.01 that underflow a plain softmax (a class no image likes) stay finite."""
    log_p = torch.full((50, 3), 0.0)
    log_p[:, 2] = -500.0  # exp(-500) == 0 in float32
    pseudo = sinkhorn(log_p, torch.full((3,), 1 / 3), 50)
    assert torch.isfinite(pseudo).all()
    assert torch.allclose(pseudo.sum(0), torch.full((3,), 50 / 3), rtol=1e-3)


def test_estimated_marginals_follow_the_power():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    q = column_targets(probs, 2.0)
    sums = probs.sum(0) ** 2
    assert torch.allclose(q, sums / sums.sum())


def test_harden_makes_confident_rows_one_hot():
    p = torch.tensor([[0.7, 0.3], [0.55, 0.45]])
    out = harden(p, 0.6)
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.55, 0.45]]))


def test_closed_form_gradient_equals_autograd():
    g = torch.Generator().manual_seed(1)
    X = torch.nn.functional.normalize(torch.randn(40, 6, generator=g, dtype=torch.float64), dim=1)
    W = torch.nn.functional.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)
    P = torch.softmax(torch.randn(40, 4, generator=g, dtype=torch.float64), dim=1)
    W_var = W.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(proxy_loss(X, W_var, P, 0.04), W_var)
    assert torch.allclose(proxy_gradient(X, W, P, 0.04), auto, rtol=1e-10, atol=1e-12)


def test_inmap_beats_zero_shot_on_a_balanced_pool():
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, imbalance=0.0, seed=5)
    zs = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    res = zsadapt.refine(pool.image_features, pool.text_features, "inmap", max_iter=300)
    assert zsadapt.accuracy(res.labels, pool.labels) > zsadapt.accuracy(zs.labels, pool.labels) + 5


def test_inmap_proxies_are_unit_and_predict_inductively(small_pool):
    solver = zsadapt.make_solver("inmap", max_iter=50)
    X = torch.as_tensor(small_pool.image_features)
    T = torch.as_tensor(small_pool.text_features)
    out = solver.fit(zsadapt.solvers.Problem(X, T))
    assert torch.allclose(solver.proxies_.norm(dim=1), torch.ones(T.shape[0]), atol=1e-5)
    again = solver.predict(X)
    assert torch.equal(out.probs.argmax(1), again.probs.argmax(1))  # predict = the proxies as a classifier
    assert out.info["iterations"] == 50


def test_step_halving_and_tol_stop(small_pool):
    with pytest.warns(Warning, match="max_iter"):
        res = zsadapt.refine(small_pool.image_features, small_pool.text_features, "inmap", max_iter=5, tol=1e-9)
    assert res.info["iterations"] == 5 and res.info["converged"] is False
    res = zsadapt.refine(small_pool.image_features, small_pool.text_features, "inmap", lr=1000.0, max_iter=100)
    assert res.info["final_lr"] < 1000.0  # an overlong step makes the gradient norm rise: halved


def test_zlap_init_inmap_scales_similarities_and_beats_zero_shot():
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, imbalance=0.0, seed=5)
    X, T = torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features)
    problem = initial_problem(X, T, initial="inmap", initial_params={"max_iter": 300})
    assert problem.image_space and problem.initial_logits is None
    inmap = zsadapt.refine(pool.image_features, pool.text_features, "inmap", max_iter=300)
    # zeroshot on the proxies is exactly InMaP's prediction
    zs_on_proxies = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot", initial="inmap",
                                   initial_params={"max_iter": 300})
    assert np.array_equal(zs_on_proxies.labels, inmap.labels)
    zlap = zsadapt.refine(pool.image_features, pool.text_features, "zlap", initial="inmap", initial_params={"max_iter": 300})
    scaled = zsadapt.refine(pool.image_features, problem.classifier.numpy(), "zlap", scale_sim=True)
    assert np.array_equal(zlap.labels, scaled.labels)  # image_space turns scale_sim on
    zs = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    assert zsadapt.accuracy(zlap.labels, pool.labels) > zsadapt.accuracy(zs.labels, pool.labels)
    assert zlap.params["initial"] == "inmap"


@pytest.mark.parametrize("method", ["zlap", "transclip"])
def test_init_inmap_is_initial_inmap(small_pool, method):
    """The papers' spelling ``init="inmap"`` starts the method from the InMaP proxies."""
    X, T = small_pool.image_features, small_pool.text_features
    spelled = zsadapt.refine(X, T, method, init="inmap", initial_params={"max_iter": 50})
    expected = zsadapt.refine(X, T, method, initial="inmap", initial_params={"max_iter": 50})
    assert np.array_equal(spelled.probs, expected.probs) and spelled.params["initial"] == "inmap"
    on_text = zsadapt.refine(X, T, method)
    assert not np.array_equal(spelled.probs, on_text.probs)


def test_bad_init_is_one_line(small_pool):
    with pytest.raises(ValueError, match="initial must be one of"):
        zsadapt.refine(small_pool.image_features, small_pool.text_features, "zlap", initial="proxies")
    with pytest.raises(ValueError, match="only used with initial='inmap'"):
        zsadapt.refine(small_pool.image_features, small_pool.text_features, "zlap", initial_params={"lr": 1})
    with pytest.raises(ValueError, match="disagree"):
        zsadapt.refine(small_pool.image_features, small_pool.text_features, "gmm", init="inmap", initial="proxies")


@pytest.mark.parametrize("n_images,n_classes,dim", [(2, 5, 8), (30, 3, 1), (40, 50, 4)])
def test_edge_shapes(n_images, n_classes, dim):
    """Tiny pools, d = 1, more classes than images: finite, rows sum to 1."""
    g = np.random.default_rng(0)
    X = g.standard_normal((n_images, dim)).astype(np.float32)
    T = g.standard_normal((n_classes, dim)).astype(np.float32)
    res = zsadapt.refine(X, T, "inmap", max_iter=20)
    assert res.probs.shape == (n_images, n_classes)
    assert np.isfinite(res.probs).all() and np.allclose(res.probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("marginals", ["mixture", "zeroshot"])
def test_one_class_pool_with_estimated_marginals(marginals):
    """A pool drawn from one class: uniform marginals force mass onto absent classes; estimated
    marginals keep the prediction on the class that is there."""
    pool = zsadapt.make_pool(n_images=400, n_classes=4, dim=16, imbalance=0.0, seed=2)
    keep = pool.labels == 0
    X = pool.image_features[keep]
    zs = zsadapt.refine(X, pool.text_features, "zeroshot")
    est = zsadapt.refine(X, pool.text_features, "inmap", marginals=marginals, max_iter=100)
    assert (est.labels == 0).mean() >= (zs.labels == 0).mean() - 0.02


def test_mixture_marginals_follow_an_imbalanced_pool_and_stay_uniform_on_a_balanced_one():
    """The Sinkhorn targets: the class proportions of a Zipf pool are found (closer to the truth
    than uniform or the zero-shot column sums), and a balanced pool keeps uniform targets."""
    pool = zsadapt.make_pool(n_images=1200, n_classes=8, dim=64, imbalance=1.2, seed=4)
    truth = np.bincount(pool.labels, minlength=8) / pool.labels.size
    error = {}
    for marginals in ("mixture", "uniform", "zeroshot"):
        res = zsadapt.refine(pool.image_features, pool.text_features, "inmap", marginals=marginals, max_iter=50)
        error[marginals] = np.abs(np.array(res.info["marginals"]) - truth).sum()
    assert error["mixture"] < 0.1 * min(error["uniform"], error["zeroshot"]), error
    balanced = zsadapt.make_pool(n_images=1200, n_classes=8, dim=64, imbalance=0.0, seed=4)
    res = zsadapt.refine(balanced.image_features, balanced.text_features, "inmap", max_iter=5)
    np.testing.assert_allclose(res.info["marginals"], np.full(8, 1 / 8), rtol=1e-6)


def test_deterministic_and_torch_in_torch_out(small_pool):
    X = torch.as_tensor(small_pool.image_features)
    T = torch.as_tensor(small_pool.text_features)
    a = zsadapt.refine(X, T, "inmap", max_iter=30)
    b = zsadapt.refine(X, T, "inmap", max_iter=30)
    assert isinstance(a.probs, torch.Tensor) and torch.equal(a.probs, b.probs)


def test_stopping_rule_stops_when_the_proxies_stop_moving():
    """The default tol stops well before max_iter on a pool where the descent settles, with the
    labels of the full run; tol=0 runs every step (the published fixed count) without a warning."""
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, imbalance=0.0, seed=5)
    X, T = pool.image_features, pool.text_features
    stopped = zsadapt.refine(X, T, "inmap", max_iter=2000)
    assert stopped.info["converged"] is True and stopped.info["iterations"] < 2000
    assert stopped.info["movement"] < 1e-4
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tol=0 is converged by definition: no ConvergenceWarning
        full = zsadapt.refine(X, T, "inmap", max_iter=2000, tol=0.0)
    assert full.info["iterations"] == 2000 and full.info["converged"] is True
    assert np.mean(stopped.labels != full.labels) <= 0.005  # at most 3 of 600 labels differ
    # A looser tol stops earlier still; the rule is "below tol for STALL_STEPS steps in a row".
    loose = zsadapt.refine(X, T, "inmap", max_iter=2000, tol=1e-2)
    assert loose.info["iterations"] < stopped.info["iterations"]


def test_two_image_pools_keep_the_zero_shot_accuracy():
    """Issue 13 item 14: a 2-image pool cannot fill uniform Sinkhorn targets over 30 classes, so it
    is not balanced (info["balanced"] False) and InMaP keeps zero-shot's accuracy; the whole pool
    is balanced."""
    pool = zsadapt.make_pool(seed=0)  # the built-in 30-class pool
    rng = np.random.default_rng(0)
    zeroshot, inmap = [], []
    for _ in range(20):
        rows = rng.choice(pool.labels.size, 2, replace=False)
        images, truth = pool.image_features[rows], pool.labels[rows]
        zeroshot.append(np.mean((images @ pool.text_features.T).argmax(1) == truth))
        res = zsadapt.refine(images, pool.text_features, "inmap", max_iter=200)
        assert res.info["balanced"] is False
        inmap.append(np.mean(res.labels == truth))
    assert np.mean(zeroshot) > 0.3 and np.mean(inmap) >= np.mean(zeroshot) - 0.05
    with pytest.warns(Warning, match="max_iter"):
        whole = zsadapt.refine(pool.image_features, pool.text_features, "inmap", max_iter=5)
    assert whole.info["balanced"] is True


def test_absent_mass_is_the_expected_share_of_empty_classes():
    """sum_c q_c (1 - q_c)^N against a Monte Carlo draw of N labels from q."""
    from zsadapt.solvers.inmap import absent_mass

    q = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    rng = np.random.default_rng(0)
    draws = rng.choice(4, size=(20000, 6), p=q.numpy())
    empty = np.array([[c not in row for c in range(4)] for row in draws])  # (draws, C)
    assert absent_mass(q, 6) == pytest.approx(float((empty * q.numpy()).sum(1).mean()), abs=3e-3)
