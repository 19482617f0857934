"""Class presence (``solvers/presence.py``): the variational empirical Bayes estimate of which
classes a pool holds, checked against a dense textbook statement of the same VB updates and
ELBO, against a Monte Carlo estimate of the marginal likelihood the ELBO bounds, and on pools
whose composition is known (balanced, class subsets, the real Cars pool)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import digamma, gammaln, logsumexp, softmax

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.solvers.presence import ALPHA_GRID, MIN_EVIDENCE, _elbo, _vb_counts, class_presence


def dense_vb(probs, alpha, n_iter=2000):
    """Mean-field VB for pi ~ Dir(alpha), y_i ~ pi, p(x_i | c) ∝ probs_ic, written out with the
    (N, C) responsibilities; returns (counts, ELBO) with every ELBO term spelled out."""
    n, c = probs.shape
    r = probs.copy()
    for _ in range(n_iter):
        post = alpha + r.sum(0)
        e_log_pi = digamma(post) - digamma(post.sum())
        r = softmax(np.log(probs) + e_log_pi, axis=1)
    post = alpha + r.sum(0)
    e_log_pi = digamma(post) - digamma(post.sum())
    log_lik = np.log(c * probs)  # log p(x_i | c) up to a constant that cancels against uniform
    elbo = ((r * (log_lik + e_log_pi)).sum() - (r * np.log(np.clip(r, 1e-300, None))).sum()
            + gammaln(c * alpha) - c * gammaln(alpha) + ((alpha - 1) * e_log_pi).sum()
            - (gammaln(post.sum()) - gammaln(post).sum() + ((post - 1) * e_log_pi).sum()))
    return r.sum(0), elbo


def random_probs(n, c, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    return softmax(scale * rng.standard_normal((n, c)), axis=1)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_vb_fixed_point_and_elbo_match_the_dense_statement(alpha):
    probs = random_probs(40, 6, seed=1)
    counts = _vb_counts(torch.tensor(probs), alpha, torch.tensor(probs.sum(0)), max_iter=5000, tol=1e-12)
    ref_counts, ref_elbo = dense_vb(probs, alpha)
    np.testing.assert_allclose(counts.numpy(), ref_counts, rtol=1e-6, atol=1e-8)
    assert _elbo(torch.tensor(probs), alpha, counts) == pytest.approx(ref_elbo, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("block_elements", [6, 7 * 6, 1 << 18])
def test_vb_steps_in_blocks_of_rows_reach_the_dense_fixed_point(block_elements, monkeypatch):
    """A VB step takes its two products block by block of rows (one row, 7 rows with a ragged
    last block, all 40 rows): the same fixed point as the dense statement, in float32 too."""
    import sys

    monkeypatch.setattr(sys.modules["zsadapt.solvers.presence"], "VB_BLOCK_ELEMENTS", block_elements)
    probs = random_probs(40, 6, seed=3)
    counts = _vb_counts(torch.tensor(probs, dtype=torch.float32), 0.5, torch.tensor(probs.sum(0)),
                        max_iter=5000, tol=1e-9)
    ref_counts, _ = dense_vb(probs, 0.5)
    np.testing.assert_allclose(counts.numpy(), ref_counts, rtol=1e-4, atol=1e-5)


def test_vb_counts_keep_the_pool_size_on_a_large_float32_pool():
    """One VB step's expected counts sum to N (every row's responsibilities sum to 1): a float32
    sum over all 200,000 rows drifts by 42 images; the blocks' float64 sum of float32 block sums
    stays within one (0.2: the float32 rounding of each row's terms)."""
    from zsadapt.solvers.presence import _vb_step

    rng = np.random.default_rng(4)
    probs = torch.from_numpy(softmax(3.0 * rng.standard_normal((200_000, 50)), axis=1).astype(np.float32))
    counts = _vb_step(probs, 0.5, probs.sum(dim=0).double())
    assert float(counts.sum()) == pytest.approx(200_000, abs=1.0)


@pytest.mark.parametrize("alpha", [0.1, 1.0, 10.0])
def test_elbo_is_a_lower_bound_on_the_marginal_likelihood(alpha):
    """log p(data | alpha) = log E_{pi ~ Dir(alpha)} prod_i sum_c C pi_c probs_ic, by Monte Carlo."""
    probs = random_probs(6, 3, seed=2)
    rng = np.random.default_rng(0)
    pis = rng.dirichlet(np.full(3, alpha), size=400_000)  # (S, C)
    log_terms = np.log(3 * pis @ probs.T).sum(axis=1)  # (S,)
    log_marginal = logsumexp(log_terms) - math.log(len(pis))
    counts = _vb_counts(torch.tensor(probs), alpha, torch.tensor(probs.sum(0)), max_iter=5000, tol=1e-12)
    elbo = _elbo(torch.tensor(probs), alpha, counts)
    assert elbo <= log_marginal + 0.02  # Monte Carlo error is far below 0.02 nats here
    assert elbo >= log_marginal - 1.0  # and the bound is not loose


def test_large_alpha_is_the_uniform_limit():
    probs = torch.tensor(random_probs(30, 5, seed=3))
    counts = _vb_counts(probs, 1e9, probs.sum(0).double(), max_iter=10, tol=0.0)
    np.testing.assert_allclose(counts.numpy(), probs.sum(0).numpy(), rtol=1e-6)
    assert abs(_elbo(probs, 1e9, counts)) < 1e-3  # the ELBO of a uniform pi is exactly 0


def test_search_finds_the_best_concentration_on_the_grid():
    for seed, n_present in [(4, 2), (5, 4), (6, 8)]:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, n_present, size=200)
        logits = 3.0 * rng.standard_normal((200, 8))
        logits[np.arange(200), labels] += 4.0  # a decent classifier over 8 classes, n_present in the pool
        probs = torch.tensor(softmax(logits, axis=1))
        counts, elbos = probs.sum(0).double(), {}
        for alpha in sorted(ALPHA_GRID, reverse=True):  # every grid point, no early stop
            counts = _vb_counts(probs, alpha, counts, 300, 1e-2)
            elbos[alpha] = _elbo(probs, alpha, counts)
        best = max(elbos, key=elbos.get)
        found = class_presence(probs)
        assert found.alpha == (best if elbos[best] > MIN_EVIDENCE else math.inf), seed


def test_a_balanced_pool_is_read_as_balanced():
    pool = zsadapt.make_pool(n_images=2000, n_classes=20, dim=64, text_noise=1.0, imbalance=0.0, seed=4)
    probs = torch.softmax(100.0 * torch.tensor(pool.image_features @ pool.text_features.T), dim=1)
    presence = class_presence(probs)
    assert presence.balanced and presence.elbo == 0.0
    assert torch.equal(presence.log_weight, torch.zeros(20)) and presence.info()["alpha"] is None
    np.testing.assert_allclose(presence.counts.numpy(), probs.sum(0).numpy(), rtol=1e-6)


def test_a_class_subset_is_found():
    pool = zsadapt.make_pool(n_images=3000, n_classes=40, dim=64, text_noise=0.5, imbalance=0.0, seed=5)
    sub = subset_pool(pool, 5, seed=1)
    probs = torch.softmax(100.0 * torch.tensor(sub.image_features @ sub.text_features.T), dim=1)
    presence = class_presence(probs)
    present = np.zeros(40, dtype=bool)
    present[sub.extras["classes"]] = True
    votes = np.bincount(probs.argmax(1).numpy(), minlength=40)
    assert presence.alpha < 0.1
    # class 6 attracts the classifier's errors (31 votes): the evidence cannot rule it out
    assert votes[6] > 10 and not present[6]
    assert presence.info()["classes_present"] == 6
    assert presence.log_weight[present].min() > -0.1  # present classes keep their prior
    assert presence.log_weight[~present & (votes == 0)].max() < -5  # the others are all but removed
    np.testing.assert_allclose(float(presence.counts.sum()), len(sub.labels), rtol=1e-5)


def test_edge_cases_and_dtype():
    one_class = class_presence(torch.ones(5, 1))
    assert one_class.balanced and one_class.log_weight.shape == (1,)
    one_image = class_presence(torch.tensor([[0.9, 0.05, 0.05]]))
    assert torch.isfinite(one_image.log_weight).all()
    half = class_presence(torch.tensor(random_probs(50, 4, seed=6), dtype=torch.float32))
    assert half.log_weight.dtype == torch.float32 and half.counts.dtype == torch.float32


@pytest.mark.realdata
def test_cars_whole_pool_is_balanced_and_its_subsets_are_not(cars_pool):
    probs = torch.softmax(100.0 * torch.tensor(cars_pool.image_features @ cars_pool.text_features.T), dim=1)
    assert class_presence(probs).balanced
    for m in (2, 10, 0.25):
        sub = subset_pool(cars_pool, m, seed=0)
        sub_probs = torch.softmax(100.0 * torch.tensor(sub.image_features @ sub.text_features.T), dim=1)
        presence = class_presence(sub_probs)
        count = len(sub.extras["classes"])
        assert not presence.balanced
        # the estimate of the number of classes held lands within a factor of 1.5 of the truth
        assert count / 1.5 <= presence.info()["classes_present"] <= 1.5 * count, m
