"""Learn ``unem``'s parameters on the validation pools of ../shared/data, and check that they
transfer: leave-one-dataset-out, each held-out dataset's test pool is refined with parameters
learned without any of its data.

    ZSADAPT_DATA=../shared/data python benchmarks/unem_lodo.py --default   # writes the shipped JSON
    ZSADAPT_DATA=../shared/data python benchmarks/unem_lodo.py --holdout dtd [--holdout ...]

Training pools (one per dataset): the val split of caltech101, fgvc_aircraft, oxford_flowers,
oxford_pets and ucf101 with 1-shot prototypes from their few-shot train features (seed 0); DTD
has no train features: one val image per class (seed 0) is its prototype and the rest of val is
the pool; Stanford Cars has only one pool (stanford_cars_val, text classifier), so it trains the
defaults and, held out, is evaluated on the very pool no other training saw. Each training pool is
capped at ``--max-images`` rows (seeded) and also used as subset pools holding 2, 5, 10 and C/4
classes. Test pools are those of :func:`zsadapt.shared_pools.load_shared_pool` (test split,
1-shot seed-0 prototypes; Cars: stanford_cars_val). The held-out rows are also written, as a
table, to the docs site's results page ``docs/results/unem_lodo.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import zsadapt
from results_page import write_page
from zsadapt.pool import Pool
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, few_shot_prototypes, load_shared_pool
from zsadapt.tuning import tune_unem

DATASETS = (TEXT_POOL,) + PROTOTYPE_POOLS
DEFAULT_JSON = Path(__file__).resolve().parents[1] / "zsadapt" / "data" / "unem_default.json"


def training_pool(root: str, name: str, max_images: int, seed: int = 0) -> Pool:
    """The labelled validation pool of dataset ``name`` (see the module docstring)."""
    if name == "dtd":
        folder = Path(root) / name
        X = np.load(folder / "val_features.npy").astype(np.float32)
        y = np.load(folder / "val_labels.npy")
        rng = np.random.default_rng(seed)
        support = np.array([rng.choice(np.flatnonzero(y == c)) for c in range(int(y.max()) + 1)])
        prototypes = few_shot_prototypes(X[support], y[support], int(y.max()) + 1, shots=1, seed=seed)
        rest = np.setdiff1d(np.arange(y.size), support)
        pool = Pool(X[rest], prototypes, y[rest], source="dtd (val minus 1-shot support)").validated()
    elif name == TEXT_POOL:
        pool = load_shared_pool(root, name)
    else:
        pool = load_shared_pool(root, name, split="val")
    if pool.n_images > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(pool.n_images, max_images, replace=False))
        pool = Pool(pool.image_features[rows], pool.text_features, pool.labels[rows],
                    source=f"{pool.source} ({max_images} rows)").validated()
    return pool


def accuracy(method, pool, params=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zsadapt.refine(pool.image_features, pool.text_features, method, **(params or {}))
    return zsadapt.accuracy(result.labels, pool.labels)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--default", action="store_true", help=f"train on all datasets, write {DEFAULT_JSON.name}")
    parser.add_argument("--holdout", action="append", default=[], choices=DATASETS)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-images", type=int, default=600)
    parser.add_argument("--freeze", default="", help="comma-separated parameters kept at em's values "
                        "(logit_scale,prior: keep the text prior, which the prototype pools would retune)")
    parser.add_argument("--out", help="append result rows (JSON lines) here")
    args = parser.parse_args()
    train = {name: training_pool(args.root, name, args.max_images) for name in DATASETS}
    jobs = ([None] if args.default else []) + args.holdout
    table = ["| dataset held out | zero-shot / prototype | em | unem, dataset held out | training loss |",
             "|---|---|---|---|---|"]
    for held in jobs:
        names = [n for n in DATASETS if n != held]
        start = time.perf_counter()
        learned = tune_unem([train[n] for n in names], layers=args.layers, steps=args.steps, lr=args.lr,
                            frozen=[f for f in args.freeze.split(",") if f], progress=True)
        learned["pools"] = names
        learned["training"] = {"steps": args.steps, "lr": args.lr, "max_images": args.max_images,
                               "frozen": args.freeze,
                               "seconds": time.perf_counter() - start,
                               "script": "benchmarks/unem_lodo.py"}
        if held is None:
            DEFAULT_JSON.write_text(json.dumps(learned, indent=2) + "\n")
            print(f"wrote {DEFAULT_JSON} (loss {learned['loss'][0]:.4f} -> {learned['loss'][1]:.4f})", flush=True)
            continue
        test = load_shared_pool(args.root, held)
        row = {"heldout": held, "zeroshot": accuracy("zeroshot", test), "em": accuracy("em", test),
               "unem_lodo": accuracy("unem", test, learned["unem"]), "params": learned["unem"],
               "loss": learned["loss"]}
        print(json.dumps({k: v for k, v in row.items() if k != "params"}), flush=True)
        table.append(f"| {held} | {row['zeroshot']:.2f} | {row['em']:.2f} | {row['unem_lodo']:.2f} | "
                     f"{row['loss'][0]:.4f} -> {row['loss'][1]:.4f} |")
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    if args.holdout:
        page = write_page("unem_lodo", "UNEM, leave one dataset out", "\n".join(table), intro=(
            "Accuracy % on each held-out dataset's test pool, with `unem` parameters learned "
            "without any of that dataset's data (`zsadapt.tuning.tune_unem` on the other "
            "datasets' validation pools and their subset pools), next to zero-shot and `em`."))
        print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
