"""How small may a stream's batches be? ``zsadapt.Stream`` at its defaults on the shared pools'
images in one seeded random order (no class correlation: every batch holds whatever the order
gives), cut into batches of 1, 2, 4, 16 and 128 images, against the zero-shot labels of the same
images. StatA's online protocol (``benchmarks/stream.py``) measures batches of 128 from correlated
streams; a camera or an upload queue may deliver one image at a time.

Writes ``docs/results/stream_batch_size.md``. Run (about 2 minutes on 2 CPU cores):

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", default=",".join((TEXT_POOL,) + PROTOTYPE_POOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-page", action="store_true")
    args = parser.parse_args()
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to ../shared/data")
    zsadapt.set_quiet(True)
    warnings.simplefilter("ignore")  # ConvergenceWarning of single batches: the accuracy is what is measured
    lines: list = []
    echo(lines, "| pool | images | zero-shot % | " + " | ".join(f"batch {b}: vs zero-shot" for b in BATCH_SIZES)
         + " | seconds, batch 1 |")
    echo(lines, "|---" * (4 + len(BATCH_SIZES)) + "|")
    gains = {b: [] for b in BATCH_SIZES}
    for name in [p.strip() for p in args.pools.split(",") if p.strip()]:
        pool = load_shared_pool(root, name)
        order = np.random.default_rng(args.seed).permutation(pool.n_images)
        X, T, y = pool.image_features[order], pool.text_features, pool.labels[order]
        zeroshot = zsadapt.accuracy(zsadapt.refine(X, T, "zeroshot").labels, y)
        cells, seconds = [], {}
        for b in BATCH_SIZES:
            start = time.perf_counter()
            gain = zsadapt.accuracy(streamed_labels(X, T, b), y) - zeroshot
            seconds[b] = time.perf_counter() - start
            gains[b].append(gain)
            cells.append(f"{gain:+.2f}")
        echo(lines, f"| {name} | {pool.n_images} | {zeroshot:.2f} | " + " | ".join(cells) + f" | {seconds[1]:.1f} |")
    echo(lines, "| mean | | | " + " | ".join(f"{np.mean(gains[b]):+.2f}" for b in BATCH_SIZES) + " | |")
    if not args.no_page:
        page = write_page("stream_batch_size", "Stream batch size", "\n".join(lines), intro=(
            "Accuracy change (points) of `zsadapt.Stream` at its defaults over zero-shot, each pool's "
            "images in one random order cut into batches of 1 to 128 (see the script's docstring). A "
            "batch of one image gets the zero-shot label and enters the state (`info[\"single_image\"]`)."))
        print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
