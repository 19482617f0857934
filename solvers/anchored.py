"""Anchored: a Gaussian mixture whose class means are anchored to the zero-shot classifier by a
conjugate prior, so that it *is* the zero-shot classifier where a class has few images and the
pool's clusters where it has many.

One component per class, one shared diagonal covariance Sigma = diag(v), class means mu_c, mixing
weights pi_c from the pool's class presence. Where you are: below ``zsadapt.refine`` and the
stream mode (``fit_with_prior``), above :mod:`zsadapt.solvers.mixture` (the matmul Gaussian),
:mod:`zsadapt.solvers.statistics` (sufficient statistics) and :mod:`zsadapt.solvers.pool_analysis`.

The anchor (why the zero-shot classifier is a Gaussian mixture)
---------------------------------------------------------------
With g the pool's mean image, t_c the unit class embedding and s the logit scale (100), put

    m_c = g + s Sigma t_c.                                                        (1)

Then x^T Sigma^-1 m_c - 1/2 m_c^T Sigma^-1 m_c = s x.t_c - b_c + (terms without c), where

    b_c = s g.t_c + s^2 / 2 t_c^T Sigma t_c,                                      (2)

so the mixture with means m_c and log-weights b_c has posterior softmax_c(s x.t_c): CLIP's
zero-shot posterior, exactly, for any Sigma (tested). The anchor is a mean *in image space*, so it
carries no modality gap (g holds the image cone's offset).

Model and MAP-EM
----------------
Each class mean has a conjugate prior centred at its anchor, worth ``prior_strength`` = a images:
mu_c ~ N(m_c, Sigma / a). With soft assignments z (N, C) the M-step (MAP) is

    n_c = sum_i z_ic,   mu_c = (sum_i z_ic x_i + a m_c) / (n_c + a),                (3)
    v = sum_ic z_ic (x_i - xbar_c)^2 / N + reg,   xbar_c = sum_i z_ic x_i / n_c,    (4)

the shared variance about the data means (about the MAP means the anchor's distance s Sigma t_c
feeds back into Sigma, which then grows without bound: measured on Caltech101 at a = 32);
Sigma starts at the spread of the images about g.

and the E-step

    log z_ic = log pi_c + x^T Sigma^-1 mu_c - 1/2 mu_c^T Sigma^-1 mu_c + (1 - w_c) b_c + const_i,
    w_c = n_c / (n_c + a),                                                          (5)

where w_c is the data's share of mu_c: the class bias (2) of the anchor fades in the same
proportion as the anchor's share of the mean, so a class with no images scores exactly as
zero-shot and a class with many images scores as a plain Gaussian (``gmm``). The anchors (1) and
biases (2) are recomputed from the current Sigma at every M-step. Iterations stop when the mean
total-variation change of the rows of z falls below ``tol`` (``ConvergenceWarning`` at
``max_iter``). The start is z = the zero-shot posterior times the presence weights.

Mixing weights: log pi_c is the class-support log-weight of the pool analysis
(:func:`zsadapt.solvers.pool_analysis.analyse_pool`: variational empirical Bayes on the zero-shot
class proportions, checked by a held-out likelihood; 0 on a pool read as balanced, -inf for a class dropped), fixed before EM,
so absent classes take no images in a few-class batch and a batch with one or two images per
class keeps the uniform zero-shot prior.

Probabilities: the posteriors (5) of a 512-d Gaussian are far too sharp. ``calibration="zeroshot"``
divides the log-posteriors by one temperature whose mean top-1 probability on the pool equals
that of the zero-shot softmax (label-free; labels do not change).

Inductive mode: ``predict`` is the E-step (5) with the fitted state, so ``predict(pool)`` equals
the transductive result; the state is O(C d) (mu, v, the biases), nothing of the pool. On images
it was not fitted on it can fall far below zero-shot where classes have few images (Stanford Cars,
fitted on a random half, about four images a class, the other half labelled: 38.0% against
zero-shot 59.8%; synthetic 1000 x 7 half: 19.6 against 64.5; ``benchmarks/fit_on_sample.py``), so
``inductive_below_initial`` is set: saving a model warns (a saved stream, which goes on
adapting, does not). Measured and not adopted (2026-12-07): the neighbour-transfer rule of the
other mixtures (:mod:`zsadapt.solvers.inductive`) around this E-step lifts that Cars half only to
48.7% (its cross-fit keeps weight 0.81 on the E-step) and costs Oxford Flowers 0.5 and Oxford Pets
1.1 points, and the model file would hold the rule's pool features and top rows of Z (for
``gmm`` 1,073 bytes per pool image; ``benchmarks/bench_label.py``).

Limits (measured 2026-12-07): a stronger prior does not bring the labels nearer zero-shot.
Between the two ends (w_c = 0: zero-shot; w_c = 1: a plain Gaussian) the mean (3) lies between the
class's images and its anchor, and the Gaussian term of (5) then rewards a class for the distance
between the two in proportion to w_c (1 - w_c), so a class that gains images gains score and takes
more: on Stanford Cars (zero-shot 58.96%) ``prior_strength`` 0, 1, 2, 4, 8, 20 and 1000 give 60.31,
60.37, 59.14, 57.25, 48.50, 27.16 and 15.35% (80 of 196 classes predicted at 20). Leave it near the
default. In few dimensions, where the anchors s Sigma t_c at CLIP's s = 100 lie many standard
deviations from the images, the same feedback empties classes even at the default: synthetic pools
of 50 images and 3 classes (``make_pool``) fall below zero-shot on 2 of 6 seeds at d = 32 and merge
classes at d = 16; at d = 128 and 512 they are at or above it on all six.

Streams: :meth:`AnchoredSolver.fit_with_prior` adds earlier images' statistics
(:class:`~zsadapt.solvers.statistics.ClassStatistics`) to the batch's in every M-step, and takes
g and Sigma's start from the batch pooled with a *population*'s statistics (a stream passes its
whole state there, and as ``prior`` only the classes the batch seems to hold); every fit leaves
``statistics_``, the statistics of its final soft assignments. Why g must come from the
population: with mu_c = w_c xbar_c + (1 - w_c) m_c the score (5) of class c is, up to a
per-image constant, w_c G_c(x) + (1 - w_c) (s x.t_c - mean_k b_k) + w_c (1 - w_c) D_c / 2, with
G_c(x) = (x - g)^T Sigma^-1 (xbar_c - g) - 1/2 |xbar_c - g|^2_Sigma and D_c = |xbar_c - m_c|^2_Sigma.
A batch of two images of one class has g = xbar_c, so G_c = 0 and the class the images belong to
keeps only the fraction 1 - w_c of its zero-shot evidence while every other class keeps all of it:
the images go to the next class (measured: Stanford Cars in file order, runs of one class,
batches of 2 images, each alone 45.2% and streamed 41.0% against zero-shot 59.0%; with g from
the stream's whole state, 60.8%). The mean image of many batches is the population's, whatever
the batch holds.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..messages import note
from ..zeroshot import zeroshot_logits
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput, convergence_warning
from .calibration import fit_temperature
from .mixture import ComponentTerms
from .pool_analysis import analyse_pool
from .statistics import ClassStatistics
from .timing import StageTimer

CALIBRATIONS = ("zeroshot", "none")

#: Rows of the pool used to fit the temperature (evenly spaced): a mean confidence over a few
#: thousand rows is as good as over all of them.
CALIBRATION_ROWS = 4096


def anchors(mean_image: torch.Tensor, classifier: torch.Tensor, var: torch.Tensor, scale: float, *,
            out: Optional[torch.Tensor] = None,
            text_squares: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor means m_c = g + s Sigma t_c (C, d) and biases b_c = s g.t_c + s^2/2 t_c^T Sigma t_c
    (C,) (module docstring, eqs. 1-2): the Gaussian mixture whose posterior is softmax(s x.t_c).

    Parameters
    ----------
    mean_image : (d,) tensor, g
    classifier : (C, d) tensor, unit rows t_c
    var : (d,) tensor, the diagonal of Sigma
    scale : float, s
    out : (C, d) tensor, optional
        Where to write the means (EM reuses one buffer: at tens of thousands of classes a fresh
        (C, d) tensor costs more to allocate than to compute).
    text_squares : (C, d) tensor, optional
        t_c * t_c, when the caller keeps it: t_c^T Sigma t_c = (t_c * t_c) . v for any Sigma.
    """
    means = torch.addcmul(mean_image, classifier, scale * var, out=out)  # (C, d)
    squares = classifier * classifier if text_squares is None else text_squares  # (C, d)
    bias = scale * (classifier @ mean_image) + 0.5 * scale * scale * (squares @ var)  # (C,)
    return means, bias


class _Workspace:
    """The (C, d) buffers one fit's EM iterations write into, and what stays fixed over them.

    ``sums`` (the M-step's s_c, then the E-step's component weights), ``means`` (the MAP means:
    ``means_`` during the fit), ``spare`` (scratch), ``text_squares`` = t_c * t_c (the anchors' bias t_c^T Sigma t_c =
    (t_c * t_c) . v for any Sigma) and ``prior_squares`` = sum_c q_c of the prior statistics (d,).
    """

    def __init__(self, classifier: torch.Tensor, prior: Optional[ClassStatistics]) -> None:
        self.sums = torch.empty_like(classifier)  # (C, d)
        self.means = torch.empty_like(classifier)  # (C, d)
        self.spare = torch.empty_like(classifier)  # (C, d)
        self.text_squares = classifier * classifier  # (C, d)
        self.prior_squares = None if prior is None else prior.squares.sum(dim=0)  # (d,)


@register
class AnchoredSolver(Solver):
    name = "anchored"
    summary = ("Gaussian mixture with class means anchored to the zero-shot classifier (MAP-EM), "
               "class presence, label-free calibration (transductive + inductive + streams)")
    reference = ("Dempster, Laird, Rubin 1977 (EM); anchor prior in the spirit of Zanella et al., "
                 "Realistic Test-Time Adaptation of Vision-Language Models (StatA), CVPR 2025")
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
    params = {
        "prior_strength": Param(2.0, float, "a: images' worth of the anchor prior on each class "
                                "mean; keep it small: values well above the default do not approach "
                                "zero-shot but collapse classes (module docstring, Limits)", minimum=0.0),
        "tol": Param(1e-3, float, "stop when the mean change of an image's assignment (total "
                     "variation) is below this", minimum=0.0),
        "max_iter": Param(100, int, "EM iteration cap (as gmm)", minimum=1),
        "reg_covar": Param(1e-6, float, "added to the shared variance", minimum=0.0),
        "logit_scale": Param(100.0, float, "s: the zero-shot logit scale the anchors reproduce", minimum=1e-6),
        "robust": Param(True, bool, "weight classes by how much the pool supports them (class "
                        "presence checked by held-out likelihood), so absent classes take no images"),
        "calibration": Param("zeroshot", str, "zeroshot: one temperature matching the zero-shot "
                             "mean confidence on the pool; none: the raw posteriors", choices=CALIBRATIONS),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        """MAP-EM on the pool (module docstring); same as ``fit_with_prior(problem, None)``."""
        return self.fit_with_prior(problem, None)

    def fit_with_prior(self, problem: Problem, prior: Optional[ClassStatistics],
                       population: Optional[ClassStatistics] = None) -> SolverOutput:
        """MAP-EM on the pool with earlier images' statistics ``prior`` (or None) added to the
        batch's own in every M-step; g and Sigma's start from the batch and ``population``
        (default ``prior``: module docstring, Streams); sets ``statistics_`` to this batch's
        final statistics."""
        cfg = self.config
        X, T = problem.image, problem.classifier  # (N, d), (C, d)
        n, n_classes = X.shape[0], T.shape[0]
        for name, stats in (("prior", prior), ("population", population)):
            if stats is not None and (stats.n_classes, stats.dim) != (n_classes, X.shape[1]):
                raise ValueError(f"anchored: {name} statistics are for {stats.n_classes} classes in dimension "
                                 f"{stats.dim}, the pool has {n_classes} classes in dimension {X.shape[1]}")
        prior = None if prior is None else prior.to(dtype=X.dtype, device=X.device)
        population = prior if population is None else population.to(dtype=X.dtype, device=X.device)
        timer = StageTimer(problem.device)
        if problem.progress:
            note(f"anchored: {n} images, {n_classes} classes, prior strength {cfg['prior_strength']:g}")
        with timer("support"):
            log_yhat = torch.log_softmax(zeroshot_logits(X, T, cfg["logit_scale"]), dim=1)  # (N, C)
            analysis = analyse_pool(problem, logit_scale=cfg["logit_scale"]) if cfg["robust"] else None
            log_pi = (analysis.support.log_start() if analysis is not None
                      else torch.zeros(n_classes, dtype=X.dtype, device=X.device))  # (C,)
        with timer("em"):
            z, path, converged = self._em(X, T, torch.softmax(log_yhat + log_pi, dim=1), log_pi, prior, population)
        if not converged:
            warnings.warn(f"anchored: EM stopped at max_iter={cfg['max_iter']}; assignments still moved "
                          f"by {path[-1]:.2e} > tol={cfg['tol']:.0e}", convergence_warning(), stacklevel=2)
        with timer("calibration"):
            self.statistics_ = ClassStatistics.of(X, z)
            log_post = torch.log_softmax(self._log_joint(X), dim=1)
            self.temperature_ = (self._fit_temperature(log_post, log_yhat) if cfg["calibration"] == "zeroshot"
                                 else 1.0)
        info = {"iterations": len(path), "converged": converged, "z_change": path,
                "temperature": self.temperature_, "seconds": timer.seconds}
        if analysis is not None:
            info["presence"] = analysis.info()
        return SolverOutput(scores=log_post, probs=torch.softmax(log_post / self.temperature_, dim=1), info=info)

    def _em(self, X, T, z, log_pi, prior, population):
        """MAP-EM (eqs. 3-5) from assignments z (N, C); sets the fitted state and returns (z, the
        per-iteration mean total-variation changes, converged)."""
        cfg = self.config
        self.log_pi_ = log_pi
        self.classifier_ = T
        row_squares = X * X  # (N, d), for the shared variance
        # g: the mean image of the pool and of the images the population statistics summarise.
        total = X.sum(dim=0) + (population.sums.sum(dim=0) if population is not None else 0.0)
        count = X.shape[0] + (float(population.counts.sum()) if population is not None else 0.0)
        self.mean_image_ = total / count  # (d,)
        # Sigma's start: the spread of the images about g (an upper bound on the within-class one).
        squares_total = row_squares.sum(dim=0) + (population.squares.sum(dim=0) if population is not None else 0.0)
        var = (squares_total / count - self.mean_image_ ** 2).clamp_min(0.0) + cfg["reg_covar"]
        work = _Workspace(T, prior)
        path = []
        for _ in range(cfg["max_iter"]):
            var = self._m_step(X, z, row_squares, var, prior, work)
            new = torch.softmax(self._log_joint(X, work), dim=1)
            path.append(float(0.5 * (new - z).abs().sum(dim=1).mean()))
            z = new
            if path[-1] < cfg["tol"]:
                return z, path, True
        return z, path, False

    def _m_step(self, X, z, row_squares, var, prior, work: "_Workspace") -> torch.Tensor:
        """MAP means (eq. 3) about the anchors (eq. 1) of the current ``var``, then the shared
        variance (eq. 4); sets ``means_``, ``bias_``, ``var_`` and returns the new variance (d,).

        The (C, d) quantities are written into ``work``'s buffers: at tens of thousands of classes
        each fresh (C, d) temporary costs a page-faulted allocation, more than its arithmetic."""
        cfg = self.config
        a, scale = cfg["prior_strength"], cfg["logit_scale"]
        tiny = torch.finfo(X.dtype).tiny
        g, T = self.mean_image_, self.classifier_  # (d,), (C, d)
        counts = z.sum(dim=0)  # (C,)
        squares = z.sum(dim=1) @ row_squares  # (d,) sum_ic z_ic x_i^2
        if prior is not None:
            counts = counts + prior.counts
            squares = squares + work.prior_squares
            sums = torch.addmm(prior.sums, z.T, X, out=work.sums)  # (C, d) s_c
        else:
            sums = torch.mm(z.T, X, out=work.sums)
        anchor, bias = anchors(g, T, var, scale, out=work.means, text_squares=work.text_squares)  # eqs. 1-2
        means = anchor.mul_(a).add_(sums).div_((counts + a).clamp_min(tiny)[:, None])  # (C, d) eq. 3
        # sum_c (q_c - s_c^2 / n_c): the residuals about the data means s_c / n_c (not the MAP
        # means: about those the anchor's distance s Sigma t_c would feed back into Sigma and diverge)
        between = torch.mul(sums, sums, out=work.spare).T @ (1.0 / counts.clamp_min(tiny))  # (d,)
        new_var = ((squares - between) / counts.sum().clamp_min(tiny)).clamp_min(0.0) + cfg["reg_covar"]
        share = counts / (counts + a) if a > 0 else torch.ones_like(counts)  # w_c
        # The bias's mean over classes changes no posterior; removing it keeps the scores small.
        bias = (1.0 - share) * (bias - bias.mean())
        self.means_, self.var_, self.bias_ = means, var, bias
        return new_var

    def _log_joint(self, image: torch.Tensor, work: Optional["_Workspace"] = None) -> torch.Tensor:
        """log pi_c + x^T Sigma^-1 mu_c - 1/2 mu_c^T Sigma^-1 mu_c + (1 - w_c) b_c (eq. 5), (M, C),
        up to a per-row constant: the mixture's component terms (about the mean of the means,
        against float32 cancellation; :class:`~zsadapt.solvers.mixture.ComponentTerms`, in
        ``work``'s buffers during EM) in one product."""
        terms = ComponentTerms.of(self.means_, self.var_, constant=False,
                                  work=None if work is None else (work.spare, work.sums))
        offset = terms.mean_term + self.bias_ + self.log_pi_  # (C,)
        return torch.addmm(offset, image - terms.centre, terms.scaled_means.T)  # (M, C)

    def _fit_temperature(self, log_post: torch.Tensor, log_yhat: torch.Tensor) -> float:
        """The temperature in [1e-3, 1e4] whose softmax(log_post / temperature) has the zero-shot
        softmax's mean top-1 probability on (up to CALIBRATION_ROWS evenly spaced rows of) the pool
        (:func:`~zsadapt.solvers.calibration.fit_temperature`)."""
        step = max(1, log_post.shape[0] // CALIBRATION_ROWS)
        log_post, log_yhat = log_post[::step], log_yhat[::step]
        target = float(torch.exp(log_yhat.max(dim=1).values).mean())
        return fit_temperature(log_post, target, t_min=1e-3, t_max=1e4)

    def fitted_state(self) -> dict:
        """What :meth:`predict` reads (eq. 5 and the temperature), for a model file: the statistics
        and the anchors' inputs (classifier, g) stay out of it, which halves a file of
        ``means_``-sized tensors."""
        if not hasattr(self, "means_"):
            raise NotFittedError("anchored: call fit first")
        return {key: getattr(self, key) for key in ("means_", "var_", "bias_", "log_pi_", "temperature_")}

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """The E-step (eq. 5) on new images (M, d) with the fitted state, temperature applied."""
        if not hasattr(self, "means_"):
            raise NotFittedError("anchored: call fit first")
        log_post = torch.log_softmax(self._log_joint(image), dim=1)
        return SolverOutput(scores=log_post, probs=torch.softmax(log_post / self.temperature_, dim=1), info={})
