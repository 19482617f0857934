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
   (When they agree nowhere, A is every image.) Mean max_c m_ic falls as T grows: a safeguarded
   Newton search on log T (:func:`fit_temperature`).
2. **Pooled confidence**: the two opinions are combined by a log-linear pool with equal weights
   (neither is known to be better without labels), r_i ∝ sqrt(p0_i * m_i), and the confidence of the
   method's label is c_i = r_i(y_i). Where the method is the initial classifier, c_i = max p0_i.
3. **The row**: softmax(l_i / t_i), with the per-image temperature t_i > 0 whose top probability is
   c_i (Newton's method per row, all rows at once). A temperature keeps the row's order of
   classes, so the labels are the method's, bit for bit (``refine`` takes them from the published
   probabilities).

Limits (measured by benchmarks/calibration.py, tested in tests/test_calibration.py): the targets
come from the initial classifier, so a method far more accurate than it is left underconfident by
about its gain, and an initial classifier that is itself miscalibrated (image-space prototypes at
CLIP's logit scale) passes its miscalibration on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

#: Rows of A used to fit T (evenly spaced): a mean over a few thousand rows is as good as over all.
CALIBRATION_ROWS = 4096

#: Bracket of every search for a temperature. Far below T_MIN a row's top probability is 1 and far
#: above T_MAX it is 1 / (its finite entries) for the log-probabilities solvers return; a target out
#: of reach gets the nearer end.
T_MIN, T_MAX = 1e-3, 1e6

#: Bisection steps on log T: the bracket's width 20.7 / 2^28, T to 8e-8 relative; the safeguarded
#: Newton search of :func:`fit_temperature` takes at most 4 x STEPS evaluations.
STEPS = 28

#: :func:`fit_temperature` stops when its Newton step in log T is below this (T to 1e-8 relative,
#: finer than the bisection's 8e-8 it replaced).
NEWTON_STOP = 1e-8

#: Newton steps of the per-image temperatures (:func:`row_temperatures`) and their tolerance on
#: log(top probability); from the flattest row, 5-10 steps reach 1e-6.
NEWTON_STEPS, NEWTON_TOL = 30, 1e-6

#: The flattest row a per-image temperature may give still puts its label ahead of the runner-up by
#: this much in log-probability (a ratio of 1.00001, some 80 float32 ulps): a pool that doubts a
#: label (c_i below 1/C, out of any distribution's reach) gets a nearly flat row, never a tie.
MIN_MARGIN = 1e-5

#: Classes of the warm start of both temperature solves: the same equation on each row's top k
#: classes, whose root bounds the true one (:func:`fit_temperature`, :func:`row_temperatures`).
WARM_START_CLASSES = 16

#: Elements per chunk of the per-image temperatures (bounds its temporaries to a few (rows, C) arrays).
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
        if bool(torch.isfinite(log_p.amax(dim=1)).all()) and _softmax_matches(log_p, probs, 1e-4):
            return log_p
    return torch.log(probs)


def _softmax_matches(log_p: torch.Tensor, probs: torch.Tensor, tol: float) -> bool:
    """max |exp(log_p) - probs| <= ``tol`` (False where NaN), over (N, C) in row chunks: no
    (N, C) temporaries, and a mismatch stops at its chunk."""
    chunk = max(1, CHUNK_ELEMENTS // max(1, probs.shape[1]))
    for start in range(0, probs.shape[0], chunk):
        part = slice(start, start + chunk)
        if not float((log_p[part].exp() - probs[part]).abs().max()) <= tol:
            return False
    return True


def _finite(gaps: torch.Tensor) -> torch.Tensor:
    """``gaps`` with -inf (probability 0) as 0, the weight such a class has in a slope sum_c g_c
    w_c. Where every gap is finite (log-softmax scores) the gaps themselves, without an (n, C)
    copy: the copy was a third of the temperature search's time at 6,400 x 1000."""
    return gaps if bool(torch.isfinite(gaps).all()) else torch.where(torch.isfinite(gaps), gaps, 0.0)


def _confidence(gaps: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """max_c softmax(l / t)_c = 1 / sum_c exp((l_c - max l) / t) per row; ``gaps`` (n, C) is
    l - max l (<= 0, -inf allowed), ``temperature`` a scalar or (n, 1)."""
    return 1.0 / torch.exp(gaps / temperature).sum(dim=1)


def _mean_confidence(gaps: torch.Tensor, finite_gaps: torch.Tensor, log_t: float,
                     work: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """(h, h') at s = ``log_t``: h(s) = mean_i max_c softmax(l_i / e^s)_c and its derivative in s,
    h'(s) = mean_i c_i E_i[g] / e^s <= 0 (E_i the mean of the gaps g under row i's tempered
    softmax); one pass over (n, C). ``work``: two (n, C) buffers to compute in (a fresh (n, C)
    tensor costs its page faults at every call, as much as the arithmetic: 76 -> 27 ms a call at
    6,453 x 1000, one thread)."""
    t = math.exp(log_t)
    weights = torch.div(gaps, t, out=work[0]).exp_()  # (n, C)
    total = weights.sum(dim=1)  # (n,)
    confidence = 1.0 / total  # (n,)
    expected_gap = torch.mul(finite_gaps, weights, out=work[1]).sum(dim=1) / total  # (n,) E_i[g] <= 0
    return float(confidence.mean()), float((confidence * expected_gap).mean()) / t


def _solve_log_temperature(gaps: torch.Tensor, target: float, low: float, high: float,
                           start: float) -> float:
    """s in [low, high] with h(s) == target, h the mean confidence at T = e^s of the rows whose
    gaps (l - max l) are ``gaps`` (:func:`fit_temperature`): safeguarded Newton from ``start``."""
    finite_gaps = _finite(gaps)
    work = (torch.empty_like(gaps), torch.empty_like(gaps))  # (n, C) each, for every evaluation
    ends = (low, high)
    s = min(max(start, low), high)
    value, slope = _mean_confidence(gaps, finite_gaps, s, work)
    low_checked = high_checked = False  # whether an end of the bracket was evaluated
    for _ in range(4 * STEPS):
        if s == ends[1] and value >= target:
            return s  # the target is out of reach: the flat end
        if s == ends[0] and value <= target:
            return s  # the sharp end
        if value == target and slope < 0:
            # The root itself, where h is strictly decreasing: no smaller T gives the target.
            # (Treated as a plateau, this exact hit sent the search to the bracket's far end and
            # back by bisection: about 30 more passes over (n, C), 5.3 of the 6.2 s it took on
            # 6,476 x 1000 rows, one thread of a busy machine.)
            return s
        if value > target:  # too confident: the root lies above s
            low, low_checked = s, True
        else:  # on a plateau where h == target (saturated rows), the smallest such T
            high, high_checked = s, True
        if high - low <= NEWTON_STOP:
            break
        step = (value - target) / slope if slope < 0 and value != target else math.inf
        proposal = s - step
        if abs(step) <= NEWTON_STOP and low < proposal < high:
            return proposal  # converged (quadratically): T to NEWTON_STOP relative
        if not low < proposal < high:  # Newton leaves the bracket
            if proposal >= high and not high_checked:
                proposal = high  # try the end once: the target may be out of reach
            elif proposal <= low and not low_checked:
                proposal = low
            else:
                proposal = (low + high) / 2
        if abs(proposal - s) <= NEWTON_STOP:
            break
        s = proposal
        value, slope = _mean_confidence(gaps, finite_gaps, s, work)
    return s


def fit_temperature(log_p: torch.Tensor, target: float, *, t_min: float = T_MIN,
                    t_max: float = T_MAX) -> float:
    """T in [t_min, t_max] with mean_i max_c softmax(l_i / T)_c == ``target``; the nearer end when
    the target is out of reach; exactly 1.0 when T = 1 is within 1e-6.

    The mean confidence h(s) at s = log T is continuous and decreasing, so the root is unique
    wherever h changes at all (on a plateau, the smallest T). It is found by Newton's method on s
    with the analytic derivative (:func:`_mean_confidence`), safeguarded by a bracket that each
    evaluation shrinks (a step that leaves it is a bisection instead). The start: the same equation
    for the rows' top ``WARM_START_CLASSES`` classes alone, solved on that (n, k) slice. Dropping
    classes only raises each row's top probability, so that root lies at or above the true one:
    Newton then needs a few passes over (n, C) (3-6 measured, where a bisection takes 30) and stops
    when its step in log T is below ``NEWTON_STOP`` or the bracket narrower than that.

    Parameters
    ----------
    log_p : (n, C) log-probabilities (or log-posteriors up to a per-row constant), rows with a
        finite maximum
    target : mean top-1 probability wanted, in [1/C, 1]
    t_min, t_max : the bracket of the search
    """
    gaps = log_p - log_p.amax(dim=1, keepdim=True)  # (n, C)
    low, high = math.log(t_min), math.log(t_max)
    top = torch.topk(gaps, WARM_START_CLASSES, dim=1).values if gaps.shape[1] > WARM_START_CLASSES else None  # (n, k)
    if low <= 0.0 <= high and _temperature_one_fits(gaps, top, target):
        return 1.0
    start = 0.0 if top is None else _solve_log_temperature(top, target, low, high, 0.0)
    s = _solve_log_temperature(gaps, target, low, high, start)
    return t_min if s == low else t_max if s == high else math.exp(s)


def _temperature_one_fits(gaps: torch.Tensor, top: Optional[torch.Tensor], target: float) -> bool:
    """Whether T = 1 gives the mean confidence ``target`` within 1e-6 (:func:`fit_temperature`).

    ``top`` (n, k), each row's k largest gaps in decreasing order, settles most pools without the
    pass over ``gaps`` (n, C): the C - k other terms of a row's sum sum_c exp(g_c) lie between 0 and
    (C - k) exp(g_k), so its top probability lies between 1 / (S_k + (C - k) exp(g_k)) and 1 / S_k,
    S_k the sum over the top k; where the mean of either bound is more than 1e-6 from the target
    on the far side, so is the mean confidence itself."""
    if top is not None:
        partial = torch.exp(top).sum(dim=1)  # (n,) S_k
        rest = (gaps.shape[1] - top.shape[1]) * torch.exp(top[:, -1])  # (n,) (C - k) exp(g_k)
        if float((1.0 / partial).mean()) < target - 1e-6 or float((1.0 / (partial + rest)).mean()) > target + 1e-6:
            return False
    return abs(float(_confidence(gaps, 1.0).mean()) - target) <= 1e-6


def _newton_rows(gaps: torch.Tensor, u: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """Newton's method on f(u) = log sum_c exp(u g_c) + log target, per row, from ``u`` (n,) where
    f(u) >= 0 (:func:`row_temperatures`); only the rows not yet converged are computed on."""
    finite_gaps = _finite(gaps)
    u = u.clone()
    active = torch.arange(gaps.shape[0], device=gaps.device)
    for _ in range(NEWTON_STEPS):
        if active.numel() == 0:
            break
        every = active.numel() == gaps.shape[0]  # the first steps: no (a, C) gather
        g, ua = (gaps, u) if every else (gaps[active], u[active])
        weights = torch.exp(g * ua[:, None])  # (a, C)
        total = weights.sum(dim=1)  # (a,)
        f = torch.log(total) + log_target[active]  # > 0: the row is still too flat
        slope = ((finite_gaps if every else finite_gaps[active]) * weights).sum(dim=1) / total  # (a,) E_u[g] <= 0
        climb = (f > NEWTON_TOL) & (slope < 0)
        active = active[climb]
        step = f[climb] / slope[climb].clamp(max=-torch.finfo(slope.dtype).tiny)
        u[active] = (ua[climb] - step).clamp(max=1.0 / T_MIN)
    return u


def row_temperatures(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row i, t_i with max_c softmax(l_i / t_i)_c == targets_i, within
    [T_MIN, min(T_MAX, (l_top - l_second) / MIN_MARGIN)]; (n,) in the dtype of ``log_p``.

    In the inverse temperature u = 1 / t, with gaps g_c = l_c - max l <= 0, the equation is
    f(u) = log sum_c exp(u g_c) + log target = 0, f convex and decreasing (f'(u) = E_u[g] <= 0).
    Newton's method from a u where f >= 0 climbs to the root without overshooting it (a convex
    function lies above its tangents), quadratically near it. The start: the flattest allowed row
    (the smallest u), moved up to the root of the same equation on the row's top
    ``WARM_START_CLASSES`` classes alone (solved the same way on that (n, k) slice): dropping
    classes only raises the top probability, so that root lies at or below the true one, f >= 0
    there still, and the climb over (n, C) takes a few steps for the rows that need it.
    """
    gaps = log_p - log_p.amax(dim=1, keepdim=True)  # (n, C), <= 0, -inf allowed
    top = torch.topk(gaps, min(WARM_START_CLASSES, gaps.shape[1]), dim=1).values  # (n, k) in decreasing order
    if gaps.shape[1] > 1:
        margin = -top[:, 1]  # (n,) l_top - l_second
    else:
        margin = torch.full_like(targets, math.inf)
    u = (MIN_MARGIN / margin).clamp(1.0 / T_MAX, 1.0 / T_MIN)  # (n,) the flattest allowed row
    log_target = torch.log(targets)
    if gaps.shape[1] > WARM_START_CLASSES:
        u = torch.maximum(u, _newton_rows(top, u, log_target))
    return 1.0 / _newton_rows(gaps, u, log_target)


def _fit_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of at most about ``CALIBRATION_ROWS`` evenly spaced rows of the (N,) mask ``rows``."""
    index = torch.nonzero(rows).squeeze(1)
    return index[::max(1, index.numel() // CALIBRATION_ROWS)]


def _target(initial_probs: torch.Tensor, index: torch.Tensor) -> float:
    """Step 1's target: the initial classifier's mean top-1 probability over the rows ``index``
    (:func:`_fit_rows`)."""
    return float(initial_probs[index].to(torch.float64).amax(dim=1).mean())


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
    if torch.equal(probs, initial_probs):  # the initial classifier itself: T = 1, c_i = max p0_i
        every = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        return Calibration(probs, 1.0, _target(initial_probs, _fit_rows(every)), probs.shape[0],
                           float(probs.amax(dim=1).mean()))
    log_p = log_probabilities(scores, probs)  # (N, C)
    labels = probs.argmax(dim=1)  # (N,)
    agree = labels == initial_probs.argmax(dim=1)  # (N,) the set A
    rows = agree if bool(agree.any()) else torch.ones_like(agree)
    index = _fit_rows(rows)
    target = _target(initial_probs, index)
    temperature = fit_temperature(log_p[index].to(torch.float64), target)  # step 1, in float64
    out = torch.empty_like(probs)
    chunk = max(1, CHUNK_ELEMENTS // max(1, probs.shape[1]))
    for start in range(0, probs.shape[0], chunk):
        part = slice(start, start + chunk)
        log_m = torch.log_softmax(log_p[part] / temperature, dim=1)  # (b, C) step 1
        pooled = torch.softmax(0.5 * (torch.log(initial_probs[part]) + log_m), dim=1)  # (b, C) step 2: r ∝ sqrt(p0 m)
        confidence = pooled.gather(1, labels[part, None]).squeeze(1)  # (b,) c_i = r_i(y_i)
        t = row_temperatures(log_p[part], confidence)  # (b,) step 3
        out[part] = torch.softmax(log_p[part] / t[:, None], dim=1)
    return Calibration(out, temperature, target, int(rows.sum()), float(out.amax(dim=1).mean()))
