"""Notes for the user on stderr: one line each, silenced by ``set_quiet(True)`` or ``--quiet``.

Results go to stdout (CLI) or return values (API); everything a person should know about *how*
the inputs were treated (normalised, transposed, upcast) goes through :func:`note`.
"""

from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (``True``) or restore (``False``) the notes printed by :func:`note`."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    return _quiet


def note(message: str) -> None:
    """Print ``zsadapt: message`` on stderr unless notes are silenced."""
    if not _quiet:
        print(f"zsadapt: {message}", file=sys.stderr, flush=True)
