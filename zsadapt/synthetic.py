"""Synthetic pools with CLIP-like geometry, for the demo, tests and benchmarks.

Classes are random directions on the unit sphere. Image and text embeddings of a class both point
near its direction, but each modality also shares its own offset vector (the *modality gap* of
Liang et al., NeurIPS 2022: images and texts lie in two separate cones, so image-text cosines are
low, ~0.2-0.4, while image-image cosines are high). Text embeddings carry their own noise, so the
zero-shot classifier is imperfect, and class sizes follow a Zipf law (imbalance). Images of a
class cluster around the true class direction: exactly the structure transductive methods use.
"""

from __future__ import annotations

import numpy as np

from .pool import Pool


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def class_sizes(n_images: int, n_classes: int, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """Class sizes summing to ``n_images`` with proportions ~ rank^-imbalance (shuffled), each >= 1."""
    weights = np.arange(1, n_classes + 1, dtype=np.float64) ** -imbalance
    weights = rng.permutation(weights / weights.sum())
    sizes = np.maximum(1, np.floor(weights * n_images).astype(np.int64))
    while sizes.sum() < n_images:
        sizes[np.argmax(weights * n_images - sizes)] += 1
    while sizes.sum() > n_images:
        sizes[np.argmax(sizes)] -= 1
    return sizes


def make_pool(
    n_images: int = 3000,
    n_classes: int = 30,
    dim: int = 128,
    *,
    image_noise: float = 0.9,
    text_noise: float = 2.5,
    modality_gap: float = 1.0,
    imbalance: float = 1.0,
    hubs: int = 0,
    hub_pull: float = 0.0,
    nuisance_dims: int = 0,
    nuisance: float = 0.0,
    seed: int = 0,
) -> Pool:
    """A deterministic synthetic pool with ground-truth labels.

    Parameters
    ----------
    n_images, n_classes, dim : int
        N, C and d.
    image_noise : float
        Norm of the isotropic noise added to a class direction for each image (relative to 1).
    text_noise : float
        Norm of the noise on each class's text embedding: the zero-shot classifier's error.
    modality_gap : float
        Norm of the per-modality offset (0: no gap).
    imbalance : float
        Zipf exponent of the class sizes (0: balanced).
    hubs : int
        Number of *hub* classes: their text embeddings are pulled towards the centre of the image
        cone, so zero-shot gives them the images it is unsure about (hubness: a few classes
        attract far more predictions than they hold images, as on real CLIP pools).
    hub_pull : float
        Norm of that pull (0: no hubs, whatever ``hubs``).
    nuisance_dims, nuisance : int, float
        Image variation shared by every class (viewpoint, background, lighting): Gaussian noise of
        typical norm ``nuisance`` in a random ``nuisance_dims``-dimensional subspace. It moves
        images of different classes together, so neighbours and clusters mix classes, as on real
        pools (0: none).
    seed : int

    Returns
    -------
    Pool
        float32 unit-norm features, int64 labels, class names ``class_000``...
    """
    if n_images < 2 or n_classes < 2 or dim < 1:
        raise ValueError("make_pool: needs n_images >= 2, n_classes >= 2 and dim >= 1")
    rng = np.random.default_rng(seed)
    means = _unit(rng.standard_normal((n_classes, dim)))  # (C, d) true class directions
    gap = _unit(rng.standard_normal((2, dim))) * modality_gap  # (2, d): image and text offsets
    shared = _unit(rng.standard_normal(dim))  # (d,) the direction both modalities lean towards
    sizes = class_sizes(n_images, n_classes, imbalance, rng)
    labels = rng.permutation(np.repeat(np.arange(n_classes), sizes))  # (N,)
    noise = rng.standard_normal((n_images, dim)) * image_noise / np.sqrt(dim)  # (N, d)
    images = _unit(means[labels] + noise + gap[0] + shared)  # (N, d)
    text_error = rng.standard_normal((n_classes, dim)) * text_noise / np.sqrt(dim)  # (C, d)
    texts = means + text_error + gap[1] + shared  # (C, d)
    # Drawn last, so that pools without nuisance or hubs are exactly what they were.
    if nuisance_dims > 0 and nuisance > 0:
        basis = np.linalg.qr(rng.standard_normal((dim, min(nuisance_dims, dim))))[0].T  # (r, d) orthonormal
        factors = rng.standard_normal((n_images, basis.shape[0])) * nuisance / np.sqrt(basis.shape[0])
        images = _unit(images + factors @ basis)  # (N, d)
    if hubs > 0 and hub_pull > 0:
        hub = rng.choice(n_classes, size=min(hubs, n_classes), replace=False)
        centre = _unit(images.mean(axis=0))  # (d,) where the image cone points
        texts[hub] += hub_pull * centre
    texts = _unit(texts)
    names = [f"class_{c:03d}" for c in range(n_classes)]
    return Pool(
        images.astype(np.float32),
        texts.astype(np.float32),
        labels.astype(np.int64),
        names,
        source=f"synthetic(n_images={n_images}, n_classes={n_classes}, dim={dim}, seed={seed})",
    )


def make_demo_pool(seed: int = 0) -> Pool:
    """The ``zsadapt demo`` pool: a :func:`make_pool` that behaves like the real CLIP pools.

    2000 images of 100 Zipf-imbalanced classes (about 20 images a class, as in
    ``../shared/data``), a modality gap, 10 hub classes that attract the images zero-shot is unsure
    of, shared nuisance variation, and zero-shot errors that come mostly from the text side (text
    noise), as on real CLIP pools, where the image clusters are cleaner than the zero-shot
    classifier: zero-shot is right 57.7% of the time (the shared pools: 15-79%, Cars 59%), and the
    default method gains about what it gains on the shared whole pools (+10.1 here; +9.3 on
    average there), instead of the near-100% a pool of clean Gaussian clusters gives. (An earlier
    demo pool with image noise 2.8 and text noise 0.6 made every mixture lose 13 points, which no
    shared whole pool shows.)
    """
    pool = make_pool(n_images=2000, n_classes=100, dim=128, image_noise=1.8, text_noise=1.1,
                     modality_gap=1.0, imbalance=1.0, hubs=10, hub_pull=0.3, nuisance_dims=8,
                     nuisance=0.4, seed=seed)
    pool.source = f"demo pool (synthetic, realistic: 2000 images, 100 imbalanced classes, seed={seed})"
    return pool
