"""Which classes does the pool hold? Variational empirical Bayes on the class proportions.

A pool often holds a handful of the C classes. Transductive solvers that give every class a
component (TransCLIP, GMM) then hand absent classes images of the present ones. This module reads
the zero-shot posteriors y_hat (N, C) as evidence about the pool's class proportions pi and says
how much each class is supported: no per-class threshold, and no change on a balanced pool.

Model (label shift, Saerens, Latinne, Decaestecker 2002): the zero-shot classifier's posteriors
assume uniform class priors, so p(x_i | c) is proportional to y_hat_ic; the pool draws its classes
from pi, and pi ~ Dirichlet(alpha 1). Mean-field variational Bayes (q(pi) = Dir(alpha + n),
q(y_i = c) = r_ic; Corduneanu and Bishop, AISTATS 2001; Bishop, PRML section 10.2) iterates

    r_ic  propto  y_hat_ic * exp(psi(alpha + n_c)),        n_c = sum_i r_ic,

and the evidence lower bound is

    ELBO(alpha) = sum_i log sum_c C y_hat_ic exp(E log pi_c) - KL(Dir(alpha + n) || Dir(alpha)),
    E log pi_c = psi(alpha + n_c) - psi(C alpha + N).

alpha is chosen by maximising the ELBO (type-II maximum likelihood). As alpha grows, q(pi)
concentrates on the uniform vector and the ELBO tends to sum_i log sum_c y_hat_ic = 0 exactly: a
pool whose best ELBO does not beat that by :data:`MIN_EVIDENCE` (1 nat: a Bayes factor below e,
"not worth more than a bare mention" in Kass and Raftery's scale) is read as balanced (alpha =
inf, every weight 0, and a solver behaves exactly as published). A pool that holds few classes
gets a small alpha, and then exp(psi(alpha + n_c)) is tiny for classes with n_c << 1: VB's
automatic pruning.

The result is used as a *presence* weight, log w_c = min(0, psi(alpha + n_c) - psi(alpha + 1)):
E log pi_c relative to a class that holds one expected image. Classes with at least one expected
image keep the solver's own (uniform) prior; only classes with less are pushed down, and as
alpha -> 0 they vanish. Measured on Stanford Cars (196 classes): the whole pool gives alpha = inf;
pools of 2 to 49 classes give alpha ~ 0.01-0.1 (benchmarks/subset_pools.py).

Each VB step is two matrix-vector products with y_hat (no (N, C) temporary): s = y_hat w,
n = w * (y_hat^T (1 / s)), w_c = exp(psi(alpha + n_c)), taken block by block of rows. Functions
only; no Solver here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Concentrations searched (log-spaced); beyond the largest, the pool is read as balanced.
ALPHA_GRID = tuple(10.0 ** (e / 2) for e in range(-6, 9))  # 1e-3 ... 1e4

#: Nats by which an imbalanced model's ELBO must beat the balanced one (whose ELBO is 0).
MIN_EVIDENCE = 1.0


@dataclass
class ClassPresence:
    """What :func:`class_presence` found.

    Attributes
    ----------
    alpha : float
        The Dirichlet concentration with the largest ELBO; ``math.inf`` for a balanced pool.
    counts : (C,) tensor
        n_c, the expected number of pool images of each class under q (the zero-shot soft counts
        when alpha is inf).
    log_weight : (C,) tensor
        log w_c = min(0, psi(alpha + n_c) - psi(alpha + 1)), <= 0; all zeros when alpha is inf.
    elbo : float
        The ELBO at ``alpha`` (0 for a balanced pool), in nats.
    """

    alpha: float
    counts: torch.Tensor
    log_weight: torch.Tensor
    elbo: float

    @property
    def balanced(self) -> bool:
        return math.isinf(self.alpha)

    def info(self) -> dict:
        """A summary for ``Result.info``: alpha, and how many classes hold >= 0.5 expected images."""
        return {"alpha": None if self.balanced else self.alpha,
                "classes_present": int((self.counts >= 0.5).sum())}


#: A VB step reads y_hat in blocks of rows of about this many elements (1 MiB in float32): each
#: block's y_hat^T (1 / s) is summed in float32 and the blocks' sums in float64. One float32 sum
#: over every row loses count as N grows: on a 50k x 1000 pool the expected counts summed to
#: 49,997.1 instead of 50,000 (now 50,000.004), and a class's count moved by up to 0.09 images. On
#: CPU both products of a block are also taken while it is in cache (the whole VB fit 4.3 -> 4.1 s);
#: on a GPU, where each block is two kernel launches, blocks are :data:`GPU_BLOCK_FACTOR` times larger.
VB_BLOCK_ELEMENTS = 1 << 18
GPU_BLOCK_FACTOR = 64


def _vb_step(probs: torch.Tensor, alpha: float, counts: torch.Tensor) -> torch.Tensor:
    """One VB update n -> n' (C,) (module docstring): two matrix-vector products with ``probs``,
    s = y_hat w and y_hat^T (1 / s), block by block of rows (:data:`VB_BLOCK_ELEMENTS`)."""
    log_w = torch.digamma(alpha + counts)  # (C,) E log pi_c + const
    w = torch.exp(log_w - log_w.max()).to(probs.dtype)  # (C,) in (0, 1]
    n, c = probs.shape
    elements = VB_BLOCK_ELEMENTS if probs.device.type == "cpu" else VB_BLOCK_ELEMENTS * GPU_BLOCK_FACTOR
    step = max(1, elements // max(1, c))
    total = torch.zeros(c, dtype=torch.float64, device=probs.device)  # (C,) sum_i y_hat_ic / s_i
    for start in range(0, n, step):
        block = probs[start:start + step]  # (b, C)
        s = block @ w  # (b,) sum_c y_hat_ic w_c
        total += block.T @ (1.0 / s.clamp_min(torch.finfo(s.dtype).tiny))
    return w.double() * total  # (C,)


def _vb_counts(probs: torch.Tensor, alpha: float, counts: torch.Tensor, max_iter: int,
               tol: float) -> torch.Tensor:
    """The VB fixed point n (C,) for one alpha, from a warm start ``counts`` (float64).

    The fixed-point iteration n <- F(n) is accelerated by SQUAREM (Varadhan and Roland, Scand. J.
    Statist. 2008, scheme S3): from two steps n1 = F(n), n2 = F(n1), r = n1 - n, v = n2 - 2 n1 + n,
    it jumps to n - 2 a r + a^2 v with a = -min(-1, ||r|| / ||v||), clipped at 0 counts. Same
    fixed point and the same stopping rule (an F step that moves no count by ``tol`` or more, or
    ``max_iter`` F steps); about half the F steps of the plain iteration on 10k x 1000 pools.
    """
    steps = 0
    while steps < max_iter:
        first = _vb_step(probs, alpha, counts)
        steps += 1
        if float((first - counts).abs().max()) < tol or steps == max_iter:
            return first
        second = _vb_step(probs, alpha, first)
        steps += 1
        if float((second - first).abs().max()) < tol:
            return second
        r, v = first - counts, second - 2.0 * first + counts  # (C,) each
        a = -max(1.0, float(r.norm()) / max(float(v.norm()), 1e-300))  # a = -1: plain steps
        counts = (counts - 2.0 * a * r + a * a * v).clamp_min(0.0)
    return counts


def _elbo(probs: torch.Tensor, alpha: float, counts: torch.Tensor) -> float:
    """ELBO(alpha) at q(pi) = Dir(alpha + counts), with q(y) optimal for that q(pi)."""
    n, c = probs.shape
    post = alpha + counts  # (C,) float64
    e_log_pi = torch.digamma(post) - torch.digamma(post.sum())  # (C,)
    shift = float(e_log_pi.max())
    w = torch.exp(e_log_pi - shift).to(probs.dtype)
    s = (probs @ w).double().clamp_min(1e-300)  # (N,)
    data = float(torch.log(s).sum()) + n * (shift + math.log(c))
    prior = torch.full_like(post, alpha)
    kl = (torch.lgamma(post.sum()) - torch.lgamma(post).sum() - torch.lgamma(prior.sum())
          + torch.lgamma(prior).sum() + ((post - prior) * e_log_pi).sum())
    return data - float(kl)


def class_presence(probs: torch.Tensor, *, max_iter: int = 300, tol: float = 1e-2) -> ClassPresence:
    """How strongly the pool supports each class, from its zero-shot posteriors.

    Parameters
    ----------
    probs : (N, C) tensor
        Zero-shot posteriors y_hat (rows sum to 1), on any device.
    max_iter : int
        VB steps per concentration (warm-started from the previous, larger one).
    tol : float
        Stop a VB run when no expected count moves by more (in images).

    Returns
    -------
    ClassPresence
        On ``probs``' device; ``alpha = inf`` (weights 0) unless some alpha on
        :data:`ALPHA_GRID` has an ELBO above :data:`MIN_EVIDENCE`.
    """
    probs = probs.detach()
    n, c = probs.shape
    soft = probs.sum(dim=0).double()  # (C,) the zero-shot soft counts
    best = ClassPresence(math.inf, soft.to(probs.dtype), torch.zeros(c, dtype=probs.dtype, device=probs.device), 0.0)
    if c < 2 or n < 1:
        return best
    counts = soft
    previous, falling = 0.0, 0
    for alpha in sorted(ALPHA_GRID, reverse=True):  # warm starts from smooth to sparse
        counts = _vb_counts(probs, alpha, counts, max_iter, tol)
        elbo = _elbo(probs, alpha, counts)
        if elbo > max(best.elbo, MIN_EVIDENCE):
            relative = torch.digamma(alpha + counts) - torch.digamma(counts.new_tensor(alpha + 1.0))
            best = ClassPresence(alpha, counts.to(probs.dtype), relative.clamp_max(0.0).to(probs.dtype), elbo)
        # The ELBO is unimodal in log alpha on every pool measured: stop two steps past the peak.
        falling = falling + 1 if elbo < previous else 0
        previous = elbo
        if falling == 2:
            break
    return best
