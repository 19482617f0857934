"""Exact inner-product k-nearest-neighbour search on torch (CPU or CUDA), chunked over queries so
memory stays O(chunk x N), with an optional pykeops backend.

On unit vectors the inner product is the cosine similarity, so the neighbours are the most similar
rows. Measured (``benchmarks/bench_knn.py``): for CLIP-sized d the chunked torch matmul + topk is
far faster than pykeops on CPU, so ``backend="auto"`` always picks torch; keops is there for
callers who want its O(N) memory footprint on a GPU.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch

#: Elements of the (chunk, N) similarity block held at once by the torch backend (64 MiB float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

BACKENDS = ("auto", "torch", "keops")


def keops_available() -> bool:
    """Whether pykeops imports (it compiles kernels on first use, which needs a C++ compiler)."""
    try:
        _import_pykeops()
    except Exception:
        return False
    return True


def _import_pykeops():
    """``pykeops.torch``, imported with its start-up messages (printed to stdout) sent to stderr,
    so that stdout carries only results."""
    with contextlib.redirect_stdout(sys.stderr):
        import pykeops.torch

    return pykeops.torch


def unique_rows(x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Distinct rows of ``x`` (U, d) and, when some rows repeat, ``inverse`` (N,) with
    ``x == unique[inverse]``; ``inverse`` is None (and ``x`` comes back as is) when all rows differ.

    Exact duplicates tie in every neighbour search, and which copy a neighbour list picks is
    arbitrary, so identical images could get different graph neighbourhoods; graph solvers build
    their graph on distinct rows instead.
    """
    unique, inverse = torch.unique(x, dim=0, return_inverse=True)
    if unique.shape[0] == x.shape[0]:
        return x, None
    return unique, inverse


def knn(
    query: torch.Tensor,
    base: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    backend: str = "auto",
    chunk: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``base`` with the largest inner product with each row of ``query``.

    Parameters
    ----------
    query : (M, d) tensor
    base : (N, d) tensor, same device and dtype as ``query``
    k : int, 1 <= k <= N (N - 1 with ``exclude_self``)
    exclude_self : bool
        ``query`` is ``base``: leave each row out of its own neighbour list.
    backend : {"auto", "torch", "keops"}
    chunk : int, optional
        Query rows per block for the torch backend (default: 2**24 / N, so a block is 64 MiB).

    Returns
    -------
    similarities : (M, k) tensor, each row in decreasing order
    indices : (M, k) int64 tensor of rows of ``base``
    """
    if backend not in BACKENDS:
        raise ValueError(f"knn: backend must be one of {BACKENDS}, got {backend!r}")
    if query.ndim != 2 or base.ndim != 2 or query.shape[1] != base.shape[1]:
        raise ValueError(f"knn: query {tuple(query.shape)} and base {tuple(base.shape)} must be (M, d) and (N, d)")
    if exclude_self and query.shape[0] != base.shape[0]:
        raise ValueError("knn: exclude_self needs query and base to be the same rows")
    available = base.shape[0] - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"knn: k = {k} must lie in 1..{available} (N = {base.shape[0]})")
    if backend == "keops":
        return _knn_keops(query, base, k, exclude_self)
    return _knn_torch(query, base, k, exclude_self, chunk)


def _knn_torch(query, base, k, exclude_self, chunk):
    m, n = query.shape[0], base.shape[0]
    if chunk is None:
        chunk = max(1, DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    sims = torch.empty(m, k, dtype=query.dtype, device=query.device)  # (M, k)
    idx = torch.empty(m, k, dtype=torch.long, device=query.device)  # (M, k)
    buffer = torch.empty(min(chunk, m), n, dtype=query.dtype, device=query.device)  # reused (b, N) block
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        block = torch.mm(query[start:stop], base.T, out=buffer[: stop - start])  # (b, N)
        if exclude_self:
            rows = torch.arange(stop - start, device=query.device)
            block[rows, rows + start] = float("-inf")
        top = torch.topk(block, k, dim=1)  # sorted, largest first
        sims[start:stop], idx[start:stop] = top.values, top.indices
    return sims, idx


def _knn_keops(query, base, k, exclude_self):
    LazyTensor = _import_pykeops().LazyTensor

    extra = 1 if exclude_self else 0
    q = LazyTensor(query[:, None, :].contiguous())  # (M, 1, d)
    b = LazyTensor(base[None, :, :].contiguous())  # (1, N, d)
    negative_sim = -(q * b).sum(-1)  # (M, N) symbolic
    with contextlib.redirect_stdout(sys.stderr):  # keops reports kernel compilation on stdout
        idx = negative_sim.argKmin(k + extra, dim=1).long()  # (M, k + extra)
    if exclude_self:
        rows = torch.arange(query.shape[0], device=query.device)[:, None]  # (M, 1)
        is_self = idx == rows  # (M, k + 1)
        # Drop the self entry where found, else the last (k+1-th) neighbour.
        drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full_like(rows[:, 0], k))
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[rows[:, 0], drop] = False
        idx = idx[keep].view(-1, k)
    sims = (query[:, None, :] * base[idx]).sum(-1)  # (M, k)
    order = sims.argsort(dim=1, descending=True)
    return sims.gather(1, order), idx.gather(1, order)
