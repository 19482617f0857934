"""Solver registry. Every module in this package that defines a :class:`Solver` subclass
decorated with :func:`register` becomes a method of ``zsadapt.refine`` and the CLI: adding a
method means adding one module here."""

from __future__ import annotations

import importlib
import pkgutil

from .base import NotFittedError, Param, Problem, Solver, SolverOutput

_REGISTRY: dict = {}

#: The method ``zsadapt.refine``, ``zsadapt refine`` and ``zsadapt label --adapt`` use when none is
#: named (the README's results table says why this one).
DEFAULT_METHOD = "auto"


def register(cls: type) -> type:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise TypeError(f"{cls!r} is not a Solver subclass")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a solver named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def get_solver(name: str) -> type:
    """The solver class registered as ``name``; ``ValueError`` listing the known names if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def available() -> list:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def _import_all() -> None:
    # The baseline first, so that "all methods" lists zeroshot first and comparisons start from it.
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: (m.name != "zeroshot", m.name)):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = [
    "DEFAULT_METHOD",
    "NotFittedError",
    "Param",
    "Problem",
    "Solver",
    "SolverOutput",
    "available",
    "get_solver",
    "register",
]
