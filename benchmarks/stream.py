"""Stream mode against batch-wise methods on StatA's online protocol (issue 12).

For each shared pool and each online setting of :mod:`zsadapt.protocol` (batches of 128 from a
stream whose classes are correlated: Dirichlet xi = 0.1, 0.01, 0.001, and one class after another),
every batch is labelled by zero-shot, by each batch-wise method solving the batch alone, and by
:class:`zsadapt.Stream` (one column per forgetting factor), which carries per-class statistics from
batch to batch. Accuracy is over every image of a stream, averaged over ``--tasks`` streams.

Then the cost: seconds per batch of 128 at C = 1000 (synthetic, d = 512) of ``Stream.refine``
against one batch-wise solve of the library's default method and of the stream's own method on the
same batches, interleaved in one run.

    ZSADAPT_DATA=../shared/data python benchmarks/stream.py --tasks 10 --baselines zeroshot,stata,auto
    # quicker, while iterating (prints, writes no page):
    ZSADAPT_DATA=../shared/data python benchmarks/stream.py --settings online:0.1 \
        --pools stanford_cars_val,fgvc_aircraft,dtd --baselines zeroshot --skip-timing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import numpy as np
import torch

import zsadapt
from zsadapt import solvers
from zsadapt.protocol import SETTINGS, setting_batches
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool
from zsadapt.stream import FORGETTING, Stream, stream_method

from results_page import write_page
from timing import timed

ONLINE = tuple(s for s in SETTINGS if s.kind == "online")


def stream_accuracy(make_labels, X: np.ndarray, y: np.ndarray, batches: list) -> float:
    """Accuracy (%) over every image of one stream; ``make_labels(batch_features)`` is called on the
    batches in stream order."""
    correct = [np.asarray(make_labels(X[rows])) == y[rows] for rows in batches]
    return 100.0 * float(np.concatenate(correct).mean())


def pool_row(X, T, y, batches_per_task, methods, method, gammas, seed) -> dict:
    """Mean accuracy over tasks of zero-shot, each batch-wise method and each stream column."""
    columns: dict = {}
    for batches in batches_per_task:
        accs = {name: stream_accuracy(lambda b, m=name: zsadapt.refine(b, T, m, seed=seed).labels, X, y, batches)
                for name in methods}
        for gamma in gammas:
            stream = Stream(T, method, forgetting=gamma, seed=seed)
            accs[f"stream {gamma:g}"] = stream_accuracy(lambda b, s=stream: s.refine(b).labels, X, y, batches)
        for key, value in accs.items():
            columns.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in columns.items()}


def markdown(setting: str, rows: dict) -> str:
    names = list(next(iter(rows.values())))
    lines = [f"| {setting} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for pool, row in rows.items():
        lines.append(f"| {pool} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def accuracy_tables(args, methods, gammas) -> tuple:
    """(markdown, {setting: mean row}) of the accuracy part."""
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("benchmarks/stream.py: set ZSADAPT_DATA=../shared/data (the shared pools)")
    pools = (TEXT_POOL,) + PROTOTYPE_POOLS if args.pools == "all" else tuple(args.pools.split(","))
    loaded = {name: load_shared_pool(root, name) for name in pools}
    text, means = [], {}
    for setting in args.settings:
        rows = {}
        for name, pool in loaded.items():
            X, T, y = pool.image_features, pool.text_features, pool.labels
            batches = setting_batches(y, setting, args.tasks, seed=args.seed)
            rows[name] = pool_row(X, T, y, batches, methods, args.method, gammas, args.seed)
            print(f"{setting.name} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[name].items()),
                  file=sys.stderr, flush=True)
        means[setting.name] = {k: float(np.mean([r[k] for r in rows.values()])) for k in rows[pools[0]]}
        rows["mean"] = means[setting.name]
        table = markdown(setting.name, rows)
        print(table + "\n", flush=True)
        text.append(table)
    return "\n\n".join(text), means


def targets(means: dict, gammas) -> str:
    """Issue 12's targets on the means: stream >= stata + 2 (xi = 0.01, 0.001, separate) and
    >= zero-shot + 1 (xi = 0.1)."""
    lines = []
    for gamma in gammas:
        col = f"stream {gamma:g}"
        for name, row in means.items():
            if name == "online:0.1":
                base, need, what = row.get("zeroshot"), 1.0, "zero-shot"
            else:
                base, need, what = row.get("stata"), 2.0, "stata"
            if base is None:
                continue
            gain = row[col] - base
            lines.append(f"- {col}, {name}: {gain:+.2f} over {what} (target {need:+.0f}): "
                         f"{'met' if gain >= need else 'NOT met'}")
    return "\n".join(lines)


def timing_table(args) -> str:
    """Seconds per batch (``--timing-batch-size`` images, default 128) at C = ``--timing-classes``
    (default 1000; synthetic pool, d = 512): Stream.refine against one batch-wise solve of the
    default method and of the stream's method, on the same batches, interleaved."""
    device = torch.device(args.device)
    size, n_classes = args.timing_batch_size, args.timing_classes
    pool = zsadapt.make_pool(n_images=max(size * (args.timing_batches + 1), 2 * n_classes), n_classes=n_classes,
                             dim=512, seed=args.seed)
    X = torch.from_numpy(pool.image_features).to(device)
    T = torch.from_numpy(pool.text_features).to(device)
    stream = Stream(T, args.method, seed=args.seed)
    alone_methods = list(dict.fromkeys([solvers.DEFAULT_METHOD, args.method]))
    seconds: dict = {name: [] for name in alone_methods + ["stream"]}
    for k in range(args.timing_batches + 1):
        rows = X[size * k:size * (k + 1)]
        spent = {name: timed(lambda m=name: zsadapt.refine(rows, T, m, seed=args.seed), device)[1]
                 for name in alone_methods}
        spent["stream"] = timed(lambda: stream.refine(rows), device)[1]
        if k:  # the first batch warms up (and has no prior)
            for name, value in spent.items():
                seconds[name].append(value)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    lines = [f"| C = {n_classes}, batches of {size} | seconds per batch (median) | stream / this |", "|---|---|---|"]
    for name in alone_methods:
        role = "default method" if name == solvers.DEFAULT_METHOD else "the stream's method"
        lines.append(f"| {name} ({role}), each batch alone | {median[name]:.3f} | "
                     f"{median['stream'] / median[name]:.2f} |")
    lines.append(f"| stream ({args.method}, forgetting {stream.forgetting:g}) | {median['stream']:.3f} | |")
    table = "\n".join(lines) + f"\n\nTarget: stream / default method <= 2 ({args.timing_batches} batches, {args.device})."
    print(table + "\n", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=None, help="the stream's method (default: zsadapt.stream.stream_method(None))")
    parser.add_argument("--baselines", default="zeroshot,stata",
                        help="batch-wise methods beside the stream's own method solving each batch alone")
    parser.add_argument("--forgetting", default=str(FORGETTING), help="comma-separated forgetting factors")
    parser.add_argument("--pools", default="all", help="comma-separated shared pools, or 'all'")
    parser.add_argument("--tasks", type=int, default=1, help="streams per setting and pool")
    parser.add_argument("--settings", default="all",
                        help="comma-separated online settings (online:0.1, online:0.01, online:0.001, "
                             "online:separate), or 'all'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-batches", type=int, default=10)
    parser.add_argument("--timing-classes", type=int, default=1000, help="classes of the timing pool")
    parser.add_argument("--timing-batch-size", type=int, default=128, help="images per timed batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    args.method = stream_method(args.method)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n != "all" and n not in {s.name for s in ONLINE}]
    if unknown or not names:
        parser.error(f"--settings: unknown {', '.join(unknown) or 'empty list'}; known: "
                     f"{', '.join(s.name for s in ONLINE)}, all")
    args.settings = ONLINE if names == ["all"] else tuple(s for s in ONLINE if s.name in names)
    warnings.simplefilter("ignore")  # ConvergenceWarnings of short batch solves
    zsadapt.set_quiet(True)
    gammas = [float(g) for g in args.forgetting.split(",")]
    methods = list(dict.fromkeys([m for m in args.baselines.split(",") if m] + [args.method]))
    body = []
    if not args.skip_accuracy:
        tables, means = accuracy_tables(args, methods, gammas)
        checks = targets(means, gammas)
        print(checks, flush=True)
        body += ["## Accuracy (%) over every image of the stream", tables, "### Targets (means)", checks]
    if not args.skip_timing:
        body += ["## Cost", timing_table(args)]
    # Only a full run (every setting, every pool, accuracy and cost) replaces the results page.
    if (not (args.skip_accuracy or args.skip_timing) and args.settings == ONLINE and args.pools == "all"
            and (args.timing_classes, args.timing_batch_size) == (1000, 128)):
        write_page("stream", "Stream mode on the online protocol", "\n\n".join(body),
                   intro=f"Stream method `{args.method}` (default method `{solvers.DEFAULT_METHOD}`); batch-wise "
                         f"columns solve each batch alone; `stream g` is `zsadapt.Stream` with forgetting g. "
                         f"{args.tasks} stream(s) per setting and pool.")


if __name__ == "__main__":
    main()
