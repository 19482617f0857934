"""ZLaP: label propagation over a joint graph of class (text) nodes and image nodes.

Stojnić, Kalantidis, Tolias, "Label Propagation for Zero-shot Classification with
Vision-Language Models", CVPR 2024. This follows the official code's transductive mode:

* nodes 0..C-1 are the classes (rows of the initial classifier), nodes C..C+N-1 the images;
* each image links to its k nearest images (the search includes the image itself; that self-edge
  vanishes with the diagonal) and to its k nearest classes; negative similarities become 0, and
  image-to-class similarities are raised to the power gamma (image-to-image ones are not);
* W <- W + W^T, diagonal removed, Wn = D^-1/2 W D^-1/2, L = I - alpha Wn   (paper eq. 3-4);
* for every class c solve L z_c = e_c (all classes at once; Chebyshev iteration on L's spectrum
  bounds [1 - alpha, 1 + alpha], or conjugate gradient where that needs over ``max_iter`` steps); the score
  of image i for class c is z_c at node C+i; the prediction is the argmax over classes. A class
  node no image links to (most of them when C >> N k) is a component of its own, z_c = e_c: only
  the linked classes, at most N k, go through the solve, so its cost does not grow as (C + N) C.

Option beyond the paper: ``degree_power`` = beta multiplies the scores of class c by
d_c^(beta/2), d_c the degree of class node c. Since L^-1 = D^1/2 (D - alpha W)^-1 D^1/2, the
official score is the discounted number of random-walk visits to c divided by sqrt(d_c), which
penalises classes that many images link to; beta = 1 removes that penalty, beta = 0.5 halves it.
beta = 0 is the published method, and the default wherever the graph holds every class.

Pools that hold only some of the classes: ``robust=True`` (the default) first asks which classes
the pool supports, as ``gmm`` does (the pool analysis, :func:`zsadapt.solvers.pool_analysis.analyse_pool`:
class presence from the zero-shot probabilities, checked by held-out GMM likelihood), and builds the graph on
those classes only; the others get probability 0. Without it the official graph gives every class
a node, and on a pool of 2 of the 196 Cars classes the 1/sqrt(d_c) penalty above hands the images
to absent classes (23.6% against 68.95% zero-shot, 10 draws). Where classes were left out the pool
is known not to be balanced over the classifier's classes, the assumption behind penalising a
popular class, so ``degree_power`` then defaults to 0.5 (:data:`SUBSET_DEGREE_POWER`;
``benchmarks/zlap_variants.py``, 2026-12-07: over 0 it adds 0 to +0.8 points on Cars pools of 2 to
49 classes and +0.2 and +3.2 on the two prototype pools where classes are left out). A pool that
reads as balanced keeps every class, and the graph is the official one (the
whole Cars pool). ``robust=False`` is the published method on any pool.

One deliberate difference: exact duplicate images become one node (the official code lets them
compete for the same neighbour slots, so identical images could get different labels); on pools
without duplicates the graph is exactly the official one.

Probabilities: the scores z are non-negative propagated label mass, and p_ic is proportional to
z_ic^beta (the argmax, so the labels, do not depend on beta). ``calibration="mass"`` takes beta = 1,
each row's share of mass, as scikit-learn's LabelSpreading does; those shares are far too flat
(expected calibration error 34% on Stanford Cars). The default ``"zeroshot"`` picks the beta whose
mean top-1 probability equals the zero-shot softmax's on the same pool, without labels: CLIP's
logit scale makes its own softmax roughly calibrated (ECE 4.9% on Cars), and ZLaP's then is too
(6.3%); for an encoder with another similarity range, ``logit_scale`` sets that softmax (and the
pool analysis's). With a classifier whose softmax is itself miscalibrated (image-space
prototypes), prefer "mass" (measurements in the README). An image with no mass at all (every
similarity clipped to 0) falls back to the zero-shot softmax.

Inductive mode: ``predict`` is the neighbour-transfer rule (:mod:`zsadapt.solvers.inductive`), one
of whose experts is the paper's (sec. 3.3; alone it labels a held-out half of Cars at 50.6% against
zero-shot 59.8%, benchmarks/fit_on_sample.py): with Z = L^-1 E_C, the (N+C, C) solution for all classes, a new
image with neighbour weights y over the graph's nodes scores y^T Z, exactly what solving
L x = y and reading x at the class nodes gives (L is symmetric). ``dual_topk=s`` keeps only the s
largest entries of each row of Z (the paper's sparse variant uses s = 1). Z is kept as the columns
of the classes some pool image links to and, for the others, the diagonal entry their row and
column hold (:class:`Dual`): with far more classes than images that is (C + N) x N k numbers instead
of (C + N) x C (20 images x 100,000 classes: 40 MB instead of 40 GB). Fitted on a random half of
Stanford Cars, the rule labels the other half 0.12 point below the initial classifier (59.66 against
59.78%, one image of 818; above it on the five val -> test pools, ``benchmarks/fit_on_sample.py``),
so ``inductive_below_initial`` is set: saving a model warns.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..graphs import (BACKENDS, EdgeList, chebyshev, chebyshev_iterations, conjugate_gradient, knn,
                      symmetric_normalise, unique_rows)
from ..messages import note
from ..zeroshot import CLIP_LOGIT_SCALE, zeroshot_probs
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput, convergence_warning
from .inductive import TransfersToNewImages, attach_transfer
from .pool_analysis import PoolAnalysis, analyse_pool
from .timing import StageTimer


#: At most this many rows of the pool fit the probability power (``calibration="zeroshot"``).
CALIBRATION_ROWS = 2048

#: ``degree_power`` by default where ``robust`` left classes out of the graph (module docstring).
SUBSET_DEGREE_POWER = 0.5


@dataclass
class SimilarityScale:
    """Min-max scaling of similarities to [0, 1] (the official code's ``scale_sim``, used with
    image-space classifiers such as InMaP proxies). Identity when ``low``/``high`` are None."""

    low: Optional[float] = None
    high: Optional[float] = None

    def __call__(self, sims: torch.Tensor) -> torch.Tensor:
        if self.low is None or self.high is None or self.high == self.low:
            return sims
        return (sims - self.low) / (self.high - self.low)


@dataclass
class Neighbours:
    """Each image's edges into the graph: node ids (C.. for images, 0..C-1 for classes) and weights
    after scaling, clipping at 0 and the gamma power on image-to-class similarities."""

    nodes: torch.Tensor  # (M, k_image + k_text) int64
    weights: torch.Tensor  # (M, k_image + k_text) float


def image_edges(
    image: torch.Tensor,
    pool: torch.Tensor,
    classifier: torch.Tensor,
    *,
    k: int,
    gamma: float,
    scale: SimilarityScale,
    backend: str = "auto",
) -> Neighbours:
    """Edges of the images ``image`` (M, d) into a graph of pool images (N, d) and classes (C, d).

    Each image gets min(k, N) image neighbours (itself included when it is in the pool) and
    min(k, C) class neighbours.
    """
    n_classes = classifier.shape[0]
    image_sims, image_idx = knn(image, pool, min(k, pool.shape[0]), backend=backend)  # (M, ki)
    text_sims, text_idx = knn(image, classifier, min(k, n_classes), backend=backend)  # (M, kt)
    image_sims = scale(image_sims).clamp_min(0)
    text_sims = scale(text_sims).clamp_min(0).pow(gamma)
    nodes = torch.cat([image_idx + n_classes, text_idx], dim=1)  # (M, ki + kt)
    return Neighbours(nodes, torch.cat([image_sims, text_sims], dim=1))


def similarity_scale(image: torch.Tensor, classifier: torch.Tensor, k: int, backend: str) -> SimilarityScale:
    """The min and max over every kNN similarity of the pool graph (for ``scale_sim``)."""
    image_sims, _ = knn(image, image, min(k, image.shape[0]), backend=backend)
    text_sims, _ = knn(image, classifier, min(k, classifier.shape[0]), backend=backend)
    both = torch.cat([image_sims.flatten(), text_sims.flatten()])
    return SimilarityScale(float(both.min()), float(both.max()))


def zlap_graph(edges: Neighbours, n_classes: int) -> tuple[EdgeList, torch.Tensor]:
    """Wn = D^-1/2 (W + W^T - diag) D^-1/2 over C + N nodes, W holding the pool images' edges;
    also the degrees of the class nodes, (C,)."""
    n_images, width = edges.nodes.shape
    rows = torch.arange(n_classes, n_classes + n_images, device=edges.nodes.device)
    w = EdgeList(
        rows.repeat_interleave(width),
        edges.nodes.reshape(-1),
        edges.weights.reshape(-1),
        n_classes + n_images,
    )
    w = w.symmetrised().without_diagonal().coalesced()
    return symmetric_normalise(w), w.degrees()[:n_classes]


def unit_sources(n_nodes: int, classes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(n_nodes, K') right-hand sides E: column j is the unit source at class node ``classes[j]``."""
    rhs = torch.zeros(n_nodes, classes.shape[0], dtype=like.dtype, device=like.device)  # (C+U, K')
    rhs[classes, torch.arange(classes.shape[0], device=like.device)] = 1.0
    return rhs


@dataclass
class Dual:
    """Z = L^-1 E_C (C+U, K) over the graph's K class nodes and U images, stored compactly: the
    columns of the classes some image links to, and the lone classes, whose row and column of Z
    are Z_cc e_c (a class node without edges is a component of its own).

    Attributes
    ----------
    linked : (C+U, K') tensor, the columns of ``columns`` (all K when ``columns`` is None)
    columns : (K',) long tensor or None
    lone : (K - K',) long tensor, the lone classes
    lone_values : (K - K',) tensor, Z_cc of each
    """

    linked: torch.Tensor
    columns: Optional[torch.Tensor]
    lone: torch.Tensor
    lone_values: torch.Tensor

    def scaled(self, factors: torch.Tensor) -> "Dual":
        """Z with column c multiplied by ``factors[c]`` (K,)."""
        linked = self.linked * (factors if self.columns is None else factors[self.columns])
        return Dual(linked, self.columns, self.lone, self.lone_values * factors[self.lone])

    def image_scores(self) -> torch.Tensor:
        """The image rows of Z, (U, K): a lone class scores 0 at every image."""
        n_classes = self.linked.shape[1] + self.lone.shape[0]  # K = K' + the lone classes
        rows = self.linked[n_classes:]  # (U, K')
        if self.columns is None:
            return rows
        scores = rows.new_zeros(rows.shape[0], n_classes)  # (U, K)
        scores[:, self.columns] = rows
        return scores


@register
class ZLaPSolver(TransfersToNewImages, Solver):
    name = "zlap"
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
    summary = "label propagation on a kNN graph of image and class nodes (transductive + inductive)"
    reference = (
        "Stojnic, Kalantidis, Tolias, Label Propagation for Zero-shot Classification with "
        "Vision-Language Models, CVPR 2024"
    )
    params = {
        "k": Param(5, int, "image neighbours and class neighbours per image", minimum=1),
        "gamma": Param(5.0, float, "power on image-to-class similarities", minimum=1e-6),
        "alpha": Param(0.3, float, "propagation weight in L = I - alpha Wn", minimum=0.0, maximum=0.999),
        "tol": Param(1e-6, float, "relative residual tolerance of the solve", minimum=0.0),
        "max_iter": Param(50, int, "iteration cap of the solve", minimum=1),
        "scale_sim": Param(False, bool, "min-max scale similarities to [0, 1] first (image-space classifiers)"),
        "degree_power": Param(None, float, "multiply class c's scores by d_c^(power/2) (default: 0, official, "
                              "on a graph of every class; 0.5 where robust left classes out)", minimum=0.0),
        "calibration": Param("zeroshot", str, "probabilities: 'zeroshot' matches the zero-shot mean "
                             "confidence, 'mass' is the raw share of propagated mass", choices=("zeroshot", "mass")),
        "dual_topk": Param(0, int, "inductive predict: keep the top-s entries per row of Z (0: dense)", minimum=0),
        "knn_backend": Param("auto", str, "kNN backend", choices=BACKENDS),
        "robust": Param(True, bool, "build the graph on the classes the pool supports only (as gmm: "
                        "no change on a balanced pool; off: every class, the published graph)"),
        "logit_scale": Param(CLIP_LOGIT_SCALE, float, "zero-shot softmax(logit_scale x cosine) of the pool "
                             "analysis and the confidence calibration=zeroshot matches (CLIP: 100)", minimum=1e-6),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        """Transduction in five named stages: the classes of the graph (:meth:`_graph_classes`),
        the kNN graph (:meth:`_graph`), the propagation (:meth:`_propagate`), the class-degree
        reweighting (:meth:`_degree_power`) and the probabilities (:meth:`_fit_power`)."""
        timer = StageTimer(problem.device)
        analysis = self._graph_classes(problem, timer)
        T = problem.classifier if self.kept_ is None else problem.classifier[self.kept_]  # (K, d) graph classes
        X, inverse = unique_rows(problem.image)  # (U, d): the graph holds each distinct image once
        wn, class_degrees, scale = self._graph(X, T, problem, timer)
        dual, cg = self._propagate(wn, class_degrees, problem, timer)
        degree_power = self._degree_power()
        if degree_power:
            # Undo part of the 1/sqrt(d_c) that the symmetric normalisation puts on class c's
            # column: popular classes are no longer penalised for being popular.
            dual = dual.scaled(class_degrees.clamp_min(torch.finfo(dual.linked.dtype).tiny).pow(degree_power / 2))
        self.pool_, self.classifier_, self.scale_ = X, T, scale
        self._store_dual(dual)
        scores = dual.image_scores()  # (U, K)
        if inverse is not None:
            scores, X = scores[inverse], problem.image  # back to (N, C), one row per input image
        info = {
            "iterations": cg.iterations,
            "converged": cg.converged,
            "relative_residual": cg.max_relative_residual,
            "graph_edges": int(wn.values().numel()),
            "neighbours": {"images": min(self.config["k"], X.shape[0]), "classes": min(self.config["k"], T.shape[0])},
            "duplicate_rows": 0 if inverse is None else problem.image.shape[0] - self.pool_.shape[0],
            "degree_power": degree_power,
            "seconds": timer.seconds,
        }
        with timer("probabilities"):
            self.power_ = self._fit_power(scores, X)
            probs = self._probs(scores, X)
        info["probability_power"] = self.power_
        if analysis is not None:
            info["presence"] = analysis.info()
        out = SolverOutput(self._expand(scores), self._expand(probs), info)
        attach_transfer(self, problem, out.probs)
        return out

    def _graph_classes(self, problem: Problem, timer: StageTimer) -> Optional[PoolAnalysis]:
        """Stage 1: which classes get a node. Sets ``n_classes_`` and ``kept_`` ((C,) bool, or None
        when every class is in the graph); returns the pool analysis (None unless ``robust``)."""
        self.n_classes_ = problem.classifier.shape[0]
        self.kept_ = None
        if not self.config["robust"]:
            return None
        with timer("class support"):
            analysis = analyse_pool(problem, logit_scale=self.config["logit_scale"])
        if not bool(analysis.support.kept.all()):
            self.kept_ = analysis.support.kept
        return analysis

    def _graph(self, X: torch.Tensor, T: torch.Tensor, problem: Problem, timer: StageTimer) -> tuple:
        """Stage 2: the normalised graph Wn (C+U, C+U) as CSR over the class nodes of ``T`` (K, d)
        and the distinct images ``X`` (U, d); the class nodes' degrees (K,); the similarity scale."""
        cfg = self.config
        if cfg["k"] > X.shape[0]:
            # Not an error: every pool image (itself included) is a neighbour, and k still sets
            # the class neighbours, min(k, K); reducing k would change those.
            note(f"zlap: k = {cfg['k']} is more than the {X.shape[0]} distinct images of the pool: each image "
                 f"links to all of them (itself included) and to {min(cfg['k'], T.shape[0])} classes")
        if problem.progress:
            note(f"zlap: kNN graph over {X.shape[0]} images and {T.shape[0]} classes")
        with timer("knn"):
            # An image-space classifier (InMaP proxies) always gets the official code's scale_sim.
            scaled = cfg["scale_sim"] or problem.image_space
            scale = similarity_scale(X, T, cfg["k"], cfg["knn_backend"]) if scaled else SimilarityScale()
            edges = image_edges(X, X, T, k=cfg["k"], gamma=cfg["gamma"], scale=scale, backend=cfg["knn_backend"])
        with timer("graph"):
            wn, class_degrees = zlap_graph(edges, T.shape[0])
            wn = wn.to_csr()  # (C+U, C+U)
        return wn, class_degrees, scale

    def _propagate(self, wn: torch.Tensor, class_degrees: torch.Tensor, problem: Problem, timer: StageTimer) -> tuple:
        """Stage 3: Z = L^-1 E_C, L = I - alpha Wn (paper eq. 4), every class at once (Chebyshev
        iteration, or conjugate gradient for alpha near 1), as a :class:`Dual`; and the solver's
        report (``ConvergenceWarning`` at the iteration cap). ``class_degrees`` (K,) are the class
        nodes'."""
        cfg = self.config
        n_classes = class_degrees.shape[0]
        if problem.progress:
            note(f"zlap: solving for {n_classes} classes")
        with timer("solve"):
            alpha = cfg["alpha"]

            def matvec(p: torch.Tensor) -> torch.Tensor:
                return torch.sparse.addmm(p, wn, p, beta=1.0, alpha=-alpha)  # (I - alpha Wn) p

            linked = class_degrees > 0  # (K,): classes some pool image has among its k nearest
            if bool(linked.all()):
                z, cg = self._solve(matvec, unit_sources(wn.shape[0], torch.arange(n_classes, device=wn.device), wn))
                dual = Dual(z, None, torch.empty(0, dtype=torch.long, device=z.device), z.new_empty(0))
            else:
                # A class node no image links to is a component of its own: its column of Z is
                # L^-1 e_c = e_c (L's row there is the identity's), 0 at every image, and so is
                # its row. Only the linked classes (at most U k of them) need the graph; the
                # others take the same solver's answer for that 1 x 1 system, bit for bit the
                # value the whole solve gave them, at a cost that no longer grows as (C + U) C:
                # a 20,000-class vocabulary over a batch of 50 images links at most 250 classes
                # at k = 5, and Z is stored as those columns and the lone diagonal.
                ids = linked.nonzero().squeeze(1)  # (K',)
                z, cg = self._solve(matvec, unit_sources(wn.shape[0], ids, wn))  # (C+U, K')
                lone = (~linked).nonzero().squeeze(1)  # (K - K',)
                unit, _ = self._solve(torch.clone, torch.ones(1, 1, dtype=wn.dtype, device=wn.device))  # L = 1 there
                dual = Dual(z, ids, lone, unit[0].expand(lone.shape[0]).clone())
        if not cg.converged:
            warnings.warn(
                f"zlap: the solve stopped at max_iter={cfg['max_iter']} with relative "
                f"residual {cg.max_relative_residual:.2e} > tol={cfg['tol']:.0e}",
                convergence_warning(),
                stacklevel=4,
            )
        return dual, cg

    def _solve(self, matvec, rhs: torch.Tensor) -> tuple:
        """X = L^-1 B for the (n, m) right-hand sides ``rhs``, L given by ``matvec``."""
        cfg = self.config
        # Wn's eigenvalues lie in [-1, 1] (it is similar to the row-stochastic D^-1 W), so L's lie in
        # [1 - alpha, 1 + alpha]: the Chebyshev iteration needs no inner products and, at the default
        # alpha = 0.3, 8 steps for tol 1e-6 (2.2x faster than CG's 6 at 7000 x 1000, in cache-sized
        # column blocks on CPU: results/zlap-speed.md). Near alpha = 1 the bound grows past
        # max_iter while CG adapts to the actual spectrum: CG then.
        low, high = 1.0 - cfg["alpha"], 1.0 + cfg["alpha"]
        if chebyshev_iterations(low, high, cfg["tol"]) <= cfg["max_iter"]:
            return chebyshev(matvec, rhs, low=low, high=high, tol=cfg["tol"], max_iter=cfg["max_iter"])
        return conjugate_gradient(matvec, rhs, tol=cfg["tol"], max_iter=cfg["max_iter"])

    def _degree_power(self) -> float:
        """Stage 4's beta (module docstring): ``degree_power``, by default 0 on a graph of every
        class and :data:`SUBSET_DEGREE_POWER` where classes were left out."""
        power = self.config["degree_power"]
        if power is None:
            power = 0.0 if self.kept_ is None else SUBSET_DEGREE_POWER
        return power

    def _expand(self, values: torch.Tensor) -> torch.Tensor:
        """(N, K) values over the graph's classes -> (N, C), 0 for the classes left out."""
        if self.kept_ is None:
            return values
        out = values.new_zeros(values.shape[0], self.n_classes_)  # (N, C)
        out[:, self.kept_] = values
        return out

    def _store_dual(self, dual: Dual) -> None:
        """Keep Z = L^-1 E_C for inductive prediction: its linked columns whole (``dual_``, with
        ``dual_columns_`` their classes, None for all) or as their top-s entries per row
        (``dual_values_``, ``dual_classes_``), and the lone classes' diagonal (``dual_lone_``,
        ``dual_lone_values_``)."""
        s = self.config["dual_topk"]
        z = dual.linked
        self.dual_lone_, self.dual_lone_values_ = dual.lone, dual.lone_values
        self.dual_columns_ = dual.columns
        if s and s < z.shape[1]:
            top = torch.topk(z, s, dim=1)
            self.dual_ = None
            classes = top.indices if dual.columns is None else dual.columns[top.indices]
            self.dual_values_, self.dual_classes_ = top.values, classes  # (C+N, s) each
        else:
            self.dual_ = z  # (C+N, K')

    def _probs(self, scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """p_ic = z_ic^beta / sum_c' z_ic'^beta over the non-negative mass z (N, C); rows with no
        mass at all get the zero-shot softmax. beta is ``self.power_`` (fitted in :meth:`fit`)."""
        mass = scores.clamp_min(0)  # CG round-off can leave tiny negatives
        has_mass = mass.sum(dim=1) > 0  # (N,)
        # in place: each fresh (N, C) temporary costs page faults as well as a pass
        log_mass = mass.clamp_min_(torch.finfo(mass.dtype).tiny).log_()  # (N, C)
        probs = torch.softmax(log_mass.mul_(self.power_), dim=1)
        if not bool(has_mass.all()):
            probs[~has_mass] = zeroshot_probs(image[~has_mass], self.classifier_, self.config["logit_scale"])
        return probs

    def _fit_power(self, scores: torch.Tensor, image: torch.Tensor) -> float:
        """beta for :meth:`_probs`: 1 (the mass shares) with ``calibration="mass"``; with
        ``"zeroshot"``, the beta whose mean top-1 probability equals that of the zero-shot
        softmax on the same pool (mean max_c p_ic grows with beta: safeguarded Newton on log beta).
        Large pools are represented by ``CALIBRATION_ROWS`` evenly spaced rows: a mean over a few
        thousand rows is as good as over all, and the fit stays a small part of the run."""
        if self.config["calibration"] == "mass":
            return 1.0
        step = max(1, scores.shape[0] // CALIBRATION_ROWS)
        mass, image = scores[::step].clamp_min(0), image[::step]
        rows = mass.sum(dim=1) > 0
        if not bool(rows.any()):
            return 1.0
        log_mass = torch.log(mass[rows].clamp_min(torch.finfo(mass.dtype).tiny))  # (n, C)
        shifted = log_mass - log_mass.max(dim=1, keepdim=True).values  # (n, C) <= 0, row maxima 0
        zeroshot = zeroshot_probs(image[rows], self.classifier_, self.config["logit_scale"])  # (n, C)
        target = float(zeroshot.max(dim=1).values.mean())

        e, weighted = torch.empty_like(shifted), torch.empty_like(shifted)  # (n, C) each, reused by every step

        def confidence(log_beta: float) -> tuple:
            """Mean top-1 probability g and dg/d(log beta) at beta: with E = exp(beta s), s the
            shifted log-mass, max_c softmax(beta l)_c = 1 / S_i, S_i = sum_c E_ic, and
            d(1 / S_i)/d(log beta) = -beta sum_c s_ic E_ic / S_i^2 (one exp pass for both)."""
            beta = math.exp(log_beta)
            torch.mul(shifted, beta, out=e).exp_()  # (n, C) E
            total = e.sum(dim=1)  # (n,)
            slope = torch.mul(shifted, e, out=weighted).sum(dim=1)  # (n,) <= 0
            return float((1.0 / total).mean()), float((-beta * slope / total.square()).mean())

        edges = low, high = math.log(1e-3), math.log(1e3)
        # Newton's method on log beta, kept inside a shrinking bracket (bisection when a step
        # leaves it): g is increasing; log beta to 1e-7 in about 5 evaluations (bisection: 30).
        # A target outside [g(low), g(high)] makes beta that end of the bracket; g at an end is
        # evaluated only where no step fell on the far side of the target (as g is increasing, a
        # step below the target proves g(low) below it too), so usually never: two exp passes
        # over the rows fewer, and the same steps, the same beta.
        log_beta = min(max(0.0, low), high)
        below = above = False  # a step with g below / above the target
        for _ in range(100):
            value, slope = confidence(log_beta)
            below, above = below or value < target, above or value > target
            if value < target:
                low = log_beta
            else:
                high = log_beta
            step = log_beta - (value - target) / slope if slope > 0 else math.nan
            if not low < step < high:
                step = (low + high) / 2
            # stop at a step under 1e-7, or where float32 means cannot resolve g any further
            converged = abs(step - log_beta) < 1e-7 or abs(value - target) <= 1e-7
            log_beta = step
            if converged:
                break
        if not below and confidence(edges[0])[0] >= target:
            return math.exp(edges[0])
        if not above and confidence(edges[1])[0] <= target:
            return math.exp(edges[1])
        return math.exp(log_beta)

    def _own_predict(self, image: torch.Tensor) -> SolverOutput:
        """Scores y^T Z for new images (M, d): y holds each image's edge weights to its k nearest
        pool images and k nearest graph classes (same scaling and gamma as the pool graph); (M, C),
        0 for the classes ``robust`` left out."""
        if not hasattr(self, "pool_"):
            raise NotFittedError("zlap: call fit first")
        cfg = self.config
        edges = image_edges(
            image, self.pool_, self.classifier_, k=cfg["k"], gamma=cfg["gamma"],
            scale=self.scale_, backend=cfg["knn_backend"],
        )
        n_classes = self.classifier_.shape[0]
        scores = torch.zeros(image.shape[0], n_classes, dtype=image.dtype, device=image.device)  # (M, C)
        chunk = max(1, (1 << 24) // max(1, edges.nodes.shape[1] * n_classes))
        lone_value = torch.zeros(n_classes + 1, dtype=image.dtype, device=image.device)  # (K + 1,)
        lone_value[self.dual_lone_] = self.dual_lone_values_.to(image.dtype)  # Z_cc of the lone classes; [K] = 0
        for start in range(0, image.shape[0], chunk):
            nodes = edges.nodes[start:start + chunk]  # (b, K)
            weights = edges.weights[start:start + chunk]  # (b, K)
            if self.dual_ is not None:
                linked = torch.einsum("bk,bkc->bc", weights, self.dual_[nodes])  # (b, K')
                if self.dual_columns_ is None:
                    scores[start:start + chunk] = linked
                else:
                    scores[start:start + chunk, self.dual_columns_] = linked
            else:
                values = self.dual_values_[nodes] * weights[..., None]  # (b, K, s)
                classes = self.dual_classes_[nodes]  # (b, K, s)
                scores[start:start + chunk].scatter_add_(
                    1, classes.flatten(1), values.flatten(1)
                )
            if self.dual_lone_.numel():
                # an edge to a lone class node c adds w Z_cc to class c (its row of Z is Z_cc e_c)
                class_node = nodes.clamp(max=n_classes)  # (b, K): image nodes -> K, whose value is 0
                scores[start:start + chunk].scatter_add_(
                    1, class_node.clamp(max=n_classes - 1), weights * lone_value[class_node]
                )
        return SolverOutput(self._expand(scores), self._expand(self._probs(scores, image)), {})
