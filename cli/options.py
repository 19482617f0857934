"""Options shared by several commands, and the translation of user errors into one-line messages."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import click

from ..api import describe_methods
from ..extras import MissingExtra
from ..messages import set_quiet
from ..solvers import NotFittedError

#: Option names the commands use themselves; a solver parameter may not take one of them.
RESERVED = {"method", "methods", "device", "seed", "quiet", "out", "overwrite", "params",
            "image_features", "text_features", "labels", "json", "progress", "weighting", "initial"}


def user_errors(command: Callable) -> Callable:
    """Turn the errors bad input raises into ``Error: <one line>`` and exit code 1 (never a
    traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError, OSError, NotFittedError, NotImplementedError, MissingExtra) as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise click.ClickException(message) from None

    return wrapper


def common_options(command: Callable) -> Callable:
    """``--device``, ``--seed`` and ``--quiet``."""
    command = click.option("--quiet", "-q", is_flag=True, help="No notes or progress on stderr.")(command)
    command = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(command)
    command = click.option(
        "--device", default=None, help="Torch device to compute on (cpu, cuda, cuda:1). Default: cpu."
    )(command)
    return command


def initial_options(command: Callable) -> Callable:
    """``--weighting`` (prompt ensembles) and ``--initial`` (the classifier solvers start from)."""
    command = click.option(
        "--initial", type=click.Choice(["text", "inmap"]), default="text", show_default=True,
        help="Initial classifier: the (weighted) text classifier, or InMaP proxies learned from it "
             "(--init inmap, the papers' spelling, means --initial inmap).",
    )(command)
    command = click.option(
        "--weighting", type=click.Choice(["mean", "zpe", "autoclip"]), default="mean", show_default=True,
        help="How per-template text features (C, P, d) are combined: mean, ZPE, or AutoCLIP.",
    )(command)
    return command


def apply_quiet(quiet: bool) -> None:
    set_quiet(quiet)


@contextlib.contextmanager
def results_only_on_stdout() -> Iterator[None]:
    """Run library code with anything it prints sent to stderr, and warnings as one line each.

    stdout must carry only the command's results (``--json`` output is parsed by scripts), but
    third-party code prints there: pykeops announces "[KeOps] Warning : CUDA libraries not
    found" with ``print`` when it is first imported. Python warnings (e.g. a solver's
    ``ConvergenceWarning``) are shown as ``zsadapt: warning: <message>`` instead of two lines
    with a source excerpt.
    """
    err = sys.stderr

    def show(message, category, filename, lineno, file=None, line=None):
        first = str(message).strip().splitlines()
        print(f"zsadapt: warning: {first[0] if first else category.__name__}", file=err, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        with contextlib.redirect_stdout(err):
            yield


def pool_options(command: Callable) -> Callable:
    """The pool: a POOL file argument, or separate feature files."""
    command = click.option("--labels", "labels_path", type=click.Path(dir_okay=False),
                           help="Ground-truth labels file (.npy), for accuracy.")(command)
    command = click.option("--text-features", "text_path", type=click.Path(dir_okay=False),
                           help="Class text features (C, d) file, instead of POOL.")(command)
    command = click.option("--image-features", "image_path", type=click.Path(dir_okay=False),
                           help="Image features (N, d) file, instead of POOL.")(command)
    command = click.argument("pool", required=False, type=click.Path(dir_okay=False))(command)
    return command


def _metavar(specs: list) -> str:
    """What ``--help`` shows as an option's value: the choices, or the type all owners share.
    (The option itself takes text; the chosen method converts and checks it.)"""
    if specs[0].choices and all(spec.choices == specs[0].choices for spec in specs):
        return "[" + "|".join(map(str, specs[0].choices)) + "]"
    types = {spec.type for spec in specs}
    names = {int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", str: "TEXT"}
    return names.get(types.pop(), "TEXT") if len(types) == 1 else "VALUE"


def solver_parameter_options(command: Callable) -> Callable:
    """One ``--name`` option per hyper-parameter of any registered solver (values are checked by
    the chosen method), plus ``--params FILE`` (a JSON object)."""
    by_name: dict = {}
    for method in describe_methods():
        for name, spec in method["params"].items():
            if name in RESERVED:
                raise RuntimeError(f"solver {method['name']} uses the reserved parameter name {name!r}")
            by_name.setdefault(name, []).append((method["name"], spec))
    for name in sorted(by_name, reverse=True):
        owners = by_name[name]
        # A default of None is resolved by the solver, and its help says how.
        help_text = "; ".join(f"{m}: {s.help}" + ("" if s.default is None else f" (default {s.default})")
                              for m, s in owners)
        command = click.option(f"--{name.replace('_', '-')}", name, default=None, help=help_text,
                               metavar=_metavar([spec for _, spec in owners]))(command)
    command = click.option(
        "--params", "params_file", type=click.Path(dir_okay=False),
        help="JSON file of hyper-parameters: an object, or one object per method name; "
             "options given on the line win.",
    )(command)
    return command


def read_json_object(params_file: str) -> dict:
    """The JSON object in ``params_file``; one-line ``ValueError`` naming the file otherwise."""
    path = Path(params_file)
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a JSON object of parameters")
    return loaded


def collect_params(params_file: Optional[str], method: str, given: dict) -> dict:
    """Hyper-parameters for ``method``: the JSON file's, then the options given on the line."""
    params: dict = {}
    if params_file is not None:
        loaded = read_json_object(params_file)
        names = {m["name"] for m in describe_methods()}
        if loaded and set(loaded) <= names and all(isinstance(v, dict) for v in loaded.values()):
            # A file keyed by method ({"zlap": {...}, "zeroshot": {...}}): this method's entry.
            loaded = loaded.get(method, {})
        params.update(loaded)
    params.update({k: v for k, v in given.items() if v is not None})
    return params
