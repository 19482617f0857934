"""Accuracy of em / unem against zero-shot on the real pools of ../shared/data, whole and as
subset pools holding m of the C classes (m = 2, 5, 10 and 25% of C).

    ZSADAPT_DATA=../shared/data python benchmarks/em_accuracy.py --methods em,unem [--subset-seeds 3]

Options ``--set method.param=value`` override hyper-parameters (e.g. ``--set em.lam=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import numpy as np

import zsadapt
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool


def subset_indices(labels: np.ndarray, n_classes: int, m: int, seed: int) -> np.ndarray:
    """Rows of the pool whose label is one of m classes drawn (seeded) among those present."""
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    chosen = rng.choice(present, size=min(m, present.size), replace=False)
    return np.flatnonzero(np.isin(labels, chosen))


def accuracy_of(method, X, W, y, params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zsadapt.refine(X, W, method, **params.get(method, {}))
    return zsadapt.accuracy(result.labels, y)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--methods", default="em,unem")
    parser.add_argument("--pools", default=",".join((TEXT_POOL,) + PROTOTYPE_POOLS))
    parser.add_argument("--subset-pools", default=TEXT_POOL, help="pools to draw subset pools from")
    parser.add_argument("--subset-seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="method.param=value")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    methods = args.methods.split(",")
    params: dict = {}
    for item in args.set:
        key, value = item.split("=", 1)
        method, name = key.split(".", 1)
        params.setdefault(method, {})[name] = json.loads(value) if value[:1] in "[{0123456789.-" else value
    rows = []
    for name in args.pools.split(","):
        pool = load_shared_pool(args.root, name)
        row = {"pool": name, "zeroshot": accuracy_of("zeroshot", pool.image_features, pool.text_features,
                                                     pool.labels, {})}
        for method in methods:
            row[method] = accuracy_of(method, pool.image_features, pool.text_features, pool.labels, params)
        rows.append(row)
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{v:<16}" for k, v in row.items()), flush=True)
    for name in [p for p in args.subset_pools.split(",") if p]:
        pool = load_shared_pool(args.root, name)
        C = pool.n_classes
        for m in sorted({2, 5, 10, max(2, C // 4)}):
            accs = {k: [] for k in ["zeroshot"] + methods}
            for seed in range(args.subset_seeds):
                idx = subset_indices(pool.labels, C, m, seed)
                X, y = pool.image_features[idx], pool.labels[idx]
                for method in accs:
                    accs[method].append(accuracy_of(method, X, pool.text_features, y, params))
            row = {"pool": f"{name}[m={m}]", **{k: float(np.mean(v)) for k, v in accs.items()}}
            rows.append(row)
            print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{v:<16}" for k, v in row.items()), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
