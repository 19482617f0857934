"""Learning ``unem``'s unrolled parameters from labelled pools (what ``zsadapt tune`` runs).

Each labelled pool is used whole and, with ``subsets=True``, also as subset pools holding m of
its C classes (m = 2, 5, 10 and C/4, classes drawn with ``seed``), so that the learned class
balance also makes absent classes fade on pools that hold only a few classes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .arrays import resolve_device
from .evaluate import subset_pool
from .pool import Pool
from .solvers.unem import TuningPool, tune


def subset_sizes(n_classes: int) -> list:
    """The class counts m of the subset pools drawn from a pool of C classes: 2, 5, 10, C/4
    (those below C, without repeats)."""
    return sorted({m for m in (2, 5, 10, n_classes // 4) if 2 <= m < n_classes})


def tuning_pools(pools: Sequence[Pool], *, subsets: bool = True, seed: int = 0,
                 device: Union[str, torch.device, None] = None) -> list:
    """:class:`~zsadapt.solvers.unem.TuningPool` tensors from validated labelled pools (and their
    subset pools)."""
    device = resolve_device(device, None)

    def tensors(pool: Pool) -> TuningPool:
        return TuningPool(torch.as_tensor(pool.image_features, dtype=torch.float32, device=device),
                          torch.as_tensor(pool.text_features, dtype=torch.float32, device=device),
                          torch.as_tensor(pool.labels, dtype=torch.int64, device=device), pool.source)

    out = []
    for index, pool in enumerate(pools):
        if pool.labels is None:
            raise ValueError(f"{pool.source}: has no labels; tune needs labelled pools")
        out.append(tensors(pool))
        if subsets:
            n_present = np.unique(pool.labels).size
            for m in subset_sizes(pool.n_classes):
                out.append(tensors(subset_pool(pool, min(m, n_present), seed + 1000 * index + m)))
    return out


def tune_unem(pools: Sequence[Pool], *, layers: int = 10, steps: int = 100, lr: float = 0.05,
              likelihood: str = "gaussian", subsets: bool = True, seed: int = 0,
              init: Optional[dict] = None, frozen: Sequence[str] = (),
              device: Union[str, torch.device, None] = None, progress: bool = False) -> dict:
    """Learn ``unem``'s parameters on labelled ``pools``; returns the JSON-ready dict that
    ``zsadapt refine --method unem --params`` reads (its ``"unem"`` entry), with the pools' names
    and the first and last training loss. See :func:`zsadapt.solvers.unem.tune`."""
    torch.manual_seed(seed)
    prepared = tuning_pools(pools, subsets=subsets, seed=seed, device=device)
    result = tune(prepared, layers=layers, init=init, likelihood=likelihood, steps=steps, lr=lr,
                  frozen=frozen, progress=progress)
    result["pools"] = [p.source for p in pools]
    result["subset_pools"] = subsets
    return result
