"""Where ``auto``'s branch rule comes from: ``gmm`` and ``stata`` on every batch of StatA's protocol,
against the images per class ``auto`` counts.

``auto`` (:mod:`zsadapt.solvers.auto`) fits ``gmm`` on a batch where m = N / K >= ``min_images``
(2) and ``stata`` below it, K the larger of the classes the pool analysis keeps and the distinct
zero-shot labels. Here every batch of ``benchmarks/realistic.py`` (same pools, settings, seeds and
samplers) is refined by ``auto``, which reports its m, K and branch, and by the branch it did not
choose; zero-shot is scored too. Labels are used to score, never to choose. Printed, accuracy %:

1. per band of m: batches, the share ``auto`` sent to ``gmm``, and the mean accuracy of ``gmm``,
   ``stata``, zero-shot and ``auto`` over those batches, real pools and the synthetic pool apart;
2. per setting (mean over pools, as ``benchmarks/realistic.py`` averages: over a task's batches,
   then over tasks, then over pools): ``gmm``, ``stata``, zero-shot, and ``auto`` with
   ``min_images`` 2 (the default), 3 and 4, all from the same fits (threshold t sends a batch to
   ``gmm`` when m >= t; below 2 the analysis is skipped and m < 2, so t >= 2 reads the same m);
3. per pool and setting: K over the number of classes the batch holds (median over batches), the
   count the rule rests on.

    ZSADAPT_DATA=../shared/data python benchmarks/auto_branches.py
    ZSADAPT_DATA=../shared/data python benchmarks/auto_branches.py --pools stanford_cars_val \
        --settings 64:1-4,online:0.1 --tasks 1 --no-page
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
from realistic import DEFAULT_POOLS, SMALL_BATCH, SYNTHETIC_POOLS, load_pool
from results_page import echo, write_page
from zsadapt.protocol import parse_settings, setting_batches

THRESHOLDS = (2.0, 3.0, 4.0)
BANDS = ((0, 2), (2, 3), (3, 4), (4, 6), (6, 10), (10, float("inf")))
BRANCHES = ("gmm", "stata")


def accuracy(labels, y) -> float:
    return 100.0 * float(np.mean(np.asarray(labels) == y))


def measure_batch(X, T, y, seed: int) -> dict:
    """auto's m, K and branch on one batch, the accuracy of both branches and of zero-shot, and the
    classes the batch holds."""
    threads = torch.get_num_threads()
    if X.shape[0] <= SMALL_BATCH:  # as realistic.py: small batches on one thread
        torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = zsadapt.refine(X, T, "auto", seed=seed)
            branch = auto.info["branch"]
            other = BRANCHES[1 - BRANCHES.index(branch)]
            acc = {branch: accuracy(auto.labels, y), other: accuracy(zsadapt.refine(X, T, other, seed=seed).labels, y)}
    finally:
        torch.set_num_threads(threads)
    return dict(m=float(auto.info["images_per_class"]), K=int(auto.info["classes_counted"]), branch=branch,
                classes=int(np.unique(y).size), zeroshot=accuracy((X @ T.T).argmax(axis=1), y), **acc)


def auto_at(row: dict, threshold: float) -> float:
    """The accuracy auto would have with ``min_images = threshold`` on this batch."""
    return row["gmm"] if row["m"] >= threshold else row["stata"]


def columns() -> list:
    return ["gmm", "stata", "zeroshot"] + [f"auto t={t:g}" for t in THRESHOLDS]


def values(row: dict) -> list:
    return [row["gmm"], row["stata"], row["zeroshot"]] + [auto_at(row, t) for t in THRESHOLDS]


def band_table(lines: list, rows: list, title: str) -> None:
    echo(lines, f"\n### Per band of m = N / K: {title}\n")
    echo(lines, "| m | batches | sent to gmm | gmm | stata | zeroshot | auto |")
    echo(lines, "|---|---|---|---|---|---|---|")
    for low, high in BANDS:
        band = [r for r in rows if low <= r["m"] < high]
        if not band:
            continue
        mean = {k: np.mean([r[k] for r in band]) for k in ("gmm", "stata", "zeroshot")}
        to_gmm = np.mean([r["branch"] == "gmm" for r in band])
        auto = np.mean([r[r["branch"]] for r in band])
        label = f"[{low:g}, {high:g})" if np.isfinite(high) else f">= {low:g}"
        echo(lines, f"| {label} | {len(band)} | {100 * to_gmm:.0f}% | {mean['gmm']:.2f} | {mean['stata']:.2f} | "
                    f"{mean['zeroshot']:.2f} | {auto:.2f} |")


def setting_means(rows: list, settings, pools) -> dict:
    """{setting: [mean over pools of (mean over tasks of (mean over batches))] per column}."""
    out = {}
    for s in settings:
        per_pool = []
        for pool in pools:
            tasks = defaultdict(list)
            for r in rows:
                if r["pool"] == pool and r["setting"] == s.name:
                    tasks[r["task"]].append(values(r))
            if tasks:
                per_pool.append(np.mean([np.mean(v, axis=0) for v in tasks.values()], axis=0))
        if per_pool:
            out[s.name] = np.mean(per_pool, axis=0)
    return out


def setting_table(lines: list, rows: list, settings, pools, title: str) -> None:
    means = setting_means(rows, settings, pools)
    if not means:
        return
    echo(lines, f"\n### Per setting, mean over {title}\n")
    echo(lines, "| setting | " + " | ".join(columns()) + " |")
    echo(lines, "|---" * (len(columns()) + 1) + "|")
    for name, row in means.items():
        echo(lines, f"| {name} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    overall = np.mean(list(means.values()), axis=0)
    echo(lines, "| mean | " + " | ".join(f"{v:.2f}" for v in overall) + " |")


def count_table(lines: list, rows: list, settings) -> None:
    echo(lines, "\n### The class count K over the classes each batch holds (median over batches)\n")
    names = [s.name for s in settings]
    echo(lines, "| pool | " + " | ".join(names) + " |")
    echo(lines, "|---" * (len(names) + 1) + "|")
    for pool in dict.fromkeys(r["pool"] for r in rows):
        cells = []
        for name in names:
            ratios = [r["K"] / r["classes"] for r in rows if r["pool"] == pool and r["setting"] == name]
            cells.append(f"{np.median(ratios):.2f}" if ratios else "-")
        echo(lines, f"| {pool} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default=",".join(DEFAULT_POOLS), help="comma-separated pool names")
    parser.add_argument("--settings", default="all", help="comma-separated settings of benchmarks/realistic.py")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/auto_branches.md")
    args = parser.parse_args()
    zsadapt.set_quiet(True)
    settings = parse_settings(args.settings)
    root = os.environ.get("ZSADAPT_DATA")
    names = [p.strip() for p in args.pools.split(",") if p.strip()]
    rows: list = []
    for name in names:
        pool, _ = load_pool(name, root)
        X = np.asarray(pool.image_features, dtype=np.float32)
        T = np.asarray(pool.text_features, dtype=np.float32)
        y = np.asarray(pool.labels)
        for setting in settings:
            for task, batches in enumerate(setting_batches(y, setting, args.tasks, seed=args.seed)):
                for index in batches:
                    row = measure_batch(X[index], T, y[index], args.seed)
                    rows.append(dict(row, pool=name, setting=setting.name, task=task))
            print(f"auto_branches: {name} {setting.name} done", file=sys.stderr, flush=True)
    real = [n for n in names if n not in SYNTHETIC_POOLS]
    synthetic = [n for n in names if n in SYNTHETIC_POOLS]
    lines: list = []
    for group, title in ((real, "the real pools"), (synthetic, "the synthetic pool")):
        if group:
            band_table(lines, [r for r in rows if r["pool"] in group], f"{title} ({', '.join(group)})")
    for group, title in ((real, "the real pools"), (synthetic, "the synthetic pool")):
        if group:
            setting_table(lines, [r for r in rows if r["pool"] in group], settings, group,
                          f"{title} ({len(group)}), {args.tasks} task(s)")
    count_table(lines, rows, settings)
    if not args.no_page:
        path = write_page(
            "auto_branches", "auto: gmm or stata, by images per class", "\n".join(lines),
            intro="Every batch of StatA's protocol (the samplers, pools and seeds of `benchmarks/realistic.py`) "
                  "refined by `auto` and by the branch it did not choose; m = N / K is the images per class "
                  "`auto` counts ([auto](../methods/auto.md)). `auto t=3` and `t=4` are what `min_images` 3 and "
                  "4 would give, from the same fits. Accuracy %.")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
