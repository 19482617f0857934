"""StatA's realistic test-time protocol as a benchmark any registered method runs through.

Zanella et al., "Realistic Test-Time Adaptation of Vision-Language Models", CVPR 2025; the batch
samplers are :mod:`zsadapt.protocol` (batches of 64 images from 1-4, 2-10, 5-25 random classes;
of 1000 from 5-25, 25-50, 50-100; the whole pool; online batches of 128 from a stream whose
classes are correlated, Dirichlet xi = 0.1, 0.01, 0.001, or one class after another). Every batch
is solved on its own by every method, on the same batches. Accuracy of a task is the mean over its
batches (one batch for the batch settings, all the stream's batches online), and a setting's
figure is the mean over ``--tasks`` tasks, as in the official ``main.py``.

Pools: ``stanford_cars_val`` (real text embeddings), the six 1-shot prototype pools of
``../shared/data`` (``ZSADAPT_DATA``), and ``synthetic-1000x7``: 1000 classes x 7 images in 512-d
with a CLIP-like modality gap (:func:`zsadapt.make_pool`, balanced, text noise 3.25 so that
zero-shot is 65.2%, seed 0). Not in the default list: ``multi-487``, the six prototype pools
stacked into one pool of 487 classes (:mod:`zsadapt.shared_pools`; many classes with few images
each on real features, ``benchmarks/many_classes.py``).

A batch a method cannot handle (too few images, ...) does not stop the run: the error is counted
and shown in the table. Prints Markdown tables on stdout (per pool, and the mean over pools), and
writes them to ``docs/results/realistic.md`` (``--no-page`` to skip).

    ZSADAPT_DATA=../shared/data python benchmarks/realistic.py --pools real   # the README's table
    ZSADAPT_DATA=../shared/data python benchmarks/realistic.py --pools stanford_cars_val \\
        --methods zeroshot,stata,moon --settings 64:1-4,1000:5-25 --tasks 20
    python benchmarks/realistic.py --pools synthetic-1000x7 --methods zeroshot,mymethod \\
        --param mymethod.k=5 --tasks 1
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections import defaultdict

import numpy as np
import torch

import zsadapt
from results_page import shots_page, write_page
from timing import timed
from zsadapt.evaluate import parse_methods
from zsadapt.protocol import parse_settings, setting_batches
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool
from zsadapt.solvers import DEFAULT_METHOD

#: Synthetic pools by name: :func:`zsadapt.make_pool` arguments.
SYNTHETIC_POOLS = {
    "synthetic-1000x7": dict(n_images=7000, n_classes=1000, dim=512, imbalance=0.0, text_noise=3.25, seed=0),
}
REAL_POOLS = (TEXT_POOL,) + PROTOTYPE_POOLS
DEFAULT_POOLS = REAL_POOLS + tuple(SYNTHETIC_POOLS)
#: Tasks per setting by default. On a small pool a setting's figure depends on the classes its few
#: tasks drew: Stanford Cars' 1000:50-100 batches put `auto` 0.29 below zero-shot over 2 tasks and
#: 3.1 above it over 20 (online 0.1: -0.30 and +0.39). Ten tasks of the 7 real pools and 7 methods
#: take 17 minutes here.
TASKS = 10
#: Batches at most this large run on one torch thread (the thread pool costs more than it saves).
SMALL_BATCH = 2000


def progress(message: str) -> None:
    """A progress line on stderr (the library's own notes are silenced during the run)."""
    print(f"realistic: {message}", file=sys.stderr, flush=True)


def default_methods() -> str:
    names = ["zeroshot", "stata", "moon", "transclip", "gmm", "zlap"]
    return ",".join(names + ([DEFAULT_METHOD] if DEFAULT_METHOD not in names else []))


def load_pool(name: str, root, shots: int = 1):
    """(pool, label) for a shared or synthetic pool name; a prototype pool's classifier is the mean
    of ``shots`` seeded train features per class."""
    if name in SYNTHETIC_POOLS:
        return zsadapt.make_pool(**SYNTHETIC_POOLS[name]), name
    if not root:
        sys.exit(f"{name}: set ZSADAPT_DATA to the shared/data folder (or use {', '.join(SYNTHETIC_POOLS)})")
    pool = load_shared_pool(root, name, shots=shots)
    return pool, name if name == TEXT_POOL else f"{name} ({shots}-shot)"


def parse_params(items) -> dict:
    """``["gmm.robust=false", ...]`` -> ``{"gmm": {"robust": "false"}}`` (values are checked by the
    solver's parameter table)."""
    params: dict = defaultdict(dict)
    for item in items or ():
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            sys.exit(f"--param: expected METHOD.NAME=VALUE, got {item!r}")
        params[method][name] = value
    return dict(params)


def run_batch(X, T, y, method, params, seed, device):
    """(accuracy %, seconds) of one method on one batch, or (error message, seconds)."""
    threads = torch.get_num_threads()
    if X.shape[0] <= SMALL_BATCH:
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, seconds = timed(lambda: zsadapt.refine(X, T, method, seed=seed, device=device, **params),
                                    torch.device(device or "cpu"))
        return 100.0 * float(np.mean(result.labels == y)), seconds
    except (ValueError, RuntimeError, TypeError, IndexError) as err:  # recorded, never fatal
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", 0.0
    finally:
        torch.set_num_threads(threads)


def evaluate_pool(pool, settings, methods, params, tasks, seed, device):
    """{(setting, method): {"acc": mean over tasks or None, "seconds": per batch, "errors": [...],
    "batches": n}} and the batch sizes seen per setting."""
    X, T, y = pool.image_features, pool.text_features, np.asarray(pool.labels)
    cells = {}
    sizes = {}
    for setting in settings:
        task_list = setting_batches(y, setting, tasks, seed=seed)
        sizes[setting.name] = sorted({len(b) for task in task_list for b in task})
        for method in methods:
            task_accs, seconds, errors, n_batches = [], [], [], 0
            for task in task_list:
                accs = []
                for rows in task:
                    n_batches += 1
                    acc, sec = run_batch(X[rows], T, y[rows], method, params.get(method, {}), seed, device)
                    if isinstance(acc, str):
                        errors.append(acc)
                    else:
                        accs.append(acc)
                        seconds.append(sec)
                if accs:
                    task_accs.append(float(np.mean(accs)))
            cells[setting.name, method] = {
                "acc": float(np.mean(task_accs)) if task_accs and not errors else None,
                "seconds": float(np.mean(seconds)) if seconds else None,
                "errors": errors, "batches": n_batches,
            }
            acc = cells[setting.name, method]["acc"]
            progress(f"{setting.name} {method}: " + (f"{acc:.2f}" if acc is not None else f"{len(errors)} error(s)"))
    return cells, sizes


def cell_text(cell) -> str:
    if cell["acc"] is not None:
        return f"{cell['acc']:.2f}"
    return f"error ({len(cell['errors'])}/{cell['batches']})"


def pool_table(cells, settings, methods) -> str:
    """Markdown: one row per method, accuracy % per setting, their mean, seconds per batch."""
    names = [s.name for s in settings]
    lines = ["| method | " + " | ".join(names) + " | mean | s/batch |", "|---" * (len(names) + 3) + "|"]
    for method in methods:
        row = [cells[n, method] for n in names]
        accs = [c["acc"] for c in row]
        mean = f"{np.mean(accs):.2f}" if all(a is not None for a in accs) else "-"
        secs = [c["seconds"] for c in row if c["seconds"] is not None]
        per_batch = f"{np.mean(secs):.3f}" if secs else "-"
        lines.append(f"| {method} | " + " | ".join(cell_text(c) for c in row) + f" | {mean} | {per_batch} |")
    return "\n".join(lines)


def error_notes(cells) -> str:
    seen = {}
    for (setting, method), cell in cells.items():
        for err in cell["errors"]:
            seen.setdefault((method, err), set()).add(setting)
    return "\n".join(f"- {method} ({', '.join(sorted(s))}): {err}" for (method, err), s in sorted(seen.items()))


def mean_table(all_cells, settings, methods) -> str:
    """Markdown: accuracy % per setting averaged over pools (a cell with an error on any pool: '-'),
    the mean over settings, and the change of that mean over zero-shot when it was run."""
    names = [s.name for s in settings]
    means = {}
    for method in methods:
        for n in names:
            accs = [cells[n, method]["acc"] for cells in all_cells]
            means[n, method] = float(np.mean(accs)) if all(a is not None for a in accs) else None
    lines = ["| method | " + " | ".join(names) + " | mean | vs zeroshot |", "|---" * (len(names) + 3) + "|"]
    overall = {}
    for method in methods:
        vals = [means[n, method] for n in names]
        overall[method] = float(np.mean(vals)) if all(v is not None for v in vals) else None
    for method in methods:
        vals = [means[n, method] for n in names]
        o = overall[method]
        delta = ("-" if o is None or overall.get("zeroshot") is None else f"{o - overall['zeroshot']:+.2f}")
        lines.append(f"| {method} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
                     + f" | {'-' if o is None else f'{o:.2f}'} | {delta} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default=",".join(DEFAULT_POOLS),
                        help=f"comma-separated; 'real': the {len(REAL_POOLS)} shared pools "
                             f"(default: all of {', '.join(DEFAULT_POOLS)})")
    parser.add_argument("--methods", default=default_methods(), help="comma-separated method names, or 'all'")
    parser.add_argument("--settings", default="all", help="comma-separated setting names (default: all)")
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks (batches, or online streams) per setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", metavar="METHOD.NAME=VALUE",
                        help="a method's hyper-parameter (repeatable)")
    parser.add_argument("--shots", type=int, default=1,
                        help="labelled train features averaged into each prototype of the six prototype pools "
                             "(default 1; other than 1 the page is realistic_<N>shot.md)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/realistic.md")
    args = parser.parse_args()
    zsadapt.set_quiet(True)
    try:
        methods = parse_methods(args.methods)
        settings = parse_settings(args.settings)
    except ValueError as err:
        sys.exit(str(err))
    params = parse_params(args.param)
    unknown = sorted(set(params) - set(methods))
    if unknown:
        sys.exit(f"--param names method(s) not run: {', '.join(unknown)}")
    root = os.environ.get("ZSADAPT_DATA")
    sections, all_cells = [], []
    names = [p.strip() for p in args.pools.split(",") if p.strip()]
    for name in [n for p in names for n in (REAL_POOLS if p == "real" else (p,))]:
        pool, label = load_pool(name, root, args.shots)
        progress(f"{label}: {pool.n_images} images, {pool.n_classes} classes")
        cells, sizes = evaluate_pool(pool, settings, methods, params, args.tasks, args.seed, args.device)
        all_cells.append(cells)
        size_line = ", ".join(f"{n}: {'-'.join(map(str, (min(s), max(s)))) if len(s) > 1 else s[0]}"
                              for n, s in sizes.items() if s)
        section = (f"### {label} ({pool.n_images} images, {pool.n_classes} classes)\n\n"
                   f"{pool_table(cells, settings, methods)}\n\nBatch sizes: {size_line}.\n")
        notes = error_notes(cells)
        if notes:
            section += f"\nErrors:\n\n{notes}\n"
        print(section, flush=True)
        sections.append(section)
    tasks_line = (f"{args.tasks} task(s) per setting, seed {args.seed}; accuracy %; an online task is "
                  "a whole stream of 128-image batches; s/batch: mean seconds per batch over all settings.")
    mean = f"### Mean over the {len(all_cells)} pools\n\n{mean_table(all_cells, settings, methods)}\n"
    print(mean)
    print(tasks_line)
    if not args.no_page:
        body = tasks_line + "\n\n" + mean + "\n" + "\n".join(sections)
        path = write_page(*shots_page("realistic", "StatA's realistic protocol", args.shots), body,
                          intro="Every method on StatA's realistic batches (see [the protocol](../realistic.md)).")
        progress(f"wrote {path}")


if __name__ == "__main__":
    main()
