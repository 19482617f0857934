"""InMaP: intra-modal proxy learning.

Qian, Xu, Hu, "Intra-Modal Proxy Learning for Zero-Shot Visual Categorization with CLIP",
NeurIPS 2023. Text embeddings are poor proxies for image clusters (the modality gap); InMaP learns
one *vision* proxy per class from the pool's zero-shot pseudo-labels:

1. pseudo-labels P0 = softmax(S / tau_t), S = cosine similarity to the initial classifier
   (tau_t = 0.01, i.e. CLIP's logit scale; by default 1 / ``logit_scale``, so an encoder with
   another similarity range sets ``logit_scale`` once, as for every method);
2. balanced by Sinkhorn iterations (paper sec. 3.3) towards row marginals 1/N and column marginals
   q (``marginals``):
   - ``"uniform"``: 1/C, as published; right on a balanced pool, and 20 points below the initial
     classifier on the strongly imbalanced Caltech101;
   - ``"zeroshot"``: q_c proportional to (sum_n P0[n, c])^marginal_power (the official gamma);
     these mirror the initial classifier's own bias, and with gamma = 1 leave P0 almost as it is;
   - ``"mixture"`` (default, not in the paper): the class proportions estimated from the pool's
     clusters by :meth:`zsadapt.solvers.pool_analysis.PoolAnalysis.proportions` (a Gaussian mixture's
     class counts shrunk towards uniform by an empirical-Bayes Dirichlet prior): uniform on a
     pool whose counts look balanced (the whole Cars pool), close to the true proportions on an
     imbalanced one (Caltech101: +2.43 over the initial classifier, against -20.0 uniform);
   computed in the log domain, so a class whose probabilities all underflow cannot give 0/0.
   The balancing is skipped (P = P0) when the pool is too small to fill the targets: if N images
   drawn with proportions q would leave classes empty that hold more than ``MAX_ABSENT_MASS``
   (5%) of the target mass, sum_c q_c (1 - q_c)^N > 0.05 (uniform q: fewer than about 3 images
   per class), Sinkhorn can meet the column sums only by spreading every image's mass over the
   classes the pool lacks: on a 2-image Cars pool that labelled both images wrong (zero-shot:
   one right), and random Cars subsets of 20 to 2C images lost 1.4 to 17 points against
   zero-shot (at 4C images balancing gains 2.2);
3. rows whose largest entry exceeds ``confidence`` (official alpha, 0.6) become one-hot;
4. proxies W (C, d) start at the initial classifier and follow full-batch gradient descent on the
   cross-entropy L(W) = -(1/N) sum_n sum_c P[n, c] log softmax(x_n W^T / tau_i)_c (tau_i = 0.04),
   whose closed-form gradient is dL/dW = (softmax(X W^T / tau_i) - P)^T X / (N tau_i) (paper eq. 7),
   with step ``lr``, the step halved whenever the gradient norm rises, and every proxy re-normalised
   to unit length after each step (projected gradient descent on the sphere);
5. the descent stops when the proxies stop moving: when for ``STALL_STEPS`` (10) consecutive
   steps the rms over classes of ||w_c(t) - w_c(t-1)|| (the angle each unit proxy turns, in
   radians) stays below ``tol`` (1e-4), or at ``max_iter`` (2000, the published fixed step count;
   ``ConvergenceWarning``). ``tol=0`` runs all ``max_iter`` steps, as published. Against the
   published 2000 steps, on the seven shared pools (Cars with text, six 1-shot prototype pools):
   the same accuracy within 0.06 point on every pool (at most 6 labels of a pool differ) in 169
   to 1614 steps, 1100 on average (``benchmarks/inmap_stopping.py``, docs/results/inmap-stopping.md).

The proxies are a classifier (inductive ``predict``: softmax(x W^T / tau_i)) and an initial
classifier for other solvers (``zsadapt.refine(..., init="inmap")``). As a classifier of new images
they fall below zero-shot on Stanford Cars (fit on a random half, the other half: 55.3% against
59.8%; ``benchmarks/fit_on_sample.py``), so ``inductive_below_initial`` is set: saving a model warns.
"""

from __future__ import annotations

import math
import warnings
from collections import deque

import torch

from ..messages import note, progress
from ..zeroshot import CLIP_LOGIT_SCALE
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput, convergence_warning
from .pool_analysis import analyse_pool
from .timing import StageTimer

MARGINALS = ("mixture", "uniform", "zeroshot")

#: Consecutive steps the proxies must stay below ``tol`` to stop (a single slow step is not enough).
STALL_STEPS = 10

#: Largest share of the Sinkhorn target mass on classes a pool of N images would lack (expected,
#: for N draws from the targets) for which the balancing is run.
MAX_ABSENT_MASS = 0.05


def absent_mass(column_marginals: torch.Tensor, n_images: int) -> float:
    """Expected share of the target mass on classes that N images drawn with proportions q
    leave empty: sum_c q_c (1 - q_c)^N (q: (C,), sums to 1)."""
    q = column_marginals.double()
    return float((q * torch.exp(n_images * torch.log1p(-q.clamp(max=1.0 - 1e-12)))).sum())


def sinkhorn(log_p: torch.Tensor, column_marginals: torch.Tensor, iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp balancing in the log domain.

    Parameters
    ----------
    log_p : (N, C) log of the initial plan (any scale; e.g. S / tau_t)
    column_marginals : (C,) target column mass, sums to 1
    iterations : int
        Column-then-row normalisations (each ends with exact row marginals).

    Returns
    -------
    (N, C) pseudo-labels: rows sum to 1; column sums tend to N * column_marginals.
    """
    n = log_p.shape[0]
    log_rows = -math.log(n)
    log_cols = torch.log(column_marginals.clamp_min(torch.finfo(log_p.dtype).tiny))  # (C,)
    log_p = log_p - torch.logsumexp(log_p.flatten(), dim=0)  # total mass 1
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_cols  # column sums q
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_rows  # row sums 1/N
    return torch.exp(log_p + math.log(n))  # rows sum to 1


def column_targets(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Column marginals (C,): uniform for gamma = 0, else (sum_n probs[n, c])^gamma normalised."""
    n_classes = probs.shape[1]
    if gamma <= 0:
        return torch.full((n_classes,), 1.0 / n_classes, dtype=probs.dtype, device=probs.device)
    q = probs.sum(dim=0).pow(gamma)
    return q / q.sum()


def harden(pseudo: torch.Tensor, alpha: float) -> torch.Tensor:
    """Rows whose largest entry exceeds ``alpha`` become one-hot (a new tensor)."""
    value, index = pseudo.max(dim=1)
    sure = value > alpha
    out = pseudo.clone()
    out[sure] = 0.0
    out[sure, index[sure]] = 1.0
    return out


def proxy_gradient(image: torch.Tensor, proxies: torch.Tensor, pseudo: torch.Tensor, tau: float) -> torch.Tensor:
    """Closed-form gradient of the mean cross-entropy (paper eq. 7), shape (C, d):
    (softmax(X W^T / tau) - P)^T X / (N tau)."""
    probs = torch.softmax(image @ proxies.T / tau, dim=1)  # (N, C)
    return (probs - pseudo).T @ image / (image.shape[0] * tau)


def proxy_loss(image: torch.Tensor, proxies: torch.Tensor, pseudo: torch.Tensor, tau: float) -> torch.Tensor:
    """The objective the gradient belongs to: -(1/N) sum P log softmax(X W^T / tau) (scalar)."""
    return -(pseudo * torch.log_softmax(image @ proxies.T / tau, dim=1)).sum(dim=1).mean()


@register
class InMaPSolver(Solver):
    name = "inmap"
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
    summary = "vision proxies learned from Sinkhorn-balanced pseudo-labels (transductive + inductive)"
    reference = (
        "Qian, Xu, Hu, Intra-Modal Proxy Learning for Zero-Shot Visual Categorization with CLIP, "
        "NeurIPS 2023"
    )
    params = {
        "logit_scale": Param(CLIP_LOGIT_SCALE, float, "zero-shot softmax(logit_scale x cosine) of the pool "
                             "analysis and, unless tau_t is given, of the pseudo-labels (CLIP: 100)", minimum=1e-6),
        "tau_t": Param(None, float, "temperature of the zero-shot pseudo-labels (default: 1 / logit_scale, "
                       "0.01 for CLIP, the official value)", minimum=1e-6),
        "tau_i": Param(0.04, float, "temperature of the proxy classifier", minimum=1e-6),
        "confidence": Param(0.6, float, "pseudo-labels above this confidence become one-hot (official alpha)", minimum=0.0, maximum=1.0),
        "marginals": Param("mixture", str, "Sinkhorn class marginals: mixture (class proportions "
                           "estimated from the pool's clusters), uniform (published) or zeroshot "
                           "((sum of zero-shot probabilities)^marginal_power)", choices=MARGINALS),
        "marginal_power": Param(1.0, float, "exponent of marginals=zeroshot (official gamma; 0: uniform)", minimum=0.0),
        "sinkhorn_iter": Param(20, int, "Sinkhorn iterations (0: no balancing)", minimum=0),
        "lr": Param(10.0, float, "initial gradient step (halved when the gradient norm rises)", minimum=0.0),
        "max_iter": Param(2000, int, "gradient steps at most (the published fixed count)", minimum=0),
        "tol": Param(1e-4, float, "stop when the proxies turn less than tol radians per step (rms over "
                     "classes) for 10 consecutive steps (0: all max_iter steps, as published)", minimum=0.0),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        cfg = self.config
        X = problem.image  # (N, d)
        timer = StageTimer(problem.device)
        with timer("pseudo_labels"):
            sims = problem.logits() / CLIP_LOGIT_SCALE  # (N, C) cosine similarities (or their per-image ensemble)
            tau_t = self._pseudo_label_temperature()
            log_p0 = sims / tau_t
            targets = self._column_targets(problem, log_p0)  # (C,)
            # A pool too small to fill the targets is not balanced (module docstring, step 2).
            balanced = cfg["sinkhorn_iter"] > 0 and absent_mass(targets, X.shape[0]) <= MAX_ABSENT_MASS
            pseudo = sinkhorn(log_p0, targets, cfg["sinkhorn_iter"]) if balanced else torch.softmax(log_p0, dim=1)
            pseudo = harden(pseudo, cfg["confidence"])  # (N, C)
        if problem.progress:
            note(f"inmap: learning {problem.classifier.shape[0]} proxies (at most {cfg['max_iter']} gradient steps)")
        with timer("proxies"):
            proxies, steps, movement, lr, stalled = self._descend(X, problem.classifier, pseudo, problem.progress)
        converged = cfg["tol"] == 0 or stalled
        if not converged:
            warnings.warn(
                f"inmap: stopped at max_iter={cfg['max_iter']} with the proxies still turning "
                f"{movement:.2e} rad per step > tol={cfg['tol']:.0e}", convergence_warning(), stacklevel=3,
            )
        self.proxies_ = proxies  # (C, d) unit rows
        out = self.predict(X)
        out.info.update(
            iterations=steps, converged=converged, movement=movement, final_lr=lr, balanced=balanced, tau_t=tau_t,
            pseudo_label_counts=pseudo.sum(dim=0).tolist(), marginals=targets.tolist(), seconds=timer.seconds,
        )
        return out

    def _pseudo_label_temperature(self) -> float:
        """tau_t of step 1: as given, else 1 / ``logit_scale`` (exactly 0.01 at CLIP's 100)."""
        tau_t = self.config["tau_t"]
        return 1.0 / self.config["logit_scale"] if tau_t is None else tau_t

    def _column_targets(self, problem: Problem, log_p0: torch.Tensor) -> torch.Tensor:
        """The Sinkhorn column marginals q (C,) chosen by ``marginals``."""
        cfg = self.config
        if cfg["marginals"] == "mixture":
            return analyse_pool(problem, logit_scale=cfg["logit_scale"]).proportions()
        power = 0.0 if cfg["marginals"] == "uniform" else cfg["marginal_power"]
        return column_targets(torch.softmax(log_p0, dim=1), power)

    def _descend(self, X: torch.Tensor, init: torch.Tensor, pseudo: torch.Tensor, show: bool) -> tuple:
        """Projected gradient descent of the proxies (C, d) from ``init``, until they stop moving
        (module docstring, step 5) or ``max_iter``.

        Returns
        -------
        (W, steps, movement, lr, stalled): the proxies, the steps taken, the rms turn of the last
        step (radians), the final step size, and whether the stopping rule was met.
        """
        cfg = self.config
        tau, lr, tol = cfg["tau_i"], cfg["lr"], cfg["tol"]
        W = init.clone()
        previous = math.inf
        movement = math.inf
        recent: deque = deque(maxlen=STALL_STEPS)  # the last steps' movements
        stalled = False
        steps = 0
        with progress(cfg["max_iter"], "inmap: gradient steps", show=show) as bar:
            for steps in range(1, cfg["max_iter"] + 1):
                grad = proxy_gradient(X, W, pseudo, tau)  # (C, d)
                norm = float(grad.norm())
                if norm > previous:
                    lr /= 2.0
                previous = norm
                moved = torch.nn.functional.normalize(W - lr * grad, dim=1)
                # rms over classes of the chord |w_c(t) - w_c(t-1)| (= the angle, for small steps)
                movement = float((moved - W).norm()) / math.sqrt(W.shape[0])
                W = moved
                recent.append(movement)
                bar.update(steps, f"(proxies turn {movement:.1e} rad/step, stop below {tol:.0e})")
                if tol > 0 and len(recent) == STALL_STEPS and max(recent) < tol:
                    stalled = True
                    break
        return W, steps, movement, lr, stalled

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """softmax(x W^T / tau_i) for new images (M, d)."""
        if not hasattr(self, "proxies_"):
            raise NotFittedError("inmap: call fit first")
        logits = image @ self.proxies_.T / self.config["tau_i"]  # (M, C)
        return SolverOutput(logits, torch.softmax(logits, dim=1), {})
