"""The shared mixture maths and the ``gmm`` solver.

References, all independent of the code under test:
* scipy's ``multivariate_normal.logpdf`` for the expanded log-likelihood;
* a dense float64 EM written out below with explicit (N, C, d) residuals, for the whole
  log-likelihood path and the fitted parameters on multi-dimensional data (diag and spherical);
* scikit-learn's ``GaussianMixture(covariance_type="tied")`` on 1-D data. Its tied covariance is a
  shared *full* covariance, ours a shared *diagonal* one; they are the same model only when d = 1
  (in d > 1 the fitted tied covariance has off-diagonal terms, so the paths differ). There the
  log-likelihood path from the same starting parameters must agree step by step.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from sklearn.utils.estimator_checks import check_estimator

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers import mixture


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These pools are tiny: on a loaded 2-core CI machine, torch's thread pool costs far more
    than it saves (measured 50x on a 16-image pool), so the tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def clustered_pool(n_per=60, n_classes=6, dim=16, seed=0):
    """Images around known unit class directions; text = direction + noise + a modality gap."""
    rng = np.random.default_rng(seed)
    directions = unit(rng.standard_normal((n_classes, dim)))
    labels = np.repeat(np.arange(n_classes), n_per)
    images = unit(directions[labels] + 0.5 * rng.standard_normal((labels.size, dim)) / np.sqrt(dim))
    gap = 0.6 * unit(rng.standard_normal(dim))
    text = unit(directions + 0.9 * rng.standard_normal((n_classes, dim)) / np.sqrt(dim) + gap)
    return images.astype(np.float32), text.astype(np.float32), labels, directions


# ---------------------------------------------------------------- mixture.py


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_loglik_matches_scipy(covariance):
    rng = np.random.default_rng(0)
    X, means = rng.standard_normal((40, 5)), rng.standard_normal((3, 5))
    var = rng.uniform(0.5, 2.0, size=5 if covariance == "diag" else 1)
    ours = mixture.gaussian_loglik(torch.tensor(X), torch.tensor(means), torch.tensor(var), chunk=7)
    cov = np.diag(var) if covariance == "diag" else var[0] * np.eye(5)
    ref = np.stack([multivariate_normal(means[c], cov).logpdf(X) for c in range(3)], axis=1)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12, atol=1e-10)
    # without the class-independent terms the difference to the full log-density is per row only
    partial = mixture.gaussian_loglik(torch.tensor(X), torch.tensor(means), torch.tensor(var), constant=False)
    gap = ref - partial.numpy()
    np.testing.assert_allclose(gap, gap[:, :1].repeat(3, axis=1), atol=1e-10)


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_affine_loglik_differs_from_scipy_by_a_row_constant(covariance):
    rng = np.random.default_rng(1)
    X, means = rng.standard_normal((40, 5)) + 3.0, rng.standard_normal((3, 5)) + 3.0
    var = rng.uniform(0.5, 2.0, size=5 if covariance == "diag" else 1)
    weights, bias = mixture.gaussian_linear(torch.tensor(means), torch.tensor(var))
    ours = (torch.tensor(X) @ weights.T + bias).numpy()
    cov = np.diag(var) if covariance == "diag" else var[0] * np.eye(5)
    ref = np.stack([multivariate_normal(means[c], cov).logpdf(X) for c in range(3)], axis=1)
    gap = ref - ours
    np.testing.assert_allclose(gap, gap[:, :1].repeat(3, axis=1), atol=1e-9)


def test_softmax_rows_matches_scipy_over_scores_spanning_thousands():
    rng = np.random.default_rng(2)
    scores = rng.uniform(-3000.0, 0.0, size=(50, 40)) * rng.uniform(0.0, 1.0, size=(50, 1))
    scores[:, 0] = rng.uniform(-3.0, 0.0, size=50)  # one strong class a row, the rest far below
    scores[::7, 1:] = rng.uniform(-2.0, 0.0, size=(8, 39))  # some rows without a gap
    ref = softmax(scores, axis=1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):  # float32: exp of -78 +- 78 ulp
        t = torch.tensor(scores, dtype=dtype)
        probs = mixture.softmax_rows(t)
        log_p, probs2 = mixture.log_softmax_rows(t)
        assert torch.equal(t, torch.tensor(scores, dtype=dtype))  # the input is not overwritten
        np.testing.assert_allclose(probs.double().numpy(), ref, rtol=tol, atol=1e-33)
        np.testing.assert_allclose(probs2.double().numpy(), ref, rtol=tol, atol=1e-33)
        np.testing.assert_allclose(log_p.double().numpy(), scores - logsumexp(scores, axis=1, keepdims=True),
                                   rtol=tol, atol=1e-5 if dtype == torch.float32 else 1e-12)
        np.testing.assert_allclose(probs.sum(dim=1).double().numpy(), 1.0, rtol=tol)


def test_variance_means_and_proportions_match_dense_residuals():
    rng = np.random.default_rng(1)
    X, means = rng.standard_normal((50, 4)), rng.standard_normal((3, 4))
    z = softmax(rng.standard_normal((50, 3)), axis=1)
    dense = (z[:, :, None] * (X[:, None, :] - means[None]) ** 2).sum(axis=(0, 1)) / 50  # (d,)
    diag = mixture.shared_variance(torch.tensor(X), torch.tensor(z), torch.tensor(means), chunk=9, reg=0.1)
    np.testing.assert_allclose(diag.numpy(), dense + 0.1, rtol=1e-12)
    sph = mixture.shared_variance(torch.tensor(X), torch.tensor(z), torch.tensor(means), covariance="spherical")
    np.testing.assert_allclose(sph.numpy(), [dense.mean()], rtol=1e-12)
    mu, counts = mixture.weighted_means(torch.tensor(X), torch.tensor(z))
    np.testing.assert_allclose(mu.numpy(), (z.T @ X) / z.sum(0)[:, None], rtol=1e-12)
    np.testing.assert_allclose(counts.numpy(), z.sum(0))
    pi = mixture.proportions(torch.tensor(z))
    np.testing.assert_allclose(pi.numpy(), z.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="covariance"):
        mixture.shared_variance(torch.tensor(X), torch.tensor(z), torch.tensor(means), covariance="full")


# ---------------------------------------------------------------- EM against references


def dense_em(X, pi, mu, var, n_iter, covariance, reg=1e-6, prior=None):
    """Readable float64 EM with a shared covariance and explicit (N, C, d) residuals. ``prior``
    (k, anchors): MAP means (sum_i r_ic x_i + k a_c) / (n_c + k), the variance about the data means."""
    n, d = X.shape
    path = []
    for _ in range(n_iter):
        residual = X[:, None, :] - mu[None]  # (N, C, d)
        log_joint = (np.log(pi)[None] - 0.5 * (residual ** 2 / var).sum(-1)
                     - 0.5 * np.log(var).sum() * (d if var.size == 1 else 1) - 0.5 * d * np.log(2 * np.pi))
        evidence = logsumexp(log_joint, axis=1)
        path.append(evidence.mean())
        r = np.exp(log_joint - evidence[:, None])
        pi, mu, var = dense_m_step(X, r, covariance, reg, prior)
    return np.array(path), pi, mu, var


def dense_m_step(X, r, covariance, reg=1e-6, prior=None):
    """(pi, means, var) from responsibilities r (N, C), with explicit (N, C, d) residuals."""
    nk = r.sum(0)
    data_means = r.T @ X / nk[:, None]
    var = (r[:, :, None] * (X[:, None, :] - data_means[None]) ** 2).sum(axis=(0, 1)) / X.shape[0]
    var = (var.mean(keepdims=True) if covariance == "spherical" else var) + reg
    mu = data_means if prior is None else (r.T @ X + prior[0] * prior[1]) / (nk + prior[0])[:, None]
    return nk / X.shape[0], mu, var


def zeroshot_start(X, T, logit_scale, covariance, reg=1e-6, prior=None):
    """One M-step from softmax(logit_scale x t): the init="zeroshot" starting parameters."""
    return dense_m_step(X, softmax(logit_scale * X @ T.T, axis=1), covariance, reg, prior)


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_em_path_matches_dense_float64_reference(covariance):
    images, text, _, _ = clustered_pool(n_per=30, n_classes=4, dim=8, seed=2)
    X, T = images.astype(np.float64), text.astype(np.float64)
    solver = get_solver("gmm")(init="zeroshot", covariance=covariance, tol=0.0, max_iter=12, robust=False)
    with pytest.warns(ConvergenceWarning, match="max_iter=12"):
        out = solver.fit(Problem(torch.tensor(X), torch.tensor(T)))
    path, pi, mu, var = dense_em(X, *zeroshot_start(X, T, 100.0, covariance), n_iter=12, covariance=covariance)
    np.testing.assert_allclose(out.info["log_likelihood"], path, rtol=1e-10)
    assert np.all(np.diff(path) > -1e-9)  # EM never decreases the likelihood
    np.testing.assert_allclose(torch.exp(solver.log_pi_).numpy(), pi, rtol=1e-9)
    np.testing.assert_allclose(solver.means_.numpy(), mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solver.var_.numpy(), var, rtol=1e-9)
    assert out.info["iterations"] == 12 and out.info["converged"] is False


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
def test_prior_images_is_map_em_against_a_dense_reference(covariance, monkeypatch):
    """prior_images = k: every M-step's means are (sum_i r_ic x_i + k t_c) / (n_c + k), the class
    vector t_c worth k images, the variance about the data means (dense float64 reference,
    streamed in blocks of 7 rows); k = 0 is the plain EM, bit for bit."""
    images, text, _, _ = clustered_pool(n_per=30, n_classes=4, dim=8, seed=2)
    X, T = images.astype(np.float64), text.astype(np.float64)
    monkeypatch.setattr(mixture, "STREAM_BLOCK_ELEMENTS", 4 * 7)
    k = 5.0
    solver = get_solver("gmm")(covariance=covariance, tol=0.0, max_iter=12, robust=False, prior_images=k)
    with pytest.warns(ConvergenceWarning):
        out = solver.fit(Problem(torch.tensor(X), torch.tensor(T)))
    start = zeroshot_start(X, T, 100.0, covariance, prior=(k, T))
    path, pi, mu, var = dense_em(X, *start, n_iter=12, covariance=covariance, prior=(k, T))
    np.testing.assert_allclose(out.info["log_likelihood"], path, rtol=1e-10)
    np.testing.assert_allclose(torch.exp(solver.log_pi_).numpy(), pi, rtol=1e-9)
    np.testing.assert_allclose(solver.means_.numpy(), mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solver.var_.numpy(), var, rtol=1e-9)
    plain = get_solver("gmm")(covariance=covariance, tol=0.0, max_iter=12, robust=False)
    with pytest.warns(ConvergenceWarning):
        plain.fit(Problem(torch.tensor(X), torch.tensor(T)))
    assert not np.allclose(plain.means_.numpy(), solver.means_.numpy())  # the prior moved the means
    zero = get_solver("gmm")(covariance=covariance, tol=0.0, max_iter=12, robust=False, prior_images=0.0)
    with pytest.warns(ConvergenceWarning):
        zero.fit(Problem(torch.tensor(X), torch.tensor(T)))
    assert torch.equal(zero.means_, plain.means_) and torch.equal(zero.var_, plain.var_)


def test_prior_images_holds_the_means_at_the_prototypes_and_refuses_kmeans():
    """An overwhelming prior leaves every class mean at its class vector (the Gaussian classifier
    of the prototypes, with the pool's shared variance and proportions); kmeans++, whose
    clusters meet their classes only after EM, refuses a prior."""
    images, text, _, _ = clustered_pool(n_per=20, n_classes=3, dim=6, seed=1)
    X, T = torch.tensor(images, dtype=torch.float64), torch.tensor(text, dtype=torch.float64)
    solver = get_solver("gmm")(robust=False, prior_images=1e12)
    solver.fit(Problem(X, T))
    np.testing.assert_allclose(solver.means_.numpy(), text, atol=1e-9)
    with pytest.raises(ValueError, match="kmeans"):
        get_solver("gmm")(init="kmeans++", prior_images=4.0).fit(Problem(X, T))


def test_prior_images_on_16_shot_prototype_pools(shared_data):
    """Real data with labels: with 16-shot prototypes (load_shared_pool(..., shots=16)) the plain
    mixture falls below them on DTD (61.11%) and Caltech101 (91.36%) while the prototypes'
    prior (16 images each) keeps most of what they knew (measured: -4.20 -> +0.71, -1.95 -> -0.77;
    docs/methods/gmm.md); auto passes it to its gmm branch."""
    from zsadapt.shared_pools import load_shared_pool

    for name, gain in (("dtd", 3.0), ("caltech101", 0.8)):
        pool = load_shared_pool(shared_data, name, shots=16)
        X, T, y = pool.image_features, pool.text_features, pool.labels
        zeroshot = zsadapt.accuracy(zsadapt.refine(X, T, "zeroshot").labels, y)
        plain = zsadapt.accuracy(zsadapt.refine(X, T, "gmm").labels, y)
        prior = zsadapt.refine(X, T, "gmm", prior_images=16)
        assert zsadapt.accuracy(prior.labels, y) > plain + gain and plain < zeroshot, (name, plain, zeroshot)
        auto = zsadapt.refine(X, T, "auto", prior_images=16)
        assert auto.info["branch"] == "gmm" and np.array_equal(auto.labels, prior.labels)


@pytest.mark.parametrize("covariance", ["diag", "spherical"])
@pytest.mark.parametrize("sparse", [False, True], ids=["product", "nonzeros"])
def test_streamed_em_matches_dense_float64_reference(covariance, sparse, monkeypatch):
    """fit_em (EM in one pass over blocks of rows per iteration; here blocks of 7 rows) gives
    the dense EM's path and parameters; a component started at weight 0 stays out of it. Both
    ways of summing z^T X: the product, and z's nonzero entries one by one (forced here; by
    default only for sparse blocks, which 4 classes never give)."""
    images, text, _, _ = clustered_pool(n_per=30, n_classes=4, dim=8, seed=2)
    X, T = images.astype(np.float64), text.astype(np.float64)
    monkeypatch.setattr(mixture, "STREAM_BLOCK_ELEMENTS", 4 * 7)  # blocks of 7 rows
    if sparse:
        monkeypatch.setattr(mixture, "SPARSE_POSTERIOR_FRACTION", 1)  # every block takes the nonzeros
    pi, mu, var = zeroshot_start(X, T, 100.0, covariance)
    log_pi, means, v, path, converged = mixture.fit_em(
        torch.tensor(X), torch.log(torch.tensor(pi)), torch.tensor(mu), torch.tensor(var),
        covariance=covariance, reg=1e-6, tol=0.0, max_iter=12)
    ref_path, ref_pi, ref_mu, ref_var = dense_em(X, pi, mu, var, n_iter=12, covariance=covariance)
    assert not converged and len(path) == 12
    np.testing.assert_allclose(path, ref_path, rtol=1e-10)
    np.testing.assert_allclose(torch.exp(log_pi).numpy(), ref_pi, rtol=1e-9)
    np.testing.assert_allclose(means.numpy(), ref_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), ref_var, rtol=1e-9)
    # class 3 starts at pi = 0 (safe_log(0)): the fit is the three-component one, pi_3 stays 0
    start = mixture.safe_log(torch.tensor(np.append(pi[:3], 0.0)))
    log_pi, means, v, path, _ = mixture.fit_em(
        torch.tensor(X), start, torch.tensor(mu), torch.tensor(var), covariance=covariance, reg=1e-6,
        tol=0.0, max_iter=12)
    ref_path, ref_pi, ref_mu, ref_var = dense_em(X, pi[:3], mu[:3], var, n_iter=12, covariance=covariance)
    np.testing.assert_allclose(path, ref_path, rtol=1e-10)
    np.testing.assert_allclose(torch.exp(log_pi).numpy(), np.append(ref_pi, 0.0), rtol=1e-9)
    np.testing.assert_allclose(means[:3].numpy(), ref_mu, rtol=1e-9, atol=1e-12)
    # the evidence of new rows is the mixture's log-density (scipy)
    rows = np.random.default_rng(0).standard_normal((5, X.shape[1]))
    cov = np.diag(v.numpy()) if covariance == "diag" else v.numpy()[0] * np.eye(X.shape[1])
    dens = [np.log(p) + multivariate_normal(m, cov).logpdf(rows) for p, m in zip(ref_pi, means[:3].numpy())]
    evidence, _ = mixture.mixture_evidence(torch.tensor(rows), log_pi, means, v)
    np.testing.assert_allclose(evidence.numpy(), logsumexp(np.stack(dens, axis=1), axis=1), rtol=1e-10)


def test_streamed_evidence_in_float32_over_components_thousands_of_nats_apart():
    """The exp floor drops components > 78 nats below a row's best: the float32 evidence and
    statistics still match float64 (what those components would add is below 1e-34)."""
    rng = np.random.default_rng(7)
    means = rng.standard_normal((50, 16))
    X = means[rng.integers(0, 50, 400)] + 0.05 * rng.standard_normal((400, 16))
    var, log_pi = np.full(16, 0.01), np.log(np.full(50, 1 / 50))
    args64 = [torch.tensor(a) for a in (X, log_pi, means, var)]
    ev64, stats64 = mixture.mixture_evidence(*args64, statistics=True)
    ev32, stats32 = mixture.mixture_evidence(*[a.float() for a in args64], statistics=True)
    # 1 posterior in 50 is nonzero: below 1 in SPARSE_POSTERIOR_FRACTION only with a lower bar
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mixture, "SPARSE_POSTERIOR_FRACTION", 32)
        ev_sparse, stats_sparse = mixture.mixture_evidence(*[a.float() for a in args64], statistics=True)
    assert torch.equal(ev_sparse, ev32)
    for a, b in zip(stats_sparse, stats32):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-4)
    gap = mixture.gaussian_loglik(args64[0], args64[2], args64[3]) + args64[1] - ev64[:, None]  # (400, 50)
    assert float(gap.min()) < -1000  # most components thousands of nats below the evidence
    np.testing.assert_allclose(ev32.double().numpy(), ev64.numpy(), rtol=1e-5, atol=1e-3)
    m64 = mixture.streamed_m_step(stats64, 400, "diag", 0.0)
    m32 = mixture.streamed_m_step(stats32, 400, "diag", 0.0)
    for a, b in zip(m32, m64):
        np.testing.assert_allclose(a.double().numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_em_path_matches_sklearn_tied_gaussian_mixture_in_1d():
    rng = np.random.default_rng(4)
    X = np.concatenate([rng.normal(-2, 0.7, 80), rng.normal(0.5, 0.7, 60), rng.normal(3, 0.7, 40)])[:, None]
    T = np.array([[-1.0], [0.2], [1.0]])
    pi, mu, var = zeroshot_start(X, T, 2.0, "diag")
    reference = GaussianMixture(
        3, covariance_type="tied", weights_init=pi, means_init=mu, precisions_init=1.0 / var.reshape(1, 1),
        max_iter=1, tol=0.0, reg_covar=1e-6, warm_start=True,
    )
    sk_path = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(15):
            reference.fit(X)
            sk_path.append(reference.lower_bound_)
    solver = get_solver("gmm")(init="zeroshot", logit_scale=2.0, tol=0.0, max_iter=15, robust=False)
    with pytest.warns(ConvergenceWarning):
        out = solver.fit(Problem(torch.tensor(X), torch.tensor(T)))
    np.testing.assert_allclose(out.info["log_likelihood"], sk_path, rtol=1e-9)
    np.testing.assert_allclose(solver.means_.numpy(), reference.means_, rtol=1e-8)
    np.testing.assert_allclose(solver.var_.numpy(), reference.covariances_.reshape(1), rtol=1e-8)
    np.testing.assert_allclose(torch.exp(solver.log_pi_).numpy(), reference.weights_, rtol=1e-8)


def test_stops_at_tol_and_warns_only_at_the_cap(small_pool):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = zsadapt.refine(small_pool.image_features, small_pool.text_features, "gmm", tol=1e-3)
    path = result.info["log_likelihood"]
    assert result.info["converged"] is True and result.info["iterations"] == len(path) < 100
    assert abs(path[-1] - path[-2]) < 1e-3 <= abs(path[-2] - path[-3])
    with pytest.warns(ConvergenceWarning, match="max_iter=2"):
        capped = zsadapt.refine(small_pool.image_features, small_pool.text_features, "gmm", max_iter=2)
    assert capped.info["converged"] is False and capped.info["iterations"] == 2


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("init", ["zeroshot", "text"])
def test_beats_zeroshot_and_recovers_generating_means(init):
    images, text, labels, directions = clustered_pool(seed=5)
    zero = zsadapt.refine(images, text, "zeroshot").accuracy(labels)
    solver = get_solver("gmm")(init=init)
    out = solver.fit(Problem(torch.tensor(images), torch.tensor(text)))
    accuracy = zsadapt.accuracy(out.probs.argmax(1), labels)
    assert accuracy > zero + 5, (accuracy, zero)
    recovered = unit(solver.means_.numpy())
    assert np.all((recovered * directions).sum(1) > 0.98)  # each class's mean found
    assert np.all((recovered * directions).sum(1) > (text * directions).sum(1))  # better than the text


def test_kmeans_plus_plus_clusters_matched_to_classes_and_seeded():
    images, text, labels, _ = clustered_pool(n_per=50, n_classes=5, dim=16, seed=6)
    runs = [zsadapt.refine(images, text, "gmm", init="kmeans++", seed=s) for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0].probs, runs[1].probs)  # deterministic given the seed
    assert sorted(runs[0].info["cluster_class"]) == list(range(5))  # a one-to-one matching
    good = [run for run in runs if run.accuracy(labels) > 90]
    assert good  # free clustering from one k-means++ seeding may land in a local optimum
    for run in good:
        # where the clusters are the classes, the text-based Hungarian matching must be the
        # relabelling an oracle with the labels would pick
        confusion = np.zeros((5, 5))
        np.add.at(confusion, (run.labels, labels), 1)
        rows, cols = linear_sum_assignment(confusion, maximize=True)
        assert run.accuracy(labels) == pytest.approx(100 * confusion[rows, cols].sum() / labels.size)


def test_kmeans_plus_plus_with_fewer_images_than_classes():
    images, text, _, _ = clustered_pool(n_per=1, n_classes=6, dim=8, seed=7)
    result = zsadapt.refine(images[:3], text, "gmm", init="kmeans++", max_iter=5)
    assert len(result.info["cluster_class"]) == 3
    unused = sorted(set(range(6)) - set(result.info["cluster_class"]))
    np.testing.assert_array_equal(result.probs[:, unused], 0)
    np.testing.assert_allclose(result.probs.sum(1), 1, rtol=1e-6)


def test_robust_drops_unsupported_classes_before_em():
    """A pool that holds classes 0-2 of 8. Zero-shot gives classes 3, 4, 5 and 7 no vote and no
    mass; class 6 is a confuser (5 zero-shot votes: the pool cannot rule it out). The four get
    pi = 0 and probability 0 for every init, kmeans++ clusters into the kept classes only, and
    robust=False keeps all 8 in play."""
    images, text, labels, _ = clustered_pool(n_per=40, n_classes=8, dim=16, seed=11)
    present = labels < 3
    X, y = images[present], labels[present]
    zero = zsadapt.refine(X, text, "zeroshot")
    assert np.bincount(zero.labels, minlength=8)[[3, 4, 5, 6, 7]].tolist() == [0, 0, 0, 5, 0]
    absent = [3, 4, 5, 7]
    plain = zsadapt.refine(X, text, "gmm", robust=False)
    assert "presence" not in plain.info and plain.probs[:, absent].max() > 1e-3
    for init in ("zeroshot", "text", "kmeans++"):
        solver = get_solver("gmm")(init=init)
        out = solver.fit(Problem(torch.tensor(X), torch.tensor(text)))
        assert out.info["presence"]["alpha"] is not None, init  # the evidence is not balanced
        assert out.probs[:, absent].max() == 0, init
        if init == "kmeans++":  # free clustering: 4 clusters for 3 groups, matched to the kept classes
            assert sorted(out.info["cluster_class"]) == [0, 1, 2, 6]
            continue
        assert torch.exp(solver.log_pi_[absent]).max() == 0, init
        accuracy = zsadapt.accuracy(out.probs.argmax(1), y)
        assert accuracy >= zero.accuracy(y) - 1 and accuracy > plain.accuracy(y), init


def test_hub_classes_of_a_poor_classifier_are_kept():
    """Zero-shot at 18% puts the pool's images on 13 of 100 classes; the held-out likelihood of
    the mixture without the other 87 is far lower (the pool has 100 clusters), so none is dropped."""
    pool = zsadapt.make_pool(n_images=1000, n_classes=100, dim=256, imbalance=0.5, text_noise=5.0, seed=0)
    X, T = pool.image_features, pool.text_features
    robust = zsadapt.refine(X, T, "gmm")
    info = robust.info["presence"]
    assert info["classes_present"] < 20 and info["heldout_gain"] < -5 and info["classes_kept"] == 100
    plain = zsadapt.refine(X, T, "gmm", robust=False)
    np.testing.assert_array_equal(robust.probs, plain.probs)
    assert plain.accuracy(pool.labels) > zsadapt.refine(X, T, "zeroshot").accuracy(pool.labels) + 30


def test_heldout_check_matches_a_direct_computation():
    """_heldout_gains: 2-fold cross-validated mean log-evidence of two EM fits, recomputed here
    with scikit-learn's tied GaussianMixture on 1-D data (where it is our shared diagonal model)."""
    from zsadapt.solvers.pool_analysis import HELDOUT_EM_ITER, _heldout_gains

    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(-2, 0.5, 30), rng.normal(2, 0.5, 30)])[:, None]
    T = np.array([[-1.0], [1.0], [0.3]])
    log_probs = torch.log_softmax(2.0 * torch.tensor(X @ T.T), dim=1)
    log_start = torch.tensor([0.0, 0.0, -np.inf], dtype=torch.float64)  # class 2 dropped
    gain, = _heldout_gains(torch.tensor(X), log_probs, [log_start], 5, "diag", 1e-6)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(5)).numpy()
    halves = (order[:30], order[30:])
    expected = []
    for train, test in (halves, halves[::-1]):
        scores = []
        for keep in ([0, 1], [0, 1, 2]):
            r = softmax(log_probs.numpy()[train][:, keep], axis=1)
            nk = r.sum(0)
            mu = r.T @ X[train] / nk[:, None]
            var = (r * (X[train] - mu.T) ** 2).sum() / len(train) + 1e-6
            model = GaussianMixture(len(keep), covariance_type="tied", weights_init=nk / len(train),
                                    means_init=mu, precisions_init=np.array([[1 / var]]), tol=1e-3,
                                    max_iter=HELDOUT_EM_ITER, reg_covar=1e-6)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X[train])
            scores.append(model.score(X[test]))
        expected.append(scores[0] - scores[1])
    assert gain == pytest.approx(np.mean(expected), rel=1e-4, abs=1e-6)


def test_robust_is_the_plain_fit_on_a_balanced_pool():
    images, text, _, _ = clustered_pool(seed=12)
    robust = zsadapt.refine(images, text, "gmm")
    assert robust.info["presence"]["alpha"] is None  # read as balanced
    np.testing.assert_array_equal(robust.probs, zsadapt.refine(images, text, "gmm", robust=False).probs)


def test_inductive_predict_is_the_e_step_with_fitted_parameters():
    images, text, labels, _ = clustered_pool(seed=8)
    model = zsadapt.GMM(text_features=text).fit(images[::2])
    np.testing.assert_allclose(model.predict_proba(images[::2]), model.label_distributions_, atol=1e-5)
    zero = zsadapt.refine(images[1::2], text, "zeroshot").accuracy(labels[1::2])
    assert zsadapt.accuracy(model.predict(images[1::2]), labels[1::2]) > zero


def test_arrays_in_arrays_out(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    out = zsadapt.refine(X, T, "gmm")
    assert isinstance(out.labels, np.ndarray) and out.probs.shape == (X.shape[0], T.shape[0])
    tensor_out = zsadapt.refine(torch.tensor(X), torch.tensor(T), "gmm")
    assert isinstance(tensor_out.probs, torch.Tensor) and tensor_out.probs.device == torch.device("cpu")
    np.testing.assert_allclose(tensor_out.probs.numpy(), out.probs, atol=1e-6)


@pytest.mark.parametrize("robust", [False, True])
def test_edge_cases(robust):
    images, text, labels, _ = clustered_pool(n_per=10, n_classes=4, dim=8, seed=9)
    cases = {
        "two images": (images[:2], text),
        "one-class pool": (images[labels == 2], text),
        "d = 1": (np.concatenate([np.ones((5, 1)), -np.ones((4, 1))]).astype(np.float32),
                  np.array([[1.0], [-1.0]], dtype=np.float32)),
        "duplicate rows": (np.repeat(images[:5], 3, axis=0), text),
    }
    for name, (X, T) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = zsadapt.refine(X, T, "gmm", robust=robust)
        assert np.all(np.isfinite(result.probs)), name
        np.testing.assert_allclose(result.probs.sum(1), 1, rtol=1e-5, err_msg=name)
    one_class = zsadapt.refine(images[labels == 2], text, "gmm")
    assert one_class.accuracy(labels[labels == 2]) >= zsadapt.refine(
        images[labels == 2], text, "zeroshot").accuracy(labels[labels == 2])


def test_two_image_pools_keep_the_zero_shot_accuracy():
    """Issue 13 item 14: 2-image pools of the built-in 30-class pool (20 draws)."""
    pool = zsadapt.make_pool(seed=0)
    rng = np.random.default_rng(0)
    ours, zero_shot = [], []
    for _ in range(20):
        rows = rng.choice(pool.labels.size, 2, replace=False)
        images, truth = pool.image_features[rows], pool.labels[rows]
        zero_shot.append(np.mean((images @ pool.text_features.T).argmax(1) == truth))
        ours.append(np.mean(zsadapt.refine(images, pool.text_features, "gmm").labels == truth))
    assert np.mean(ours) >= np.mean(zero_shot) - 0.05


def test_estimator_checks():
    check_estimator(zsadapt.GMM())


# ---------------------------------------------------------------- class-subset pools


def mean_subset_accuracies(pool, method_params, m, seeds):
    """Mean accuracy (zero-shot, method) over pools holding ``m`` classes drawn with ``seeds``."""
    zero, ours = [], []
    for seed in seeds:
        sub = subset_pool(pool, m, seed)
        zero.append(zsadapt.refine(sub.image_features, sub.text_features, "zeroshot").accuracy(sub.labels))
        ours.append(zsadapt.refine(sub.image_features, sub.text_features, "gmm", **method_params).accuracy(sub.labels))
    return np.mean(zero), np.mean(ours)


@pytest.mark.parametrize("m", [2, 5, 10, 0.25])
def test_defaults_on_synthetic_class_subsets(m):
    pool = zsadapt.make_pool(n_images=1500, n_classes=100, dim=64, text_noise=1.5, seed=1)
    zero, ours = mean_subset_accuracies(pool, {}, m, range(6))
    assert ours >= zero - 1.0, (m, zero, ours)


@pytest.mark.parametrize("m", [2, 5, 10, 0.25])
def test_defaults_on_cars_class_subsets(cars_pool, m):
    zero, ours = mean_subset_accuracies(cars_pool, {}, m, range(10))
    assert ours >= zero - 1.0, (m, zero, ours)


def test_plain_em_collapses_on_cars_class_subsets(cars_pool):
    """Why ``robust`` exists: without it, absent classes take the images of 2-class pools."""
    zero, plain = mean_subset_accuracies(cars_pool, {"robust": False}, 2, range(10))
    assert plain < zero - 20, (zero, plain)


def test_default_beats_zeroshot_on_cars(cars_pool):
    zero = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "zeroshot").accuracy(cars_pool.labels)
    ours = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "gmm").accuracy(cars_pool.labels)
    assert ours > zero + 1.0, (zero, ours)


def test_subset_pool_draws_classes_and_keeps_the_classifier(small_pool):
    sub = subset_pool(small_pool, 3, seed=4)
    assert sub.text_features.shape == small_pool.text_features.shape
    assert set(np.unique(sub.labels)) == set(sub.extras["classes"]) and len(sub.extras["classes"]) == 3
    np.testing.assert_array_equal(sub.image_features, small_pool.image_features[np.isin(small_pool.labels, sub.extras["classes"])])
    np.testing.assert_array_equal(subset_pool(small_pool, 3, seed=4).labels, sub.labels)  # seeded
    assert len(subset_pool(small_pool, 0.25, seed=0).extras["classes"]) == 2  # 25% of 8 classes
    for bad in (0, 9, 1.5):
        with pytest.raises(ValueError, match="class|m ="):
            subset_pool(small_pool, bad)
    with pytest.raises(ValueError, match="labels"):
        subset_pool(zsadapt.Pool(small_pool.image_features, small_pool.text_features), 2)


def test_compare_cli_on_a_class_subset(tmp_path, small_pool):
    import json

    from click.testing import CliRunner

    from zsadapt.cli.main import main

    path = tmp_path / "pool.npz"
    np.savez(path, image_features=small_pool.image_features, text_features=small_pool.text_features,
             labels=small_pool.labels)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"gmm": {"robust": False}}))
    result = CliRunner().invoke(main, ["compare", str(path), "--methods", "zeroshot,gmm", "--subset-classes",
                                       "25%", "--seed", "3", "--params", str(params), "--json", "-q"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[1]["params"]["robust"] is False
    sub = subset_pool(small_pool, 0.25, seed=3)
    expected = zsadapt.refine(sub.image_features, sub.text_features, "gmm", robust=False).accuracy(sub.labels)
    assert rows[1]["accuracy"] == pytest.approx(expected)
    bad = CliRunner().invoke(main, ["compare", str(path), "--subset-classes", "0"])
    assert bad.exit_code == 1 and "--subset-classes" in bad.output
