"""Results pages of the docs site, written by the benchmark scripts themselves, so that a figure
and the command that made it never drift apart.

A script calls :func:`write_page` with what it printed; the page lands in
``docs/results/<slug>.md`` with the exact command line, the date, the machine and the torch build
above the tables. The scripts run as ``python benchmarks/<name>.py``, which puts this folder first
on ``sys.path``.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from zsadapt.threads import ENV as THREADS_ENV, set_threads

# ZSADAPT_THREADS sets a benchmark's torch threads as it sets the CLI's: two benchmarks sharing
# the 2 cores should run with 1 each (each with both is several times slower).
if os.environ.get(THREADS_ENV):
    set_threads()

# ZSADAPT_RESULTS_DIR redirects the pages (tests run scripts without touching the committed ones).
DOCS_RESULTS = Path(os.environ.get("ZSADAPT_RESULTS_DIR")
                    or Path(__file__).resolve().parent.parent / "docs" / "results")


def machine() -> str:
    """One line: CPU count, GPU name if any, torch version and build."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch thread{'' if torch.get_num_threads() == 1 else 's'}")


def command_line() -> str:
    """The command that ran this script, as a user would type it (``ZSADAPT_DATA`` included when set)."""
    env = "ZSADAPT_DATA=../shared/data " if os.environ.get("ZSADAPT_DATA") else ""
    script = os.path.relpath(sys.argv[0], Path(__file__).resolve().parent.parent)
    return env + "python " + " ".join(shlex.quote(a) for a in [script, *sys.argv[1:]])


def echo(lines: list, line: str = "") -> None:
    """Print ``line`` at once (a long run shows each row as it is measured) and keep it in
    ``lines``, the body of the page :func:`write_page` writes at the end."""
    print(line, flush=True)
    lines.append(line)


def shots_page(slug: str, title: str, shots: int) -> tuple:
    """(slug, title) of a page measured with prototypes of ``shots`` labelled images per class:
    the page itself for the 1-shot pools, ``<slug>_<N>shot`` beside it otherwise (never over it)."""
    if shots == 1:
        return slug, title
    return f"{slug}_{shots}shot", f"{title}, {shots}-shot prototypes"


def write_page(slug: str, title: str, body: str, *, intro: str = "") -> Path:
    """Write ``docs/results/<slug>.md``: title, intro, the command, machine and date, then ``body``
    (Markdown: the tables the script printed). Returns the path."""
    DOCS_RESULTS.mkdir(parents=True, exist_ok=True)
    path = DOCS_RESULTS / f"{slug}.md"
    when = datetime.date.today().isoformat()
    text = (f"# {title}\n\n" + (f"{intro.strip()}\n\n" if intro.strip() else "")
            + f"Written by the benchmark itself on {when}:\n\n```bash\n{command_line()}\n```\n\n"
            + f"Machine: {machine()}.\n\n{body.strip()}\n")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
