"""How small may a stream's batches be? ``zsadapt.Stream`` at its defaults on the shared pools'
images in ``--orders`` seeded orders of two kinds, cut into batches of 1, 2, 4, 16 and 128 images,
against the zero-shot labels of the same images; each table gives the mean change over the orders,
and the worst pool:

- *random*: a random permutation (no class correlation: every batch holds whatever the order gives);
- *one class at a time*: the classes in a random order, each class's images together (in a random
  order): a camera that sees one object for a while, or files sorted by class. Small batches then
  hold one class; batches of 128 hold a run of classes.

StatA's online protocol (``benchmarks/stream.py``) measures batches of 128 from correlated streams;
a camera or an upload queue may deliver one image at a time.

Writes ``docs/results/stream_batch_size.md``. Run (about 6 minutes an order kind alone on 2 CPU cores):

    ZSADAPT_DATA=../shared/data python benchmarks/stream_batch_size.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

import zsadapt
from results_page import echo, write_page
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool

BATCH_SIZES = (1, 2, 4, 16, 128)


def streamed_labels(X: np.ndarray, T: np.ndarray, batch_size: int) -> np.ndarray:
    """(N,) labels of a fresh default ``Stream`` fed ``X`` (N, d) in row order, ``batch_size`` rows a batch."""
    stream = zsadapt.Stream(T)
    return np.concatenate([stream.refine(X[i:i + batch_size]).labels for i in range(0, len(X), batch_size)])


def random_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of the rows."""
    return rng.permutation(len(labels))


def class_runs_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rows of one class after another: classes in a random order, each class's rows together in
    a random order."""
    rows = rng.permutation(len(labels))
    class_rank = np.argsort(rng.permutation(int(labels.max()) + 1))  # class -> its place in the run order
    return rows[np.argsort(class_rank[labels[rows]], kind="stable")]


ORDERS = {"random order": random_order, "one class at a time": class_runs_order}


def order_table(lines: list, pools: list, make_order, seeds) -> None:
    """One table: per pool ``(name, Pool)`` the mean change over zero-shot (points) of the stream at each batch size,
    over the orders ``make_order(labels, numpy Generator(seed))`` for ``seeds``."""
    echo(lines, "| pool | images | zero-shot % | " + " | ".join(f"batch {b}: vs zero-shot" for b in BATCH_SIZES)
         + " | seconds, batch 1 |")
    echo(lines, "|---" * (4 + len(BATCH_SIZES)) + "|")
    gains = {b: [] for b in BATCH_SIZES}
    for name, pool in pools:
        T = pool.text_features
        zeroshot = zsadapt.accuracy(zsadapt.refine(pool.image_features, T, "zeroshot").labels, pool.labels)
        per_order = {b: [] for b in BATCH_SIZES}
        seconds = []  # batch 1, each order
        for seed in seeds:
            order = make_order(pool.labels, np.random.default_rng(seed))
            X, y = pool.image_features[order], pool.labels[order]
            for b in BATCH_SIZES:
                start = time.perf_counter()
                per_order[b].append(zsadapt.accuracy(streamed_labels(X, T, b), y) - zeroshot)
                if b == 1:
                    seconds.append(time.perf_counter() - start)
        cells = []
        for b in BATCH_SIZES:
            gains[b].append(float(np.mean(per_order[b])))
            cells.append(f"{gains[b][-1]:+.2f}")
        echo(lines, f"| {name} | {pool.n_images} | {zeroshot:.2f} | " + " | ".join(cells)
             + f" | {np.mean(seconds):.1f} |")
    echo(lines, "| mean | | | " + " | ".join(f"{np.mean(gains[b]):+.2f}" for b in BATCH_SIZES) + " | |")
    echo(lines, "| worst pool | | | " + " | ".join(f"{min(gains[b]):+.2f}" for b in BATCH_SIZES) + " | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", default=",".join((TEXT_POOL,) + PROTOTYPE_POOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--orders", type=int, default=3,
                        help="random orders per pool (seeds seed, seed + 1, ...); the table gives their mean")
    parser.add_argument("--no-page", action="store_true")
    args = parser.parse_args()
    if args.orders < 1:
        parser.error("--orders must be at least 1")
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to ../shared/data")
    zsadapt.set_quiet(True)
    warnings.simplefilter("ignore")  # ConvergenceWarning of single batches: the accuracy is what is measured
    lines: list = []
    pools = [(name.strip(), load_shared_pool(root, name.strip())) for name in args.pools.split(",") if name.strip()]
    for kind, make_order in ORDERS.items():
        echo(lines, f"### {kind}")
        echo(lines)
        order_table(lines, pools, make_order, range(args.seed, args.seed + args.orders))
        echo(lines)
    if not args.no_page:
        page = write_page("stream_batch_size", "Stream batch size", "\n".join(lines), intro=(
            "Accuracy change (points) of `zsadapt.Stream` at its defaults over zero-shot, each pool's "
            f"images in {args.orders} order(s) of each kind cut into batches of 1 to 128, the mean over "
            "the orders (see the script's docstring). A "
            "batch of one image gets the zero-shot label and enters the state (`info[\"single_image\"]`)."))
        print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
