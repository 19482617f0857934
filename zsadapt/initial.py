"""The initial classifier a solver starts from: prompt weighting, then optionally InMaP proxies.

Data flow (before any solver runs)::

    text (C, d) or (C, P, d) --weighting--> class vectors (C, d) [+ per-image logits (N, C)]
                             --initial---->  "text": as is
                                             "inmap": InMaP vision proxies (C, d), image space

The result is a :class:`~zsadapt.solvers.Problem`: ``classifier`` holds class vectors (what
graph and mixture solvers need), ``initial_logits`` the per-image logits where they are not
``100 X classifier^T`` (ZPE, AutoCLIP; solvers that start from logits use them), and
``image_space`` tells solvers that the classifier is an image-space one (ZLaP then min-max scales
its similarities, as the official code does for InMaP proxies).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import solvers
from .memory import check_result_fits
from .prompts import WEIGHTINGS, build_ensemble

INITIALS = ("text", "inmap")


def read_init_alias(initial: str, params: dict) -> tuple:
    """``(initial, params)`` with ``init="inmap"`` (the spelling of ZLaP's and TransCLIP's papers)
    read as ``initial="inmap"`` and taken out of the method's ``params``."""
    if params.get("init") != "inmap":
        return initial, params
    if initial not in ("text", "inmap"):
        raise ValueError(f"init='inmap' and initial={initial!r} disagree: give one of them")
    return "inmap", {k: v for k, v in params.items() if k != "init"}


def initial_problem(
    X: torch.Tensor,
    T: torch.Tensor,
    *,
    weighting: str = "mean",
    initial: str = "text",
    initial_params: Optional[dict] = None,
    logit_scale: Optional[float] = None,
    seed: int = 0,
    progress: bool = False,
) -> solvers.Problem:
    """The :class:`Problem` for validated features.

    Parameters
    ----------
    X : (N, d) unit rows
    T : (C, d) unit rows, or (C, P, d) unit template embeddings
    weighting : {"mean", "zpe", "autoclip"}
        How templates are combined (:mod:`zsadapt.prompts`); only "mean" for (C, d) text.
    initial : {"text", "inmap"}
        Start from the (weighted) text classifier, or from InMaP proxies learned from it.
    initial_params : dict, optional
        Hyper-parameters of the InMaP run for ``initial="inmap"`` (defaults otherwise).
    logit_scale : float, optional
        The method's zero-shot logit scale (an encoder with another similarity range): the InMaP
        run's too, unless ``initial_params`` names one.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if initial not in INITIALS:
        raise ValueError(f"initial must be one of {', '.join(INITIALS)}, got {initial!r}")
    if initial_params and initial != "inmap":
        raise ValueError("initial_params are only used with initial='inmap'")
    check_result_fits(X.shape[0], T.shape[0], X.device)
    if T.ndim == 3:
        ens = build_ensemble(X, T, weighting)
        problem = solvers.Problem(X, ens.classifier, seed=seed, progress=progress, initial_logits=ens.logits)
    elif weighting != "mean":
        raise ValueError(
            f"weighting={weighting!r} needs per-template text features (C, P, d), got shape {tuple(T.shape)}"
        )
    else:
        problem = solvers.Problem(X, T, seed=seed, progress=progress)
    if initial == "inmap":
        inherited = {} if logit_scale is None else {"logit_scale": logit_scale}
        inmap = solvers.get_solver("inmap")(**{**inherited, **(initial_params or {})})
        inmap.fit(problem)
        problem = solvers.Problem(X, inmap.proxies_, seed=seed, progress=progress, image_space=True)
    return problem
