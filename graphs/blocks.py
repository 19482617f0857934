"""Dense product blocks whose rows start on 64-byte boundaries.

MKL's single-precision GEMM, torch's CPU matmul, writes an output whose row length (its leading
dimension) is not a multiple of 8 floats at about 55-78 GFLOP/s on this project's CPU and the
others at about 95 (one thread; measured 2026-12-06: a (1048, 512) x (512, C) product at C = 843,
917 or 999 against 848, 920 or 1000, and a self-kNN strip 875 or 3500 floats wide against 3504 or
7000). Pool sizes and class counts are whatever the user's data is (Stanford Cars has 196 classes,
Oxford Pets 37), so a product whose width we do not choose is written into :func:`aligned_empty`,
a view whose rows are padded to :data:`ROW_ALIGNMENT` elements: the same values bit for bit (the
padding is never read), at the aligned speed.
"""

from __future__ import annotations

from typing import Optional

import torch

#: Row stride, in elements, of an :func:`aligned_empty` block (64 bytes in float32).
ROW_ALIGNMENT = 16


def aligned_width(width: int) -> int:
    """``width`` rounded up to a multiple of :data:`ROW_ALIGNMENT`."""
    return -(-width // ROW_ALIGNMENT) * ROW_ALIGNMENT


def aligned_empty(rows: int, width: int, *, dtype: torch.dtype, device: Optional[torch.device] = None,
                  storage: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An uninitialised (rows, width) tensor whose row stride is :func:`aligned_width` (width),
    for ``torch.mm(..., out=)``. ``storage``: a 1-D tensor of at least rows x aligned_width(width)
    elements to carve it from (a buffer reused across blocks), else a fresh allocation."""
    stride = aligned_width(width)
    if storage is None:
        storage = torch.empty(rows * stride, dtype=dtype, device=device)
    return storage[: rows * stride].view(rows, stride)[:, :width]
