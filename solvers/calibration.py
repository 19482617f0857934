"""Label-free calibration of a method's probabilities: one temperature, labels unchanged.

A refined method's probabilities are often far more confident than its accuracy (on the Stanford
Cars text pool, ``gmm``'s mean top-1 probability is 1.00 at 61% accuracy). Without labels, the
only calibrated signal is the initial classifier itself: CLIP's zero-shot softmax at its learned
logit scale is calibrated to a few points (Cars: ECE 4.9%). This module transfers that calibration
to any method's output by tempering its log-probabilities l (N, C),

    p_ic(T) = exp(l_ic / T) / sum_c' exp(l_ic' / T),        T > 0,

which keeps every row's order of classes (so the labels) and only changes how sharp the rows are.
The one temperature T is fitted by *agreement matching*: on the set A of images where the method's
label equals the initial classifier's,

    mean_{i in A} max_c p_ic(T) = mean_{i in A} max_c p0_ic,

with p0 the initial (zero-shot) probabilities. Why A: there the method's label *is* the zero-shot
label, so zero-shot's top probability is a label-free estimate of how often that label is right;
where the two disagree, zero-shot's judgement of the method's label is not one (the method used
information zero-shot lacks), so those images are left to the method's own, tempered, ranking.
When the method agrees with zero-shot nowhere, A is every image (plain mean-confidence matching,
as ``zlap`` does for its mass). Mean max_c p_ic(T) decreases as T grows, so T is found by
bisection on log T. What a single temperature cannot do is reorder images: a method whose
confident images are not its correct ones stays miscalibrated (benchmarks/calibration.py
measures it, with ``oracle``, the best temperature given the labels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Rows of A used to fit T (evenly spaced): a mean over a few thousand rows is as good as over all.
CALIBRATION_ROWS = 4096

#: Bracket of the bisection on T: below 1e-3 every row is one-hot, above 1e6 every row is the
#: uniform distribution over its finite entries, for any log-probabilities a solver returns.
T_MIN, T_MAX = 1e-3, 1e6


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`.

    Attributes
    ----------
    probs : (N, C) tensor, rows sum to 1
        softmax(l / temperature), same dtype and device as the input probabilities.
    temperature : float
        T; 1.0 when the output already matched its target.
    target : float
        Mean zero-shot top-1 probability over the fitted rows (a label-free accuracy estimate).
    rows : int
        Images in A (method and initial classifier agree); all N when they agree nowhere.
    """

    probs: torch.Tensor
    temperature: float
    target: float
    rows: int

    def info(self) -> dict:
        """For ``Result.info["calibration"]``: plain floats and ints."""
        return {"temperature": self.temperature, "target": self.target, "rows": self.rows}


def log_probabilities(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The log-probabilities (N, C) of a solver's output.

    Solvers whose ``scores`` are logits of ``probs`` (softmax(scores) == probs to 1e-4:
    log-posteriors, logits) give ``log_softmax(scores)``: it keeps the order of rows whose
    probabilities underflowed to one-hot in float32 (gmm's gaps of hundreds of nats), which
    ``log(probs)`` would make all alike. Otherwise (zlap's mass, solvers with their own
    temperature) ``log(probs)``, with -inf where a probability is exactly 0."""
    if scores.shape == probs.shape and scores.numel():
        log_p = torch.log_softmax(scores, dim=1)
        if bool(torch.isfinite(log_p.amax(dim=1)).all()):
            if float((log_p.exp() - probs).abs().max()) <= 1e-4:
                return log_p
    return torch.log(probs)


def _confidence(log_p: torch.Tensor, temperature: float) -> float:
    """Mean over rows of max_c softmax(l / T)_c = mean 1 / sum_c exp((l_c - max l) / T)."""
    top = log_p.amax(dim=1, keepdim=True)  # (n, 1)
    return float((1.0 / torch.exp((log_p - top) / temperature).sum(dim=1)).mean())


def fit_temperature(log_p: torch.Tensor, target: float) -> float:
    """T in [T_MIN, T_MAX] with mean_i max_c softmax(l_i / T)_c == ``target`` (bisection on
    log T, 40 steps: T to 4e-11 relative); the nearest end when the target is out of reach.

    Parameters
    ----------
    log_p : (n, C) log-probabilities, rows with a finite maximum
    target : mean top-1 probability wanted, in [1/C, 1]
    """
    if abs(_confidence(log_p, 1.0) - target) <= 1e-6:
        return 1.0
    low, high = math.log(T_MIN), math.log(T_MAX)
    if _confidence(log_p, T_MIN) <= target:
        return T_MIN
    if _confidence(log_p, T_MAX) >= target:
        return T_MAX
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if _confidence(log_p, math.exp(middle)) > target else (low, middle)
    return math.exp((low + high) / 2)


def calibrate(scores: torch.Tensor, probs: torch.Tensor, initial_probs: torch.Tensor) -> Calibration:
    """Temper a method's probabilities to the initial classifier's calibration (module docstring).

    Parameters
    ----------
    scores, probs : (N, C) tensors
        A solver's output (:class:`~zsadapt.solvers.SolverOutput`); its labels are
        ``probs.argmax(dim=1)``, and the calibrated probabilities keep them.
    initial_probs : (N, C) tensor
        The initial classifier's probabilities on the same images, e.g.
        ``softmax(problem.logits())``.

    Returns
    -------
    Calibration
        ``probs`` softmax(l / T) in the dtype of ``probs``, and T, the target and |A|.
    """
    if probs.shape != initial_probs.shape:
        raise ValueError(f"calibrate: probabilities {tuple(probs.shape)} and initial probabilities "
                         f"{tuple(initial_probs.shape)} differ")
    if probs.shape[0] == 0:
        return Calibration(probs, 1.0, float("nan"), 0)
    log_p = log_probabilities(scores, probs)  # (N, C)
    agree = probs.argmax(dim=1) == initial_probs.argmax(dim=1)  # (N,) the set A
    rows = agree if bool(agree.any()) else torch.ones_like(agree)
    index = torch.nonzero(rows).squeeze(1)
    index = index[::max(1, index.numel() // CALIBRATION_ROWS)]
    target = float(initial_probs[index].to(torch.float64).amax(dim=1).mean())
    temperature = fit_temperature(log_p[index].to(torch.float64), target)  # the fit in float64
    if temperature == 1.0:
        return Calibration(probs, 1.0, target, int(rows.sum()))
    calibrated = torch.softmax(log_p / temperature, dim=1).to(probs.dtype)  # (N, C)
    return Calibration(calibrated, temperature, target, int(rows.sum()))
