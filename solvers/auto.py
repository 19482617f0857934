"""Auto: the Gaussian mixture where the pool can estimate one component per class, StatA's
text-anchored shrinkage where it cannot; chosen per pool by the pool analysis, no labels.

Where you are: a thin layer over :mod:`zsadapt.solvers.gmm` (``gmm``, robust, its defaults) and
:mod:`zsadapt.solvers.stata` (``stata``, its published defaults), above the pool analysis
(:mod:`zsadapt.solvers.pool_analysis`), which both it and ``gmm`` read from one cache per fit.

Why two methods. Measured on StatA's realistic protocol (Zanella et al., CVPR 2025;
``benchmarks/realistic.py``: 4 real pools and a synthetic 1000-class pool, 2 tasks, 1,000 batches),
per batch, against m, the images per class of the batch (below):

* ``gmm`` (one Gaussian per class, shared diagonal covariance, class presence) gains the most
  where each class has images enough (+5 to +6 points over zero-shot on average where m >= 5; the
  whole pools +9.3) and collapses where it has not: -14 to -23 points on average where m < 3, e.g.
  online batches of 128 Cars images holding 53-91 of the 196 classes, which the class presence
  rightly reads as balanced (m = 0.65);
* ``stata`` shrinks each class's mean and variance to its text embedding by beta_k = n_k / (1 +
  n_k): never far from zero-shot (+0.4 to +6 points on average per band of m, its worst batch
  -4.7), and behind ``gmm`` on whole pools (Cars 57.4 vs 61.2, zero-shot 59.0).

The rule. A mixture component with one image has that image as its mean and nothing to estimate
its spread from: a Gaussian per class is estimable when the pool holds at least two images per
class. So

    m = N / K >= ``min_images`` (2)  ->  ``gmm``,    else  ->  ``stata``,

K the larger of the number of classes the pool analysis keeps (all C on a pool whose class
evidence is balanced) and the number of distinct zero-shot labels in the pool: the analysis can
read a batch as holding fewer classes than it does (synthetic online batches of ~50 classes: 33-38
kept), and the number of classes zero-shot names is a second, independent count; the larger one
is the cautious one (on StatA's batches of the seven shared pools K is a median 0.98-9.1 times the
classes a batch holds). The threshold is the principle, not a fit; ``benchmarks/auto_branches.py``
(every batch of the protocol, both branches fitted) shows what others would give: on the real
pools ``gmm`` is ahead of ``stata`` in every band of m from 2 up (1,217 batches), and thresholds
2, 3 and 4 give 52.68, 52.39 and 51.59% on average; on the synthetic 1000-class pool ``stata`` is
ahead in every band below 6 and they give 70.49, 71.78 and 73.98 (the failure below). Labels and
probabilities are the chosen solver's, unchanged (each published method stays bit for bit itself,
and ``auto`` equals one of them on every pool).

``logit_scale`` (CLIP's 100) is the initial classifier's zero-shot scale, y_hat = softmax(
``logit_scale`` x cosine): the pool analysis and the chosen solver both read it (set it for an
encoder whose similarities have another range; the branches' own default is the same 100).

``Result.info``: ``branch`` (``"gmm"`` or ``"stata"``), ``images_per_class`` (m),
``classes_counted`` (K), ``presence`` (the pool analysis, when it was run), and the chosen solver's
own diagnostics.

Inductive mode: ``predict`` is the chosen solver's ``predict``, the neighbour-transfer rule of
both (:mod:`zsadapt.solvers.inductive`; Cars, ``gmm`` fitted on a random half, the other half
predicted: 59.90%, zero-shot 59.78%). ``benchmarks/fit_on_sample.py`` (fit on val, label test):
above the initial classifier on four of the five split pools, 0.78 point below it on
fgvc_aircraft (where no method's transduction gains either), so ``inductive_below_initial`` is
set: saving a model warns; and far below it on the synthetic 1000-class pool
(fit on 3,500 images: 44.14% against 64.51%), where the transduction itself fails (next paragraph).

Known failure: a balanced pool of many classes with few images each. On the synthetic
1000 x 7 pool subsampled to 2-4 images per class, the pool analysis keeps 451-696 of the
907-997 classes present (its zero-shot evidence reads the classifier's hub classes as class
imbalance, and the held-out check, fitted on halves of 1-2 images per class, confirms the drop), and
``gmm`` falls to 42-52% against zero-shot 65% (``gmm`` with ``robust=False`` at 3 per class: 99.2%;
``stata`` 69-74%). A held-out check whose shared variance has N - K degrees of freedom (the pooled
variance of LDA) keeps every class at 6 and 7 per class (58 -> 100%) but not at 2-4, and on Caltech101's
1000-image batch of 29 classes keeps all 100 (73.4 -> 61.7%); not adopted.

Known failure: a strong initial classifier on a pool whose clusters are not its classes. ``gmm``
keeps the initial classifier only as EM's start, so where the classifier is better than the
pool's Gaussian clusters it loses what the classifier knew. With 16-shot image prototypes instead
of 1-shot (``benchmarks/real_pools.py --shots 16``) ``auto`` falls below the initial classifier
on four of the six prototype pools (Caltech101 -1.95, DTD -4.20, FGVC Aircraft -6.06, Flowers
-1.46; mean -1.71), where the text-anchored ``stata`` (+1.33 on average, worst -1.71) and
``transclip`` (+0.89, worst -3.36) lose less; with 4-shot prototypes it gains +2.47 on average
but Aircraft falls by 3.30. In StatA's batches of those 16-shot pools (``benchmarks/realistic.py
--shots 16``) ``auto`` gains 3.22 on average but falls below the classifier on the 1000-image and
whole-pool settings (-0.58 to -1.71 on average), and ``stata`` falls 1.45 below it on average: no
method is safe there. No label-free signal measured tells these pools from the 1-shot ones on
which ``gmm`` gains most (docs/methods/auto.md). For prototypes, ``prior_images`` (the labelled
images each averages, passed to ``gmm``) anchors the class means at them: at 16 shots the mean
change goes from -1.71 to +0.18, Aircraft from -6.06 to -5.37 (``benchmarks/prototype_prior.py``).
"""

from __future__ import annotations

import torch

from ..messages import note
from ..zeroshot import CLIP_LOGIT_SCALE
from . import get_solver, register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput
from .pool_analysis import analyse_pool

#: The solver of each branch: a Gaussian per class where it is estimable, text-anchored otherwise.
MIXTURE, ANCHORED = "gmm", "stata"


def images_per_class(problem: Problem, min_images: float,
                     logit_scale: float = CLIP_LOGIT_SCALE) -> tuple[float, int, bool]:
    """(m, K, analysed): the images per class m = N / K of ``problem``'s pool, K the larger of the
    number of distinct zero-shot labels and the number of classes the pool analysis keeps
    (:func:`~zsadapt.solvers.pool_analysis.analyse_pool` at the ``gmm`` solver's settings, with
    zero-shot probabilities softmax(``logit_scale`` x cosine), so the analysis is computed once
    for both). The zero-shot labels are counted first: when they alone put m below
    ``min_images``, the larger K can only put it lower, the branch is ``stata`` either way, and the
    analysis is not run (``analysed`` False; K is then the zero-shot count)."""
    n = problem.image.shape[0]
    votes = int(torch.unique(problem.logits().argmax(dim=1)).numel())
    if n / votes < min_images:
        return n / votes, votes, False
    kept = max(int(analyse_pool(problem, logit_scale=logit_scale).support.kept.sum()), votes)
    return n / kept, kept, True


@register
class AutoSolver(Solver):
    name = "auto"
    summary = ("gmm where the pool holds >= 2 images per supported class, stata (text-anchored "
               "shrinkage) where it holds fewer; chosen by the pool analysis (transductive + inductive)")
    reference = ("Dempster, Laird, Rubin 1977 (gmm); Zanella et al., Realistic Test-Time Adaptation "
                 "of Vision-Language Models, CVPR 2025 (stata)")
    params = {
        "min_images": Param(2.0, float, "images per supported class from which a Gaussian per class "
                            "(gmm) is fitted; below it, stata", minimum=0.0),
        "logit_scale": Param(CLIP_LOGIT_SCALE, float, "zero-shot probabilities softmax(logit_scale x "
                             "cosine) of the pool analysis and of the chosen method", minimum=1e-6),
        "prior_images": Param(0.0, float, "for prototype classifiers: the labelled images each prototype "
                              "averages, passed to the gmm branch (its class means anchored at the "
                              "prototypes with that weight; 0: plain EM)", minimum=0.0),
    }
    #: On the shared real pools auto is gmm: its predict is 0.78 point below the initial
    #: classifier on fgvc_aircraft (benchmarks/fit_on_sample.py, module docstring).
    inductive_below_initial = True

    def fit(self, problem: Problem) -> SolverOutput:
        """Analyse the pool, pick the branch by m = N / K (module docstring), fit that solver."""
        n = problem.image.shape[0]
        if n == 0:
            raise ValueError("auto: the pool is empty (0 images)")
        m, kept, analysed = images_per_class(problem, self.config["min_images"], self.config["logit_scale"])
        self.branch_ = MIXTURE if m >= self.config["min_images"] else ANCHORED
        if problem.progress:
            note(f"auto: {n} images, {kept} classes counted ({m:.2f} images per class): {self.branch_}")
        self.delegate_ = self._branch_solver()
        out = self.delegate_.fit(problem)
        out.info.update(branch=self.branch_, images_per_class=m, classes_counted=kept)
        if analysed:
            out.info.setdefault("presence", analyse_pool(problem, logit_scale=self.config["logit_scale"]).info())
        return out

    def _branch_solver(self) -> Solver:
        """An unfitted solver of the chosen branch, at its defaults, this solver's logit scale and,
        for ``gmm``, its ``prior_images``."""
        extra = {"prior_images": self.config["prior_images"]} if self.branch_ == MIXTURE else {}
        return get_solver(self.branch_)(logit_scale=self.config["logit_scale"], **extra)

    def predict(self, image) -> SolverOutput:
        """The chosen solver's ``predict`` on new images (M, d)."""
        if not hasattr(self, "delegate_"):
            raise NotFittedError("auto: call fit first")
        return self.delegate_.predict(image)

    def fitted_state(self) -> dict:
        """The branch and the chosen solver's own fitted state."""
        return {"branch_": self.branch_, "delegate_state_": self.delegate_.fitted_state()}

    def load_fitted_state(self, state: dict) -> None:
        self.branch_ = state["branch_"]
        self.delegate_ = self._branch_solver()
        self.delegate_.load_fitted_state(state["delegate_state_"])
