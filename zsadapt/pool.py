"""A pool: the unlabeled image features to refine, the class text embeddings, and (optionally)
ground-truth labels and class names for evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Pool:
    """Arrays of one pool, as read from disk or built in memory.

    Attributes
    ----------
    image_features : numpy.ndarray, shape (N, d)
    text_features : numpy.ndarray, shape (C, d)
        The class embeddings; given as (C, P, d) (one per prompt template), :meth:`validated`
        keeps those in ``text_templates`` and makes this their normalised mean.
    labels : numpy.ndarray of int64, shape (N,), optional
        Ground truth, used only for evaluation (never by a solver).
    classnames : list of str, length C, optional
    source : str
        Where the pool came from (a path, or a description); error messages start with it.
    text_templates : numpy.ndarray, shape (C, P, d), optional
        Per-template class embeddings (unit), for prompt weighting (``zsadapt.prompts``).
    """

    image_features: np.ndarray
    text_features: np.ndarray
    labels: Optional[np.ndarray] = None
    classnames: Optional[list] = None
    source: str = "pool"
    extras: dict = field(default_factory=dict)
    text_templates: Optional[np.ndarray] = None

    @property
    def n_images(self) -> int:
        return int(self.image_features.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.text_features.shape[0])

    def validated(
        self,
        *,
        image_name: Optional[str] = None,
        text_name: Optional[str] = None,
        labels_name: Optional[str] = None,
    ) -> "Pool":
        """This pool with checked shapes and labels, text as (C, d), features float32 and
        L2-normalised. Raises ``ValueError`` naming ``source`` and the offending array.
        (C, P, d) text features (one per prompt template) are kept in ``text_templates``, and
        ``text_features`` becomes their normalised mean.

        ``image_name``, ``text_name`` and ``labels_name`` override how messages name an array
        (default ``"<source>: image_features"`` etc.), e.g. with the file it came from.
        """
        import torch  # here, not at the top: reading a pool file's name needs no torch

        from .prompts import mean_classifier, prepare_text
        from .validation import check_classnames, check_labels

        text = self.text_features if self.text_templates is None else self.text_templates
        X, T = prepare_text(
            self.image_features,
            text,
            torch.device("cpu"),
            image_name=image_name or f"{self.source}: image_features",
            text_name=text_name or f"{self.source}: text_features",
        )
        templates = None
        if T.ndim == 3:
            templates, T = T, mean_classifier(T)
        labels = None
        if self.labels is not None:
            labels = check_labels(
                self.labels, X.shape[0], T.shape[0], labels_name or f"{self.source}: labels"
            )
        names = check_classnames(self.classnames, T.shape[0], f"{self.source}: classnames")
        return Pool(X.numpy(), T.numpy(), labels, names, self.source, dict(self.extras),
                    None if templates is None else templates.numpy())
