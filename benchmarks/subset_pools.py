"""Accuracy on pools that hold only m of the C classes (``zsadapt.evaluate.subset_pool``).

For each m (2, 5, 10 and 25% of C by default) it draws ``--draws`` pools (seeds 0, 1, ...), runs
zero-shot and each method with its defaults and with ``robust=False`` (where the method has that
parameter), and prints the mean accuracy per m as a Markdown table, also written to the docs
site's results page ``docs/results/subset_pools_<pool>.md``.

    ZSADAPT_DATA=../shared/data python benchmarks/subset_pools.py                  # Cars, gmm + transclip
    python benchmarks/subset_pools.py --pool synthetic --methods gmm,transclip,zlap
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

import zsadapt
from results_page import echo, write_page
from zsadapt.evaluate import parse_methods, parse_subset, subset_pool
from zsadapt.shared_pools import load_shared_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", default="stanford_cars_val",
                        help="a ../shared/data pool name, or 'synthetic' (make_pool: 3000 images, 100 classes)")
    parser.add_argument("--methods", default="gmm,transclip")
    parser.add_argument("--subsets", default="2,5,10,25%")
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small pools: thread start-up costs more than it saves
    zsadapt.set_quiet(True)
    if args.pool == "synthetic":
        pool = zsadapt.make_pool(n_images=3000, n_classes=100, dim=64, text_noise=1.5, seed=1)
    else:
        root = os.environ.get("ZSADAPT_DATA")
        if not root:
            sys.exit("set ZSADAPT_DATA to the shared/data folder")
        pool = load_shared_pool(root, args.pool)
    variants = []
    for method in parse_methods(args.methods):
        variants.append((method, {}))
        if "robust" in zsadapt.solvers.get_solver(method).params:
            variants.append((method, {"robust": False}))
    names = [m + (" robust=False" if p else "") for m, p in variants]
    lines: list = []
    echo(lines, f"{pool.source}: mean accuracy % over {args.draws} draws")
    echo(lines)
    echo(lines, "| classes in the pool | zero-shot | " + " | ".join(names) + " |")
    echo(lines, "|---" * (len(names) + 2) + "|")
    for spec in args.subsets.split(","):
        m = parse_subset(spec)
        scores = np.zeros((args.draws, len(variants) + 1))
        for seed in range(args.draws):
            sub = subset_pool(pool, m, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores[seed, 0] = zsadapt.refine(sub.image_features, sub.text_features, "zeroshot").accuracy(sub.labels)
                for j, (method, params) in enumerate(variants, start=1):
                    scores[seed, j] = zsadapt.refine(
                        sub.image_features, sub.text_features, method, seed=seed, **params).accuracy(sub.labels)
        count = len(sub.extras["classes"])
        echo(lines, f"| {count} of {pool.n_classes} | " + " | ".join(f"{v:.2f}" for v in scores.mean(axis=0)) + " |")
    page = write_page(f"subset_pools_{args.pool}", f"Pools holding some of the classes: {args.pool}",
                      "\n".join(lines), intro=(
                          "Mean accuracy % over seeded draws of pools that hold only m of the C classes "
                          "(`zsadapt.evaluate.subset_pool`), each method at its defaults and with "
                          "`robust=False` (the published algorithm) where it has that parameter."))
    print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
