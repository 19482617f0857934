"""The pool analysis: which classes does this pool hold, and how many images of each?

The floor under the solvers. ``zlap``, ``transclip`` and ``gmm`` (``robust=True``) protect
themselves against pools that hold only some of the classes, and ``inmap`` and ``self_training``
need the pool's class proportions; all of them ask these two questions of the same (pool, initial
classifier) pair. This module answers them once per :class:`~zsadapt.solvers.base.Problem` and
imports no Solver class, so a new method plugs in with two lines::

    from .pool_analysis import analyse_pool
    analysis = analyse_pool(problem)      # cached on the problem: computed once per fit
    analysis.support.kept                 # (C,) bool, the classes the pool supports
    analysis.support.log_weight           # (C,) presence log-weights <= 0
    analysis.presence                     # the zero-shot evidence (ClassPresence)
    analysis.proportions()                # (C,) class proportions (lazy, cached)
    info["presence"] = analysis.info()    # for Result.info

The analysis is of a (pool, classifier) pair: an InMaP-initialised problem carries other class
vectors, and is a new :class:`Problem` with its own analysis.

**Class support** (:func:`supported_classes`):

1. :func:`zsadapt.solvers.presence.class_presence`: variational empirical Bayes on the zero-shot
   class proportions. A pool whose evidence is balanced keeps every class, and a solver behaves
   as published, step by step (the whole Cars pool).
2. Otherwise two nested candidate supports are read from it: the classes with at least half an
   expected image (VB's own, *evident*), and those plus every class with at least 2 zero-shot
   argmax votes (*voted*: the votes keep a class whose text embedding is poor but whose images are
   many, and also a class the pool lacks that merely catches the classifier's errors). *Evident*
   declares every image the zero-shot classifier puts in a voted class it drops a zero-shot error;
   it is a candidate only when those images are no more than the errors the classifier itself
   expects on the pool, sum_i (1 - max_c p_ic). (Measured: on 36 real 1000-image batches of
   Caltech101, Flowers, Cars, UCF101 and Pets, such images are 1-24% of the batch against an
   expected 5-48%, about half of it at most, and of the 2,211 batches of StatA's protocol on the
   seven shared pools (4 tasks, every setting) where the two supports differ, the guard acts on
   9, 128-image batches of one or two classes and one DTD batch; on the synthetic 1000-class
   pool subsampled to 2-5 images per class, where the held-out check, fitted on 1-2 images per
   component, would keep 172-232 of 920-1000 present classes, 43% against an expected 34%.)
3. The zero-shot predictions cannot tell a class the pool lacks from one the classifier never
   predicts (hub classes of a poor classifier attract the images of many others), nor say whether
   the votes rescue present classes or absent ones. So each candidate is checked against the pool's
   clusters: 2-fold cross-validation (halves of the distinct images, drawn with the seed) of the
   mean held-out log-likelihood of the Gaussian mixture (one component per class, shared covariance,
   EM from the zero-shot probabilities) fitted on the candidate's classes, against the mixture with
   every class. The support is the candidate with the largest gain if that gain is at least 0 (gains
   within the EM tolerance are a tie, and a tie goes to the smaller support); else every class stays
   (and presence weights are all 1). Each check stops after its first fold when that fold's gain is
   beyond doubt (more than :data:`DECISIVE_Z` standard errors from 0). Measured
   (benchmarks/subset_pools.py and the README): Cars pools of 2 to 147 of its classes are pruned
   (gains of 12 to 2e5 nats per image); synthetic 500-class pools whose zero-shot classifier (24-44%
   accurate) puts the images on 45-79 hub classes are not (losses of 42-64 nats per image), nor the
   Zipf synthetic pool whose zero-shot-invisible classes presence would drop (-1.3). Choosing
   between the two candidates (instead of checking *voted* alone) was measured on StatA's batches of
   the seven shared pools (4 tasks, ``gmm``): +0.5 point on average, Caltech101's 1000-image batches
   of 25-50 classes from -1.3 to +1.6 against zero-shot and Flowers' of 5-25 from +5.9 to +13.6,
   Cars' of 50-100 from +2.3 to -0.3 (docs/methods/presence.md).

**Class proportions** (:meth:`PoolAnalysis.proportions`): the soft class counts of that mixture
fitted on the whole pool from the zero-shot probabilities times the presence weights (classes the
pool does not support start, and stay, at pi = 0: exactly the ``gmm`` solver's default fit), shrunk
towards uniform by :func:`zsadapt.solvers.proportions.shrunk_proportions`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..graphs import unique_rows
from ..messages import note
from ..zeroshot import CLIP_LOGIT_SCALE, zeroshot_logits
from .base import Problem, convergence_warning
from .mixture import COVARIANCES, fit_em, m_step, mixture_evidence
from .presence import ClassPresence, class_presence
from .proportions import shrunk_proportions
from .timing import StageTimer

#: EM iterations of each fit in the held-out check: it compares two fits, it does not need them
#: converged (20 instead of 100 made the same decision on every pool measured and saves 35-40%).
HELDOUT_EM_ITER = 20

#: EM tolerance of those fits (change of the mean log-likelihood per image, nats). A fit is only
#: known to about this much, so two candidates whose gains differ by less are a tie.
HELDOUT_TOL = 1e-3

#: The held-out check stops after its first fold when that fold's mean gain lies more than this
#: many standard errors (of the mean over held-out images) from 0: the second fold would halve
#: the noise of a sign that is already beyond doubt, at the cost of two more EM fits.
DECISIVE_Z = 4.0

#: EM of the proportions' mixture: the ``gmm`` solver's defaults (tolerance on the mean
#: log-likelihood per image, iteration cap).
MIXTURE_TOL, MIXTURE_MAX_ITER = 1e-3, 100


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
        Mean held-out log-likelihood per image (nats) of the mixture on the chosen candidate's
        classes (the best candidate's when every class stays) minus that of the mixture with every
        class; None when no check was run.
    """

    kept: torch.Tensor
    log_weight: torch.Tensor
    presence: ClassPresence
    heldout_gain: Optional[float] = None

    def info(self) -> dict:
        """For ``Result.info``: alpha, classes with >= 0.5 expected images, classes kept, and the
        held-out check's gain (None: not run)."""
        return dict(self.presence.info(), classes_kept=int(self.kept.sum()), heldout_gain=self.heldout_gain)

    def log_start(self) -> torch.Tensor:
        """(C,) log-weights with which a mixture starts: the presence log-weights, -inf for a
        dropped class (probability 0 at the start, so pi_c = 0 throughout EM)."""
        return self.log_weight.masked_fill(~self.kept, -float("inf"))


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
    evident = (counts >= 0.5) | (counts == counts.max())  # never an empty model
    voted = evident | (votes >= 2)
    distinct, inverse = unique_rows(X)
    if distinct.shape[0] < 4:  # too few distinct images to hold any out: the zero-shot evidence stands
        return ClassSupport(voted, presence.log_weight, presence)
    candidates = [voted]
    # The images zero-shot puts in the voted classes that *evident* drops: its zero-shot errors.
    declared_errors = int(votes[voted & ~evident].sum())
    if declared_errors and declared_errors <= _expected_errors(log_probs):
        candidates.append(evident)
    gains = _heldout_gains(X, log_probs, [presence.log_weight.masked_fill(~kept, -float("inf")) for kept in candidates],
                           seed, covariance, reg, inverse, decisive=DECISIVE_Z)
    # A tie goes to the smaller support (later in the list): where the voted classes' extra
    # components die in EM, both candidates reach the same fit, up to round-off.
    best = max(i for i, gain in enumerate(gains) if gain >= max(gains) - HELDOUT_TOL)
    if gains[best] >= 0:
        return ClassSupport(candidates[best], presence.log_weight, presence, gains[best])
    return ClassSupport(every, torch.zeros_like(presence.log_weight), presence, gains[best])


def _expected_errors(log_probs: torch.Tensor) -> float:
    """The zero-shot classifier's own estimate of how many of the pool's images it gets wrong,
    sum_i (1 - max_c p_ic), from its log-probabilities (N, C)."""
    return float((1.0 - log_probs.amax(dim=1).exp()).sum())


def _heldout_gains(X: torch.Tensor, log_probs: torch.Tensor, log_starts: list, seed: int, covariance: str,
                   reg: float, inverse: Optional[torch.Tensor] = None, *, decisive: float = 0.0) -> list:
    """For each candidate start in ``log_starts`` ((C,) log-weights, -inf: a dropped class), the
    2-fold cross-validated mean log-likelihood per image of the mixture started from
    softmax(log_probs + log_start) minus that of the mixture started from the zero-shot
    probabilities (EM at tol HELDOUT_TOL, at most HELDOUT_EM_ITER iterations). The mixture with every
    class is fitted once per fold and shared by the candidates.

    ``decisive`` > 0: a candidate's first-fold gain alone is returned when it lies more than
    ``decisive`` standard errors from 0 (the per-image gains' standard deviation / sqrt(held-out
    images)); the second fold is fitted only for the candidates still in doubt.

    ``inverse`` (N,): the distinct image of each row (:func:`zsadapt.graphs.unique_rows`), None
    when all rows differ. The halves are drawn over distinct images, so every copy of an image
    falls in the same half: a held-out image is never also a training image (a pool of copies
    would otherwise score any two mixtures alike, to round-off)."""
    groups = X.shape[0] if inverse is None else int(inverse.max()) + 1
    order = torch.randperm(groups, generator=torch.Generator().manual_seed(seed)).to(X.device)
    halves = (order[: groups // 2], order[groups // 2:])
    if inverse is not None:
        first = torch.zeros(groups, dtype=torch.bool, device=X.device)
        first[halves[0]] = True
        halves = (first[inverse].nonzero().squeeze(1), (~first[inverse]).nonzero().squeeze(1))
    gains: list = [[] for _ in log_starts]
    pending = list(range(len(log_starts)))
    for train, test in (halves, halves[::-1]):
        every = _heldout_loglik(X, log_probs, torch.zeros_like(log_starts[0]), train, test, covariance, reg)  # (n/2,)
        for i in pending:
            per_image = (_heldout_loglik(X, log_probs, log_starts[i], train, test, covariance, reg) - every).double()
            gains[i].append(float(per_image.mean()))
            if decisive > 0 and per_image.numel() > 1 and len(gains[i]) == 1:
                error = float(per_image.std()) / per_image.numel() ** 0.5
                if abs(gains[i][0]) > decisive * error:
                    gains[i].append(gains[i][0])  # beyond doubt: the first fold stands for both
        pending = [i for i in pending if len(gains[i]) < 2]
        if not pending:
            break
    return [sum(g) / len(g) for g in gains]


def _heldout_loglik(X: torch.Tensor, log_probs: torch.Tensor, log_start: torch.Tensor, train: torch.Tensor,
                    test: torch.Tensor, covariance: str, reg: float) -> torch.Tensor:
    """(n_test,) log-likelihood of each held-out image X[test] under the mixture fitted by EM on
    X[train], started from softmax(log_probs[train] + log_start). EM streams over blocks of rows
    (:func:`~zsadapt.solvers.mixture.fit_em`)."""
    params = m_step(X[train], torch.softmax(log_probs[train] + log_start, dim=1), covariance, reg)
    log_pi, means, var, _, _ = fit_em(X[train], *params, covariance=covariance, reg=reg,
                                      tol=HELDOUT_TOL, max_iter=HELDOUT_EM_ITER)
    return mixture_evidence(X[test], log_pi, means, var)[0]


@dataclass
class PoolAnalysis:
    """What a pool holds, for one (pool, classifier) pair and one set of settings
    (:func:`analyse_pool`).

    Attributes
    ----------
    support : ClassSupport
        The classes the pool supports.
    image : (N, d) tensor
        The pool.
    classifier : (C, d) tensor
        The initial classifier the zero-shot probabilities come from.
    logit_scale, covariance, reg
        The settings of the analysis (zero-shot logit scale; the mixture's shared covariance and
        its ``reg_covar``).
    timer : StageTimer
        Seconds spent on each part (``"support"``, then ``"proportions"`` when asked).
    """

    support: ClassSupport
    image: torch.Tensor
    classifier: torch.Tensor
    logit_scale: float
    covariance: str
    reg: float
    timer: StageTimer = field(repr=False)
    _proportions: Optional[tuple] = field(default=None, repr=False)

    @property
    def presence(self) -> ClassPresence:
        return self.support.presence

    def log_probs(self) -> torch.Tensor:
        """The zero-shot log-probabilities (N, C) the analysis reads (recomputed: one matmul, not
        worth holding an (N, C) tensor for the problem's lifetime)."""
        return torch.log_softmax(zeroshot_logits(self.image, self.classifier, self.logit_scale), dim=1)

    def proportions(self) -> torch.Tensor:
        """Class proportions (C,), summing to 1 (module docstring); computed on the first call."""
        if self._proportions is None:
            with self.timer("proportions"):
                self._proportions = shrunk_proportions(self._mixture_counts())
        return self._proportions[0]

    def _mixture_counts(self) -> torch.Tensor:
        """Soft class counts (C,) sum_i r_ic of the mixture fitted on the whole pool from the
        zero-shot probabilities times the presence weights (the ``gmm`` solver's default fit)."""
        X = self.image
        resp = torch.softmax(self.log_probs() + self.support.log_start(), dim=1)  # (N, C)
        params = m_step(X, resp, self.covariance, self.reg)
        with warnings.catch_warnings():  # a capped EM still gives usable counts
            warnings.simplefilter("ignore", convergence_warning())
            log_pi, means, var, _, _ = fit_em(X, *params, covariance=self.covariance, reg=self.reg,
                                              tol=MIXTURE_TOL, max_iter=MIXTURE_MAX_ITER)
        _, (counts, _, _, _) = mixture_evidence(X, log_pi, means, var, statistics=True)
        return counts  # (C,) sum_i r_ic

    def info(self) -> dict:
        """For ``Result.info["presence"]``: :meth:`ClassSupport.info`, the seconds spent, and the
        proportions' Dirichlet concentration once they were asked for (None: uniform)."""
        info = dict(self.support.info(), seconds=dict(self.timer.seconds))
        if self._proportions is not None:
            alpha = self._proportions[1]
            info["proportions_concentration"] = None if alpha == float("inf") else alpha
        return info


def analyse_pool(problem: Problem, *, logit_scale: float = CLIP_LOGIT_SCALE, covariance: str = "diag",
                 reg: float = 1e-6, log_probs: Optional[torch.Tensor] = None) -> PoolAnalysis:
    """The pool analysis of ``problem`` (its images and initial classifier), computed on the first
    call with these settings and cached on the problem (``problem.analyses``).

    Parameters
    ----------
    problem : Problem
    logit_scale : float
        Zero-shot probabilities softmax(logit_scale x cosine) (CLIP's 100 by default).
    covariance : {"diag", "spherical"}
        Shared covariance of the mixture of the held-out check and the proportions.
    reg : float
        Added to the mixture's variance (scikit-learn's ``reg_covar``).
    log_probs : (N, C) tensor, optional
        The zero-shot log-probabilities log softmax(logit_scale x cosine), when the caller has
        them already (saves a product of the pool with the classifier); else computed here.
    """
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    key = (float(logit_scale), covariance, float(reg), problem.seed)
    if key not in problem.analyses:
        if problem.progress:
            note("pool analysis: which classes does the pool hold (class presence)")
        timer = StageTimer(problem.device)
        with timer("support"):
            if log_probs is None:
                log_probs = torch.log_softmax(zeroshot_logits(problem.image, problem.classifier, logit_scale), dim=1)
            support = supported_classes(problem.image, log_probs, seed=problem.seed, covariance=covariance, reg=reg)
        problem.analyses[key] = PoolAnalysis(support, problem.image, problem.classifier, logit_scale,
                                             covariance, reg, timer)
    return problem.analyses[key]
