"""Validation of a pool: shapes, finiteness, orientation, normalisation.

Every check raises a one-line ``ValueError`` (or ``TypeError`` for non-numeric input) that names
the array, and the file when the array came from one, so the CLI can print it as is.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from .arrays import to_tensor
from .messages import is_quiet, note, note_once

#: A row whose L2 norm is this far from 1 counts as "not normalised".
NORM_TOLERANCE = 1e-3


def _check_matrix(t: torch.Tensor, name: str, what: str) -> None:
    if t.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array {what}, got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name}: has 0 feature dimensions")
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name}: contains NaN or infinite values (first in row {bad})")


def orient_text(text: torch.Tensor, d: int, name: str) -> torch.Tensor:
    """Text features as (C, d). A (d, C) array (ZLaP's and open_clip's layout) is transposed when
    only that reading fits ``d``; a square (d, d) array is read as (C, d) and said so."""
    if text.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (C, d), got shape {tuple(text.shape)}")
    rows, cols = text.shape
    if cols == d:
        if rows == d:
            note_once(f"{name} is square ({rows} x {cols}); reading it as (C, d) = one class per row",
                      key=("square text", rows, cols))
        return text
    if rows == d:
        note(f"{name} has shape ({rows}, {cols}); reading it as (d, C) and transposing to (C, d)")
        return text.T
    raise ValueError(
        f"{name}: shape {tuple(text.shape)} does not match the image feature dimension d = {d}"
    )


def plain_unit_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Rows of the (N, d) float tensor ``t`` divided by their norms, as :func:`l2_normalise`
    computes them, when every row is plain: its norm finite and well inside the dtype's range
    (then no entry is NaN or inf, and the row is not all zeros). None otherwise: the caller then
    takes the full checks. One pass over ``t`` and one division instead of isfinite, abs and amax
    over every entry (a norm above 1e-18 sqrt(d) implies a max |entry| above 1e-18)."""
    norms = torch.linalg.vector_norm(t, dim=1)  # (N,)
    plain = torch.isfinite(norms) & (norms > 1e-18 * t.shape[1] ** 0.5) & (norms < 1e18)
    return t / norms[:, None] if bool(plain.all()) else None


def l2_normalise(t: torch.Tensor, name: str, *, allow_zero: bool = False) -> tuple[torch.Tensor, bool]:
    """Rows of ``t`` scaled to unit L2 norm; also whether any row was not unit-norm already.

    Rows of zero norm have no direction: refused, or with ``allow_zero`` left at zero (cosine 0 to
    everything), which the scikit-learn estimators use for generic tabular data.
    """
    peak = t.abs().amax(dim=1) if t.shape[1] else t.new_zeros(t.shape[0])  # (rows,)
    zero = peak == 0
    if not allow_zero and bool(zero.any()):
        raise ValueError(f"{name}: row {int(zero.nonzero()[0, 0])} is all zeros (no direction)")
    # Squares of float32 entries above ~1e19 overflow to inf (the row would silently become 0)
    # and below ~1e-19 lose precision or underflow to 0: bring such rows to a max entry of 1
    # first. Other rows are divided by their norm directly.
    extreme = ~zero & ((peak > 1e18) | (peak < 1e-18))
    if bool(extreme.any()):
        t = torch.where(extreme[:, None], t / peak[:, None], t)
    norms = t.norm(dim=1)  # (rows,)
    changed = bool(extreme.any()) or bool(((norms - 1).abs() > NORM_TOLERANCE).any())
    if allow_zero:
        norms = torch.where(zero, torch.ones_like(norms), norms)
    return t / norms[:, None], changed


def prepare_features(
    image_features: Any,
    text_features: Any,
    device: torch.device,
    *,
    image_name: str = "image_features",
    text_name: str = "text_features",
    min_classes: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated, float32, L2-normalised ``(X, T)`` on ``device``.

    Parameters
    ----------
    image_features : array-like, shape (N, d)
    text_features : array-like, shape (C, d) or (d, C) when unambiguous
    device : torch.device
    image_name, text_name : str
        How error messages name the two arrays (e.g. ``"pool.npz: image_features"``).

    Returns
    -------
    X : torch.Tensor, shape (N, d), float32, unit rows
    T : torch.Tensor, shape (C, d), float32, unit rows
    """
    X = to_tensor(image_features, image_name, device)
    T = to_tensor(text_features, text_name, device)
    _check_matrix(X, image_name, "(N, d)")
    n, d = X.shape
    if n == 0:
        raise ValueError(f"{image_name}: the pool is empty (0 images)")
    T = orient_text(T, d, text_name)
    _check_matrix(T, text_name, "(C, d)")
    if T.shape[0] < min_classes:
        raise ValueError(f"{text_name}: needs at least {min_classes} classes, got {T.shape[0]}")
    X, x_changed = l2_normalise(X, image_name)
    T, t_changed = l2_normalise(T, text_name)
    if x_changed or t_changed:
        which = " and ".join(n for n, c in ((image_name, x_changed), (text_name, t_changed)) if c)
        note(f"{which} were not L2-normalised; normalising rows")
    _note_duplicate_classes(T, text_name)
    return X, T


def _note_duplicate_classes(T: torch.Tensor, name: str) -> None:
    """A note naming classes whose unit rows of ``T`` (C, d) are identical: no method can tell
    them apart (rounding decides which of them takes their images), and mixture methods, which
    give each a component, lose accuracy on the other classes too."""
    if T.shape[0] < 2 or is_quiet():  # nothing would be shown: skip the work (0.2 s at C = 100,000)
        return
    rows = T.detach().cpu().numpy()  # (C, d)
    # Equal rows have projections equal up to rounding (BLAS sums rows in different orders): sort
    # the projections, and compare exactly only rows whose projections are that close.
    keys = rows.astype(np.float64) @ np.linspace(1.0, 2.0, rows.shape[1])  # (C,)
    order = np.argsort(keys, kind="stable")
    close = np.flatnonzero(np.diff(keys[order]) <= 1e-9 * (1.0 + np.abs(keys[order][1:])))  # (candidates,)
    firsts = np.arange(rows.shape[0])  # the lowest class with the same row, where one is found
    for position in close:
        previous, current = int(order[position]), int(order[position + 1])
        if np.array_equal(rows[previous], rows[current]):
            firsts[current] = firsts[previous] = min(firsts[previous], firsts[current])
    pairs = sorted((int(f), c) for c, f in enumerate(firsts) if f != c)
    if pairs:
        shown = ", ".join(f"{a} = {b}" for a, b in pairs[:3]) + (f" and {len(pairs) - 3} more" if len(pairs) > 3 else "")
        note_once(f"{name}: classes with identical embeddings ({shown}): no method can tell them apart",
                  key=("identical classes", tuple(pairs)))


def check_labels(labels: Any, n_images: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Ground-truth labels as an int64 numpy array of shape (N,) with values in ``0..C-1``."""
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n_images:
        raise ValueError(f"{name}: expected shape ({n_images},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"{name}: values must lie in 0..{n_classes - 1}, found {arr.min()}..{arr.max()}"
        )
    return arr


def check_classnames(classnames: Optional[Sequence], n_classes: int, name: str) -> Optional[list]:
    """Class names as a list of ``C`` strings (or ``None``)."""
    if classnames is None:
        return None
    names = [
        c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
        for c in np.asarray(classnames).reshape(-1).tolist()
    ]
    if len(names) != n_classes:
        raise ValueError(f"{name}: {len(names)} names for {n_classes} classes")
    return names


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` as an int in ``0..2**63 - 1`` (what every torch and numpy generator takes).

    ``TypeError`` for a non-integer (a string, a float, a bool), ``ValueError`` out of range; both
    one line naming ``name``.
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {type(seed).__name__} {seed!r}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name}: must lie in 0..2**63 - 1, got {seed}")
    return int(seed)
