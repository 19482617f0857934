"""InMaP's stopping rule against the published fixed 2000 steps, side by side on the shared pools.

    ZSADAPT_DATA=../shared/data python benchmarks/inmap_stopping.py [--pools cars,dtd] [--threads 1]

For each pool (Cars with its text embeddings, the six 1-shot prototype pools) it runs ``inmap`` at
its defaults (stop when the proxies turn less than ``tol`` = 1e-4 rad per step for 10 steps) and
with ``tol=0`` (all 2000 steps, as published) and prints the accuracy of each, the labels that
differ, the steps taken and the seconds. The table goes to ``docs/results/inmap-stopping.md``
(``--no-page``: print only).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import zsadapt
from results_page import echo, write_page
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool


def run(pool, **params) -> tuple:
    """(labels (N,), steps, seconds) of one inmap fit."""
    start = time.perf_counter()
    res = zsadapt.refine(pool.image_features, pool.text_features, "inmap", seed=0, **params)
    return res.labels, res.info["iterations"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--pools", default="all", help="comma-separated pool names, or 'all'")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/inmap-stopping.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zsadapt.set_quiet(True)
    pools = [TEXT_POOL, *PROTOTYPE_POOLS] if args.pools == "all" else args.pools.split(",")
    lines: list = []
    echo(lines, "| pool | N x C | initial | inmap (stopping rule) | inmap 2000 steps | difference | labels "
         "differing | steps | seconds | seconds, 2000 steps | time ratio |")
    echo(lines, "|---" * 11 + "|")
    worst, steps_all, seconds = 0.0, [], [0.0, 0.0]
    for name in pools:
        pool = load_shared_pool(args.data, name, shots=1, seed=0)
        initial = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot").accuracy(pool.labels)
        fast, steps, fast_s = run(pool)
        full, _, full_s = run(pool, tol=0.0)
        a, b = zsadapt.accuracy(fast, pool.labels), zsadapt.accuracy(full, pool.labels)
        worst = max(worst, abs(a - b))
        steps_all.append(steps)
        seconds[0] += fast_s
        seconds[1] += full_s
        n, c = pool.image_features.shape[0], pool.text_features.shape[0]
        echo(lines, f"| {name} | {n} x {c} | {initial:.2f} | {a:.2f} | {b:.2f} | {a - b:+.2f} | "
             f"{int(np.sum(fast != full))} | {steps} | {fast_s:.1f} | {full_s:.1f} | {fast_s / full_s:.2f} |")
    echo(lines)
    echo(lines, f"Largest accuracy difference {worst:.2f} point; steps {min(steps_all)}-{max(steps_all)} "
         f"(mean {np.mean(steps_all):.0f}) of 2000; {seconds[0]:.1f} s against {seconds[1]:.1f} s in all "
         f"({seconds[0] / seconds[1]:.2f}x).")
    if not args.no_page:
        write_page("inmap-stopping", "InMaP: the stopping rule against 2000 steps", "\n".join(lines),
                   intro="`inmap` stops when its proxies stop moving (`tol` = 1e-4 rad per step, rms over "
                         "classes, for 10 consecutive steps); `tol=0` runs the published 2000 steps. "
                         "Accuracy %, seed 0, 1-shot prototypes for the six prototype pools.")


if __name__ == "__main__":
    main()
