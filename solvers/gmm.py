"""GMM: Gaussian-mixture clustering of the pool, one component per class, fitted by EM.

The components share one covariance: diagonal diag(v) (``covariance="diag"``) or spherical v I
(``covariance="spherical"``); each class c has a mean mu_c and a mixing weight pi_c. EM
(Dempster, Laird, Rubin 1977) alternates

* E-step: r_ic = pi_c N(x_i | mu_c, Sigma) / sum_c' pi_c' N(x_i | mu_c', Sigma); the mean
  log-likelihood (1/N) sum_i log sum_c pi_c N(x_i | mu_c, Sigma) is recorded;
* M-step: pi_c = (1/N) sum_i r_ic, mu_c = sum_i r_ic x_i / sum_i r_ic,
  v = sum_ic r_ic (x_i - mu_c)^2 / N (+ ``reg_covar``; averaged over dimensions when spherical),

until the mean log-likelihood changes by less than ``tol`` (``ConvergenceWarning`` after
``max_iter`` iterations), then one last E-step gives the probabilities. The iteration order, the
stopping rule and ``reg_covar`` are scikit-learn's ``GaussianMixture``'s, so with the same starting
parameters the log-likelihood path is the same (on 1-D data, where its ``"tied"`` covariance is our
shared one; ``tests/test_gmm.py``). The log-likelihood is computed as matmuls
(:mod:`zsadapt.solvers.mixture`), never as (N, C, d) residuals.

Initialisation (``init``) ties components to classes:

* ``"text"``: mu_c = the class embedding t_c, v = the variance of each image around the embedding
  of its zero-shot class, pi uniform;
* ``"zeroshot"``: one M-step from the zero-shot probabilities softmax(``logit_scale`` x t);
* ``"kmeans++"``: free clustering: C k-means++ seeds (Arthur and Vassilvitskii 2007, seeded),
  one M-step from the hard assignment to the nearest seed, EM, and then each cluster is given a
  class by the Hungarian algorithm on the cosine similarity of the L2-normalised cluster means to
  the class embeddings (scipy ``linear_sum_assignment``). Classes left without a cluster (fewer
  images than classes) get probability 0.

The mixing weights pi are estimated (the M-step above). That alone does not protect a pool that
holds a few of the C classes: from the soft zero-shot probabilities every absent class starts with
a mean on the pool and a sizeable weight, and EM hands it images (Cars pools of 2 classes, 10
draws: 13.7% against 69.0% zero-shot). ``robust=True`` (the default) first asks which classes the pool supports
(:func:`supported_classes`):

1. :func:`zsadapt.solvers.presence.class_presence`: variational empirical Bayes on the zero-shot
   class proportions. A pool whose evidence is balanced keeps every class, and the fit is the
   plain one, step by step (the whole Cars pool).
2. Otherwise a class is dropped (pi = 0, and EM keeps it there) when it holds under half an
   expected image and wins fewer than 2 zero-shot argmax votes (the votes keep a class whose text
   embedding is poor but whose images are many).
3. The zero-shot predictions cannot tell a class the pool lacks from one the classifier never
   predicts (hub classes of a poor classifier attract the images of many others). So the drop is
   checked against the pool's clusters: 2-fold cross-validation (halves drawn with the seed) of
   the mean held-out log-likelihood of the GMM fitted with and without the dropped classes. Only
   if dropping them predicts held-out images at least as well are they dropped; else every class
   stays (and transclip's presence weights are all 1). Measured (benchmarks/subset_pools.py and
   the README): Cars pools of 2 to 147 of its classes are pruned (gains of 12 to 2e5 nats per
   image); synthetic 500-class pools whose zero-shot classifier (24-44% accurate) puts the images
   on 45-79 hub classes are not (losses of 42-64 nats per image), nor the Zipf synthetic pool
   whose zero-shot-invisible classes presence would drop (-1.3).

The kept classes start from the zero-shot probabilities times the presence weights;
``init="kmeans++"`` clusters into as many clusters as kept classes and matches them to those
classes. ``robust=False`` is the plain fit on any pool.

Inductive mode: ``predict`` runs the E-step on new images with the fitted pi, mu and Sigma.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning

from ..messages import note
from ..zeroshot import zeroshot_logits
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput
from .mixture import COVARIANCES, gaussian_loglik, posteriors, safe_log, shared_variance, weighted_means
from .presence import ClassPresence, class_presence
from .timing import StageTimer

INITS = ("text", "zeroshot", "kmeans++")

#: EM iterations of each fit in the held-out check: it compares two fits, it does not need them
#: converged (20 instead of 100 made the same decision on every pool measured and saves 35-40%).
HELDOUT_EM_ITER = 20


def m_step(X: torch.Tensor, resp: torch.Tensor, covariance: str, reg: float) -> tuple:
    """(log pi (K,), means (K, d), shared variance) maximising the expected log-likelihood for
    the responsibilities ``resp`` (N, K)."""
    means, counts = weighted_means(X, resp)  # (K, d), (K,)
    var = shared_variance(X, resp, means, covariance=covariance, reg=reg)
    return safe_log(counts / X.shape[0]), means, var


def fit_em(X: torch.Tensor, log_pi: torch.Tensor, means: torch.Tensor, var: torch.Tensor, *,
           covariance: str, reg: float, tol: float, max_iter: int) -> tuple:
    """EM from the given parameters, scikit-learn's order and stopping rule: (log pi, means, var,
    mean log-likelihood path, converged)."""
    path = []
    for _ in range(max_iter):
        resp, evidence = posteriors(gaussian_loglik(X, means, var) + log_pi)  # E-step
        path.append(float(evidence.mean()))
        log_pi, means, var = m_step(X, resp, covariance, reg)
        if len(path) > 1 and abs(path[-1] - path[-2]) < tol:
            return log_pi, means, var, path, True
    return log_pi, means, var, path, False


@dataclass
class ClassSupport:
    """Which classes a pool supports (:func:`supported_classes`).

    Attributes
    ----------
    kept : (C,) bool tensor
        Classes that take part in the fit.
    log_weight : (C,) tensor
        Presence log-weights (<= 0); all zeros when nothing is dropped.
    presence : ClassPresence
        The zero-shot evidence.
    heldout_gain : float or None
        Mean held-out log-likelihood per image (nats) of the GMM without the dropped classes minus
        that of the GMM with every class; None when no check was run.
    """

    kept: torch.Tensor
    log_weight: torch.Tensor
    presence: ClassPresence
    heldout_gain: Optional[float] = None

    def info(self) -> dict:
        """For ``Result.info``: alpha, classes with >= 0.5 expected images, classes kept, and the
        held-out check's gain (None: not run)."""
        return dict(self.presence.info(), classes_kept=int(self.kept.sum()), heldout_gain=self.heldout_gain)


def supported_classes(X: torch.Tensor, log_probs: torch.Tensor, *, seed: int = 0,
                      covariance: str = "diag", reg: float = 1e-6) -> ClassSupport:
    """The classes the pool ``X`` (N, d) supports, from its zero-shot log-probabilities (N, C),
    checked by held-out likelihood (module docstring, steps 1-3)."""
    n_classes = log_probs.shape[1]
    presence = class_presence(torch.exp(log_probs))
    every = torch.ones(n_classes, dtype=torch.bool, device=log_probs.device)
    if presence.balanced:
        return ClassSupport(every, torch.zeros_like(presence.log_weight), presence)
    votes = torch.bincount(log_probs.argmax(dim=1), minlength=n_classes)  # (C,)
    counts = presence.counts
    kept = (counts >= 0.5) | (votes >= 2) | (counts == counts.max())  # never an empty model
    if X.shape[0] < 4:  # too few images to hold any out: the zero-shot evidence stands
        return ClassSupport(kept, presence.log_weight, presence)
    gain = _heldout_gain(X, log_probs, presence.log_weight.masked_fill(~kept, -float("inf")), seed,
                         covariance, reg)
    if gain >= 0:
        return ClassSupport(kept, presence.log_weight, presence, gain)
    return ClassSupport(every, torch.zeros_like(presence.log_weight), presence, gain)


def _heldout_gain(X: torch.Tensor, log_probs: torch.Tensor, log_start: torch.Tensor, seed: int,
                  covariance: str, reg: float) -> float:
    """2-fold cross-validated mean log-likelihood per image of the GMM started from
    softmax(log_probs + log_start) (-inf: a dropped class) minus that of the GMM started from the
    zero-shot probabilities (EM at the solver's default tol 1e-3, at most HELDOUT_EM_ITER iterations)."""
    n = X.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(X.device)
    halves = (order[: n // 2], order[n // 2:])
    gains = []
    for train, test in (halves, halves[::-1]):
        heldout = []
        for start in (log_start, torch.zeros_like(log_start)):
            params = m_step(X[train], torch.softmax(log_probs[train] + start, dim=1), covariance, reg)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                log_pi, means, var, _, _ = fit_em(X[train], *params, covariance=covariance, reg=reg,
                                                  tol=1e-3, max_iter=HELDOUT_EM_ITER)
            evidence = torch.logsumexp(gaussian_loglik(X[test], means, var) + log_pi, dim=1)  # (n/2,)
            heldout.append(float(evidence.mean()))
        gains.append(heldout[0] - heldout[1])
    return sum(gains) / len(gains)


def kmeans_plus_plus(X: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (n_clusters,) of k-means++ seeds: the first uniformly at random, each next one with
    probability proportional to the squared distance to the nearest seed chosen so far."""
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    sq_norms = (X * X).sum(dim=1)  # (N,)
    nearest = (sq_norms - 2 * X @ X[first] + sq_norms[first]).clamp_min(0)  # (N,) squared distances
    for _ in range(1, n_clusters):
        total = float(nearest.sum())
        if total > 0:
            weights = (nearest / total).double().cpu()
        else:  # every point coincides with a seed: draw among the points not chosen yet
            weights = torch.ones(n, dtype=torch.float64)
            weights[chosen] = 0
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        distance = (sq_norms - 2 * X @ X[pick] + sq_norms[pick]).clamp_min(0)
        nearest = torch.minimum(nearest, distance)
    return torch.tensor(chosen, device=X.device)


@register
class GMMSolver(Solver):
    name = "gmm"
    summary = "Gaussian mixture, shared diagonal/spherical covariance, EM from the text (transductive + inductive)"
    reference = "Dempster, Laird, Rubin, Maximum Likelihood from Incomplete Data via the EM Algorithm, 1977"
    params = {
        "init": Param("zeroshot", str, "starting point: zeroshot (one M-step from the zero-shot "
                      "probabilities), text (means = class embeddings) or kmeans++ (free clustering, "
                      "clusters matched to classes by the Hungarian algorithm)", choices=INITS),
        "covariance": Param("diag", str, "shared covariance: diag or spherical", choices=COVARIANCES),
        "tol": Param(1e-3, float, "stop when the mean log-likelihood changes by less", minimum=0.0),
        "max_iter": Param(100, int, "EM iteration cap", minimum=1),
        "reg_covar": Param(1e-6, float, "added to the variance (as scikit-learn)", minimum=0.0),
        "logit_scale": Param(100.0, float, "zero-shot logit scale for init=zeroshot", minimum=0.0),
        "robust": Param(True, bool, "drop classes the pool does not support before EM, so absent "
                        "classes cannot take images (no change on a balanced pool; off: plain EM)"),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        cfg = self.config
        X, T = problem.image, problem.classifier  # (N, d), (C, d)
        n, n_classes = X.shape[0], T.shape[0]
        timer = StageTimer(problem.device)
        if problem.progress:
            note(f"gmm: {n} images, {n_classes} classes, init={cfg['init']}, covariance={cfg['covariance']}")
        with timer("init"):
            log_probs = torch.log_softmax(zeroshot_logits(X, T, cfg["logit_scale"]), dim=1)  # (N, C)
            self.support_ = (supported_classes(X, log_probs, seed=problem.seed, covariance=cfg["covariance"],
                                               reg=cfg["reg_covar"]) if cfg["robust"] else None)
            kept = self.support_.kept if self.support_ else torch.ones(n_classes, dtype=torch.bool, device=X.device)
            log_weight = self.support_.log_weight if self.support_ else torch.zeros(n_classes, dtype=X.dtype, device=X.device)
            log_pi, means, var = self._initial_parameters(X, T, log_probs, kept, log_weight, problem.seed)
        with timer("em"):
            log_pi, means, var, path, converged = self._em(X, log_pi, means, var)
        if not converged:
            warnings.warn(
                f"gmm: EM stopped at max_iter={cfg['max_iter']}; the mean log-likelihood still moved "
                f"by {abs(path[-1] - path[-2]) if len(path) > 1 else float('nan'):.2e} > tol={cfg['tol']:.0e}",
                ConvergenceWarning,
                stacklevel=3,
            )
        self.log_pi_, self.means_, self.var_ = log_pi, means, var  # (K,), (K, d), (d,) or (1,)
        kept_classes = kept.nonzero().squeeze(1).cpu().numpy()
        self.cluster_class_ = self._match(means, T, kept_classes) if cfg["init"] == "kmeans++" else None
        self.n_classes_ = n_classes
        out = self.predict(X)
        out.info.update(
            iterations=len(path), converged=converged, log_likelihood=path, seconds=timer.seconds,
        )
        if self.cluster_class_ is not None:
            out.info["cluster_class"] = self.cluster_class_.tolist()
        if self.support_ is not None:
            out.info["presence"] = self.support_.info()
        return out

    def _initial_parameters(self, X, T, log_probs, kept, log_weight, seed):
        """(log pi (K,), means (K, d), var) before the first E-step, from the zero-shot log
        probabilities (N, C), the kept classes (C,) and their presence log-weights (C,)."""
        cfg = self.config
        if cfg["init"] == "kmeans++":
            generator = torch.Generator().manual_seed(seed)
            seeds = kmeans_plus_plus(X, min(int(kept.sum()), X.shape[0]), generator)  # (K,)
            nearest = (X @ X[seeds].T - 0.5 * (X[seeds] * X[seeds]).sum(dim=1)).argmax(dim=1)  # (N,)
            return self._m_step(X, torch.nn.functional.one_hot(nearest, seeds.shape[0]).to(X.dtype))
        # Dropped classes get log-weight -inf: probability 0 at the start, so pi_c = 0 throughout.
        log_start = log_weight.masked_fill(~kept, -float("inf"))  # (C,)
        if cfg["init"] == "text":
            votes = (X @ T.T + safe_log(kept.to(X.dtype))).argmax(dim=1)  # (N,) nearest kept class
            votes = torch.nn.functional.one_hot(votes, T.shape[0]).to(X.dtype)  # (N, C)
            var = shared_variance(X, votes, T, covariance=cfg["covariance"], reg=cfg["reg_covar"])
            return torch.log_softmax(log_start, dim=0), T.clone(), var
        return self._m_step(X, torch.softmax(log_probs + log_start, dim=1))

    def _m_step(self, X, resp):
        return m_step(X, resp, self.config["covariance"], self.config["reg_covar"])

    def _em(self, X, log_pi, means, var):
        """EM from the given parameters: (log pi, means, var, mean log-likelihood path, converged)."""
        cfg = self.config
        return fit_em(X, log_pi, means, var, covariance=cfg["covariance"], reg=cfg["reg_covar"],
                      tol=cfg["tol"], max_iter=cfg["max_iter"])

    def _match(self, means: torch.Tensor, T: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
        """The class (K,) of each cluster: Hungarian assignment, among the ``candidates`` classes,
        maximising the total cosine similarity of the unit cluster means to the class embeddings."""
        unit = means / means.norm(dim=1, keepdim=True).clamp_min(torch.finfo(means.dtype).tiny)
        similarity = (unit @ T[torch.as_tensor(candidates, device=T.device)].T).double().cpu().numpy()  # (K, C')
        clusters, classes = linear_sum_assignment(similarity, maximize=True)
        cluster_class = np.empty(means.shape[0], dtype=np.int64)
        cluster_class[clusters] = candidates[classes]
        return cluster_class

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """The E-step on new images (M, d): posteriors under the fitted pi, means and covariance.

        ``scores`` are log pi_c + log N(x | mu_c, Sigma) (M, C); a class without a cluster
        (kmeans++ with fewer images than classes) scores -inf."""
        if not hasattr(self, "means_"):
            raise NotFittedError("gmm: call fit first")
        log_joint = gaussian_loglik(image, self.means_, self.var_) + self.log_pi_  # (M, K)
        probs, _ = posteriors(log_joint)
        if self.cluster_class_ is None:
            return SolverOutput(scores=log_joint, probs=probs, info={})
        index = torch.as_tensor(self.cluster_class_, device=image.device)
        scores = torch.full((image.shape[0], self.n_classes_), -float("inf"), dtype=image.dtype, device=image.device)
        full = torch.zeros_like(scores)
        scores[:, index], full[:, index] = log_joint, probs
        return SolverOutput(scores=scores, probs=full, info={})
