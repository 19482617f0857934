"""Accuracy of every registered method on the real CLIP ViT-B/32 pools of ../shared/data.

Stanford Cars uses its real text embeddings; the six others use 1-shot prototype classifiers
(seed 0), as described in shared/data/README.md. Prints a Markdown table (accuracy %, and the
change over the initial classifier in parentheses), plus the mean change per method, and writes
it to the docs site's results page ``docs/results/real_pools.md`` (``--shots N`` other than 1:
``docs/results/real_pools_Nshot.md``, the same pools with a stronger initial classifier, the
mean of N seeded train features per class).

    ZSADAPT_DATA=../shared/data python benchmarks/real_pools.py
    ZSADAPT_DATA=../shared/data python benchmarks/real_pools.py --methods zeroshot,zlap --shots 2
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import zsadapt
from results_page import echo, shots_page, write_page
from zsadapt.evaluate import compare, parse_methods
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="all")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pools", default=",".join((TEXT_POOL,) + PROTOTYPE_POOLS))
    args = parser.parse_args()
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to the shared/data folder")
    zsadapt.set_quiet(True)
    methods = parse_methods(args.methods)
    if methods[0] != "zeroshot":
        methods = ["zeroshot"] + [m for m in methods if m != "zeroshot"]
    lines: list = []
    echo(lines, "| pool | " + " | ".join(methods) + " |")
    echo(lines, "|---" * (len(methods) + 1) + "|")
    deltas = {m: [] for m in methods}
    for name in args.pools.split(","):
        pool = load_shared_pool(root, name, shots=args.shots, seed=args.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = compare(pool, methods, seed=args.seed)
        cells = []
        for row in rows:
            deltas[row["method"]].append(row["delta"])
            cells.append(f"{row['accuracy']:.2f}" if row["method"] == "zeroshot"
                         else f"{row['accuracy']:.2f} ({row['delta']:+.2f})")
        label = name if name == TEXT_POOL else f"{name} ({args.shots}-shot)"
        echo(lines, f"| {label} | " + " | ".join(cells) + " |")
    echo(lines, "| mean change | " + " | ".join(f"{sum(d) / len(d):+.2f}" for d in deltas.values()) + " |")
    slug, title = shots_page("real_pools", "Every method on the real CLIP pools", args.shots)
    page = write_page(slug, title, "\n".join(lines), intro=(
        "Accuracy % of each method at its defaults (seed 0) on the CLIP ViT-B/32 pools of "
        "`../shared/data`, and in parentheses the change over the initial classifier: Stanford Cars "
        f"with its text embeddings, the others with {args.shots}-shot image prototypes."))
    print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
