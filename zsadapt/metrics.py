"""Evaluation metrics (numpy or torch in, Python floats out)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(predicted: Any, labels: Any) -> float:
    """Top-1 accuracy in percent. ``predicted`` is (N,) labels or (N, C) scores."""
    pred, true = _numpy(predicted), _numpy(labels)
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    if pred.shape != true.shape:
        raise ValueError(f"accuracy: predictions {pred.shape} and labels {true.shape} differ")
    return float(100.0 * np.mean(pred == true)) if true.size else float("nan")


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error in percent, with ``n_bins`` equal-width confidence bins
    (Guo et al., 2017): sum over bins of (bin size / N) * |accuracy(bin) - confidence(bin)|."""
    p, y = _numpy(probs).astype(np.float64), _numpy(labels)
    confidence = p.max(axis=1)  # (N,)
    correct = p.argmax(axis=1) == y  # (N,)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(100.0 * ece)
