"""The ``moon`` solver: its Bessel-function pieces against mpmath and closed forms, its updates
against a direct loop implementation of the paper's Algorithm 1 (with this module's documented
choices) whose vMF normaliser comes from mpmath, a synthetic pool whose answer is known, the real
Stanford Cars few-class batches where the paper says it beats zero-shot, predict and edge cases."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.estimators import MOON
from zsadapt.protocol import SETTINGS, setting_batches
from zsadapt.solvers import NotFittedError, Problem, get_solver
from zsadapt.solvers.moon import banerjee_kappa, log_bessel_iv, log_vmf_normaliser

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mp_log_iv(nu, x):
    return float(mpmath.log(mpmath.besseli(nu, x)))


@pytest.mark.parametrize("nu", [-0.5, 0.0, 0.5, 15.0, 255.0])
def test_log_bessel_matches_mpmath(nu):
    kappa = np.array([1e-3, 0.1, 1.0, 10.0, 150.0, 1000.0, 2e4])
    ours = log_bessel_iv(nu, kappa)
    ref = np.array([mp_log_iv(nu, k) for k in kappa])
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-6)


def test_vmf_normaliser_matches_closed_forms():
    kappa = torch.tensor([0.0, 1e-4, 0.5, 3.0, 40.0, 600.0], dtype=torch.float64)
    # d = 3: C_3(kappa) = kappa / (4 pi sinh kappa); at 0, 1 / (4 pi).
    k = kappa[1:]
    closed = torch.cat([torch.tensor([-math.log(4 * math.pi)], dtype=torch.float64),
                        torch.log(k) - math.log(4 * math.pi) - (k + torch.log1p(-torch.exp(-2 * k)) - math.log(2))])
    torch.testing.assert_close(log_vmf_normaliser(kappa, 3), closed)
    # d = 1: two points, p(x) = e^(kappa x) / (2 cosh kappa).
    closed = -math.log(2) - (kappa + torch.log1p(torch.exp(-2 * kappa)) - math.log(2))
    torch.testing.assert_close(log_vmf_normaliser(kappa, 1), closed)
    # d = 512 at kappa = 0: minus the log area of the unit sphere S^511.
    area = math.log(2) + 256 * math.log(math.pi) - math.lgamma(256)
    assert abs(float(log_vmf_normaliser(torch.zeros(1, dtype=torch.float64), 512)) + area) < 1e-9


@pytest.mark.parametrize("r", [0.3, 0.6, 0.9])
def test_banerjee_kappa_inverts_the_mean_resultant_length(r):
    d = 512
    kappa = float(banerjee_kappa(torch.tensor([r], dtype=torch.float64), d))
    a_d = float(mpmath.besseli(d / 2, kappa) / mpmath.besseli(d / 2 - 1, kappa))
    assert abs(a_d - r) < 0.01 * r


def reference_moon(X, T, *, k=3, n_iter=10, scale=100.0, temperature=50.0):
    """Algorithm 1 in float64 with per-class loops and mpmath's Bessel function; returns z."""
    X = np.asarray(X, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    n, d = X.shape
    C = T.shape[0]

    def log_c(kap):
        if kap == 0:
            return math.lgamma(d / 2) - math.log(2) - d / 2 * math.log(math.pi)
        return (d / 2 - 1) * math.log(kap) - d / 2 * math.log(2 * math.pi) - mp_log_iv(d / 2 - 1, kap)

    def kappa_of(r):
        r = min(max(r, 0.0), 1 - 1e-6)
        return (d * r - r ** 3) / (1 - r * r)

    logits = scale * X @ T.T
    y_hat = np.exp(logits - logits.max(axis=1, keepdims=True))
    y_hat /= y_hat.sum(axis=1, keepdims=True)
    z = y_hat.copy()
    anchor_r = np.array([max(0.0, 1 - (z[:, c] * ((X - T[c]) ** 2).sum(1)).sum() / (2 * z[:, c].sum()))
                         for c in range(C)])  # eq. 7
    mu = T.copy()
    kappa = np.array([kappa_of(r) for r in anchor_r])
    lam = np.sqrt(y_hat.mean(axis=0) * y_hat.max(axis=0))  # eq. 11
    W = np.zeros((n, n))
    sims = X @ X.T
    for i in range(n):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:min(k, n - 1)]
        W[i, order] = sims[i, order]
    for _ in range(n_iter):
        log_p = np.array([[kappa[c] * mu[c] @ X[i] + log_c(kappa[c]) for c in range(C)] for i in range(n)])
        a = np.log(y_hat) + log_p / temperature + W @ z
        z = np.exp(a - a.max(axis=1, keepdims=True))
        z /= z.sum(axis=1, keepdims=True)
        gamma = 1 - (-(z * np.log(np.maximum(z, 1e-300))).sum(1)) / math.log(C) if C > 1 else np.ones(n)
        votes = np.zeros(C)
        for i in range(n):
            votes[z[i].argmax()] += gamma[i]
        for c in range(C):
            beta = votes[c] / (votes[c] + 1 / lam[c])
            weight = gamma * z[:, c]
            v = weight @ X / weight.sum() if weight.sum() > 0 else np.zeros(d)
            m = beta * v + (1 - beta) * anchor_r[c] * T[c]
            mu[c] = m / np.linalg.norm(m) if np.linalg.norm(m) > 0 else 0.0  # r = 0: uniform component
            kappa[c] = kappa_of(np.linalg.norm(m))
    return z


def accuracy(labels, y):
    return 100.0 * float(np.mean(np.asarray(labels) == np.asarray(y)))


@pytest.mark.parametrize("temperature", [50.0, 1.0])
def test_matches_a_direct_loop_implementation(temperature):
    pool = zsadapt.make_pool(n_images=120, n_classes=6, dim=16, seed=4)
    X, T = pool.image_features, pool.text_features
    ours = zsadapt.refine(X, T, "moon", temperature=temperature, calibrate=False)
    ref = reference_moon(X, T, temperature=temperature)
    np.testing.assert_allclose(ours.probs, ref, atol=1e-4)


def test_matches_a_direct_loop_implementation_on_a_class_subset():
    pool = zsadapt.make_pool(n_images=400, n_classes=12, dim=24, seed=6, text_noise=1.5)
    rows = np.isin(pool.labels, [0, 5])
    X, T = pool.image_features[rows], pool.text_features
    ours = zsadapt.refine(X, T, "moon", k=5, n_iter=4, calibrate=False)
    np.testing.assert_allclose(ours.probs, reference_moon(X, T, k=5, n_iter=4), atol=1e-4)


def test_recovers_the_clusters_of_few_class_synthetic_batches():
    # Tight clusters, noisy text, a batch holding a few of the 20 classes (MOON's setting): the
    # answer (the generating labels) is in the clusters.
    pool = zsadapt.make_pool(n_images=2000, n_classes=20, dim=64, image_noise=0.5, text_noise=2.0,
                             imbalance=0.0, seed=1)
    X, T, y = pool.image_features, pool.text_features, pool.labels
    for classes, floor in (([0, 1], 95.0), ([3, 4, 5, 6], 0.0)):
        rows = np.isin(y, classes)
        zeroshot = accuracy(zsadapt.refine(X[rows], T, "zeroshot").labels, y[rows])
        moon = accuracy(zsadapt.refine(X[rows], T, "moon").labels, y[rows])
        assert moon > max(zeroshot + 5, floor), classes


def test_beats_zeroshot_on_few_class_cars_batches(cars_pool):
    X, T, y = cars_pool.image_features, cars_pool.text_features, cars_pool.labels
    for setting in SETTINGS[:2]:  # 64 images from 1-4 and from 2-10 classes
        moon, zeroshot = [], []
        for (rows,) in setting_batches(y, setting, tasks=8, seed=0):
            moon.append(accuracy(zsadapt.refine(X[rows], T, "moon").labels, y[rows]))
            zeroshot.append(accuracy(zsadapt.refine(X[rows], T, "zeroshot").labels, y[rows]))
        assert np.mean(moon) > np.mean(zeroshot) + 3, setting.name


def test_inductive_predict(small_pool):
    X, T, y = small_pool.image_features, small_pool.text_features, small_pool.labels
    model = MOON(text_features=T).fit(X[:300])
    assert accuracy(model.predict(X[300:]), y[300:]) >= accuracy(np.argmax(X[300:] @ T.T, 1), y[300:])
    assert np.mean(model.predict(X[:300]) == model.transduction_) > 0.9
    with pytest.raises(NotFittedError):
        get_solver("moon")().predict(torch.as_tensor(X[:3]))


def test_arrays_in_arrays_out(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    out = zsadapt.refine(X, T, "moon")
    assert isinstance(out.probs, np.ndarray) and out.probs.shape == (X.shape[0], T.shape[0])
    out_t = zsadapt.refine(torch.as_tensor(X), torch.as_tensor(T), "moon")
    assert isinstance(out_t.probs, torch.Tensor)
    np.testing.assert_allclose(out_t.probs.numpy(), out.probs, atol=1e-6)
    assert np.isfinite(zsadapt.refine(X.astype(np.float16), T, "moon").probs).all()


def fit_direct(X, T):
    X = torch.nn.functional.normalize(torch.as_tensor(X, dtype=torch.float32), dim=1)
    T = torch.nn.functional.normalize(torch.as_tensor(T, dtype=torch.float32), dim=1)
    return get_solver("moon")().fit(Problem(X, T))


def test_edge_cases(small_pool):
    X, T, y = small_pool.image_features, small_pool.text_features, small_pool.labels
    # N = 1: no neighbours; the reference (same equations, no graph) agrees.
    np.testing.assert_allclose(fit_direct(X[:1], T).probs.numpy(), reference_moon(X[:1], T), atol=1e-4)
    # C = 1: every image is that class (gamma = 1, log K = 0).
    assert torch.equal(fit_direct(X[:20], T[:1]).probs, torch.ones(20, 1))
    # N < k, fewer images than classes.
    for n in (2, 3):
        np.testing.assert_allclose(zsadapt.refine(X[:n], T, "moon", calibrate=False).probs, reference_moon(X[:n], T), atol=1e-4)
    # Duplicate rows (a class's weight on one direction: r clamped, kappa finite).
    dup = np.concatenate([X[:30], X[:30], X[:30]])
    out = zsadapt.refine(dup, T, "moon")
    assert np.isfinite(out.probs).all() and np.array_equal(out.labels[:30], out.labels[30:60])
    same = zsadapt.refine(np.repeat(X[:1], 5, axis=0), T, "moon")
    assert np.isfinite(same.probs).all() and len(set(same.labels.tolist())) == 1
    # A pool of one class: at least zero-shot's accuracy.
    rows = y == 3
    moon = accuracy(zsadapt.refine(X[rows], T, "moon").labels, y[rows])
    assert moon >= accuracy(np.argmax(X[rows] @ T.T, 1), y[rows])
    # d = 1.
    out = zsadapt.refine(np.array([[1.0], [-1.0], [1.0]]), np.array([[1.0], [-1.0]]), "moon")
    assert out.labels.tolist() == [0, 1, 0]


def test_bad_batches_are_one_line_errors(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    with pytest.raises(ValueError, match="empty") as info:
        zsadapt.refine(X[:0], T, "moon")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="at least 2 classes"):
        zsadapt.refine(X, T[:1], "moon")
    with pytest.raises(ValueError, match="empty"):
        get_solver("moon")().fit(Problem(torch.zeros(0, X.shape[1]), torch.as_tensor(T)))
