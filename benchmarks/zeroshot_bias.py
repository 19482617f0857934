"""How much of a pool's zero-shot error is a per-class bias (hubness)? The shared pools against the
synthetic 1000-class pool of the realistic benchmark.

A classifier's *hub* classes attract far more zero-shot predictions than they hold images. One
cause is a per-class offset of the scores: class c's text embedding t_c leans towards the centre
of the image cloud, u = mean_i x_i / |mean_i x_i|, by b_c = t_c . u, which adds b_c (x_i . u) to
every image's score for c. For each pool this prints

* zero-shot accuracy and its hubness: the most-voted class's votes over the mean class size, and
  the share of votes taken by the top 1% of classes (at least one);
* zero-shot accuracy with that bias taken out: t_c <- t_c - (b_c - mean_c b_c) u, renormalised
  (every class then leans towards u alike);
* for the synthetic pool, ``auto`` and ``stata`` on the whole pool and on a random half, with the
  classifier as it is and with the bias taken out.

The synthetic pool is where ``auto`` falls below zero-shot (docs/methods/auto.md); this
shows what kind of zero-shot error it carries, against the real text pool's.

Run: ``ZSADAPT_DATA=../shared/data python benchmarks/zeroshot_bias.py`` (about 25 seconds on 2 CPU
cores; without ZSADAPT_DATA the synthetic pool only). Writes ``docs/results/zeroshot_bias.md``.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import zsadapt
from realistic import REAL_POOLS, SYNTHETIC_POOLS, load_pool
from results_page import echo, write_page


def without_class_bias(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Text embeddings (C, d) with each class's lean towards the image centre u made equal:
    t_c - (t_c . u - mean_c t_c . u) u, renormalised. ``image`` (N, d), unit rows."""
    u = image.mean(axis=0)
    u /= np.linalg.norm(u)  # (d,)
    lean = text @ u  # (C,)
    centred = text - np.outer(lean - lean.mean(), u)  # (C, d)
    return centred / np.linalg.norm(centred, axis=1, keepdims=True)


def zeroshot_figures(image: np.ndarray, text: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy (%) and hubness of the zero-shot labels argmax_c x_i . t_c."""
    predicted = (image @ text.T).argmax(axis=1)  # (N,)
    votes = np.bincount(predicted, minlength=text.shape[0])  # (C,)
    mean_size = len(labels) / len(np.unique(labels))
    top = max(1, text.shape[0] // 100)
    return {"accuracy": 100 * float((predicted == labels).mean()),
            "max votes": float(votes.max() / mean_size),
            "top 1% share": 100 * float(np.sort(votes)[::-1][:top].sum() / len(labels))}


def refined(image, text, labels, method: str) -> float:
    return zsadapt.accuracy(zsadapt.refine(image, text, method, calibrate=False).labels, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    zsadapt.set_quiet(True)
    root = os.environ.get("ZSADAPT_DATA")
    pools = [load_pool(name, root) for name in [*(REAL_POOLS if root else ()), *SYNTHETIC_POOLS]]  # (pool, label)
    synthetic = next(pool for pool, label in pools if label == "synthetic-1000x7")

    lines: list = []
    echo(lines, "| pool | zero-shot % | most-voted class, votes / mean class size | votes of the top 1% of "
                "classes, % | zero-shot %, class bias taken out | change |")
    echo(lines, "|---" * 6 + "|")
    for pool, label in pools:
        X, T, y = pool.image_features, pool.text_features, pool.labels
        before = zeroshot_figures(X, T, y)
        after = zeroshot_figures(X, without_class_bias(X, T), y)
        echo(lines, f"| {label} | {before['accuracy']:.2f} | {before['max votes']:.1f} | "
                    f"{before['top 1% share']:.1f} | {after['accuracy']:.2f} | "
                    f"{after['accuracy'] - before['accuracy']:+.2f} |")
    echo(lines)

    X, T, y = synthetic.image_features, synthetic.text_features, synthetic.labels
    half = np.sort(np.random.default_rng(0).permutation(len(y))[: len(y) // 2])
    echo(lines, "The synthetic pool refined, with its classifier as it is and with the class bias taken out "
                "(accuracy %):")
    echo(lines)
    echo(lines, "| pool | classifier | zero-shot | auto | stata |")
    echo(lines, "|---|---|---|---|---|")
    for part, rows in (("whole (7000 images)", np.arange(len(y))), ("random half (3500)", half)):
        for name, text in (("as it is", T), ("class bias taken out", without_class_bias(X, T))):
            figures = [refined(X[rows], text, y[rows], m) for m in ("zeroshot", "auto", "stata")]
            echo(lines, f"| {part} | {name} | " + " | ".join(f"{f:.2f}" for f in figures) + " |")
    write_page("zeroshot_bias", "How much of the zero-shot error is a per-class bias?", "\n".join(lines), intro=(
        "Zero-shot accuracy and hubness of each pool, and zero-shot accuracy once every class leans "
        "towards the centre of the image cloud alike (t_c - (t_c . u - mean_c t_c . u) u, renormalised, u "
        "the mean image direction): the larger the gain, the more of the pool's zero-shot error is that "
        "per-class bias (see the script's docstring)."))


if __name__ == "__main__":
    main()
