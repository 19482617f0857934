"""Loaders for the real CLIP ViT-B/32 feature pools of ``../shared/data`` (development and CI only;
the data never ships with the package, and code reaches it through a path such as ZSADAPT_DATA).

* ``stanford_cars_val``: real text embeddings (196 classes).
* the six others (caltech101, dtd, fgvc_aircraft, oxford_flowers, oxford_pets, ucf101): no text
  embeddings exist, so the initial classifier is a *prototype* classifier: for each class, the
  L2-normalised mean of ``shots`` few-shot train features drawn with ``seed`` (DTD has no train
  features: its prototypes come from the val split). Image-space prototypes lack CLIP's
  image-text modality gap; keep that in mind when reading results.
* ``multi-487``: those six stacked into one pool of 487 classes (their test images, each class with
  its own pool's prototype): many classes with few images each, on real features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .pool import Pool

TEXT_POOL = "stanford_cars_val"
PROTOTYPE_POOLS = ("caltech101", "dtd", "fgvc_aircraft", "oxford_flowers", "oxford_pets", "ucf101")
STACKED_POOL = "multi-487"


def _load(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def load_shared_pool(root: Union[str, Path], name: str, *, shots: int = 1, seed: int = 0,
                     split: str = "test") -> Pool:
    """A validated pool from ``root/name``.

    Parameters
    ----------
    root : path to ``shared/data``
    name : ``"stanford_cars_val"``, one of :data:`PROTOTYPE_POOLS`, or :data:`STACKED_POOL`
    shots : int
        Few-shot examples averaged per class prototype (prototype pools only).
    seed : int
        Seed of the few-shot draw.
    split : {"test", "val"}
        Which split is the pool (prototype pools only; DTD's prototypes always come from val, so
        its pool is always test).
    """
    if name == STACKED_POOL:
        return _stacked_pool(root, shots=shots, seed=seed, split=split)
    folder = Path(root) / name
    classnames = [str(c) for c in _load(folder / "classnames.npy")]
    if name == TEXT_POOL:
        return Pool(
            _load(folder / "image_features.npy").astype(np.float32),
            _load(folder / "text_features.npy").astype(np.float32),
            _load(folder / "labels.npy"), classnames, source=str(folder),
        ).validated()
    if name not in PROTOTYPE_POOLS:
        raise ValueError(f"unknown shared pool {name!r}; known: {TEXT_POOL}, {', '.join(PROTOTYPE_POOLS)}, "
                         f"{STACKED_POOL}")
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


def _stacked_pool(root: Union[str, Path], *, shots: int, seed: int, split: str) -> Pool:
    """The :data:`PROTOTYPE_POOLS` as one pool: images concatenated pool after pool, labels offset
    by the classes of the pools before, each class with its own pool's prototype and its name as
    ``"pool: class"``."""
    pools = [load_shared_pool(root, name, shots=shots, seed=seed, split=split) for name in PROTOTYPE_POOLS]
    offsets = np.cumsum([0] + [p.n_classes for p in pools[:-1]])
    return Pool(
        np.concatenate([p.image_features for p in pools]),
        np.concatenate([p.text_features for p in pools]),
        np.concatenate([p.labels + offset for p, offset in zip(pools, offsets)]),
        [f"{name}: {c}" for name, p in zip(PROTOTYPE_POOLS, pools) for c in p.classnames],
        source=f"{Path(root)} (the {len(pools)} prototype pools stacked, {split}, {shots}-shot prototypes, seed {seed})",
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
