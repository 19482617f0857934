"""``zsadapt label --adapt`` on a sharded collection: the written labels against zero-shot and
against a fresh stream per batch.

For each pool and row order (a seeded random order, or sorted by class: the images of a class
arrive together, as in a stream), the pool's rows are cut into ``--shards`` float16 ``.npy``
shards (clip-retrieval's ``img_emb/img_emb_<i>.npy`` layout) and labelled three ways, all on the
same float16 rows:

* ``zero-shot``: argmax of the cosine to the class embeddings;
* ``each batch alone``: a new :class:`zsadapt.Stream` (the default stream method) for every
  ``--batch``-row batch of a shard, cut as ``label --adapt`` cuts them;
* ``label --adapt``: :func:`zsadapt.label` with ``adapt=True`` from the class embeddings file (one
  stream carried through the shards in order), its parquet outputs read back; rows/s of that call
  (reading, checks, stream solves, parquet writes) on this machine.

The class embeddings are the pool's initial classifier (Cars: its real text embeddings; the other
pools: 1-shot image prototypes, ``zsadapt.shared_pools``). Accuracy %.

    ZSADAPT_DATA=../shared/data python benchmarks/label_adapt.py
    ZSADAPT_DATA=../shared/data python benchmarks/label_adapt.py --pools caltech101 --no-page
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import zsadapt
from results_page import echo, write_page
from zsadapt.labelling import ADAPT_BATCH
from zsadapt.shared_pools import load_shared_pool

ORDERS = ("random", "by class")


def write_shards(rows: np.ndarray, folder: Path, shards: int) -> list:
    """``rows`` (N, d) float16 cut into ``shards`` consecutive ``img_emb_<i>.npy`` files; their paths."""
    folder.mkdir(parents=True)
    paths = []
    for i, part in enumerate(np.array_split(rows, shards)):
        paths.append(folder / f"img_emb_{i}.npy")
        np.save(paths[-1], part)
    return paths


def each_batch_alone(shards: list, text: np.ndarray, batch: int) -> np.ndarray:
    """(N,) labels of a fresh default stream per ``batch``-row batch of each shard."""
    labels = []
    for path in shards:
        rows = np.load(path)
        for start in range(0, len(rows), batch):
            labels.append(zsadapt.Stream(text).refine(rows[start:start + batch]).labels)
    return np.concatenate(labels)


def label_adapt(shards: list, text_file: Path, out: Path) -> tuple:
    """((N,) labels written by ``zsadapt.label(adapt=True)``, in row order; seconds of the call)."""
    start = time.perf_counter()
    zsadapt.label(text_file, shards[0].parent, out, adapt=True, progress=False)
    seconds = time.perf_counter() - start
    labels = [pq.read_table(out / f"{path.stem}.parquet", columns=["label"])["label"].to_numpy() for path in shards]
    return np.concatenate(labels), seconds


def measure(pool, order: str, shards: int, batch: int, seed: int) -> dict:
    """Accuracy of the three labellings and rows/s of ``label --adapt`` for one pool and order."""
    X, T, y = np.asarray(pool.image_features), np.asarray(pool.text_features), np.asarray(pool.labels)
    perm = np.random.default_rng(seed).permutation(len(y)) if order == "random" else np.argsort(y, kind="stable")
    rows, truth = X[perm].astype(np.float16), y[perm]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(rows, Path(tmp) / "img_emb", shards)
        text_file = Path(tmp) / "text.npy"
        np.save(text_file, T)
        adapted, seconds = label_adapt(paths, text_file, Path(tmp) / "labels")
        alone = each_batch_alone(paths, T, batch)
    unit = rows.astype(np.float32) / np.linalg.norm(rows.astype(np.float32), axis=1, keepdims=True)
    zeroshot = (unit @ (T / np.linalg.norm(T, axis=1, keepdims=True)).T).argmax(axis=1)
    accuracy = {k: 100.0 * float(np.mean(v == truth)) for k, v in
                (("zero-shot", zeroshot), ("each batch alone", alone), ("label --adapt", adapted))}
    return dict(accuracy, rows_per_s=len(y) / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", default="stanford_cars_val,caltech101,oxford_pets")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=ADAPT_BATCH, help="rows per stream batch (label --adapt-batch)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random order")
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/label_adapt.md")
    args = parser.parse_args()
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to the shared/data folder")
    zsadapt.set_quiet(True)
    lines: list = []
    echo(lines, f"{args.shards} float16 shards per pool, stream batches of {args.batch} rows, seed {args.seed}; "
                "accuracy %.")
    echo(lines)
    echo(lines, "| pool, order | zero-shot | each batch alone | `label --adapt` | rows/s |")
    echo(lines, "|---|---|---|---|---|")
    for name in [p.strip() for p in args.pools.split(",") if p.strip()]:
        pool = load_shared_pool(root, name)
        for order in ORDERS:
            r = measure(pool, order, args.shards, args.batch, args.seed)
            echo(lines, f"| {name}, {order} | {r['zero-shot']:.2f} | {r['each batch alone']:.2f} | "
                        f"{r['label --adapt']:.2f} | {r['rows_per_s']:,.0f} |")
    if not args.no_page:
        path = write_page("label_adapt", "Labelling a sharded collection with `label --adapt`", "\n".join(lines),
                          intro="See [label a collection](../label.md) for what `--adapt` does.")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
