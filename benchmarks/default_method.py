"""The default method's targets (issue 10, deliverable 3), measured side by side with the other
methods on the real pools of ../shared/data and a synthetic 1000-class pool.

Sections (``--sections``, comma-separated):

* ``whole``: accuracy on the whole pools (Cars text + the six 1-shot prototype pools) and the
  ECE of every method (``zsadapt.expected_calibration_error``);
* ``batches``: StatA's realistic batches (Zanella et al., CVPR 2025): 64 images drawn from 1-4,
  2-10 and 5-25 random classes, 1000 from 5-25, 25-50 and 50-100, and online batches of 128 from
  a stream whose classes are correlated (each class's images spread over the stream's slots by
  Dirichlet(xi) proportions, xi = 0.1, 0.01, 0.001, and "separate": one class after another);
  each batch solved on its own; mean accuracy over ``--tasks`` draws (every online batch of one
  stream); ``--tasks`` draws per setting;
* ``inductive``: fit on a random half of a pool and ``predict`` the other half (Cars, synthetic
  1000 classes), and val -> test on five prototype pools;
* ``cost``: seconds of one fit, side by side with ``transclip`` (robust=False) in the same run, at
  N x C = 50k x 1000 (``--large``) and per 64-image batch at C = 1000 (synthetic pools).

    ZSADAPT_DATA=../shared/data python benchmarks/default_method.py --sections whole
    ZSADAPT_DATA=../shared/data python benchmarks/default_method.py --sections batches --tasks 10
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np
import torch

import zsadapt
from zsadapt.api import make_solver
from zsadapt.metrics import accuracy, expected_calibration_error
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool
from zsadapt.solvers import Problem, available

from timing import timed

#: The realistic batch settings: (name, batch size, smallest and largest number of classes).
BATCHES = (("64 / 1-4", 64, 1, 4), ("64 / 2-10", 64, 2, 10), ("64 / 5-25", 64, 5, 25),
           ("1000 / 5-25", 1000, 5, 25), ("1000 / 25-50", 1000, 25, 50), ("1000 / 50-100", 1000, 50, 100))
#: Online settings: Dirichlet concentration of each class over the stream's slots (None: separate).
ONLINE = (("online 0.1", 0.1), ("online 0.01", 0.01), ("online 0.001", 0.001), ("online separate", None))
ONLINE_BATCH = 128


def solve(method: str, X: torch.Tensor, T: torch.Tensor, seed: int = 0, **params):
    """The fitted solver and its output on the pool (X, T) (unit rows)."""
    solver = make_solver(method, **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return solver, solver.fit(Problem(X, T, seed=seed))


def realistic_batch(labels: np.ndarray, size: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices of one batch: ``size`` images (or all, if fewer) drawn uniformly from the
    images of k classes, k uniform in [low, high], the classes drawn at random among those present."""
    present = np.unique(labels)
    k = min(int(rng.integers(low, high + 1)), present.size)
    classes = rng.choice(present, size=k, replace=False)
    rows = np.flatnonzero(np.isin(labels, classes))
    return np.sort(rng.choice(rows, size=min(size, rows.size), replace=False))


def online_stream(labels: np.ndarray, xi, rng: np.random.Generator) -> np.ndarray:
    """The pool's rows in stream order: the stream has one slot per batch of ``ONLINE_BATCH``; each
    class's (shuffled) images are spread over the slots by Dirichlet(xi) proportions (xi None: the
    classes one after another, in random order)."""
    classes = rng.permutation(np.unique(labels))
    if xi is None:
        return np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in classes])
    slots = max(1, int(np.ceil(labels.size / ONLINE_BATCH)))
    slot_of = np.empty(labels.size, dtype=np.int64)
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        shares = rng.dirichlet(np.full(slots, xi))
        cuts = np.round(np.cumsum(shares) * rows.size).astype(np.int64)
        slot_of[rows] = np.searchsorted(cuts, np.arange(rows.size), side="right")
    order = np.lexsort((rng.random(labels.size), slot_of))
    return order


def batch_accuracy(methods, X, T, y, rows_list, seed):
    """Accuracy (%) over all images of the batches ``rows_list`` of every method, each batch solved
    alone."""
    correct = {m: 0 for m in methods}
    total = 0
    for rows in rows_list:
        rows_t = torch.as_tensor(rows)
        for m in methods:
            _, out = solve(m, X[rows_t], T, seed=seed)
            correct[m] += int((out.probs.argmax(dim=1).numpy() == y[rows]).sum())
        total += len(rows)
    return {m: 100.0 * correct[m] / total for m in methods}


def pools(root: str, names) -> dict:
    """{name: (X, T, labels)} for the shared pools ``names`` and ``"synthetic"`` (1000 classes x 7
    images, CLIP-like modality gap)."""
    out = {}
    for name in names:
        if name == "synthetic":
            pool = zsadapt.make_pool(n_images=7000, n_classes=1000, dim=512, imbalance=0.0, seed=0)
        else:
            pool = load_shared_pool(root, name)
        out[name] = (torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features),
                     np.asarray(pool.labels))
    return out


def whole_section(data: dict, methods) -> str:
    lines = ["| pool | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    deltas = {m: [] for m in methods}
    for name, (X, T, y) in data.items():
        cells = []
        for m in methods:
            _, out = solve(m, X, T)
            acc, ece = accuracy(out.probs, y), expected_calibration_error(out.probs, y)
            if m == methods[0]:
                base = acc
            deltas[m].append(acc - base)
            cells.append(f"{acc:.2f} ({acc - base:+.2f}; ECE {ece:.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    real = [i for i, name in enumerate(data) if name != "synthetic"]
    lines.append("| mean change (real pools) | " + " | ".join(
        f"{np.mean([deltas[m][i] for i in real]):+.2f}" for m in methods) + " |")
    print(lines[-1], flush=True)
    return "\n".join(lines)


def batches_section(data: dict, methods, tasks: int, seed: int) -> str:
    settings = [s[0] for s in BATCHES] + [s[0] for s in ONLINE]
    means = {m: {s: [] for s in settings} for m in methods}
    lines = ["| pool | setting | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    for name, (X, T, y) in data.items():
        rng = np.random.default_rng(seed)
        for setting, size, low, high in BATCHES:
            if size >= y.size:
                continue
            rows_list = [realistic_batch(y, size, low, high, rng) for _ in range(tasks)]
            acc = batch_accuracy(methods, X, T, y, rows_list, seed)
            for m in methods:
                means[m][setting].append(acc[m])
            lines.append(f"| {name} | {setting} | " + " | ".join(f"{acc[m]:.2f}" for m in methods) + " |")
            print(lines[-1], flush=True)
        for setting, xi in ONLINE:
            order = online_stream(y, xi, rng)
            rows_list = [order[i:i + ONLINE_BATCH] for i in range(0, order.size, ONLINE_BATCH)][:max(tasks, 1) * 3]
            acc = batch_accuracy(methods, X, T, y, rows_list, seed)
            for m in methods:
                means[m][setting].append(acc[m])
            lines.append(f"| {name} | {setting} | " + " | ".join(f"{acc[m]:.2f}" for m in methods) + " |")
            print(lines[-1], flush=True)
    for setting in settings:
        if means[methods[0]][setting]:
            lines.append(f"| mean | {setting} | " + " | ".join(f"{np.mean(means[m][setting]):.2f}" for m in methods) + " |")
            print(lines[-1], flush=True)
    lines.append("| mean | all settings | " + " | ".join(
        f"{np.mean([v for s in settings for v in means[m][s]]):.2f}" for m in methods) + " |")
    print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="whole,batches,inductive,cost")
    parser.add_argument("--methods", default="zeroshot,anchored,gmm,transclip,em" + (",stata" if "stata" in available() else ""))
    parser.add_argument("--pools", default=",".join((TEXT_POOL,) + PROTOTYPE_POOLS + ("synthetic",)))
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to the shared/data folder")
    zsadapt.set_quiet(True)
    torch.manual_seed(args.seed)
    methods = args.methods.split(",")
    data = pools(root, args.pools.split(","))
    sections = args.sections.split(",")
    if "whole" in sections:
        whole_section(data, methods)
    if "batches" in sections:
        batches_section(data, methods, args.tasks, args.seed)


if __name__ == "__main__":
    main()
