"""Loaders for the real CLIP ViT-B/32 feature pools of ``../shared/data`` (development and CI only;
the data never ships with the package, and code reaches it through a path such as ZSADAPT_DATA).

* ``stanford_cars_val``: real text embeddings (196 classes).
* the six others (caltech101, dtd, fgvc_aircraft, oxford_flowers, oxford_pets, ucf101): no text
  embeddings exist, so the initial classifier is a *prototype* classifier: for each class, the
  L2-normalised mean of ``shots`` few-shot train features drawn with ``seed`` (DTD has no train
  features: its prototypes come from the val split). Image-space prototypes lack CLIP's
  image-text modality gap; keep that in mind when reading results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .pool import Pool

TEXT_POOL = "stanford_cars_val"
PROTOTYPE_POOLS = ("caltech101", "dtd", "fgvc_aircraft", "oxford_flowers", "oxford_pets", "ucf101")


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def load_shared_pool(root: Union[str, Path], name: str, *, shots: int = 1, seed: int = 0,
                     split: str = "test") -> Pool:
    """A validated pool from ``root/name``.

    Parameters
    ----------
    root : path to ``shared/data``
    name : ``"stanford_cars_val"`` or one of :data:`PROTOTYPE_POOLS`
    shots : int
        Few-shot examples averaged per class prototype (prototype pools only).
    seed : int
        Seed of the few-shot draw.
    split : {"test", "val"}
        Which split is the pool (prototype pools only; DTD's prototypes always come from val, so
        its pool is always test).
    """
    folder = Path(root) / name
    classnames = [str(c) for c in _load(folder / "classnames.npy")]
    if name == TEXT_POOL:
        return Pool(
            _load(folder / "image_features.npy").astype(np.float32),
            _load(folder / "text_features.npy").astype(np.float32),
            _load(folder / "labels.npy"), classnames, source=str(folder),
        ).validated()
    if name not in PROTOTYPE_POOLS:
        raise ValueError(f"unknown shared pool {name!r}; known: {TEXT_POOL}, {', '.join(PROTOTYPE_POOLS)}")
    support = "val" if name == "dtd" else "fewshot16_train"
    if name == "dtd":
        split = "test"
    features = _load(folder / f"{support}_features.npy").astype(np.float32)
    labels = _load(folder / f"{support}_labels.npy")
    prototypes = few_shot_prototypes(features, labels, len(classnames), shots=shots, seed=seed)
    return Pool(
        _load(folder / f"{split}_features.npy").astype(np.float32), prototypes,
        _load(folder / f"{split}_labels.npy"), classnames,
        source=f"{folder} ({split}, {shots}-shot prototypes, seed {seed})",
    ).validated()


def few_shot_prototypes(features: np.ndarray, labels: np.ndarray, n_classes: int, *, shots: int,
                        seed: int) -> np.ndarray:
    """(C, d) unit prototypes: per class, the mean of ``shots`` unit features drawn without
    replacement by ``numpy.random.default_rng(seed)`` (classes in index order)."""
    rng = np.random.default_rng(seed)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    prototypes = np.empty((n_classes, features.shape[1]), dtype=np.float32)
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise ValueError(f"class {c} has no examples to build a prototype from")
        chosen = rng.choice(members, size=min(shots, members.size), replace=False)
        mean = unit[chosen].mean(axis=0)
        prototypes[c] = mean / np.linalg.norm(mean)
    return prototypes
