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
(:mod:`zsadapt.solvers.mixture`), never as (N, C, d) residuals, and each EM iteration is one pass
over blocks of rows (:func:`~zsadapt.solvers.mixture.fit_em`): a component more than 78 nats below
an image's best gets r_ic = 0 instead of at most 1e-34, which spares float32's slow subnormal exp.

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
(the pool analysis, :func:`zsadapt.solvers.pool_analysis.analyse_pool`, with this fit's logit
scale, covariance and ``reg_covar``): class presence from the zero-shot probabilities (a pool whose
evidence is balanced keeps every class, and the fit is the plain one, step by step: the whole Cars
pool), a class dropped (pi = 0, and EM keeps it there) only when the pool holds under half an
expected image of it and a mixture without it predicts held-out images of the pool at least as well
(a class with 2 or more zero-shot votes is dropped only when that check prefers the support
without the voted classes to the one with them).

The kept classes start from the zero-shot probabilities times the presence weights;
``init="kmeans++"`` clusters into as many clusters as kept classes and matches them to those
classes. ``robust=False`` is the plain fit on any pool.

Prototype classifiers (``prior_images``). EM keeps the initial classifier only as its start, so
where that classifier is better than the pool's Gaussian clusters, EM to convergence trades what
it knew for the clusters: with prototypes of 16 labelled shots per class the plain fit falls 1.5
to 6.1 points below them on four of the six shared prototype pools (docs/methods/auto.md). When
each class vector t_c is itself the mean of k labelled images (:func:`zsadapt.class_prototypes`),
it is k images of evidence about mu_c: ``prior_images=k`` puts a conjugate Normal prior
mu_c ~ N(t_c, Sigma / k) on each mean (:class:`~zsadapt.solvers.mixture.MeanPrior`), and every
M-step takes the MAP mean mu_c = (sum_i r_ic x_i + k t_c) / (n_c + k) (Gauvain and Lee 1994); the
variance stays the one about the data means. Measured (``benchmarks/prototype_prior.py``): at
16 shots the mean change over the six pools goes from -1.71 to +0.18 (DTD -4.20 -> +0.71,
Caltech101 -1.95 -> -0.77; FGVC Aircraft still -5.37), at 2 and 4 shots it is higher on all
twelve, at 1 shot (k = 1) within a point either way. For text embeddings, which lie in another
cone than the images (the modality gap), leave it at 0: they are no image mean.

Inductive mode: ``predict`` is the neighbour-transfer rule (:mod:`zsadapt.solvers.inductive`), one of
whose experts is the E-step on new images with the fitted pi, mu and Sigma (alone that E-step
labels a held-out half of Cars at 39.7% against zero-shot 59.8%; benchmarks/fit_on_sample.py).
The rule, fitted on val and labelling test: above the initial classifier on four of the five
split pools, 0.78 point below it on fgvc_aircraft (so ``inductive_below_initial`` is set: saving a
model warns), and 20.5 points below it on the synthetic 1000 x 7 pool,
where the class-support step drops present classes (see :mod:`zsadapt.solvers.auto`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..messages import note
from ..zeroshot import zeroshot_logits
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput, convergence_warning
from .mixture import (COVARIANCES, MeanPrior, fit_em, gaussian_linear, gaussian_loglik, m_step, posteriors,
                      safe_log, shared_variance, softmax_rows)
from .inductive import TransfersToNewImages, attach_transfer, transferred
from .pool_analysis import analyse_pool
from .timing import StageTimer

INITS = ("text", "zeroshot", "kmeans++")


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
class GMMSolver(TransfersToNewImages, Solver):
    name = "gmm"
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
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
        "logit_scale": Param(100.0, float, "zero-shot logit scale for init=zeroshot", minimum=1e-6),
        "robust": Param(True, bool, "drop classes the pool does not support before EM, so absent "
                        "classes cannot take images (no change on a balanced pool; off: plain EM)"),
        "prior_images": Param(0.0, float, "for prototype classifiers (class vectors that are means of "
                              "labelled images): the images each prototype averages; the class means "
                              "are then MAP estimates anchored at the prototypes with that weight "
                              "(0: maximum likelihood, the plain EM)", minimum=0.0),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        cfg = self.config
        X, T = problem.image, problem.classifier  # (N, d), (C, d)
        n, n_classes = X.shape[0], T.shape[0]
        if cfg["prior_images"] > 0 and cfg["init"] == "kmeans++":
            raise ValueError("gmm: prior_images anchors each class's mean at its class vector; "
                             "init='kmeans++' matches clusters to classes only after EM (use zeroshot or text)")
        self.prior_ = MeanPrior(cfg["prior_images"], T) if cfg["prior_images"] > 0 else None
        timer = StageTimer(problem.device)
        if problem.progress:
            note(f"gmm: {n} images, {n_classes} classes, init={cfg['init']}, covariance={cfg['covariance']}")
        with timer("init"):
            log_probs = torch.log_softmax(zeroshot_logits(X, T, cfg["logit_scale"]), dim=1)  # (N, C)
            analysis = (analyse_pool(problem, logit_scale=cfg["logit_scale"], covariance=cfg["covariance"],
                                     reg=cfg["reg_covar"], log_probs=log_probs) if cfg["robust"] else None)
            self.support_ = analysis.support if analysis else None
            kept = self.support_.kept if self.support_ else torch.ones(n_classes, dtype=torch.bool, device=X.device)
            log_weight = self.support_.log_weight if self.support_ else torch.zeros(n_classes, dtype=X.dtype, device=X.device)
            log_pi, means, var = self._initial_parameters(X, T, log_probs, kept, log_weight, problem.seed)
        with timer("em"):
            log_pi, means, var, path, converged = self._em(X, log_pi, means, var, show=problem.progress)
        if not converged:
            warnings.warn(
                f"gmm: EM stopped at max_iter={cfg['max_iter']}; the mean log-likelihood still moved "
                f"by {abs(path[-1] - path[-2]) if len(path) > 1 else float('nan'):.2e} > tol={cfg['tol']:.0e}",
                convergence_warning(),
                stacklevel=3,
            )
        self.log_pi_, self.means_, self.var_ = log_pi, means, var  # (K,), (K, d), (d,) or (1,)
        kept_classes = kept.nonzero().squeeze(1).cpu().numpy()
        self.cluster_class_ = self._match(means, T, kept_classes) if cfg["init"] == "kmeans++" else None
        self.n_classes_ = n_classes
        out = self._own_predict(X)
        out.info.update(
            iterations=len(path), converged=converged, log_likelihood=path, seconds=timer.seconds,
        )
        if self.cluster_class_ is not None:
            out.info["cluster_class"] = self.cluster_class_.tolist()
        if analysis is not None:
            out.info["presence"] = analysis.info()
        attach_transfer(self, problem, out.probs)
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
        return m_step(X, resp, self.config["covariance"], self.config["reg_covar"], self.prior_)

    def _em(self, X, log_pi, means, var, show: bool = False):
        """EM from the given parameters: (log pi, means, var, mean log-likelihood path, converged)."""
        cfg = self.config
        return fit_em(X, log_pi, means, var, covariance=cfg["covariance"], reg=cfg["reg_covar"],
                      tol=cfg["tol"], max_iter=cfg["max_iter"], show=show, prior=self.prior_)

    def _match(self, means: torch.Tensor, T: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
        """The class (K,) of each cluster: Hungarian assignment, among the ``candidates`` classes,
        maximising the total cosine similarity of the unit cluster means to the class embeddings."""
        from scipy.optimize import linear_sum_assignment  # here: 0.3 s to import, kmeans++ only

        unit = means / means.norm(dim=1, keepdim=True).clamp_min(torch.finfo(means.dtype).tiny)
        similarity = (unit @ T[torch.as_tensor(candidates, device=T.device)].T).double().cpu().numpy()  # (K, C')
        clusters, classes = linear_sum_assignment(similarity, maximize=True)
        cluster_class = np.empty(means.shape[0], dtype=np.int64)
        cluster_class[clusters] = candidates[classes]
        return cluster_class

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """New images (M, d): the neighbour-transfer rule of :class:`TransfersToNewImages`, its own
        rule the fast E-step of :meth:`_own_predict`."""
        return transferred(self, image, lambda rows: self._own_predict(rows, fast=True))

    def _own_predict(self, image: torch.Tensor, fast: bool = False) -> SolverOutput:
        """The E-step on new images (M, d): posteriors under the fitted pi, means and covariance.

        ``scores`` are log pi_c + log N(x | mu_c, Sigma) (M, C); a class without a cluster
        (kmeans++ with fewer images than classes) scores -inf. ``fast`` (``predict``): the scores
        up to a per-row constant, from one product (:func:`~zsadapt.solvers.mixture.gaussian_linear`),
        and probabilities from :func:`~zsadapt.solvers.mixture.softmax_rows` (exact but for those
        below 1e-34); the fit's own rows take the exact E-step."""
        if not hasattr(self, "means_"):
            raise NotFittedError("gmm: call fit first")
        if fast:
            weights, bias = gaussian_linear(self.means_, self.var_)  # (K, d), (K,)
            log_joint = torch.addmm(bias + self.log_pi_, image, weights.T)  # (M, K)
            probs = softmax_rows(log_joint)
        else:
            log_joint = gaussian_loglik(image, self.means_, self.var_) + self.log_pi_  # (M, K)
            probs, _ = posteriors(log_joint)
        if self.cluster_class_ is None:
            return SolverOutput(scores=log_joint, probs=probs, info={})
        index = torch.as_tensor(self.cluster_class_, device=image.device)
        scores = torch.full((image.shape[0], self.n_classes_), -float("inf"), dtype=image.dtype, device=image.device)
        full = torch.zeros_like(scores)
        scores[:, index], full[:, index] = log_joint, probs
        return SolverOutput(scores=scores, probs=full, info={})
