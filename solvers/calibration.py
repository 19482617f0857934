"""Label-free calibration of a method's probabilities: labels unchanged, confidences that mean
what they say.

A refined method's probabilities are often far more confident than its accuracy (on the Stanford
Cars text pool, ``gmm``'s mean top-1 probability is 1.00 at 61% accuracy). Without labels there
are two sources of confidence for the method's label y_i of image i: the method's own
probabilities, which see the pool but are overconfident in their own mistakes, and the initial
(zero-shot) classifier's probability p0_i(y_i), which CLIP's learned logit scale makes roughly
calibrated (Cars: ECE 4.9%) but which is blind to what the method learned from the pool. Their
ranking of images is not alike: on Cars, p0_i(y_i) tells right from wrong labels better than the
method's own confidence for 10 of the 11 methods (AUROC 0.77-0.92 against 0.63-0.80). So:

1. **One temperature** T for the method's log-probabilities l (N, C), m_i = softmax(l_i / T),
   fitted by *agreement matching*: on the set A of images where the method's label equals the
   initial classifier's, mean_{i in A} max_c m_ic = mean_{i in A} max_c p0_ic. There the two labels
   are the same, so zero-shot's top probability is a label-free estimate of how often it is right.
   (When they agree nowhere, A is every image.) Mean max_c m_ic falls as T grows: bisection.
2. **Pooled confidence**: the two opinions are combined by a log-linear pool with equal weights
   (neither is known to be better without labels), r_i ∝ sqrt(p0_i * m_i), and the confidence of the
   method's label is c_i = r_i(y_i). Where the method is the initial classifier, c_i = max p0_i.
3. **The row**: softmax(l_i / t_i), with the per-image temperature t_i > 0 whose top probability is
   c_i (Newton's method per row). A temperature keeps the row's order of classes, so the labels are the
   method's, bit for bit (``refine`` takes them from the published probabilities).

Limits (measured by benchmarks/calibration.py, tested in tests/test_calibration.py): the targets
come from the initial classifier, so a method far more accurate than it is left underconfident by
about its gain, and an initial classifier that is itself miscalibrated (image-space prototypes at
CLIP's logit scale) passes its miscalibration on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Rows of A used to fit T (evenly spaced): a mean over a few thousand rows is as good as over all.
CALIBRATION_ROWS = 4096

#: Bracket of every bisection on a temperature. Far below T_MIN a row's top probability is 1 and far
#: above T_MAX it is 1 / (its finite entries) for the log-probabilities solvers return; a target out
#: of reach gets the nearer end.
T_MIN, T_MAX = 1e-3, 1e6

#: Bisection steps on log T: the bracket's width 20.7 / 2^28, T to 8e-8 relative.
STEPS = 28

#: Newton steps of the per-image temperatures (:func:`row_temperatures`) and their tolerance on
#: log(top probability); from the flattest row, 5-10 steps reach 1e-6.
NEWTON_STEPS, NEWTON_TOL = 30, 1e-6

#: The flattest row a per-image temperature may give still puts its label ahead of the runner-up by
#: this much in log-probability (a ratio of 1.00001, some 80 float32 ulps): a pool that doubts a
#: label (c_i below 1/C, out of any distribution's reach) gets a nearly flat row, never a tie.
MIN_MARGIN = 1e-5

#: Rows per chunk of the per-image bisection (bounds its temporaries to a few (rows, C) arrays).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Calibration:
    """The outcome of :func:`calibrate`.

    Attributes
    ----------
    probs : (N, C) tensor, rows sum to 1
        softmax(l_i / t_i) per image, same dtype and device as the input probabilities.
    temperature : float
        T of step 1 (the method's tempered opinion m = softmax(l / T)).
    target : float
        Mean zero-shot top-1 probability over the rows T was fitted on.
    rows : int
        Images in A (method and initial classifier agree); all N when they agree nowhere.
    confidence : float
        Mean top-1 probability of the calibrated rows, mean_i c_i.
    """

    probs: torch.Tensor
    temperature: float
    target: float
    rows: int
    confidence: float

    def info(self) -> dict:
        """For ``Result.info["calibration"]``: plain floats and ints."""
        return {"temperature": self.temperature, "target": self.target, "rows": self.rows,
                "confidence": self.confidence}


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


def _confidence(gaps: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """max_c softmax(l / t)_c = 1 / sum_c exp((l_c - max l) / t) per row; ``gaps`` (n, C) is
    l - max l (<= 0, -inf allowed), ``temperature`` a scalar or (n, 1)."""
    return 1.0 / torch.exp(gaps / temperature).sum(dim=1)


def fit_temperature(log_p: torch.Tensor, target: float, *, t_min: float = T_MIN,
                    t_max: float = T_MAX) -> float:
    """T in [t_min, t_max] with mean_i max_c softmax(l_i / T)_c == ``target`` (bisection on
    log T); the nearer end when the target is out of reach; exactly 1.0 when T = 1 is within 1e-6.

    Parameters
    ----------
    log_p : (n, C) log-probabilities (or log-posteriors up to a per-row constant), rows with a
        finite maximum
    target : mean top-1 probability wanted, in [1/C, 1]
    t_min, t_max : the bracket of the bisection
    """
    gaps = log_p - log_p.amax(dim=1, keepdim=True)  # (n, C)

    def mean_confidence(log_t: float) -> float:
        return float(_confidence(gaps, math.exp(log_t)).mean())

    if abs(mean_confidence(0.0) - target) <= 1e-6:
        return 1.0
    low, high = math.log(t_min), math.log(t_max)
    if mean_confidence(low) <= target:
        return t_min
    if mean_confidence(high) >= target:
        return t_max
    for _ in range(STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_confidence(middle) > target else (low, middle)
    return math.exp((low + high) / 2)


def row_temperatures(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row i, t_i with max_c softmax(l_i / t_i)_c == targets_i, within
    [T_MIN, min(T_MAX, (l_top - l_second) / MIN_MARGIN)]; (n,) in the dtype of ``log_p``.

    In the inverse temperature u = 1 / t, with gaps g_c = l_c - max l <= 0, the equation is
    f(u) = log sum_c exp(u g_c) + log target = 0, f convex and decreasing (f'(u) = E_u[g] <= 0).
    Newton's method from the flattest allowed row (the smallest u, where f >= 0 unless the target
    is out of reach) then climbs to the root without overshooting it (a convex function lies
    above its tangents), quadratically near it: a few passes over (n, C) instead of a bisection's 40.
    """
    gaps = log_p - log_p.amax(dim=1, keepdim=True)  # (n, C), <= 0, -inf allowed
    finite_gaps = torch.where(torch.isfinite(gaps), gaps, torch.zeros_like(gaps))
    if gaps.shape[1] > 1:
        margin = -torch.topk(gaps, 2, dim=1).values[:, 1]  # (n,) l_top - l_second
    else:
        margin = torch.full_like(targets, math.inf)
    u = (MIN_MARGIN / margin).clamp(1.0 / T_MAX, 1.0 / T_MIN)  # (n,) the flattest allowed row
    log_target = torch.log(targets)
    for _ in range(NEWTON_STEPS):
        weights = torch.exp(gaps * u[:, None])  # (n, C)
        total = weights.sum(dim=1)  # (n,)
        f = torch.log(total) + log_target  # > 0: the row is still too flat
        slope = (finite_gaps * weights).sum(dim=1) / total  # (n,) E_u[g] <= 0
        climb = (f > NEWTON_TOL) & (slope < 0)
        if not bool(climb.any()):
            break
        u = torch.where(climb, (u - f / slope.clamp(max=-torch.finfo(slope.dtype).tiny)).clamp(max=1.0 / T_MIN), u)
    return 1.0 / u


def calibrate(scores: torch.Tensor, probs: torch.Tensor, initial_probs: torch.Tensor) -> Calibration:
    """Calibrate a method's probabilities without labels (the three steps of the module docstring).

    Parameters
    ----------
    scores, probs : (N, C) tensors
        A solver's output (:class:`~zsadapt.solvers.SolverOutput`); its labels are
        ``probs.argmax(dim=1)``, and the calibrated rows keep them.
    initial_probs : (N, C) tensor
        The initial classifier's probabilities on the same images, e.g.
        ``softmax(problem.logits())``.

    Returns
    -------
    Calibration
        The calibrated ``probs`` (dtype of ``probs``), T, its target, |A| and the mean confidence.
        A method whose probabilities are the initial ones (``zeroshot``) is returned as it is.
    """
    if probs.shape != initial_probs.shape:
        raise ValueError(f"calibrate: probabilities {tuple(probs.shape)} and initial probabilities "
                         f"{tuple(initial_probs.shape)} differ")
    if probs.shape[0] == 0:
        return Calibration(probs, 1.0, float("nan"), 0, float("nan"))
    log_p = log_probabilities(scores, probs)  # (N, C)
    labels = probs.argmax(dim=1)  # (N,)
    agree = labels == initial_probs.argmax(dim=1)  # (N,) the set A
    rows = agree if bool(agree.any()) else torch.ones_like(agree)
    index = torch.nonzero(rows).squeeze(1)
    index = index[::max(1, index.numel() // CALIBRATION_ROWS)]
    target = float(initial_probs[index].to(torch.float64).amax(dim=1).mean())
    temperature = fit_temperature(log_p[index].to(torch.float64), target)  # step 1, in float64
    if temperature == 1.0 and torch.equal(probs, initial_probs):
        return Calibration(probs, 1.0, target, int(rows.sum()), float(probs.amax(dim=1).mean()))
    out = torch.empty_like(probs)
    log_initial = torch.log(initial_probs)
    chunk = max(1, CHUNK_ELEMENTS // max(1, probs.shape[1]))
    for start in range(0, probs.shape[0], chunk):
        part = slice(start, start + chunk)
        log_m = torch.log_softmax(log_p[part] / temperature, dim=1)  # (b, C) step 1
        pooled = torch.softmax(0.5 * (log_initial[part] + log_m), dim=1)  # (b, C) step 2: r ∝ sqrt(p0 m)
        confidence = pooled.gather(1, labels[part, None]).squeeze(1)  # (b,) c_i = r_i(y_i)
        t = row_temperatures(log_p[part], confidence)  # (b,) step 3
        out[part] = torch.softmax(log_p[part] / t[:, None], dim=1)
    return Calibration(out, temperature, target, int(rows.sum()), float(out.amax(dim=1).mean()))
