"""Optional dependencies: import them on first use, with a one-line error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is missing or broken; the message says what to install."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtra` naming ``pip install 'zsadapt[extra]'``.

    A module that is installed but fails to import (a torch / torchvision build mismatch makes
    ``import open_clip`` raise ``RuntimeError``) is reported with the original error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingExtra(
            f"{purpose} needs the optional package {err.name or module}: pip install 'zsadapt[{extra}]'"
        ) from None
    except Exception as err:  # an installed but broken package: say so instead of a traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise MissingExtra(
            f"{purpose} needs {module}, which is installed but fails to import "
            f"({type(err).__name__}: {first}); see README, Troubleshooting"
        ) from None
