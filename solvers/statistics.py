"""Per-class sufficient statistics of a Gaussian (or vMF) mixture, for solvers that carry what
they learned from one batch to the next (``zsadapt.Stream``) and for any M-step that wants them.

For images x_i (N, d) and soft assignments z_ic (N, C) the statistics are

    n_c = sum_i z_ic,    s_c = sum_i z_ic x_i,    q_c = sum_i z_ic x_i**2   (element-wise square),

everything a diagonal-Gaussian M-step needs: the means mu_c = s_c / n_c, the per-class variances
v_c = q_c / n_c - mu_c**2, the shared variance, and (for a vMF mixture) the mean resultant
length |s_c| / n_c. The statistics are additive over disjoint sets of rows, so the statistics of
a stream of batches are the sum of the batches' statistics (exactly, without forgetting), and
``scaled(gamma)`` implements an exponential forgetting factor: after T batches with factor gamma
the state is sum_t gamma**(T - t) stats_t, O(C d) whatever T.

This module holds the statistics only, no Solver class; it sits below every solver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: The keys of :meth:`ClassStatistics.to_dict` (after an optional prefix).
FIELDS = ("counts", "sums", "squares")


@dataclass
class ClassStatistics:
    """Soft counts, sums and sums of squares of the images assigned to each class.

    Attributes
    ----------
    counts : (C,) tensor
        n_c = sum_i z_ic, in images (soft).
    sums : (C, d) tensor
        s_c = sum_i z_ic x_i.
    squares : (C, d) tensor
        q_c = sum_i z_ic x_i**2 (element-wise).
    """

    counts: torch.Tensor
    sums: torch.Tensor
    squares: torch.Tensor

    def __post_init__(self) -> None:
        counts, sums, squares = self.counts, self.sums, self.squares
        if not all(isinstance(t, torch.Tensor) for t in (counts, sums, squares)):
            raise TypeError("ClassStatistics: counts, sums and squares must be torch tensors")
        if counts.dim() != 1 or sums.dim() != 2 or sums.shape != squares.shape or sums.shape[0] != counts.shape[0]:
            raise ValueError(
                "ClassStatistics: expected counts (C,), sums and squares (C, d); got "
                f"{tuple(counts.shape)}, {tuple(sums.shape)}, {tuple(squares.shape)}"
            )
        if len({counts.dtype, sums.dtype, squares.dtype}) != 1 or len({counts.device, sums.device, squares.device}) != 1:
            raise ValueError("ClassStatistics: counts, sums and squares must share one dtype and device")

    # ------------------------------------------------------------------ construction
    @classmethod
    def of(cls, X: torch.Tensor, z: torch.Tensor, *, dtype: Optional[torch.dtype] = None) -> "ClassStatistics":
        """The statistics of images ``X`` under soft assignments ``z``.

        Parameters
        ----------
        X : (N, d) tensor
            Images (unit rows in the solvers, but nothing here assumes it).
        z : (N, C) tensor
            Non-negative assignments (responsibilities; rows need not sum to 1: a row of weight w
            counts as w images).
        dtype : torch.dtype, optional
            Accumulate in this dtype (default: X's). float64 keeps a long stream's sums exact to
            round-off.

        Returns
        -------
        ClassStatistics
            n = z^T 1 (C,), s = z^T X (C, d), q = z^T X**2 (C, d): three matmuls, no (N, C, d)
            tensor.
        """
        if X.dim() != 2 or z.dim() != 2 or X.shape[0] != z.shape[0]:
            raise ValueError(
                f"ClassStatistics.of: expected X (N, d) and z (N, C) with the same N, got "
                f"{tuple(X.shape)} and {tuple(z.shape)}"
            )
        dtype = dtype or X.dtype
        X = X.to(dtype)
        z = z.to(device=X.device, dtype=dtype)
        return cls(z.sum(dim=0), z.T @ X, z.T @ (X * X))

    @classmethod
    def zeros(cls, n_classes: int, dim: int, *, dtype: torch.dtype = torch.float32,
              device: Optional[torch.device] = None) -> "ClassStatistics":
        """Empty statistics (no image seen) for ``n_classes`` classes in dimension ``dim``."""
        if n_classes < 1 or dim < 1:
            raise ValueError(f"ClassStatistics.zeros: need n_classes >= 1 and dim >= 1, got {n_classes}, {dim}")
        return cls(
            torch.zeros(n_classes, dtype=dtype, device=device),
            torch.zeros(n_classes, dim, dtype=dtype, device=device),
            torch.zeros(n_classes, dim, dtype=dtype, device=device),
        )

    # ------------------------------------------------------------------ shape
    @property
    def n_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def dim(self) -> int:
        return self.sums.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.counts.dtype

    @property
    def device(self) -> torch.device:
        return self.counts.device

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: "ClassStatistics") -> "ClassStatistics":
        """Statistics of the union of the two sets of rows (other is cast to self's dtype and
        device)."""
        if not isinstance(other, ClassStatistics):
            return NotImplemented
        if other.sums.shape != self.sums.shape:
            raise ValueError(
                f"ClassStatistics: cannot add statistics of shape {tuple(other.sums.shape)} to "
                f"{tuple(self.sums.shape)} (C, d)"
            )
        other = other.to(dtype=self.dtype, device=self.device)
        return ClassStatistics(self.counts + other.counts, self.sums + other.sums, self.squares + other.squares)

    def scaled(self, factor: float) -> "ClassStatistics":
        """Every statistic times ``factor`` (forgetting: ``state.scaled(gamma) + batch``).

        Means and variances do not change; the weight of what was seen against the next batch
        does. ``factor`` must be finite and >= 0 (0 forgets everything).
        """
        factor = float(factor)
        if not factor >= 0.0 or factor == float("inf"):
            raise ValueError(f"ClassStatistics.scaled: factor must be finite and >= 0, got {factor!r}")
        return ClassStatistics(self.counts * factor, self.sums * factor, self.squares * factor)

    def scaled_per_class(self, factors: torch.Tensor) -> "ClassStatistics":
        """Class c's statistics times ``factors[c]`` ((C,), finite, >= 0): the images of some
        classes count for less (``zsadapt.Stream`` gates its prior by each class's presence in
        the batch)."""
        factors = torch.as_tensor(factors, dtype=self.dtype, device=self.device)
        if factors.shape != self.counts.shape:
            raise ValueError(f"ClassStatistics.scaled_per_class: expected {self.n_classes} factors, "
                             f"got shape {tuple(factors.shape)}")
        if not bool(torch.isfinite(factors).all()) or bool((factors < 0).any()):
            raise ValueError("ClassStatistics.scaled_per_class: factors must be finite and >= 0")
        return ClassStatistics(self.counts * factors, self.sums * factors[:, None], self.squares * factors[:, None])

    def scale_(self, factor: float) -> "ClassStatistics":
        """:meth:`scaled` in place (no (C, d) copy: a stream's state at tens of thousands of
        classes is hundreds of MB); returns self."""
        factor = float(factor)
        if not factor >= 0.0 or factor == float("inf"):
            raise ValueError(f"ClassStatistics.scale_: factor must be finite and >= 0, got {factor!r}")
        if factor != 1.0:
            for t in (self.counts, self.sums, self.squares):
                t.mul_(factor)
        return self

    def add_rows_(self, X: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
                  by_product: Optional[bool] = None) -> "ClassStatistics":
        """Add images ``X`` (N, d), image i to class ``labels[i]`` (N,) with weight ``weights[i]``
        (N,), in place: the same as ``self + ClassStatistics.of(X, z)`` for the one-hot z with
        z[i, labels[i]] = weights[i], touching only the rows of those classes; returns self.

        ``by_product`` (default: on any device but the CPU) adds them through the one-hot z as a
        product; otherwise they are added one by one (``index_add_``: sequential on the CPU, so
        deterministic; on a GPU it accumulates with atomic adds, in a run-dependent order)."""
        if X.dim() != 2 or X.shape[1] != self.dim or labels.shape != (X.shape[0],) or weights.shape != labels.shape:
            raise ValueError(f"ClassStatistics.add_rows_: expected X (N, {self.dim}), labels and weights (N,); "
                             f"got {tuple(X.shape)}, {tuple(labels.shape)}, {tuple(weights.shape)}")
        X = X.to(dtype=self.dtype, device=self.device)
        weights = weights.to(dtype=self.dtype, device=self.device)
        labels = labels.to(device=self.device)
        if by_product is None:
            by_product = self.device.type != "cpu"
        if by_product:
            z = torch.zeros(X.shape[0], self.n_classes, dtype=self.dtype, device=self.device)  # (N, C)
            z[torch.arange(X.shape[0], device=self.device), labels] = weights
            self.counts.add_(z.sum(dim=0))
            self.sums.addmm_(z.T, X)
            self.squares.addmm_(z.T, X * X)
            return self
        weighted = weights[:, None] * X  # (N, d)
        self.counts.index_add_(0, labels, weights)
        self.sums.index_add_(0, labels, weighted)
        self.squares.index_add_(0, labels, weighted * X)
        return self

    def to(self, *, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> "ClassStatistics":
        """A copy (or self when nothing changes) on ``device`` in ``dtype``."""
        return ClassStatistics(*(t.to(dtype=dtype, device=device) for t in (self.counts, self.sums, self.squares)))

    def clone(self) -> "ClassStatistics":
        return ClassStatistics(self.counts.clone(), self.sums.clone(), self.squares.clone())

    # ------------------------------------------------------------------ M-step quantities
    def means(self, eps: float = 1e-12) -> torch.Tensor:
        """Class means mu_c = s_c / n_c, (C, d); a class with n_c <= eps gets mean 0 (its sum
        is 0 too)."""
        return self.sums / self.counts.clamp_min(eps)[:, None]

    def variances(self, means: Optional[torch.Tensor] = None, eps: float = 1e-12) -> torch.Tensor:
        """Per-class diagonal variances about ``means`` (default: the class means), (C, d):

            v_c = (q_c - 2 m_c * s_c + n_c m_c**2) / n_c      (= q_c / n_c - mu_c**2 at m = mu),

        clamped at 0 (round-off); a class with n_c <= eps gets 0 (no evidence: the caller
        regularises or shrinks).
        """
        means = self.means(eps) if means is None else means
        spread = self.squares - 2.0 * means * self.sums + self.counts[:, None] * means * means  # (C, d)
        return spread.clamp_min(0.0) / self.counts.clamp_min(eps)[:, None]

    def shared_variance(self, means: Optional[torch.Tensor] = None, *, covariance: str = "diag",
                        reg: float = 0.0, eps: float = 1e-12) -> torch.Tensor:
        """The variance shared by all classes about ``means`` (default: the class means):
        v = sum_c (q_c - 2 m_c * s_c + n_c m_c**2) / sum_c n_c, (d,) for ``"diag"`` or (1,) for
        ``"spherical"`` (averaged over dimensions), plus ``reg``; the same as
        ``solvers.mixture.shared_variance`` on the rows these statistics summarise."""
        if covariance not in ("diag", "spherical"):
            raise ValueError(f"covariance must be 'diag' or 'spherical', got {covariance!r}")
        means = self.means(eps) if means is None else means
        spread = self.squares - 2.0 * means * self.sums + self.counts[:, None] * means * means  # (C, d)
        total = (spread.sum(dim=0) / self.counts.sum().clamp_min(eps)).clamp_min(0.0)  # (d,)
        if covariance == "spherical":
            total = total.mean().reshape(1)
        return total + reg

    def resultant_lengths(self, eps: float = 1e-12) -> torch.Tensor:
        """Mean resultant length r_c = |s_c| / n_c of each class, (C,): the statistic of a vMF
        concentration estimate (for unit rows, 0 <= r_c <= 1)."""
        return self.sums.norm(dim=1) / self.counts.clamp_min(eps)

    # ------------------------------------------------------------------ saving
    def to_dict(self, prefix: str = "") -> dict:
        """The tensors by name (``prefix + "counts"``, ...), contiguous and on the CPU, as
        ``safetensors.torch.save_file`` takes them."""
        return {prefix + key: getattr(self, key).detach().contiguous().cpu() for key in FIELDS}

    @classmethod
    def from_dict(cls, tensors: dict, prefix: str = "", *, where: str = "statistics") -> "ClassStatistics":
        """Inverse of :meth:`to_dict`. ``ValueError`` (naming ``where``, e.g. the file) when a
        tensor is missing, the shapes disagree, or a value is not finite or a count is negative."""
        missing = [prefix + key for key in FIELDS if prefix + key not in tensors]
        if missing:
            raise ValueError(f"{where}: missing tensor(s) {', '.join(missing)}")
        parts = [tensors[prefix + key] for key in FIELDS]
        try:
            stats = cls(*parts)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise ValueError(f"{where}: the class statistics hold non-finite values")
        if bool((stats.counts < 0).any()):
            raise ValueError(f"{where}: the class statistics hold negative counts")
        return stats
