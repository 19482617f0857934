"""Options shared by several commands, and the translation of user errors into one-line messages.

Nothing here imports torch or the solvers at import time: ``--help`` must stay fast. The solvers'
parameter options are built from the registry (which imports torch) and kept as JSON in the user's
cache folder, keyed by the solvers' source files, so that ``zsadapt refine --help`` reads them
without torch from the second time on (:func:`solver_table`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import click

from .. import __version__
from ..extras import MissingExtra
from ..messages import first_line, heartbeat, is_quiet, set_quiet, stop_heartbeat

#: Option names the commands use themselves; a solver parameter may not take one of them.
RESERVED = {"method", "methods", "device", "seed", "quiet", "out", "overwrite", "params",
            "image_features", "text_features", "labels", "json", "progress", "weighting", "initial",
            "threads"}


def user_errors(command: Callable) -> Callable:
    """Turn the errors bad input raises into ``Error: <one line>`` and exit code 1 (never a
    traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as err:
            memory = _out_of_memory(err)
            if memory is None and not isinstance(err, _user_error_types()):
                raise
            message = memory or first_line(err)
            raise click.ClickException(message) from None
        finally:
            stop_heartbeat()  # started by --threads' callback; never outlives the command

    return wrapper


def _out_of_memory(err: Exception) -> Optional[str]:
    """One line for an allocation that failed (numpy's ``MemoryError``, torch's CPU allocator
    error or CUDA out-of-memory error), else None. The OS may also kill a process that runs out
    of memory without any error: :mod:`zsadapt.memory` refuses up front what cannot fit."""
    text = str(err).strip()
    cuda = type(err).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError, without importing torch
    if not (isinstance(err, MemoryError) or cuda
            or (isinstance(err, RuntimeError) and "can't allocate memory" in text)):
        return None
    detail = text.splitlines()[0] if text else type(err).__name__
    if "DefaultCPUAllocator" in detail:  # "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..."
        detail = detail[detail.index("DefaultCPUAllocator"):]
    return (f"out of memory ({detail}); use a smaller --batch-size where the command has one, or for a "
            "large pool refine a sample with --save-model and label the rest with zsadapt label")


def _user_error_types() -> tuple:
    """The exceptions bad input raises; a solver's ``NotFittedError`` only once solvers are loaded
    (an error raised before that cannot be one)."""
    types = (ValueError, TypeError, OSError, NotImplementedError, MissingExtra)
    base = sys.modules.get("zsadapt.solvers.base")
    return types + ((base.NotFittedError,) if base is not None else ())


def _set_threads(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> None:
    """``--threads`` callback: set torch's thread count before the command runs.

    This is where a command that computes first imports torch (``--help`` never gets here), so
    the start-up :func:`~zsadapt.messages.heartbeat` starts here: a line every few seconds until
    the command's first note or progress line, or its end (also when parsing fails later)."""
    if ctx.resilient_parsing:
        return
    from ..threads import set_threads

    start = time.monotonic()
    name = " ".join(ctx.command_path.split()[1:]) or ctx.info_name  # "refine", "encode images"
    desc = f"{name}: starting (importing torch and the solvers, reading the inputs)"
    heartbeat(desc, start=start)
    ctx.find_root().call_on_close(stop_heartbeat)
    try:
        set_threads(value)
    except ValueError as err:
        raise click.BadParameter(str(err).replace("threads: ", "", 1), ctx=ctx, param=param) from None
    heartbeat(desc, start=start)  # on again after the thread-count note, which ended it


def quiet_option(command: Callable, help_text: str = "No notes or progress on stderr.") -> Callable:
    """``--quiet``, applied first (eager) so that notes printed while other options are read obey it."""
    return click.option("--quiet", "-q", is_flag=True, is_eager=True, help=help_text,
                        callback=lambda ctx, param, value: apply_quiet(value))(command)


def threads_option(command: Callable) -> Callable:
    """``--threads N`` (also ``ZSADAPT_THREADS``): torch's CPU threads, set before the command runs."""
    return click.option(
        "--threads", default=None, expose_value=False, callback=_set_threads, metavar="N",
        help="CPU threads for torch (default: the CPUs this process may use, less those other "
             "processes keep busy, also with 0 or 'auto'; also ZSADAPT_THREADS).",
    )(command)


def common_options(command: Callable) -> Callable:
    """``--device``, ``--seed``, ``--threads`` and ``--quiet``."""
    command = quiet_option(command)
    command = threads_option(command)
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
    """Silence (or restore) the notes on stderr for this command."""
    set_quiet(quiet)


@contextlib.contextmanager
def results_only_on_stdout() -> Iterator[None]:
    """Run library code with anything it prints sent to stderr (nowhere under ``--quiet``), and
    warnings as one line each.

    stdout must carry only the command's results (``--json`` output is parsed by scripts), but
    third-party code prints there: pykeops announces "[KeOps] Warning : CUDA libraries not
    found" with ``print`` when it is first imported, and reports each kernel it compiles. Python
    warnings (e.g. a solver's ``ConvergenceWarning``) are shown as ``zsadapt: warning: <message>``
    instead of two lines with a source excerpt, with or without ``--quiet``.
    """
    err = sys.stderr

    def show(message, category, filename, lineno, file=None, line=None):
        first = str(message).strip().splitlines()
        print(f"zsadapt: warning: {first[0] if first else category.__name__}", file=err, flush=True)

    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.showwarning = show
        chatter = stack.enter_context(open(os.devnull, "w")) if is_quiet() else err
        stack.enter_context(contextlib.redirect_stdout(chatter))
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
    if specs[0]["choices"] and all(spec["choices"] == specs[0]["choices"] for spec in specs):
        return "[" + "|".join(map(str, specs[0]["choices"])) + "]"
    types = {spec["type"] for spec in specs}
    names = {"int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN", "str": "TEXT"}
    return names.get(types.pop(), "TEXT") if len(types) == 1 else "VALUE"


def build_solver_table() -> dict:
    """``{method: {"summary": str, "params": {name: {"default", "type", "help", "choices"}}}}``
    from the solver registry (imports torch and every solver)."""
    from ..api import describe_methods

    table = {}
    for method in describe_methods():
        params = {}
        for name, spec in method["params"].items():
            if name in RESERVED:
                raise RuntimeError(f"solver {method['name']} uses the reserved parameter name {name!r}")
            params[name] = {"default": spec.default, "type": spec.type.__name__, "help": spec.help,
                            "choices": None if spec.choices is None else list(spec.choices)}
        table[method["name"]] = {"summary": method["summary"], "params": params}
    return table


def _solver_sources_key() -> str:
    """A digest of what the solver table is made from: the version and the name, size and
    modification time of every source file of ``zsadapt.solvers`` and ``zsadapt.graphs`` (found
    without importing them)."""
    digest = hashlib.sha256(__version__.encode())
    for package in ("zsadapt.solvers", "zsadapt.graphs"):
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.endswith(".py"):
                    stat = entry.stat()
                    digest.update(f"{package}/{entry.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cache_folder() -> Path:
    """Where zsadapt keeps files it can rebuild: ``$XDG_CACHE_HOME/zsadapt`` (``~/.cache/zsadapt``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "zsadapt"


def solver_table() -> dict:
    """:func:`build_solver_table`, read from the cache when the solvers' sources have not changed
    since it was written (no torch import), built and cached otherwise. A cache that cannot be
    read or written only costs the build."""
    cache = cache_folder() / f"solver-table-{_solver_sources_key()}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    # Options are built before --quiet is parsed: read it from the command line.
    if not {"-q", "--quiet"} & set(sys.argv[1:]):
        heartbeat("reading the solvers' parameters (once after an install or an upgrade)")
    try:
        table = build_solver_table()
    finally:
        stop_heartbeat()
    try:
        from ..io import atomic_write

        cache.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(table)
        atomic_write(cache, lambda handle: handle.write(text), overwrite=True, mode="w")
        for stale in cache.parent.glob("solver-table-*.json"):
            if stale != cache:
                stale.unlink()
    except (OSError, ValueError):
        pass
    return table


def solver_parameter_options() -> list:
    """One ``--name`` option per hyper-parameter of any registered solver (values are checked by
    the chosen method)."""
    by_name: dict = {}
    for method, described in solver_table().items():
        for name, spec in described["params"].items():
            by_name.setdefault(name, []).append((method, spec))
    options = []
    for name in sorted(by_name):
        owners = by_name[name]
        # A default of None is resolved by the solver, and its help says how.
        help_text = "; ".join(f"{m}: {s['help']}" + ("" if s["default"] is None else f" (default {s['default']})")
                              for m, s in owners)
        options.append(click.Option([f"--{name.replace('_', '-')}", name], default=None, help=help_text,
                                    metavar=_metavar([spec for _, spec in owners])))
    return options


class SolverOptionsCommand(click.Command):
    """A command that also takes every solver parameter as an option (``--k``, ``--alpha``, ...),
    passed to it as keyword arguments. The options are added when the command is parsed or its
    help is shown, so that listing the commands (``zsadapt --help``) needs no solver."""

    def get_params(self, ctx: click.Context) -> list:
        if not getattr(self, "_solver_options_added", False):
            self.params.extend(solver_parameter_options())
            self._solver_options_added = True
        return super().get_params(ctx)


def params_file_option(command: Callable) -> Callable:
    """``--params FILE``: a JSON object of hyper-parameters."""
    return click.option(
        "--params", "params_file", type=click.Path(dir_okay=False),
        help="JSON file of hyper-parameters: an object, or one object per method name; "
             "options given on the line win.",
    )(command)


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
        if loaded and set(loaded) <= set(solver_table()) and all(isinstance(v, dict) for v in loaded.values()):
            # A file keyed by method ({"zlap": {...}, "zeroshot": {...}}): this method's entry.
            loaded = loaded.get(method, {})
        params.update(loaded)
    params.update({k: v for k, v in given.items() if v is not None})
    return params
