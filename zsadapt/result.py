"""The value every solver run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .arrays import ArrayLike


@dataclass(eq=False)  # arrays have no single truth value: results compare by identity
class Result:
    """Refined predictions for a pool of N images over C classes.

    Arrays have the kind of the input image features: numpy in gives numpy out, a torch tensor in
    gives tensors on the same device.

    Attributes
    ----------
    labels : array of int64, shape (N,)
        Predicted class index per image: the argmax of ``probs`` (which is the argmax of
        ``scores`` except where a solver falls back to zero-shot, as documented on the solver).
    probs : array of float32, shape (N, C)
        Class probabilities; each row sums to 1. How a solver turns scores into probabilities is
        documented on the solver.
    scores : array of float32, shape (N, C)
        The solver's raw scores (logits, propagated label mass, log-posteriors...).
    method : str
        Registered method name.
    params : dict
        Every hyper-parameter the solver ran with, defaults included.
    info : dict
        Diagnostics: ``iterations``, ``converged``, ``seconds`` (per stage and ``total``), and any
        solver-specific entries.
    """

    labels: ArrayLike
    probs: ArrayLike
    scores: ArrayLike
    method: str
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    #: The fitted solver and its shapes (:class:`zsadapt.models.FittedSolver`), for :meth:`save`.
    fitted: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        n, c = tuple(self.probs.shape)
        kind = type(self.labels).__module__.split(".")[0]
        return f"Result(method={self.method!r}, N={n}, C={c}, arrays={kind}, info={self.info!r})"

    def confident_labels(self, min_confidence: float) -> ArrayLike:
        """``labels`` with -1 (unlabelled) wherever the top probability is below
        ``min_confidence`` (for auto-labelling: keep only predictions confident enough)."""
        if not 0.0 <= float(min_confidence) <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if isinstance(self.probs, torch.Tensor):
            keep = self.probs.amax(dim=1) >= min_confidence  # (N,) bool, on the probs' device
            labels = self.labels.clone()
        else:
            keep = self.probs.max(axis=1) >= min_confidence
            labels = self.labels.copy()
        labels[~keep] = -1
        return labels

    def save(self, path: Any, *, classnames: Any = None, overwrite: bool = False) -> Any:
        """Save the fitted model to a ``.safetensors`` file for :func:`zsadapt.load_model` and
        ``zsadapt label`` (see :func:`zsadapt.models.save_model`); returns the path."""
        from .models import save_model

        if self.fitted is None:
            raise ValueError("this Result holds no fitted model to save (it was not made by zsadapt.refine, or its pool "
                             "was one image, which fits nothing)")
        return save_model(path, self.fitted, classnames=classnames, overwrite=overwrite)

    def accuracy(self, labels: Any) -> float:
        """Top-1 accuracy in percent against ground-truth ``labels`` (N,)."""
        from .metrics import accuracy

        return accuracy(self.labels, labels)
