"""The zero-shot baseline: no refinement, the initial classifier's softmax (logit scale 100)."""

from __future__ import annotations

import torch

from ..zeroshot import zeroshot_logits
from . import register
from .base import NotFittedError, Param, Problem, Solver, SolverOutput


@register
class ZeroShotSolver(Solver):
    name = "zeroshot"
    summary = "cosine similarity to the class embeddings x logit scale, softmax (the baseline)"
    reference = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    params = {
        "logit_scale": Param(100.0, float, "multiplier of the cosine similarities", minimum=1e-6),
    }

    def fit(self, problem: Problem) -> SolverOutput:
        self.classifier_ = problem.classifier
        if problem.initial_logits is not None:
            logits = problem.logits(self.config["logit_scale"])  # (N, C) per-image logits (AutoCLIP, ZPE)
            return SolverOutput(logits, torch.softmax(logits, dim=1), {"iterations": 0, "converged": True})
        out = self.predict(problem.image)
        out.info.update(iterations=0, converged=True)
        return out

    def predict(self, image: torch.Tensor) -> SolverOutput:
        if not hasattr(self, "classifier_"):
            raise NotFittedError("zeroshot: call fit first")
        logits = zeroshot_logits(image, self.classifier_, self.config["logit_scale"])  # (N, C)
        return SolverOutput(scores=logits, probs=torch.softmax(logits, dim=1))
