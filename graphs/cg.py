"""Conjugate gradient for A X = B with many right-hand sides at once (Hestenes & Stiefel, 1952).

Each column runs its own CG (its own step sizes), but all columns share one sparse x dense product
per iteration, which is where the time goes; columns that have converged are dropped from the
active block so they cost nothing afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class CGInfo:
    """Diagnostics of :func:`conjugate_gradient`."""

    iterations: int  # iterations of the slowest column
    converged: bool  # every column reached the tolerance
    max_relative_residual: float  # max over columns of ||b - A x|| / ||b|| (recursively updated)


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    x0: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, CGInfo]:
    """Solve A X = B for symmetric positive definite A given as ``matvec``.

    Parameters
    ----------
    matvec : callable
        ``matvec(P)`` returns ``A @ P`` for a (n, m') block ``P``.
    b : (n, m) tensor
        Right-hand sides, one per column.
    tol : float
        A column stops when ||r|| <= tol * ||b|| (relative residual, as scipy's ``rtol``).
    max_iter : int
        Iteration cap per column.
    x0 : (n, m) tensor, optional
        Starting point (zeros by default).

    Returns
    -------
    x : (n, m) tensor
    info : CGInfo
    """
    if b.ndim == 1:
        x, info = conjugate_gradient(matvec, b[:, None], tol=tol, max_iter=max_iter,
                                     x0=None if x0 is None else x0[:, None])
        return x[:, 0], info
    x = torch.zeros_like(b) if x0 is None else x0.clone()  # (n, m)
    r = b - matvec(x) if x0 is not None else b.clone()  # (n, m) residuals
    threshold = tol * b.norm(dim=0)  # (m,)
    b_norm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)  # (m,)
    active = torch.arange(b.shape[1], device=b.device)  # columns still iterating
    p = r.clone()  # (n, a) search directions
    rs = _column_dot(r, r)  # (a,) squared residual norms
    iterations = 0
    final_residual = torch.zeros(b.shape[1], dtype=b.dtype, device=b.device)
    for _ in range(max_iter + 1):
        done = rs.sqrt() <= threshold[active]  # (a,)
        if bool(done.any()):
            final_residual[active[done]] = rs[done].sqrt() / b_norm[active[done]]
            keep = ~done
            active, r, p, rs = active[keep], r[:, keep], p[:, keep], rs[keep]
        if active.numel() == 0 or iterations == max_iter:
            break
        ap = matvec(p)  # (n, a)
        step = rs / _column_dot(p, ap)  # (a,) alpha_j = r_j.r_j / p_j.A p_j
        if active.numel() == x.shape[1]:
            x.addcmul_(p, step)  # in place: no (n, a) temporary while every column is active
        else:
            x.index_add_(1, active, p * step)
        r.addcmul_(ap, step, value=-1.0)
        rs_new = _column_dot(r, r)  # (a,)
        p = p.mul_(rs_new / rs).add_(r)  # p_j <- r_j + beta_j p_j
        rs = rs_new
        iterations += 1
    if active.numel():
        final_residual[active] = rs.sqrt() / b_norm[active]
    info = CGInfo(
        iterations=iterations,
        converged=active.numel() == 0,
        max_relative_residual=float(final_residual.max()) if final_residual.numel() else 0.0,
    )
    return x, info


def _column_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m,) inner products of matching columns of two (n, m) blocks. (An elementwise product and
    a column sum: on CPU over ten times faster than ``einsum("ij,ij->j")``, measured.)"""
    return (a * b).sum(0)
