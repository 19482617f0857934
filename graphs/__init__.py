"""Graph building blocks on torch: exact kNN search, sparse matrices, conjugate gradient."""

from .cg import CGInfo, conjugate_gradient
from .knn import BACKENDS, keops_available, knn, unique_rows
from .sparse import EdgeList, symmetric_normalise

__all__ = [
    "BACKENDS",
    "CGInfo",
    "EdgeList",
    "conjugate_gradient",
    "keops_available",
    "knn",
    "symmetric_normalise",
    "unique_rows",
]
