"""The interface every solver implements.

A solver is a class with a registered ``name``, a table of hyper-parameters (``params``), a
``fit`` that refines the predictions of a whole pool (transduction), and optionally a
``predict`` for images that were not in the pool (induction). Solvers receive validated,
L2-normalised float32 tensors on the compute device and return tensors on that device; they never
read files and never print to stdout.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from ..zeroshot import CLIP_LOGIT_SCALE, zeroshot_logits


def convergence_warning() -> type:
    """scikit-learn's ``ConvergenceWarning`` (what solvers warn with at their iteration cap),
    imported when first needed: importing scikit-learn costs about 0.9 s of every process that
    loads a solver (``zsadapt label``, each Ray actor and Spark worker), most of which never warn."""
    from sklearn.exceptions import ConvergenceWarning

    return ConvergenceWarning


class NotFittedError(RuntimeError):
    """``predict`` was called on a solver that has not been fitted."""


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: default, type (int, float, str, bool, or ``tuple``: a tuple of floats,
    given as a sequence or a comma-separated string, e.g. one value per unrolled layer), help
    text, allowed values (``minimum``/``maximum`` apply to each entry of a tuple)."""

    default: Any
    type: type
    help: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    def check(self, name: str, value: Any, solver: str) -> Any:
        """``value`` converted to this parameter's type; ``ValueError`` when out of range."""
        if value is None and self.default is None:
            return None
        if self.type is tuple:
            return self._check_tuple(name, value, solver)
        try:
            if self.type in (int, float) and isinstance(value, (bool, np.bool_)):
                raise ValueError(value)  # int(True) is 1: a flag given for a number is a mistake
            if self.type is bool and isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                converted = lowered in ("true", "1", "yes")
            elif self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            else:
                converted = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{solver}: parameter {name} must be {self.type.__name__}, got {value!r}"
            ) from None
        if isinstance(converted, float) and not math.isfinite(converted):
            raise ValueError(f"{solver}: parameter {name} must be finite, got {value!r}")
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"{solver}: parameter {name} must be one of {self.choices}, got {value!r}")
        if self.minimum is not None and converted < self.minimum:
            raise ValueError(f"{solver}: parameter {name} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and converted > self.maximum:
            raise ValueError(f"{solver}: parameter {name} must be <= {self.maximum}, got {value!r}")
        return converted

    def _check_tuple(self, name: str, value: Any, solver: str) -> tuple:
        items = value.split(",") if isinstance(value, str) else value
        try:
            if isinstance(items, (int, float)):
                items = [items]
            converted = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(
                f"{solver}: parameter {name} must be a list of numbers, got {value!r}"
            ) from None
        if not converted:
            raise ValueError(f"{solver}: parameter {name} must hold at least one number")
        scalar = Param(self.default, float, self.help, minimum=self.minimum, maximum=self.maximum)
        return tuple(scalar.check(name, v, solver) for v in converted)


@dataclass
class Problem:
    """What a solver refines.

    Attributes
    ----------
    image : (N, d) float32 tensor, unit rows
        The unlabeled pool.
    classifier : (C, d) float32 tensor, unit rows
        The initial zero-shot classifier: the class text embeddings, or another classifier in the
        same space (few-shot prototypes, InMaP proxies).
    seed : int
        Seed for every random choice the solver makes.
    progress : bool
        Whether the solver may show progress on stderr.
    initial_logits : (N, C) float32 tensor, optional
        Per-image zero-shot logits on CLIP's scale (100 x cosine) when the initial classifier is
        not one set of class vectors (AutoCLIP's per-image template weights, ZPE's weighted
        logits). Solvers that start from logits use them; solvers that need class vectors use
        ``classifier``. ``None``: the logits are ``100 * image @ classifier.T``.
    image_space : bool
        The classifier lives in image space (InMaP proxies), not text space: it lacks the
        image-text modality gap, so e.g. ZLaP min-max scales its similarities.
    analyses : dict
        Cache of :func:`zsadapt.solvers.pool_analysis.analyse_pool` (which classes the pool holds,
        and how many of each), keyed by its settings: filled on the first call, so every solver
        and stage of a fit on this problem shares one analysis. Not an argument.
    """

    image: torch.Tensor
    classifier: torch.Tensor
    seed: int = 0
    progress: bool = False
    initial_logits: Optional[torch.Tensor] = None
    image_space: bool = False
    analyses: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.image.device

    def logits(self, logit_scale: float = CLIP_LOGIT_SCALE) -> torch.Tensor:
        """The initial zero-shot logits (N, C) at ``logit_scale`` (CLIP's 100 by default):
        ``logit_scale`` x cosine similarity to the rows of ``classifier`` (Radford et al., 2021),
        or ``initial_logits`` (given on CLIP's scale) times ``logit_scale / 100``."""
        if self.initial_logits is not None:
            if logit_scale == CLIP_LOGIT_SCALE:
                return self.initial_logits
            return self.initial_logits * (logit_scale / CLIP_LOGIT_SCALE)  # (N, C)
        return zeroshot_logits(self.image, self.classifier, logit_scale)  # (N, C)


@dataclass
class SolverOutput:
    """Scores (N, C), probabilities (N, C, rows sum to 1) and diagnostics of one fit."""

    scores: torch.Tensor
    probs: torch.Tensor
    info: dict = field(default_factory=dict)


class Solver(abc.ABC):
    """Base class of all solvers. Subclasses set ``name``, ``summary``, ``reference`` and
    ``params``, implement :meth:`fit`, and may implement :meth:`predict`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    params: ClassVar[dict] = {}
    #: ``predict`` labelled new images worse than the initial classifier on at least one shared
    #: real pool, by any margin (benchmarks/fit_on_sample.py); saving a model of such a solver
    #: warns (zsadapt.models).
    inductive_below_initial: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise TypeError(f"{self.name}: unknown parameter(s) {', '.join(unknown)} (known: {known})")
        self.config = {
            key: spec.check(key, params.get(key, spec.default), self.name)
            for key, spec in self.params.items()
        }

    @abc.abstractmethod
    def fit(self, problem: Problem) -> SolverOutput:
        """Refine the predictions for every image of ``problem``."""

    def predict(self, image: torch.Tensor) -> SolverOutput:
        """Scores and probabilities for new images (M, d), unit rows, from the fitted state."""
        raise NotImplementedError(f"{self.name} has no inductive mode: refine the whole pool instead")

    def fitted_state(self) -> dict:
        """What :meth:`predict` needs, for a model file (:mod:`zsadapt.models`): by default every
        public attribute ending in ``_`` (tensors, arrays, numbers, strings, None, lists, dicts,
        dataclasses). Override it, with :meth:`load_fitted_state`, to store less or other things.
        A pending neighbour-transfer rule (:func:`zsadapt.solvers.inductive.attach_transfer`) is
        fitted first, so the file holds it."""
        from .inductive import ensure_transfer

        ensure_transfer(self)
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def __getstate__(self) -> dict:
        """Pickling and copying first fit a pending neighbour-transfer rule (it is kept outside
        the instance until used; :func:`zsadapt.solvers.inductive.attach_transfer`)."""
        from .inductive import ensure_transfer

        ensure_transfer(self)
        return dict(vars(self))

    def load_fitted_state(self, state: dict) -> None:
        """Make this (unfitted) solver the fitted one ``state`` (from :meth:`fitted_state`) describes."""
        for key, value in state.items():
            setattr(self, key, value)
