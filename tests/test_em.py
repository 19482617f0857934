"""Tests of the ``em`` solver (generalized EM with class balance and the zero-shot prior)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers.em import GeneralizedEM, inverse_digamma


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def mixture_pool(n_per_class=60, n_classes=6, dim=16, image_noise=0.3, text_noise=0.8, seed=0):
    """Images around known unit means; text = means + heavy noise, so zero-shot is poor while the
    pool's clusters are the classes. Returns images, texts, labels and the generating means."""
    rng = np.random.default_rng(seed)
    means = unit(rng.standard_normal((n_classes, dim)))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = unit(means[labels] + image_noise * rng.standard_normal((labels.size, dim)) / np.sqrt(dim))
    texts = unit(means + text_noise * rng.standard_normal((n_classes, dim)) / np.sqrt(dim))
    return images.astype(np.float32), texts.astype(np.float32), labels, means


def zeroshot_accuracy(images, texts, labels):
    return zsadapt.accuracy(zsadapt.refine(images, texts, "zeroshot").labels, labels)


@pytest.mark.parametrize("params, gain", [
    ({}, 3.0),
    ({"likelihood": "dirichlet", "temperature": 1.0, "prior": 0.2, "lam": 0.0}, 2.0),
])
def test_em_beats_zeroshot_on_a_clip_like_pool(params, gain):
    pool = zsadapt.make_pool(n_images=1000, n_classes=10, dim=128, seed=1)  # modality gap, Zipf sizes
    images, texts, labels = pool.image_features, pool.text_features, pool.labels
    zs = zeroshot_accuracy(images, texts, labels)
    result = zsadapt.refine(images, texts, "em", **params)
    assert zs < 90  # the text side really is weak
    assert zsadapt.accuracy(result.labels, labels) > zs + gain
    assert result.info["converged"]
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)


def test_em_recovers_the_generating_means():
    images, texts, labels, means = mixture_pool(n_per_class=150)
    solver = get_solver("em")(lam=0.0)
    solver.fit(Problem(torch.from_numpy(images), torch.from_numpy(texts)))
    fitted = unit(solver.params_.means.numpy())
    cosines = (fitted * means).sum(axis=1)  # the fitted mean of class k against the true mean k
    assert cosines.min() > 0.97
    np.testing.assert_allclose(solver.params_.pi.numpy(), 1 / 6, atol=0.03)


def test_m_step_matches_a_dense_float64_reference():
    images, texts, _, _ = mixture_pool(n_per_class=20, n_classes=4, dim=8)
    X = torch.from_numpy(images).double()
    model = GeneralizedEM(X, torch.from_numpy(texts).double(), logit_scale=30.0, mean_prior=2.0, var_prior=5.0)
    u = model.initial()
    params = model.m_step(u)
    Xn, un = X.numpy(), u.numpy()
    counts = un.sum(0)
    means = (un.T @ Xn + 2.0 * Xn.mean(0)) / (counts + 2.0)[:, None]
    resid = ((Xn[:, None, :] - means[None]) ** 2 * un[:, :, None]).sum((0, 1))  # (d,)
    var = (resid + 5.0 / 8) / (Xn.shape[0] + 5.0)
    np.testing.assert_allclose(params.means.numpy(), means, rtol=1e-10)
    np.testing.assert_allclose(params.var.numpy(), var, rtol=1e-8)
    np.testing.assert_allclose(params.pi.numpy(), counts / counts.sum(), rtol=1e-12)
    # E-step against the textbook Gaussian log-density
    from scipy.stats import multivariate_normal

    logp = np.stack([multivariate_normal(means[k], np.diag(var)).logpdf(Xn) for k in range(4)], 1)
    logits = (logp + 0.5 * np.log(params.pi.numpy())) / 3.0 + 0.7 * model.log_prior.numpy()
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = model.e_step(params, lam=0.5, temperature=3.0, prior=0.7).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_dirichlet_m_step_solves_the_likelihood_equations():
    rng = np.random.default_rng(1)
    log_z = torch.log_softmax(torch.from_numpy(rng.standard_normal((200, 3))), dim=1)
    stats = log_z.mean(0, keepdim=True)  # (1, 3)
    alpha = torch.ones(1, 3, dtype=torch.float64)
    for _ in range(500):
        alpha = inverse_digamma(torch.digamma(alpha.sum(1, keepdim=True)) + stats)
    # the maximum-likelihood conditions psi(alpha_j) - psi(sum alpha) = mean log z_j
    np.testing.assert_allclose(torch.digamma(alpha) - torch.digamma(alpha.sum()), stats, atol=1e-8)
    x = torch.tensor([0.1, 1.0, 7.5], dtype=torch.float64)
    np.testing.assert_allclose(inverse_digamma(torch.digamma(x)), x, rtol=1e-10)


def test_deterministic_and_arrays_in_arrays_out():
    images, texts, labels, _ = mixture_pool(n_per_class=20)
    a = zsadapt.refine(images, texts, "em")
    b = zsadapt.refine(images, texts, "em")
    np.testing.assert_array_equal(a.probs, b.probs)
    assert isinstance(a.probs, np.ndarray)
    c = zsadapt.refine(torch.from_numpy(images), torch.from_numpy(texts), "em")
    assert isinstance(c.probs, torch.Tensor)
    np.testing.assert_allclose(c.probs.numpy(), a.probs, atol=1e-6)


def test_convergence_warning_at_the_cap():
    images, texts, _, _ = mixture_pool(n_per_class=20)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        result = zsadapt.refine(images, texts, "em", max_iter=1, tol=0.0)
    assert result.info["converged"] is False and result.info["iterations"] == 1


def direct_em_loop(images, texts, rule, max_iter=50, tol=1e-4, label_tol=1e-3, patience=3):
    """The EM iterations written out with GeneralizedEM's two steps, each stopping rule spelled
    out directly: returns the final assignments and the iteration count."""
    X = torch.nn.functional.normalize(torch.as_tensor(images, dtype=torch.float32), dim=1)
    W = torch.nn.functional.normalize(torch.as_tensor(texts, dtype=torch.float32), dim=1)
    model = GeneralizedEM(X, W, logit_scale=100.0)
    u = model.initial()
    run = 0
    for it in range(1, max_iter + 1):
        u_new = model.e_step(model.m_step(u), lam=3.0, temperature=10.0, prior=2.0)
        moved = (u_new.argmax(1) != u.argmax(1)).float().mean().item()
        big = (u_new - u).abs().max().item()
        u = u_new
        if rule == "posteriors" and big < tol:
            break
        run = run + 1 if moved <= label_tol + 1e-12 else 0
        if rule == "labels" and run == patience:
            break
    return u.numpy(), it


@pytest.mark.parametrize("rule", ["labels", "posteriors"])
def test_stopping_rules_match_a_direct_loop(rule):
    """stop="labels" (the default) ends at the first iteration after which the labels stayed
    settled ``patience`` times; stop="posteriors" is the earlier rule, bit for bit."""
    pool = zsadapt.make_pool(n_images=1000, n_classes=10, dim=128, seed=1)
    expected, iterations = direct_em_loop(pool.image_features, pool.text_features, rule, max_iter=300)
    X = torch.nn.functional.normalize(torch.from_numpy(pool.image_features), dim=1)
    W = torch.nn.functional.normalize(torch.from_numpy(pool.text_features), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        output = get_solver("em")(stop=rule, max_iter=300).fit(Problem(X, W))
    assert output.info["iterations"] == iterations and output.info["converged"]
    np.testing.assert_array_equal(output.probs.numpy(), expected)


def test_label_rule_settles_before_the_posterior_rule_on_cars(cars_pool):
    """Issue 13 item 15: at its defaults em converges on the Cars pool (no warning), and lands
    within half a point of the posterior rule's fixed point, reached much later."""
    X, T, y = cars_pool.image_features, cars_pool.text_features, cars_pool.labels
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        default = zsadapt.refine(X, T, "em")
        fixed_point = zsadapt.refine(X, T, "em", stop="posteriors", max_iter=400)
    assert default.info["converged"] and default.info["labels_changed"] <= 1  # 0.1% of 1635
    assert default.info["iterations"] < 50 < fixed_point.info["iterations"]
    assert abs(default.accuracy(y) - fixed_point.accuracy(y)) < 0.5
    with pytest.warns(ConvergenceWarning, match="max_iter=50 unconverged: max assignment change"):
        zsadapt.refine(X, T, "em", stop="posteriors")  # the earlier default: the warning the issue saw


def test_label_tolerance_counts_images():
    images, texts, _, _ = mixture_pool(n_per_class=20)
    with pytest.warns(ConvergenceWarning, match="labels changed in the last iteration"):
        zsadapt.refine(images, texts, "em", max_iter=2)  # patience 3 cannot be met in 2 iterations
    with pytest.raises(ValueError, match="label_tol"):
        get_solver("em")(label_tol=1.5)
    with pytest.raises(ValueError, match="stop"):
        get_solver("em")(stop="never")


def test_inductive_predict_labels_new_images():
    pool = zsadapt.make_pool(n_images=1000, n_classes=10, dim=128, seed=2)
    images, texts, labels = pool.image_features, pool.text_features, pool.labels
    rng = np.random.default_rng(0)
    order = rng.permutation(labels.size)
    fit_rows, new_rows = order[:700], order[700:]
    model = zsadapt.EM(text_features=texts).fit(images[fit_rows])
    zs = zeroshot_accuracy(images[new_rows], texts, labels[new_rows])
    assert zsadapt.accuracy(model.predict(images[new_rows]), labels[new_rows]) > zs + 2
    np.testing.assert_allclose(model.predict_proba(images[new_rows]).sum(1), 1.0, atol=1e-5)


def subset_gaps(pool, m, seeds=3, method="em"):
    """Accuracy of ``method`` minus zero-shot on subset pools holding m classes (one per seed)."""
    gaps = []
    for seed in range(seeds):
        sub = subset_pool(pool, m, seed)
        X, y = sub.image_features, sub.labels
        refined = zsadapt.refine(X, pool.text_features, method).labels
        gaps.append(zsadapt.accuracy(refined, y) - zeroshot_accuracy(X, pool.text_features, y))
    return gaps


def test_subset_pools_stay_at_least_near_zeroshot_synthetic():
    pool = zsadapt.make_pool(n_images=1200, n_classes=40, dim=128, seed=5)
    for m in (2, 5, 10):  # 10 = 25% of C
        gaps = subset_gaps(pool, m)
        assert np.mean(gaps) >= -1.0, (m, gaps)


def test_subset_pools_stay_at_least_near_zeroshot_cars(cars_pool):
    for m in (2, 5, 10, cars_pool.n_classes // 4):
        # a 2-class Cars pool holds ~17 images (one image = 6 points): average over 10 draws
        gaps = subset_gaps(cars_pool, m, seeds=10 if m == 2 else 2)
        assert np.mean(gaps) >= -1.0, (m, gaps)


@pytest.mark.parametrize("likelihood", ["gaussian", "dirichlet"])
def test_whole_cars_pool_not_below_zeroshot(cars_pool, likelihood):
    zs = zeroshot_accuracy(cars_pool.image_features, cars_pool.text_features, cars_pool.labels)
    em = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "em", likelihood=likelihood)
    assert zsadapt.accuracy(em.labels, cars_pool.labels) >= zs - 1.0


def test_dirichlet_defaults_gain_on_cars_class_subsets(cars_pool):
    """EM-Dirichlet's setting: pools of few classes (5 draws each of 5, 10 and 49 classes)."""
    for m in (5, 10, 0.25):
        gaps = []
        for seed in range(5):
            sub = subset_pool(cars_pool, m, seed)
            em = zsadapt.refine(sub.image_features, sub.text_features, "em", likelihood="dirichlet")
            gaps.append(em.accuracy(sub.labels) - zeroshot_accuracy(sub.image_features, sub.text_features, sub.labels))
        assert np.mean(gaps) > 1.0, (m, gaps)


def test_defaults_follow_the_likelihood():
    gaussian, dirichlet = get_solver("em")(), get_solver("em")(likelihood="dirichlet", prior=0.5)
    assert (gaussian.config["lam"], gaussian.config["temperature"], gaussian.config["prior"]) == (3.0, 10.0, 2.0)
    assert (dirichlet.config["lam"], dirichlet.config["temperature"], dirichlet.config["prior"]) == (0.0, 20.0, 0.5)


@pytest.mark.parametrize("likelihood", ["gaussian", "dirichlet"])
@pytest.mark.parametrize("case", ["d=1", "N=2", "one class present", "C=2", "C>N"])
def test_edge_cases_give_finite_probabilities(case, likelihood):
    rng = np.random.default_rng(0)
    if case == "d=1":
        images, texts = rng.choice([-1.0, 1.0], size=(30, 1)), np.array([[1.0], [-1.0]])
    elif case == "N=2":
        images, texts = rng.standard_normal((2, 8)), rng.standard_normal((5, 8))
    elif case == "one class present":
        texts = rng.standard_normal((6, 8))
        images = texts[2] + 0.1 * rng.standard_normal((40, 8))
    elif case == "C=2":
        images, texts = rng.standard_normal((40, 8)), rng.standard_normal((2, 8))
    else:
        images, texts = rng.standard_normal((10, 8)), rng.standard_normal((50, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = zsadapt.refine(images, texts, "em", likelihood=likelihood)
    assert np.isfinite(result.probs).all()
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-4)
    if case == "one class present":
        assert (result.labels == 2).mean() > 0.9


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(ValueError, match="likelihood"):
        get_solver("em")(likelihood="poisson")
    with pytest.raises(ValueError, match="temperature"):
        get_solver("em")(temperature=0.0)


def test_em_estimator_passes_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check_estimator(zsadapt.EM())
