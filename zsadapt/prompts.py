"""Zero-shot classifiers from per-template text embeddings (prompt ensembles).

Text features may come per prompt template: an array (C, P, d), one unit embedding per class and
template. Three ways to turn them into the zero-shot classifier every solver starts from:

* ``"mean"``: the standard ensemble (Radford et al., 2021): the L2-normalised mean over templates
  of the unit template embeddings; one (C, d) classifier.
* ``"zpe"``: ZPE, the test-only variant (Allingham et al., "A Simple Zero-shot Prompt Weighting
  Technique to Improve Prompt Ensembling in Text-Image Models", ICML 2023). With template logits
  l[n, c, p] = 100 x_n . t[c, p] and their pool mean mu[c, p] = mean_n l[n, c, p], each template
  scores s[p] = mean_n max_c (l[n, c, p] - mu[c, p]) (how confidently it separates images beyond its
  own class bias); the weights are w = softmax(s) and the logits sum_p w[p] l[n, c, p]. The class
  vectors are the L2-normalised sum_p w[p] t[c, p].
* ``"autoclip"``: AutoCLIP (Metzen et al., "Auto-tuning Zero-Shot Classifiers for Vision-Language
  Models", TMLR 2024): per-image template weights w[n] = softmax(rho[n]). Starting from uniform
  weights (rho = 0), one gradient-ascent step on the log-sum-exp over classes of the logits
  s[n, c] = sum_p w[n, p] l[n, c, p]: rho[n] = t[n] * d lse(s[n]) / d rho, with the step t[n]
  found by bisection so that the entropy of w[n] is 0.85 x log2(P) (the paper's target). Vectorised
  over the pool (all images bisect together). The logits are per image, so there is no single
  class-vector classifier: ``classifier`` is the mean ensemble, and solvers that start from logits
  use the per-image ``logits``.

Large pools are processed in chunks of images so that no (N, C, P) array is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .arrays import like_input, resolve_device, to_tensor
from .messages import note
from .validation import NORM_TOLERANCE, prepare_features

WEIGHTINGS = ("mean", "zpe", "autoclip")
#: CLIP's logit scale, on which template logits are computed.
LOGIT_SCALE = 100.0
#: AutoCLIP's target entropy, as a fraction of the uniform weights' entropy log2(P).
AUTOCLIP_ENTROPY_FRACTION = 0.85


@dataclass
class PromptEnsemble:
    """A zero-shot classifier built from template embeddings.

    Attributes
    ----------
    classifier : (C, d), unit rows
        Class vectors (the mean ensemble for ``"autoclip"``).
    logits : (N, C) or None
        Per-image logits on CLIP's scale when they are not ``100 * X @ classifier.T`` (ZPE's
        weighted template logits, AutoCLIP's per-image ensembles); ``None`` for ``"mean"``.
    weights : (P,) or (N, P)
        Template weights (each row sums to 1): uniform, ZPE's, or AutoCLIP's per image.
    weighting : str
    """

    classifier: Any
    logits: Optional[Any]
    weights: Any
    weighting: str


def _chunk(n_classes: int, n_templates: int) -> int:
    """Images per chunk so that a (chunk, C, P) block holds at most 2^24 floats."""
    return max(1, (1 << 24) // max(1, n_classes * n_templates))


def template_logits(image: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """l[n, c, p] = 100 x_n . t[c, p] for a chunk of images: (n, d), (C, P, d) -> (n, C, P)."""
    return LOGIT_SCALE * torch.einsum("nd,cpd->ncp", image, templates)


def mean_classifier(templates: torch.Tensor) -> torch.Tensor:
    """(C, P, d) unit templates -> (C, d): the L2-normalised mean over templates."""
    return torch.nn.functional.normalize(templates.mean(dim=1), dim=1)


def zpe_weights(image: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
    """ZPE template weights (P,): softmax over p of mean_n max_c (l[n, c, p] - mu[c, p])."""
    n_classes, n_templates, _ = templates.shape
    # mu[c, p] = mean_n l[n, c, p] = 100 t[c, p] . mean_n x_n (linearity: no (N, C, P) pass needed)
    mu = LOGIT_SCALE * templates @ image.mean(dim=0)  # (C, P)
    total = torch.zeros(n_templates, dtype=image.dtype, device=image.device)
    step = _chunk(n_classes, n_templates)
    for start in range(0, image.shape[0], step):
        centred = template_logits(image[start:start + step], templates) - mu  # (n, C, P)
        total += centred.max(dim=1).values.sum(dim=0)  # (P,)
    return torch.softmax(total / image.shape[0], dim=0)


def _entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of softmax over the last axis: (..., P) -> (...)."""
    log_w = torch.log_softmax(logits, dim=-1)
    return -(log_w.exp() * log_w).sum(dim=-1) / math.log(2.0)


def autoclip_step(direction: torch.Tensor, target_bits: float, iterations: int = 60) -> torch.Tensor:
    """Step sizes t (n,) with entropy(softmax(t * direction[i])) = target_bits, by bisection.

    The entropy of softmax(t v) falls monotonically as t grows from 0 (log2 P) towards the entropy
    of the uniform distribution over argmax(v), so one bisection per row works; all rows bisect at
    once, in log-space over t in [1e-6, 1e12] (rows whose direction is constant, so that no step
    reaches the target, get the upper bound, which leaves their weights uniform).
    """
    low = torch.full(direction.shape[:1], -6.0, dtype=direction.dtype, device=direction.device)
    high = torch.full_like(low, 12.0)
    for _ in range(iterations):
        mid = (low + high) / 2
        above = _entropy_bits(10.0 ** mid[:, None] * direction) > target_bits  # step too small
        low = torch.where(above, mid, low)
        high = torch.where(above, high, mid)
    return 10.0 ** ((low + high) / 2)


def autoclip_logits(image: torch.Tensor, templates: torch.Tensor,
                    entropy_fraction: float = AUTOCLIP_ENTROPY_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoCLIP's per-image logits (N, C) and template weights (N, P).

    With w = softmax(rho) and s[c] = sum_p w[p] l[c, p], the gradient of lse_c(s) at rho = 0 is
    d/d rho[p] = w[p] (g[p] - sum_q w[q] g[q]) with g[p] = sum_c softmax(s)[c] l[c, p] and
    w = 1/P (chain rule through the softmax); rho = t * gradient, t from :func:`autoclip_step`.
    """
    n_classes, n_templates, _ = templates.shape
    target = entropy_fraction * math.log2(n_templates)
    logits = torch.empty(image.shape[0], n_classes, dtype=image.dtype, device=image.device)
    weights = torch.empty(image.shape[0], n_templates, dtype=image.dtype, device=image.device)
    step = _chunk(n_classes, n_templates)
    for start in range(0, image.shape[0], step):
        block = template_logits(image[start:start + step], templates)  # (n, C, P)
        class_probs = torch.softmax(block.mean(dim=2), dim=1)  # (n, C): softmax(s) at uniform w
        g = torch.einsum("nc,ncp->np", class_probs, block)  # (n, P)
        grad = (g - g.mean(dim=1, keepdim=True)) / n_templates  # (n, P)
        if n_templates > 1:
            w = torch.softmax(autoclip_step(grad, target)[:, None] * grad, dim=1)  # (n, P)
        else:
            w = torch.ones_like(grad)
        weights[start:start + step] = w
        logits[start:start + step] = torch.einsum("np,ncp->nc", w, block)
    return logits, weights


def build_ensemble(image: torch.Tensor, templates: torch.Tensor, weighting: str) -> PromptEnsemble:
    """The :class:`PromptEnsemble` of validated tensors: image (N, d) unit rows, templates
    (C, P, d) unit vectors. Tensors stay on their device."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    n_templates = templates.shape[1]
    if weighting == "mean":
        uniform = torch.full((n_templates,), 1.0 / n_templates, dtype=image.dtype, device=image.device)
        return PromptEnsemble(mean_classifier(templates), None, uniform, weighting)
    if weighting == "zpe":
        w = zpe_weights(image, templates)  # (P,)
        classifier = torch.nn.functional.normalize(torch.einsum("p,cpd->cd", w, templates), dim=1)
        logits = torch.empty(image.shape[0], templates.shape[0], dtype=image.dtype, device=image.device)
        step = _chunk(templates.shape[0], n_templates)
        for start in range(0, image.shape[0], step):
            logits[start:start + step] = template_logits(image[start:start + step], templates) @ w
        return PromptEnsemble(classifier, logits, w, weighting)
    logits, w = autoclip_logits(image, templates)
    return PromptEnsemble(mean_classifier(templates), logits, w, weighting)


def check_templates(text: torch.Tensor, d: int, name: str, min_classes: int = 2) -> torch.Tensor:
    """Per-template text features (C, P, d), validated and L2-normalised per template.

    One-line ``ValueError`` naming ``name`` for a wrong shape, NaN/inf, or an all-zero embedding.
    """
    if text.ndim != 3:
        raise ValueError(f"{name}: expected a 3-d array (C, P, d), got shape {tuple(text.shape)}")
    n_classes, n_templates, dim = text.shape
    if dim != d:
        raise ValueError(
            f"{name}: shape {tuple(text.shape)} does not match the image feature dimension d = {d} "
            "(per-template text must be (C, P, d))"
        )
    if n_templates == 0:
        raise ValueError(f"{name}: has 0 templates")
    if n_classes < min_classes:
        raise ValueError(f"{name}: needs at least {min_classes} classes, got {n_classes}")
    if not bool(torch.isfinite(text).all()):
        bad = int((~torch.isfinite(text)).flatten(1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name}: contains NaN or infinite values (first in class {bad})")
    norms = text.norm(dim=2)  # (C, P)
    if bool((norms == 0).any()):
        c, p = (int(i) for i in (norms == 0).nonzero()[0])
        raise ValueError(f"{name}: the embedding of class {c}, template {p} is all zeros (no direction)")
    if bool(((norms - 1).abs() > NORM_TOLERANCE).any()):
        note(f"{name} were not L2-normalised; normalising each template embedding")
    return text / norms[..., None]


def prepare_text(image_features: Any, text_features: Any, device: torch.device, *,
                 image_name: str = "image_features", text_name: str = "text_features") -> tuple:
    """Validated ``(X, T)``: X (N, d) unit rows and T either (C, d) unit rows or (C, P, d) unit
    template embeddings, float32 on ``device``."""
    text = to_tensor(text_features, text_name, device)
    if text.ndim != 3:
        return prepare_features(image_features, text_features, device, image_name=image_name, text_name=text_name)
    image = to_tensor(image_features, image_name, device)
    d = image.shape[1] if image.ndim == 2 else -1
    if d < 1:  # let the 2-d checks name the image problem
        prepare_features(image, text.reshape(-1, text.shape[-1]), device, image_name=image_name)
    templates = check_templates(text, d, text_name)
    X, _ = prepare_features(image, mean_classifier(templates), device, image_name=image_name,
                            text_name=text_name)
    return X, templates


def zeroshot_classifier(text_features: Any, image_features: Any, weighting: str = "mean", *,
                        device: Any = None) -> PromptEnsemble:
    """The zero-shot classifier of a prompt ensemble, weighted by ``weighting``.

    Parameters
    ----------
    text_features : array-like, shape (C, P, d), or (C, d) (one template; ``"mean"`` only)
        Unit (or not: they are normalised) text embeddings per class and template.
    image_features : array-like, shape (N, d)
        The pool (ZPE and AutoCLIP read it; ``"mean"`` only checks its dimension).
    weighting : {"mean", "zpe", "autoclip"}
    device : optional; ``None`` means the device of ``image_features``.

    Returns
    -------
    PromptEnsemble
        ``classifier`` (C, d), ``logits`` (N, C) or None, ``weights`` (P,) or (N, P), arrays of the
        kind of ``image_features`` (numpy, or torch on its device).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    compute = resolve_device(device, image_features)
    X, T = prepare_text(image_features, text_features, compute)
    if T.ndim == 2:
        if weighting != "mean":
            raise ValueError(
                f"weighting={weighting!r} needs per-template text features (C, P, d), got shape {tuple(T.shape)}"
            )
        T = T[:, None, :]
    ens = build_ensemble(X, T, weighting)
    out = lambda t: None if t is None else like_input(t, image_features)  # noqa: E731
    return PromptEnsemble(out(ens.classifier), out(ens.logits), out(ens.weights), weighting)
