"""The zero-shot classifier every solver starts from: cosine similarity between unit image and
class embeddings times CLIP's logit scale (100), and a softmax (Radford et al., 2021)."""

from __future__ import annotations

import torch

from .graphs.blocks import aligned_empty

#: CLIP's learned logit scale exp(t) at the end of training (t clipped at log 100).
CLIP_LOGIT_SCALE = 100.0


def zeroshot_logits(
    image: torch.Tensor, classifier: torch.Tensor, logit_scale: float = CLIP_LOGIT_SCALE
) -> torch.Tensor:
    """Logits ``logit_scale * X W^T``.

    Parameters
    ----------
    image : (N, d) unit rows
    classifier : (C, d) unit rows (text embeddings, or another initial classifier)

    Returns
    -------
    (N, C) tensor
    """
    out = aligned_empty(image.shape[0], classifier.shape[0], dtype=torch.result_type(image, classifier),
                        device=image.device)  # (N, C), rows aligned for the GEMM (zsadapt.graphs.blocks)
    return torch.mm(logit_scale * image, classifier.T, out=out)


def zeroshot_probs(
    image: torch.Tensor, classifier: torch.Tensor, logit_scale: float = CLIP_LOGIT_SCALE
) -> torch.Tensor:
    """Softmax over classes of :func:`zeroshot_logits`; (N, C), rows sum to 1."""
    return torch.softmax(zeroshot_logits(image, classifier, logit_scale), dim=1)
