"""Pseudo-label self-training of a student classifier on the frozen features.

After Menghini, Delworth, Bach, "Enhancing CLIP with CLIP: Exploring Pseudolabeling for
Limited-Label Prompt Tuning", NeurIPS 2023, on features instead of prompts. The student is a
cosine classifier: logits = s * normalise(phi(x)) . normalise(w_c), with w initialised at the
initial classifier's class vectors, a learnable scale s (initialised at ``logit_scale``, CLIP's
100, the scale of the first teacher's zero-shot softmax too) and, with
``adapter=True``, a residual linear adapter phi(x) = x + A x (A initialised at 0). It is trained
with cross-entropy on pseudo-labels (Adam), the epoch picked on a held-out part of the
pseudo-labelled set (lowest held-out cross-entropy, epoch 0 = the initial classifier included;
accuracy against pseudo-labels that the
teacher itself made starts near 100% and does not tell epochs apart; early stopping after
``patience`` epochs without improvement), full-batch when the set fits (``batch_size=0``) and in
seeded mini-batches when it does not.

Pseudo-labels (:func:`select_pseudo_labels`): each class c has a quota q_c; every image is offered
to its most probable class first, and a class accepts its most confident offers up to its quota;
an image that a class turned down is offered to its next most probable class in the next round.

Strategies (the paper's names):

* ``fpl``: one round; quotas of ``k`` (16) per class from the initial zero-shot probabilities.
* ``ifpl``: ``rounds`` (10) rounds; each round re-trains the student from the initial classifier
  on ``k`` per class chosen by the previous round's student.
* ``grip``: as ifpl, but the pseudo-labelled set grows by ``growth`` (a tenth) of the pool each
  round until it covers the pool.

Quotas (``quota``). The published methods give every class the same quota, which forces balanced
pseudo-labels onto an imbalanced pool (Caltech101: balanced grip 23 points below the initial
classifier, benchmarks/pseudolabel_pools.py).

* ``"mixture"`` (default, not in the paper): quotas proportional to the class proportions
  estimated once from the pool's clusters (:meth:`zsadapt.solvers.pool_analysis.PoolAnalysis.proportions`:
  a Gaussian mixture's class counts shrunk towards uniform by an empirical-Bayes Dirichlet
  prior; uniform when the counts look balanced), split by largest remainders;
* ``"balanced"``: the published quotas;
* ``"proportional"``: proportional to the class proportions the current teacher estimates (mean
  of its probabilities over the pool) each round; grip's round 1 stays balanced, since the
  zero-shot classifier's prediction counts mirror its own bias more than the pool's proportions.

Every class gets a quota of at least one image: a class without pseudo-labels is pushed down by
the cross-entropy of all the others and, with proportional quotas, would never come back.

Rounds stop early at a fixed point of the pseudo-labels: when a round pseudo-labels every image
of the pool, each as the previous round did, its student would be trained on the same set from
the same start as the previous one, so the previous student is the answer (``info["iterations"]``
counts the rounds trained). On a pool of many images per class grip's set grows every round
and every round runs; where C >= N every quota of one image covers the pool: 20 images among
20,000 classes took 37 s on one thread for 10 rounds, 6 s now (one round; the labels repeated).

Inductive ``predict`` is the trained student. It falls below the initial classifier on FGVC
Aircraft (fit on val, label test: 13.1% against 15.0%; ``benchmarks/fit_on_sample.py``), so
``inductive_below_initial`` is set: saving a model warns.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..messages import note, progress
from ..zeroshot import CLIP_LOGIT_SCALE
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput
from .pool_analysis import analyse_pool
from .timing import StageTimer

#: Full-batch training while (pseudo-labelled images) x C stays below this many logits.
FULL_BATCH_LOGITS = 1 << 25


def largest_remainder(budget: int, proportions: torch.Tensor) -> torch.Tensor:
    """Integer quotas (C,) summing to ``budget``, as close as possible to budget * proportions
    (floors, then one more for the largest fractional parts; ties to the lower class index)."""
    raw = budget * proportions / proportions.sum()
    quotas = raw.floor().long()
    short = int(budget - quotas.sum())
    if short > 0:
        fraction = raw - quotas
        order = torch.sort(-fraction, stable=True).indices
        quotas[order[:short]] += 1
    return quotas


def grip_budget(round_: int, growth: float, n: int) -> int:
    """grip's pseudo-labelled set after ``round_`` rounds: ceil(round_ x growth x n) images, at
    most n. The product is taken in decimal, as written: in binary floating point 6 x 0.1 x 1635
    is 981.0000000000001, and its ceiling one image too many."""
    exact = Fraction(str(growth)) * round_ * n
    return min(n, math.ceil(exact))


def select_pseudo_labels(probs: torch.Tensor, quotas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labelled images and their labels under per-class quotas.

    Round r offers every still unlabelled image to its r-th most probable class; a class accepts
    the most confident offers (probability of that class; ties to the lower image index) until its
    quota is full. Stops when every image is labelled, every quota is full, or after C rounds.

    Parameters
    ----------
    probs : (N, C) class probabilities
    quotas : (C,) int64 images wanted per class

    Returns
    -------
    index : (M,) int64 pool indices, ascending
    labels : (M,) int64 their pseudo-labels
    """
    n, n_classes = probs.shape
    device = probs.device
    ranked = torch.argsort(probs, dim=1, descending=True, stable=True)  # (N, C)
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    remaining = quotas.clone().to(device)
    for r in range(n_classes):
        open_images = (labels < 0).nonzero().squeeze(1)
        if open_images.numel() == 0 or int(remaining.sum()) == 0:
            break
        cls = ranked[open_images, r]  # (m,)
        keep = remaining[cls] > 0
        images, cls = open_images[keep], cls[keep]
        if images.numel() == 0:
            continue
        conf = probs[images, cls]
        by_conf = torch.argsort(conf, descending=True, stable=True)
        images, cls = images[by_conf], cls[by_conf]
        by_class = torch.argsort(cls, stable=True)  # grouped by class, most confident first
        images, cls = images[by_class], cls[by_class]
        counts = torch.bincount(cls, minlength=n_classes)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(cls.numel(), device=device) - starts[cls]
        accept = rank < remaining[cls]
        labels[images[accept]] = cls[accept]
        remaining -= torch.bincount(cls[accept], minlength=n_classes)
    index = (labels >= 0).nonzero().squeeze(1)
    return index, labels[index]


class Student:
    """Cosine classifier with a learnable logit scale and an optional residual adapter."""

    def __init__(self, classifier: torch.Tensor, adapter: bool, logit_scale: float = CLIP_LOGIT_SCALE) -> None:
        self.weight = classifier.clone().requires_grad_(True)  # (C, d)
        self.log_scale = torch.tensor(math.log(logit_scale), dtype=classifier.dtype,
                                      device=classifier.device).requires_grad_(True)
        d = classifier.shape[1]
        self.adapter = (torch.zeros(d, d, dtype=classifier.dtype, device=classifier.device)
                        .requires_grad_(True) if adapter else None)

    def parameters(self) -> list:
        return [p for p in (self.weight, self.log_scale, self.adapter) if p is not None]

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """(M, d) -> (M, C): s * normalise(x + x A^T) . normalise(w_c)."""
        x = image if self.adapter is None else torch.nn.functional.normalize(image + image @ self.adapter.T, dim=1)
        w = torch.nn.functional.normalize(self.weight, dim=1)
        return self.log_scale.exp() * x @ w.T

    def state(self) -> list:
        return [p.detach().clone() for p in self.parameters()]

    def load(self, state: list) -> None:
        with torch.no_grad():
            for p, s in zip(self.parameters(), state):
                p.copy_(s)


@register
class SelfTrainingSolver(Solver):
    name = "self_training"
    inductive_below_initial = True  # benchmarks/fit_on_sample.py (module docstring)
    summary = "student cosine classifier trained on pseudo-labels: fpl, ifpl, grip (transductive + inductive)"
    reference = (
        "Menghini, Delworth, Bach, Enhancing CLIP with CLIP: Exploring Pseudolabeling for "
        "Limited-Label Prompt Tuning, NeurIPS 2023"
    )
    params = {
        "strategy": Param("grip", str, "pseudo-labelling strategy", choices=("fpl", "ifpl", "grip")),
        "k": Param(16, int, "pseudo-labels per class for fpl and ifpl", minimum=1),
        "rounds": Param(10, int, "ifpl rounds", minimum=1),
        "growth": Param(0.1, float, "grip: fraction of the pool added to the pseudo-labelled set per round", minimum=1e-3, maximum=1.0),
        "quota": Param("mixture", str, "per-class quotas: mixture (class proportions estimated from the "
                       "pool's clusters), balanced (published) or proportional (the current teacher's "
                       "estimate, each round)", choices=("mixture", "balanced", "proportional")),
        "adapter": Param(False, bool, "add a residual linear adapter to the student"),
        "lr": Param(1e-3, float, "Adam learning rate of the student", minimum=0.0),
        "epochs": Param(100, int, "training epochs per round (cap)", minimum=1),
        "patience": Param(10, int, "stop after this many epochs without held-out improvement", minimum=1),
        "holdout": Param(0.2, float, "fraction of the pseudo-labelled set held out to pick the epoch", minimum=0.0, maximum=0.9),
        "batch_size": Param(0, int, "mini-batch size (0: full batch when it fits)", minimum=0),
        "logit_scale": Param(CLIP_LOGIT_SCALE, float, "zero-shot softmax(logit_scale x cosine) of the first "
                             "teacher and the pool analysis, and the student's starting scale (CLIP: 100)",
                             minimum=1e-6),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        cfg = self.config
        X = problem.image  # (N, d)
        n, n_classes = X.shape[0], problem.classifier.shape[0]
        generator = torch.Generator(device="cpu").manual_seed(problem.seed)
        timer = StageTimer(problem.device)
        teacher = torch.softmax(problem.logits(cfg["logit_scale"]), dim=1)  # (N, C) initial zero-shot probabilities
        if cfg["strategy"] == "fpl":
            n_rounds = 1
        elif cfg["strategy"] == "ifpl":
            n_rounds = cfg["rounds"]
        else:
            n_rounds = math.ceil(1.0 / cfg["growth"] - 1e-9)
        with timer("proportions"):
            if cfg["quota"] == "mixture":
                fixed_shares = analyse_pool(problem, logit_scale=cfg["logit_scale"]).proportions()  # (C,)
            else:
                fixed_shares = torch.ones(n_classes, dtype=X.dtype, device=X.device)  # (C,)
        history = []
        student, previous_labels = None, None
        for r in range(1, n_rounds + 1):
            with timer("pseudo_labels"):
                budget = grip_budget(r, cfg["growth"], n) if cfg["strategy"] == "grip" else cfg["k"] * n_classes
                # grip's round 1 is balanced even for proportional quotas: the zero-shot
                # classifier's prediction counts mirror its own bias more than the pool's
                # proportions, and later rounds have a student to estimate them with.
                estimate = cfg["quota"] == "proportional" and (r > 1 or cfg["strategy"] != "grip")
                shares = teacher.mean(dim=0) if estimate else fixed_shares
                # At least one image per class: a class without pseudo-labels is pushed down by
                # the cross-entropy of all others and, with proportional quotas, never comes back.
                quotas = largest_remainder(budget, shares.double()).clamp_min(1).to(X.device)
                index, labels = select_pseudo_labels(teacher, quotas)
            if index.numel() == n and previous_labels is not None and torch.equal(labels, previous_labels):
                # Every image pseudo-labelled as in the previous round: the next student is trained
                # on the same set from the same start, so this round's teacher is the fixed point.
                break
            if problem.progress:
                note(f"self_training ({cfg['strategy']}): round {r}/{n_rounds}, {index.numel()} pseudo-labels")
            with timer("train"):
                student, epoch = self._train(X[index], labels, problem.classifier, generator,
                                             show=problem.progress, desc=f"self_training: round {r} epochs")
                with torch.no_grad():
                    teacher = torch.softmax(student.logits(X), dim=1)
            history.append({"pseudo_labels": int(index.numel()), "epoch": epoch})
            previous_labels = labels
        self.student_ = student
        out = self.predict(X)
        out.info.update(iterations=len(history), converged=True, rounds=history, seconds=timer.seconds)
        return out

    def _train(self, X: torch.Tensor, y: torch.Tensor, init: torch.Tensor, generator: torch.Generator, *,
               show: bool = False, desc: str = "self_training: epochs") -> tuple:
        """A fresh student trained on (X, y); returns it at the best held-out epoch and that epoch.
        ``show``: a progress line (``desc``) when the epochs take more than a few seconds."""
        cfg = self.config
        m = X.shape[0]
        perm = torch.randperm(m, generator=generator).to(X.device)
        n_hold = int(cfg["holdout"] * m) if m >= 5 else 0
        hold, train = perm[:n_hold], perm[n_hold:]
        bar = progress(cfg["epochs"], desc, show=show)  # its clock covers Adam's first-use import too
        student = Student(init, cfg["adapter"], cfg["logit_scale"])
        optimiser = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
        batch = cfg["batch_size"] or (train.numel() if train.numel() * init.shape[0] <= FULL_BATCH_LOGITS
                                      else max(1, FULL_BATCH_LOGITS // init.shape[0]))
        best, best_key, best_epoch, stale = student.state(), None, 0, 0
        if n_hold:  # epoch 0, the initial classifier, is a candidate too: training may only hurt
            with torch.no_grad():
                best_key = float(torch.nn.functional.cross_entropy(student.logits(X[hold]), y[hold]))
        with bar:
            for epoch in range(1, cfg["epochs"] + 1):
                order = (train[torch.randperm(train.numel(), generator=generator).to(X.device)]
                         if batch < train.numel() else train)
                for start in range(0, order.numel(), batch):
                    rows = order[start:start + batch]
                    loss = torch.nn.functional.cross_entropy(student.logits(X[rows]), y[rows])
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                bar.update(epoch)
                if n_hold == 0:
                    best, best_epoch = student.state(), epoch
                    continue
                with torch.no_grad():
                    logits = student.logits(X[hold])
                    key = float(torch.nn.functional.cross_entropy(logits, y[hold]))
                if best_key is None or key < best_key:
                    best, best_key, best_epoch, stale = student.state(), key, epoch, 0
                else:
                    stale += 1
                    if stale >= cfg["patience"]:
                        break
        student.load(best)
        return student, best_epoch

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """The student's logits and softmax for new images (M, d)."""
        if not hasattr(self, "student_"):
            raise NotFittedError("self_training: call fit first")
        with torch.no_grad():
            logits = self.student_.logits(image)  # (M, C)
        return SolverOutput(logits, torch.softmax(logits, dim=1), {})
