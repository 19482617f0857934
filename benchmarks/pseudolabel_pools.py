"""Accuracy of self_training (fpl, ifpl, grip), inmap and zlap (text and initial="inmap") against the
initial classifier on the real CLIP ViT-B/32 pools of ../shared/data (issue 4's evidence).

    ZSADAPT_DATA=../shared/data python benchmarks/pseudolabel_pools.py [--pools cars,dtd] [--runs ...]

Prints one markdown row per pool (accuracy %, seed 0, 1-shot prototypes for the six prototype
pools) and the mean gain over the initial classifier of each column on the six prototype pools.
The InMaP proxies of a pool are learned once (through ``zsadapt.initial.initial_problem``, the
code path of ``refine(..., initial="inmap")``) and shared by the ``inmap`` and ``zlap initial=inmap``
columns; every other column is one ``zsadapt.refine`` call at the method's defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

import zsadapt
from zsadapt.initial import initial_problem
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool

REFINE_RUNS = {
    "initial": ("zeroshot", {}),
    "st fpl": ("self_training", {"strategy": "fpl"}),
    "st ifpl": ("self_training", {"strategy": "ifpl"}),
    "st grip": ("self_training", {"strategy": "grip"}),
    "st grip balanced": ("self_training", {"strategy": "grip", "quota": "balanced"}),
    "st grip proportional": ("self_training", {"strategy": "grip", "quota": "proportional"}),
    "zlap": ("zlap", {}),
}
#: Columns computed from InMaP proxies: name -> InMaP parameters.
PROXY_RUNS = {
    "inmap": {},
    "zlap initial=inmap": {},
    "inmap uniform": {"marginals": "uniform"},
    "inmap zeroshot marginals": {"marginals": "zeroshot"},
}
RUNS = list(REFINE_RUNS) + list(PROXY_RUNS)


def run_column(run: str, pool, cache: dict) -> np.ndarray:
    """Predicted labels (N,) of one column."""
    if run in REFINE_RUNS:
        method, params = REFINE_RUNS[run]
        return zsadapt.refine(pool.image_features, pool.text_features, method, seed=0, **params).labels
    key = tuple(sorted(PROXY_RUNS[run].items()))
    if key not in cache:
        X, T = torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features)
        cache[key] = initial_problem(X, T, initial="inmap", initial_params=PROXY_RUNS[run] or None)
    problem = cache[key]
    if run.startswith("zlap"):
        return zsadapt.make_solver("zlap").fit(problem).probs.argmax(1).numpy()
    return problem.logits().argmax(1).numpy()  # the proxies as a classifier: InMaP's prediction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("ZSADAPT_DATA", "../shared/data"))
    parser.add_argument("--pools", default="all", help="comma-separated pool names, or 'all'")
    parser.add_argument("--runs", default="all", help=f"comma-separated columns among: {', '.join(RUNS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    zsadapt.set_quiet(True)
    pools = [TEXT_POOL, *PROTOTYPE_POOLS] if args.pools == "all" else args.pools.split(",")
    runs = RUNS if args.runs == "all" else ["initial"] + [r for r in args.runs.split(",") if r != "initial"]
    print("| pool | " + " | ".join(runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    gains = {r: [] for r in runs}
    for name in pools:
        pool = load_shared_pool(args.data, name, shots=1, seed=0)
        cells, base, cache = [], None, {}
        for run in runs:
            start = time.perf_counter()
            acc = zsadapt.accuracy(run_column(run, pool, cache), pool.labels)
            base = acc if base is None else base
            if name != TEXT_POOL:
                gains[run].append(acc - base)
            cells.append(f"{acc:.2f}")
            print(f"  {name} {run}: {acc:.2f} ({time.perf_counter() - start:.1f} s)", flush=True, file=sys.stderr)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if any(gains[r] for r in runs):
        print("| mean gain, prototype pools | " + " | ".join(
            f"{np.mean(gains[r]):+.2f}" if gains[r] else "-" for r in runs) + " |")


if __name__ == "__main__":
    main()
