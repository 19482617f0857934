"""StatA's realistic test-time protocol as pure functions over labels and a seed.

Zanella, Fuchs, De Vleeschouwer, Ben Ayed, "Realistic Test-Time Adaptation of Vision-Language
Models", CVPR 2025 (official samplers: MaxZanella/StatA, ``sampler.py`` and ``main.py``; this is
our own code written from their description). Every function returns row indices into the pool;
nothing here touches features or solvers, so :mod:`benchmarks.realistic` (and anyone else) can
run any method on the same batches.

* **Batch adaptation** (:func:`batch_indices`): draw the number of effective classes K_eff
  uniformly from ``[low, high]`` (integers, both ends included); draw K_eff distinct classes among
  those the pool holds (all of them when K_eff >= that number); pool every image of those classes;
  keep ``batch_size`` of them drawn without replacement, or all of them when they are fewer (so a
  batch may be smaller than ``batch_size``, as in the official sampler); shuffle.
  ``batch_size=None`` with no class range is the whole pool.
* **Online adaptation** (:func:`online_batches`): the stream is split into
  S = min(N // batch_size, number of classes) slots. With ``xi`` a float, each class's images
  (in pool order, as in the official sampler) are cut into S consecutive parts whose sizes follow
  proportions drawn from Dirichlet(xi * 1_S), part s going to slot s; each slot is shuffled and
  the slots are concatenated. With ``xi="separate"`` the classes come one after another in random
  order, each class's images shuffled. The stream is cut into consecutive batches of
  ``batch_size``; the last incomplete batch is dropped (as officially). Each batch is solved on
  its own.

The settings of the paper's tables are :data:`SETTINGS`. Randomness comes only from
``numpy.random.default_rng``: the same labels and seed give the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

#: The Dirichlet value that stands for "one class after another" (StatA's gamma = -1).
SEPARATE = "separate"


@dataclass(frozen=True)
class Setting:
    """One row of StatA's protocol.

    Attributes
    ----------
    name : str
        Short column name (``"64:1-4"``, ``"1000:5-25"``, ``"whole"``, ``"online:0.1"``).
    kind : {"batch", "whole", "online"}
    batch_size : int or None
        Images per batch (``None``: the whole pool).
    classes : (int, int) or None
        Inclusive range of K_eff for batch settings.
    xi : float or "separate" or None
        Dirichlet concentration of the online stream.
    """

    name: str
    kind: str
    batch_size: Optional[int] = None
    classes: Optional[tuple] = None
    xi: Union[float, str, None] = None


#: StatA's settings: batches of 64 with 1-4, 2-10, 5-25 classes; batches of 1000 with 5-25, 25-50,
#: 50-100; the whole pool; online batches of 128 with xi = 0.1, 0.01, 0.001 and separate classes.
SETTINGS = (
    Setting("64:1-4", "batch", 64, (1, 4)),
    Setting("64:2-10", "batch", 64, (2, 10)),
    Setting("64:5-25", "batch", 64, (5, 25)),
    Setting("1000:5-25", "batch", 1000, (5, 25)),
    Setting("1000:25-50", "batch", 1000, (25, 50)),
    Setting("1000:50-100", "batch", 1000, (50, 100)),
    Setting("whole", "whole"),
    Setting("online:0.1", "online", 128, xi=0.1),
    Setting("online:0.01", "online", 128, xi=0.01),
    Setting("online:0.001", "online", 128, xi=0.001),
    Setting("online:separate", "online", 128, xi=SEPARATE),
)


def _labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels: expected a 1-d array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels: the pool is empty (0 images)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels: expected integer class indices, got dtype {arr.dtype}")
    return arr


def batch_indices(labels, batch_size: Optional[int], classes: Optional[tuple],
                  rng: np.random.Generator) -> np.ndarray:
    """Row indices of one batch of the batch-adaptation protocol (see the module docstring).

    Parameters
    ----------
    labels : (N,) int array
    batch_size : int or None
        At most this many images; ``None``: every image of the drawn classes.
    classes : (low, high) or None
        Range of K_eff, inclusive; ``None``: every class of the pool.
    rng : numpy.random.Generator

    Returns
    -------
    (B,) int64 array of distinct indices in random order, B = min(batch_size, images of the drawn
    classes).
    """
    y = _labels(labels)
    present = np.unique(y)
    if classes is not None:
        low, high = int(classes[0]), int(classes[1])
        if not 1 <= low <= high:
            raise ValueError(f"classes: expected 1 <= low <= high, got {classes}")
        k_eff = int(rng.integers(low, high + 1))
        if k_eff < present.size:
            present = rng.choice(present, size=k_eff, replace=False)
    rows = np.flatnonzero(np.isin(y, present))
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if rows.size > batch_size:
            rows = rng.choice(rows, size=batch_size, replace=False)
    return rng.permutation(rows).astype(np.int64)


def online_stream(labels, xi: Union[float, str], batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """The whole temporally correlated stream (N,) of row indices (see the module docstring)."""
    y = _labels(labels)
    classes = np.unique(y)
    if xi == SEPARATE:
        return np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in rng.permutation(classes)])
    xi = float(xi)
    if not xi > 0:
        raise ValueError(f"xi: the Dirichlet concentration must be > 0 or {SEPARATE!r}, got {xi}")
    n_slots = max(1, min(y.size // batch_size, classes.size))
    proportions = rng.dirichlet(np.full(n_slots, xi), size=classes.size)  # (classes, slots)
    slots = [[] for _ in range(n_slots)]
    for c, share in zip(classes, proportions):
        members = np.flatnonzero(y == c)
        cuts = (np.cumsum(share)[:-1] * members.size).astype(np.int64)  # part s goes to slot s
        for s, part in enumerate(np.split(members, cuts)):
            slots[s].append(part)
    return np.concatenate([rng.permutation(np.concatenate(parts)) for parts in slots]).astype(np.int64)


def online_batches(labels, xi: Union[float, str], batch_size: int, rng: np.random.Generator) -> list:
    """Consecutive batches of ``batch_size`` row indices of :func:`online_stream` (the last
    incomplete one dropped; a pool smaller than one batch gives no batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    stream = online_stream(labels, xi, batch_size, rng)
    return [stream[start:start + batch_size] for start in range(0, stream.size - batch_size + 1, batch_size)]


def setting_batches(labels, setting: Setting, tasks: int, seed: int = 0) -> list:
    """The batches of ``tasks`` tasks of ``setting``: a list (one per task) of lists of index arrays.

    A batch task is one batch; an online task is one stream (all its batches); ``"whole"`` is
    always one task of one batch (it has no randomness). The generator is seeded by ``seed`` and
    the setting's position in :data:`SETTINGS` (or its name), so settings draw independently and
    adding tasks keeps the first ones.
    """
    if tasks < 1:
        raise ValueError(f"tasks: expected >= 1, got {tasks}")
    key = next((i for i, s in enumerate(SETTINGS) if s == setting), None)
    entropy = [int(seed), key if key is not None else sum(setting.name.encode())]
    rng = np.random.default_rng(entropy)
    if setting.kind == "whole":
        return [[np.arange(_labels(labels).size, dtype=np.int64)]]
    if setting.kind == "batch":
        return [[batch_indices(labels, setting.batch_size, setting.classes, rng)] for _ in range(tasks)]
    if setting.kind == "online":
        return [online_batches(labels, setting.xi, setting.batch_size, rng) for _ in range(tasks)]
    raise ValueError(f"unknown setting kind {setting.kind!r}")


def parse_settings(spec: str) -> tuple:
    """Settings from a comma-separated list of names (``"all"``: :data:`SETTINGS`)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return SETTINGS
    known = {s.name: s for s in SETTINGS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown setting(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return tuple(known[n] for n in names)
