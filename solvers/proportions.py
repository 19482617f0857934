"""How many images of each class does the pool hold? Class proportions from the pool's clusters.

The pseudo-label methods need class proportions: InMaP balances its pseudo-labels towards them
(Sinkhorn column marginals) and self-training sets its per-class quotas by them. The published
versions assume a balanced pool (uniform proportions), which is wrong on an imbalanced one
(Caltech101: InMaP loses 20 points); proportions read off the zero-shot predictions mirror the
classifier's own bias instead of the pool. This module estimates them from the cluster structure:

1. fit a Gaussian mixture (one Gaussian per class, shared diagonal covariance, started from the
   initial classifier, classes the pool does not support dropped: the ``gmm`` solver's default
   fit), and take its soft class counts n_c = sum_i r_ic
   (:meth:`zsadapt.solvers.pool_analysis.PoolAnalysis.proportions`, which a solver calls);
2. shrink them towards uniform with an empirical-Bayes Dirichlet prior (the Polya, or
   Dirichlet-multinomial, model; Minka 2000, "Estimating a Dirichlet distribution"):
   pi_c = (n_c + a) / (N + C a), with a maximising the Dirichlet-multinomial likelihood
   log Gamma(C a) - log Gamma(N + C a) + sum_c [log Gamma(n_c + a) - log Gamma(a)].
   Counts no more dispersed than multinomial sampling around uniform give a -> infinity (the
   published uniform proportions); strongly imbalanced counts give a small a (the GMM's counts).

Measured on the real pools of ../shared/data (``benchmarks/pseudolabel_pools.py``): the whole
Cars pool gets a = inf (uniform), Caltech101 a = 1.9, the other prototype pools a = 2.7-5.2.
This module holds step 2; functions only, no Solver here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Concentrations searched (log a in [log 1e-4, log 1e7]); the top of the range means uniform
#: (beyond it, float64 log-gamma differences are round-off, ~1e-5 nats).
LOG_ALPHA_RANGE = (math.log(1e-4), math.log(1e7))


def polya_concentration(counts: np.ndarray) -> float:
    """The Dirichlet concentration a > 0 maximising the Dirichlet-multinomial log-likelihood of the
    (soft) class counts (C,); ``math.inf`` when the maximum is at the top of the range (counts
    consistent with uniform proportions)."""
    # scipy is imported here, not with the module: 0.3 s of every process that loads a solver
    from scipy.optimize import minimize_scalar
    from scipy.special import gammaln

    counts = np.asarray(counts, dtype=np.float64)
    n, c = counts.sum(), counts.size

    def negative_log_likelihood(log_alpha: float) -> float:
        a = math.exp(log_alpha)
        return -(gammaln(c * a) - gammaln(n + c * a) + (gammaln(counts + a) - gammaln(a)).sum())

    low, high = LOG_ALPHA_RANGE
    best = minimize_scalar(negative_log_likelihood, bounds=(low, high), method="bounded",
                           options={"xatol": 1e-3}).x
    # Within 1e-3 nats of the top of the range: the counts do not ask for any limit to shrinkage.
    flat = negative_log_likelihood(high) - negative_log_likelihood(best) < 1e-3
    return math.inf if flat else math.exp(best)


def shrunk_proportions(counts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Class proportions (C,) (n_c + a) / (N + C a) with the empirical-Bayes a of
    :func:`polya_concentration` (uniform when a is infinite), and a."""
    alpha = polya_concentration(counts.detach().double().cpu().numpy()) if counts.numel() > 1 else math.inf
    if math.isinf(alpha):
        return torch.full_like(counts, 1.0 / counts.numel()), alpha
    shares = counts + alpha
    return shares / shares.sum(), alpha

