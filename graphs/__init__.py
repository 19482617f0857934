"""Graph building blocks on torch: exact kNN search, sparse matrices, conjugate gradient and Chebyshev
iteration, and dense product blocks with aligned rows (:mod:`.blocks`)."""

from .cg import CGInfo, chebyshev, chebyshev_iterations, conjugate_gradient
from .knn import BACKENDS, keops_available, knn, unique_rows
from .sparse import EdgeList, symmetric_normalise

__all__ = [
    "BACKENDS",
    "CGInfo",
    "EdgeList",
    "chebyshev",
    "chebyshev_iterations",
    "conjugate_gradient",
    "keops_available",
    "knn",
    "symmetric_normalise",
    "unique_rows",
]
