"""How calibrated are ZLaP's probabilities, and does a label-free power on the mass fix them?

ZLaP's ``probs`` divide each row of propagated label mass z (N, C) by its sum. Candidates, all
keeping the argmax (so accuracy) unchanged, p_beta ∝ z^beta = softmax(beta * log z):

* ``raw``: beta = 1 (what zlap returns today);
* ``match-zs``: beta such that the mean top-1 probability equals the zero-shot softmax's (CLIP's
  logit scale is itself fitted to be roughly calibrated) — no labels;
* ``nll-zs``: beta minimising the negative log-likelihood of the zero-shot argmax labels (pseudo
  labels) — no labels;
* ``oracle``: beta minimising the ECE on the true labels (grid over 0.1..100): the best a single
  power can do (uses labels; a reference, not a method).

Prints ECE (%) of each, and the betas, as a Markdown table, also written to the docs site's
results page ``docs/results/zlap_calibration.md``. Run: ``python benchmarks/zlap_calibration.py``
(with ``ZSADAPT_DATA`` set, the real pools are added).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_softmax

import zsadapt
from results_page import echo, write_page
from zsadapt.shared_pools import load_shared_pool


def powered(log_mass: np.ndarray, beta: float) -> np.ndarray:
    """softmax(beta * log z) row-wise: p ∝ z^beta."""
    return np.exp(log_softmax(beta * log_mass, axis=1))


def nll(log_mass: np.ndarray, labels: np.ndarray, beta: float) -> float:
    return float(-log_softmax(beta * log_mass, axis=1)[np.arange(len(labels)), labels].mean())


def fit_nll(log_mass: np.ndarray, labels: np.ndarray) -> float:
    res = minimize_scalar(lambda b: nll(log_mass, labels, np.exp(b)), bounds=(-5, 6), method="bounded")
    return float(np.exp(res.x))


def fit_confidence(log_mass: np.ndarray, target: float) -> float:
    """beta with mean top-1 probability == target (monotone in beta)."""
    f = lambda b: powered(log_mass, np.exp(b)).max(axis=1).mean() - target  # noqa: E731
    lo, hi = -5.0, 8.0
    if f(lo) > 0 or f(hi) < 0:
        return float(np.exp(lo if f(lo) > 0 else hi))
    return float(np.exp(brentq(f, lo, hi, xtol=1e-4)))


def main() -> None:
    pools = [("synthetic demo", zsadapt.make_pool())]
    root = os.environ.get("ZSADAPT_DATA")
    if root:
        pools.append(("stanford_cars_val", load_shared_pool(root, "stanford_cars_val")))
        for name in ("dtd", "ucf101", "oxford_pets"):
            pools.append((f"{name} (1-shot)", load_shared_pool(root, name)))
    lines: list = []
    echo(lines, "| pool | acc zs | acc zlap | ECE zs | ECE raw | ECE match-zs | ECE nll-zs | ECE oracle | "
                "betas (match-zs, nll-zs, oracle) |")
    echo(lines, "|---" * 9 + "|")
    for name, pool in pools:
        zs = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
        zl = zsadapt.refine(pool.image_features, pool.text_features, "zlap")
        y = pool.labels
        log_mass = np.log(np.clip(zl.scores.astype(np.float64), 1e-30, None))  # (N, C)
        betas = {
            "raw": 1.0,
            "match-zs": fit_confidence(log_mass, zs.probs.max(axis=1).mean()),
            "nll-zs": fit_nll(log_mass, zs.labels),
        }
        grid = np.exp(np.linspace(np.log(0.1), np.log(100.0), 61))
        betas["oracle"] = float(min(grid, key=lambda b: zsadapt.expected_calibration_error(powered(log_mass, b), y)))
        ece = {k: zsadapt.expected_calibration_error(powered(log_mass, b), y) for k, b in betas.items()}
        echo(lines, f"| {name} | {zsadapt.accuracy(zs.labels, y):.2f} | {zsadapt.accuracy(zl.labels, y):.2f} | "
                    f"{zsadapt.expected_calibration_error(zs.probs, y):.2f} | {ece['raw']:.2f} | "
                    f"{ece['match-zs']:.2f} | {ece['nll-zs']:.2f} | {ece['oracle']:.2f} | "
                    f"{betas['match-zs']:.2f}, {betas['nll-zs']:.2f}, {betas['oracle']:.2f} |")
    page = write_page("zlap_calibration", "How calibrated are ZLaP's probabilities?", "\n".join(lines), intro=(
        "Accuracy and expected calibration error (ECE, %) of ZLaP's probabilities p ∝ z^beta for four "
        "choices of beta (all keep the labels): `raw` beta = 1, `match-zs` matches the zero-shot mean "
        "confidence (zsadapt's default, `calibration=\"zeroshot\"`), `nll-zs` fits the zero-shot "
        "labels, `oracle` minimises the ECE on the true labels (a reference, not a method)."))
    print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
