"""Exact inner-product k-nearest-neighbour search on torch (CPU or CUDA), chunked over queries so
memory stays O(chunk x N), with an optional pykeops backend.

On unit vectors the inner product is the cosine similarity, so the neighbours are the most similar
rows. Measured (``benchmarks/bench_knn.py``): for CLIP-sized d the chunked torch matmul + topk is
far faster than pykeops on CPU, so ``backend="auto"`` always picks torch; keops is there for
callers who want its O(N) memory footprint on a GPU.

A pool searched against itself (``knn(X, X, k)``, every graph solver's case) needs only half of
the (N, N) product, since x_i . x_j = x_j . x_i. The torch backend then cuts the pool into strips
of rows (at least :data:`SELF_STRIPS`) and computes each strip against itself and the rows below
it only, from the last strip up, keeping a running top-k per row: a strip's rows take the top-k of
their part of the product, and the rows below take the entries of it that reach their current
k-th best (read down its columns; they hold their own strip's top-k by then, so few entries
qualify, and a comparison is far cheaper than a top-k). Every product block has its rows aligned
(:mod:`zsadapt.graphs.blocks`): 0.49 -> 0.39 s for a self-search of 7000 rows, whose strips are
875 to 7000 floats wide.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import torch

from .blocks import aligned_empty, aligned_width

#: Elements of the (chunk, N) similarity block held at once by the torch backend (64 MiB float32).
DEFAULT_BLOCK_ELEMENTS = 1 << 24

#: A self-search cuts the pool into at least this many strips of rows (each at most
#: DEFAULT_BLOCK_ELEMENTS similarities): a strip's square on the diagonal is computed whole, so the
#: share of the full product done is about (1 + 1 / SELF_STRIPS) / 2, 56% at 8.
SELF_STRIPS = 8

#: ... for pools of at least this many rows, and only when k is at most a strip's height: below it,
#: the strips' few dozen small operations cost more than the half product saves (N = 1000, d = 512,
#: k = 5: 11.1 ms against 12.1 ms for the full product; N = 4000: 130 against 209 ms; N = 256: 2.5
#: against 1.2 ms).
SELF_MIN_ROWS = 2048

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

    Rows whose first two entries already differ cannot repeat, so those entries are checked first
    (a sort of N integers) and the row-wise ``torch.unique`` (a lexicographic sort of the whole
    (N, d) array: 0.25 s at 50000 x 512 on one thread) runs only when some of them repeat.
    """
    if not _leading_entries_repeat(x):
        return x, None
    unique, inverse = torch.unique(x, dim=0, return_inverse=True)
    if unique.shape[0] == x.shape[0]:
        return x, None
    return unique, inverse


def _leading_entries_repeat(x: torch.Tensor) -> bool:
    """Whether two rows of ``x`` (N, d) have equal first two entries (equal as numbers: 0.0 and
    -0.0 alike, as for ``torch.unique``); False means every row is distinct. Exact: the entries
    are compared by their bits, packed into one int64 key per row."""
    if x.shape[0] < 2:
        return False
    lead = x[:, :2].to(torch.float32) + 0.0  # (N, <=2); + 0.0 turns -0.0 into 0.0
    bits = lead.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # (N, <=2) unsigned bits
    keys = bits[:, 0] if bits.shape[1] == 1 else (bits[:, 0] << 32) | bits[:, 1]  # (N,)
    return torch.unique(keys).numel() < x.shape[0]


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
        Without it, a search of a pool against itself (``query is base``, N >= SELF_MIN_ROWS)
        computes only half of the product (module docstring); with it, the full product.

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
    n = base.shape[0]
    if query is base and chunk is None and n >= SELF_MIN_ROWS and k <= _self_strip(n):
        return _knn_torch_self(base, k, exclude_self)
    return _knn_torch(query, base, k, exclude_self, chunk)


def _knn_torch(query, base, k, exclude_self, chunk):
    m, n = query.shape[0], base.shape[0]
    if chunk is None:
        chunk = max(1, DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    sims = torch.empty(m, k, dtype=query.dtype, device=query.device)  # (M, k)
    idx = torch.empty(m, k, dtype=torch.long, device=query.device)  # (M, k)
    buffer = aligned_empty(min(chunk, m), n, dtype=query.dtype, device=query.device)  # reused (b, N) block
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        block = torch.mm(query[start:stop], base.T, out=buffer[: stop - start])  # (b, N)
        if exclude_self:
            rows = torch.arange(stop - start, device=query.device)
            block[rows, rows + start] = float("-inf")
        top = torch.topk(block, k, dim=1)  # sorted, largest first
        sims[start:stop], idx[start:stop] = top.values, top.indices
    return sims, idx


def _self_strip(n: int) -> int:
    """Rows per strip of a self-search of ``n`` rows (module docstring)."""
    return max(1, min(DEFAULT_BLOCK_ELEMENTS // n, -(-n // SELF_STRIPS)))


def _knn_torch_self(x: torch.Tensor, k: int, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``knn(x, x, k)`` from the part of x x^T on and above the diagonal (module docstring).

    x : (N, d). Returns similarities (N, k), each row in decreasing order, and indices (N, k)."""
    n = x.shape[0]
    strip = _self_strip(n)
    sims = torch.full((n, k), float("-inf"), dtype=x.dtype, device=x.device)  # (N, k) running top-k
    idx = torch.zeros(n, k, dtype=torch.long, device=x.device)  # (N, k)
    # reused by every strip: no fresh pages per strip
    buffer = torch.empty(strip * aligned_width(n), dtype=x.dtype, device=x.device)
    for start in reversed(range(0, n, strip)):  # bottom-up: the rows below have their own strip's top-k
        stop = min(start + strip, n)
        block = aligned_empty(stop - start, n - start, dtype=x.dtype, storage=buffer)  # (b, N - start)
        torch.mm(x[start:stop], x[start:].T, out=block)  # rows start.. against columns start..
        if exclude_self:
            block[:, : stop - start].fill_diagonal_(float("-inf"))
        top = torch.topk(block, min(k, block.shape[1]), dim=1)  # (b, k') rows start..stop
        _fold(sims, idx, slice(start, stop), top.values, top.indices + start, k)
        if stop < n:  # the same entries, read down the columns: rows stop.. against columns start..stop
            _merge_sparse(sims, idx, block[:, stop - start:], stop, start, k)
    return sims, idx


def _merge_sparse(sims, idx, block, row, column, k) -> None:
    """Fold the transposed similarities ``block`` (b, W), of rows ``column``.. to rows
    ``row``..``row + W``, into the running top-k of rows ``row``.. (the column entries of each).

    Only an entry at least a row's current k-th best can enter its top-k, so the entries below it
    are dropped first (a comparison, far cheaper than a top-k over b): each of those rows already
    holds its own strip's top-k, so few remain."""
    threshold = sims[row:row + block.shape[1], k - 1]  # (W,) current k-th best of each row
    source, target = (block >= threshold).nonzero(as_tuple=True)  # (P,), (P,) entries that may enter
    if source.numel() == 0:
        return
    values = block[source, target]  # (P,)
    order = torch.argsort(values, descending=True, stable=True)
    order = order[torch.argsort(target[order], stable=True)]  # grouped by row, best first within a row
    target, source, values = target[order], source[order], values[order]
    rows, group, counts = torch.unique_consecutive(target, return_inverse=True, return_counts=True)  # (U,)
    rank = torch.arange(target.numel(), device=target.device) - (torch.cumsum(counts, 0) - counts)[group]
    keep = rank < k  # at most k candidates per row
    padded = torch.full((rows.numel(), k), float("-inf"), dtype=sims.dtype, device=sims.device)  # (U, k)
    padded_idx = torch.zeros(rows.numel(), k, dtype=torch.long, device=sims.device)  # (U, k)
    padded[group[keep], rank[keep]] = values[keep]
    padded_idx[group[keep], rank[keep]] = source[keep] + column
    _fold(sims, idx, rows + row, padded, padded_idx, k)


def _fold(sims, idx, rows, values, indices, k) -> None:
    """The running top-k ``sims``, ``idx`` (N, k) of ``rows`` (a slice or an index tensor, R rows)
    and the candidates ``values``, ``indices`` (R, k'): the best k of both, in place."""
    best = torch.topk(torch.cat([sims[rows], values], dim=1), k, dim=1)  # (R, k), sorted, largest first
    sims[rows] = best.values
    idx[rows] = torch.cat([idx[rows], indices], dim=1).gather(1, best.indices)


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
