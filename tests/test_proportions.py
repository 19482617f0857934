"""Class proportions from the pool's clusters (``solvers/proportions.py``): the empirical-Bayes
Dirichlet concentration on counts whose generating concentration is known, the shrinkage
formula, and the mixture estimate on synthetic pools whose class sizes are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers.pool_analysis import analyse_pool
from zsadapt.solvers.proportions import polya_concentration, shrunk_proportions


@pytest.mark.parametrize("alpha", [0.5, 2.0, 10.0])
def test_concentration_recovers_the_generating_dirichlet(alpha):
    """Counts of 300 classes: pi ~ Dir(alpha), 50 000 draws from pi. The Dirichlet-multinomial
    maximum-likelihood concentration lands within 25% of alpha."""
    rng = np.random.default_rng(int(alpha * 10))
    pi = rng.dirichlet(np.full(300, alpha))
    counts = rng.multinomial(50_000, pi).astype(float)
    assert polya_concentration(counts) == pytest.approx(alpha, rel=0.25)


def test_uniform_counts_are_read_as_uniform():
    assert math.isinf(polya_concentration(np.full(50, 40.0)))
    proportions, alpha = shrunk_proportions(torch.full((50,), 40.0))
    assert math.isinf(alpha)
    torch.testing.assert_close(proportions, torch.full((50,), 0.02))


def test_shrinkage_formula():
    counts = torch.tensor([90.0, 5.0, 3.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    proportions, alpha = shrunk_proportions(counts)
    assert 0 < alpha < 10
    torch.testing.assert_close(proportions, (counts + alpha) / (counts.sum() + 6 * alpha))
    single, alpha_single = shrunk_proportions(torch.tensor([7.0]))
    assert math.isinf(alpha_single) and single.tolist() == [1.0]


def test_mixture_proportions_follow_the_class_sizes_of_a_zipf_pool():
    pool = zsadapt.make_pool(n_images=1500, n_classes=10, dim=64, imbalance=1.0, seed=7)
    truth = np.bincount(pool.labels, minlength=10) / pool.labels.size
    analysis = analyse_pool(Problem(torch.tensor(pool.image_features), torch.tensor(pool.text_features)))
    estimate = analysis.proportions()
    zero_shot = torch.softmax(100 * torch.tensor(pool.image_features @ pool.text_features.T), 1).mean(0)
    error = np.abs(estimate.numpy() - truth).sum()
    assert error < 0.3 * np.abs(zero_shot.numpy() - truth).sum()
    assert error < 0.3 * np.abs(0.1 - truth).sum()
    assert estimate.sum().item() == pytest.approx(1.0)


def test_proportions_are_the_shrunk_soft_counts_of_the_default_gmm_fit():
    """The floor's mixture is the ``gmm`` solver's default fit, to the last bit (the floor may not
    import the solver, so this ties the two together)."""
    pool = zsadapt.make_pool(n_images=400, n_classes=8, dim=32, imbalance=1.0, seed=3)
    problem = Problem(torch.tensor(pool.image_features), torch.tensor(pool.text_features))
    gmm_counts = get_solver("gmm")().fit(Problem(problem.image, problem.classifier)).probs.sum(dim=0)
    expected, alpha = shrunk_proportions(gmm_counts)
    analysis = analyse_pool(problem)
    assert torch.equal(analysis.proportions(), expected)
    assert analysis.proportions() is analysis.proportions()  # computed once
    concentration = analysis.info()["proportions_concentration"]
    assert concentration == (None if math.isinf(alpha) else alpha)
