"""The ``anchored`` solver (solvers/anchored.py).

Independent references: scipy's Gaussian log-density for the anchor identity (the mixture with
means m_c and log-weights b_c is the zero-shot softmax), the zero-shot softmax itself, a numpy
re-implementation of one MAP M-step with prior statistics, a synthetic pool whose clusters are
the classes, and (with ZSADAPT_DATA) the real Cars pool with its labels.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.metrics import accuracy
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers.anchored import anchors
from zsadapt.solvers.statistics import ClassStatistics

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensors(pool):
    return torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features)


def _fit(X, T, **params):
    solver = get_solver("anchored")(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return solver, solver.fit(Problem(X, T))


def test_anchor_mixture_is_the_zeroshot_classifier():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 6)); X /= np.linalg.norm(X, axis=1, keepdims=True)
    T = rng.standard_normal((4, 6)); T /= np.linalg.norm(T, axis=1, keepdims=True)
    var = rng.uniform(1e-3, 5e-3, 6)
    means, bias = anchors(torch.as_tensor(X.mean(0)), torch.as_tensor(T), torch.as_tensor(var), 100.0)
    log_joint = np.stack([multivariate_normal(m, np.diag(var)).logpdf(X) for m in means.numpy()], axis=1)
    np.testing.assert_allclose(softmax(log_joint + bias.numpy(), axis=1), softmax(100 * X @ T.T, axis=1),
                               rtol=1e-6, atol=1e-9)


def test_strong_prior_gives_the_zeroshot_posterior(small_pool):
    X, T = _tensors(small_pool)
    _, out = _fit(X, T, prior_strength=1e7, robust=False, calibration="none")
    np.testing.assert_allclose(out.probs.numpy(), torch.softmax(100 * X @ T.T, dim=1).numpy(), atol=2e-3)


def test_clusters_beat_a_poor_text_classifier():
    pool = zsadapt.make_pool(n_images=600, n_classes=6, dim=32, image_noise=0.5, text_noise=3.0, seed=1)
    X, T = _tensors(pool)
    zeroshot = accuracy(X @ T.T, pool.labels)
    _, out = _fit(X, T)
    assert zeroshot < 90
    assert accuracy(out.probs, pool.labels) > zeroshot + 5


def test_predict_on_the_pool_is_the_transduction(small_pool):
    X, T = _tensors(small_pool)
    solver, out = _fit(X, T)
    again = solver.predict(X)
    torch.testing.assert_close(again.probs, out.probs)
    assert torch.equal(again.probs.argmax(1), out.probs.argmax(1))


def test_calibration_matches_the_zeroshot_mean_confidence(small_pool):
    X, T = _tensors(small_pool)
    solver, out = _fit(X, T)
    target = torch.softmax(100 * X @ T.T, dim=1).max(dim=1).values.mean()
    assert abs(float(out.probs.max(dim=1).values.mean() - target)) < 1e-3
    _, raw = _fit(X, T, calibration="none")
    assert torch.equal(raw.probs.argmax(1), out.probs.argmax(1))  # a temperature keeps the labels


def test_statistics_are_those_of_the_final_assignments(small_pool):
    X, T = _tensors(small_pool)
    solver, out = _fit(X, T)
    z = torch.softmax(out.scores, dim=1)
    expected = ClassStatistics.of(X, z)
    for name in ("counts", "sums", "squares"):
        torch.testing.assert_close(getattr(solver.statistics_, name), getattr(expected, name), rtol=1e-4, atol=1e-4)


def _first_m_step(X, T, prior, *, population, strength):
    """numpy float64 re-implementation of the first M-step of eqs. 1-3 from the zero-shot
    posterior (logit scale 100): the mean image g (d,) of the batch ``X`` pooled with
    ``population``, and the class means (C, d), MAP between the batch plus ``prior`` and the
    anchors g + 100 t_c Sigma."""
    x, t = X.double().numpy(), T.double().numpy()
    z = softmax(100 * x @ t.T, axis=1)  # (N, C)
    count = x.shape[0] + population.counts.sum().item()
    g = (x.sum(0) + population.sums.double().numpy().sum(0)) / count  # (d,)
    var = ((x ** 2).sum(0) + population.squares.double().numpy().sum(0)) / count - g ** 2  # (d,)
    anchors = g + 100 * t * var  # (C, d)
    sums = z.T @ x + prior.sums.double().numpy()  # (C, d)
    counts = z.sum(0) + prior.counts.double().numpy()  # (C,)
    return g, (sums + strength * anchors) / (counts + strength)[:, None]


def test_prior_statistics_enter_the_m_step(small_pool):
    """One M-step with prior statistics against a numpy re-implementation of eqs. 1-3."""
    X, T = _tensors(small_pool)
    rng = np.random.default_rng(2)
    n_c = T.shape[0]
    prior = ClassStatistics.of(X[:50], torch.as_tensor(rng.dirichlet(np.ones(n_c), 50), dtype=torch.float32))
    solver = get_solver("anchored")(robust=False, max_iter=1, prior_strength=3.0, reg_covar=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver.fit_with_prior(Problem(X, T), prior)
    g, mu = _first_m_step(X, T, prior, population=prior, strength=3.0)
    np.testing.assert_allclose(solver.means_.double().numpy(), mu, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(solver.mean_image_.double().numpy(), g, rtol=1e-5, atol=1e-6)


def test_population_centres_the_anchors_and_prior_feeds_the_means(small_pool):
    """fit_with_prior(problem, prior, population): g and Sigma's start from the batch pooled with
    the population (a stream's whole state), the class means from the prior (its gated share)."""
    X, T = _tensors(small_pool)
    rng = np.random.default_rng(3)
    n_c, d = T.shape
    prior = ClassStatistics.of(X[:40], torch.as_tensor(rng.dirichlet(np.ones(n_c), 40), dtype=torch.float32))
    population = ClassStatistics.of(X[40:200], torch.as_tensor(rng.dirichlet(np.ones(n_c), 160), dtype=torch.float32))
    solver = get_solver("anchored")(robust=False, max_iter=1, prior_strength=3.0, reg_covar=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solver.fit_with_prior(Problem(X, T), prior, population=population)
    g, mu = _first_m_step(X, T, prior, population=population, strength=3.0)
    np.testing.assert_allclose(solver.mean_image_.double().numpy(), g, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(solver.means_.double().numpy(), mu, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="population statistics"):
        solver.fit_with_prior(Problem(X, T), prior, population=ClassStatistics.zeros(3, d))


def test_prior_of_other_shape_is_an_error(small_pool):
    X, T = _tensors(small_pool)
    with pytest.raises(ValueError, match="prior statistics"):
        get_solver("anchored")().fit_with_prior(Problem(X, T), ClassStatistics.zeros(3, X.shape[1]))


def test_fit_is_fit_with_no_prior(small_pool):
    X, T = _tensors(small_pool)
    a = get_solver("anchored")().fit(Problem(X, T))
    b = get_solver("anchored")().fit_with_prior(Problem(X, T), None)
    torch.testing.assert_close(a.probs, b.probs)


def test_default_iteration_cap_lets_the_demo_pool_converge():
    # zsadapt demo printed "converged NO" for anchored: its EM needs 46 iterations there (and 50
    # on the whole Oxford Pets pool), over the old cap of 30.
    pool = zsadapt.make_demo_pool(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = zsadapt.refine(pool.image_features, pool.text_features, "anchored")
    assert result.info["converged"] and 30 < result.info["iterations"] < 100


def test_classes_absent_from_the_pool_take_no_images():
    pool = zsadapt.make_pool(n_images=2000, n_classes=20, dim=64, seed=4)
    sub = subset_pool(pool, 3, seed=0)
    X, T = _tensors(sub)
    _, out = _fit(X, T)
    inside = np.isin(out.probs.argmax(1).numpy(), sub.extras["classes"]).mean()
    assert out.info["presence"]["classes_kept"] < 20
    assert inside > np.isin((X @ T.T).argmax(1).numpy(), sub.extras["classes"]).mean()
    assert accuracy(out.probs, sub.labels) > accuracy(X @ T.T, sub.labels)


@pytest.mark.parametrize("n, c, d", [(1, 5, 16), (7, 1, 16), (3, 10, 16), (40, 4, 1)])
def test_edge_shapes_give_probabilities(n, c, d):
    """One image, one class, fewer images than classes, d = 1 (solver level: the API itself asks
    for 2 images and 2 classes)."""
    rng = np.random.default_rng(n + c + d)
    X = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((n, d)), dtype=torch.float32), dim=1)
    T = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((c, d)), dtype=torch.float32), dim=1)
    _, out = _fit(X, T)
    assert out.probs.shape == (n, c)
    assert bool(torch.isfinite(out.probs).all())
    torch.testing.assert_close(out.probs.sum(1), torch.ones(n))
    if n == 1:  # one image: nothing to learn from; the zero-shot label
        assert int(out.probs.argmax()) == int((X @ T.T).argmax())


def test_duplicate_rows_get_the_same_label(small_pool):
    X = np.concatenate([small_pool.image_features, small_pool.image_features[:20]])
    result = zsadapt.refine(X, small_pool.text_features, "anchored")
    np.testing.assert_array_equal(result.labels[-20:], result.labels[:20])


def test_arrays_in_arrays_out(small_pool):
    numpy_result = zsadapt.refine(small_pool.image_features, small_pool.text_features, "anchored")
    assert isinstance(numpy_result.probs, np.ndarray)
    torch_result = zsadapt.refine(torch.as_tensor(small_pool.image_features), torch.as_tensor(small_pool.text_features),
                                  "anchored")
    assert isinstance(torch_result.probs, torch.Tensor)
    np.testing.assert_allclose(torch_result.probs.numpy(), numpy_result.probs, atol=1e-6)


def test_empty_pool_is_an_error():
    with pytest.raises(ValueError):
        zsadapt.refine(np.zeros((0, 8), np.float32), np.eye(8, dtype=np.float32)[:3], "anchored")


def test_predict_before_fit_is_an_error():
    with pytest.raises(zsadapt.solvers.NotFittedError):
        get_solver("anchored")().predict(torch.zeros(2, 3))


def test_cars_whole_pool_not_below_zeroshot(cars_pool):
    X, T = _tensors(cars_pool)
    y = np.asarray(cars_pool.labels)
    _, out = _fit(X, T)
    assert accuracy(out.probs, y) >= accuracy(X @ T.T, y) - 0.5


@pytest.mark.xfail(strict=True, reason="known unmet target (issue 10): predict on the unseen half of "
                   "Cars is 38.0% against zero-shot 59.8%: the 4-image class means overfit")
def test_cars_inductive_half_beats_zeroshot(cars_pool):
    X, T = _tensors(cars_pool)
    y = np.asarray(cars_pool.labels)
    order = np.random.default_rng(0).permutation(y.size)
    fit_rows, new_rows = torch.as_tensor(order[: y.size // 2]), order[y.size // 2:]
    solver, _ = _fit(X[fit_rows], T)
    new = torch.as_tensor(new_rows)
    assert accuracy(solver.predict(X[new]).probs, y[new_rows]) > accuracy(X[new] @ T.T, y[new_rows])


def test_cars_inductive_half_below_zeroshot_is_flagged(cars_pool, tmp_path):
    # Until this was set, anchored's predict sat 21.8 points below zero-shot on the unseen half of
    # Cars while its model files were saved without the warning the other such methods give.
    X, T = _tensors(cars_pool)
    y = np.asarray(cars_pool.labels)
    order = np.random.default_rng(0).permutation(y.size)
    fit_rows, new_rows = order[: y.size // 2], order[y.size // 2:]
    result = zsadapt.refine(X[torch.as_tensor(fit_rows)], T, "anchored")
    new = X[torch.as_tensor(new_rows)]
    below = accuracy(result.fitted.solver.predict(new).probs, y[new_rows]) < accuracy(new @ T.T, y[new_rows]) - 1
    assert below and get_solver("anchored").inductive_below_initial
    with pytest.warns(UserWarning, match="worse than the initial classifier"):
        result.save(tmp_path / "anchored.safetensors")


def test_log_joint_is_the_gaussian_mixture_of_eq_5(small_pool):
    """The E-step's log-joint (eq. 5, computed about the mean of the means into reused buffers)
    against scipy's diagonal Gaussian log-densities plus the faded biases and log-weights, up to
    a per-row constant."""
    X, T = _tensors(small_pool)
    solver, out = _fit(X.double(), T.double(), robust=False, calibration="none")
    var = solver.var_.numpy()
    log_density = np.stack([multivariate_normal(m, np.diag(var)).logpdf(X.double().numpy())
                            for m in solver.means_.numpy()], axis=1)
    expected = softmax(log_density + solver.bias_.numpy() + solver.log_pi_.numpy(), axis=1)
    np.testing.assert_allclose(torch.softmax(out.scores, dim=1).numpy(), expected, rtol=1e-7, atol=1e-9)


def test_model_file_holds_what_predict_reads(small_pool, tmp_path):
    """A saved model keeps eq. 5's state only (no class statistics, no classifier copy), and
    predicts as the fitted solver."""
    from safetensors import safe_open

    X, T = _tensors(small_pool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zsadapt.refine(X.numpy(), T.numpy(), "anchored")
        path = result.save(tmp_path / "anchored.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        sizes = {key: handle.get_tensor(key).numel() for key in handle.keys()}
    C, d = T.shape
    assert sum(n == C * d for n in sizes.values()) == 2  # the means and the class text embeddings
    model = zsadapt.load_model(path)
    expected = result.fitted.solver.predict(torch.nn.functional.normalize(X, dim=1)).probs.numpy()
    np.testing.assert_allclose(model.predict_proba(X.numpy()), expected, rtol=0, atol=1e-6)
