"""The default method's targets (issue 10, deliverable 3) that StatA's protocol does not measure,
side by side with the other methods on the real pools of ../shared/data and synthetic pools.
The realistic batches themselves are ``benchmarks/realistic.py``.

Sections (``--sections``, comma-separated):

* ``whole``: accuracy on the whole pools (Cars text + the six 1-shot prototype pools), the change
  over the initial classifier, and the ECE of the probabilities ``zsadapt.refine`` returns (label-
  free calibration on, its default; ``zsadapt.expected_calibration_error``, 15 bins);
* ``inductive``: fit on a random half of a pool (seeded) and ``predict`` the other half, against
  the zero-shot accuracy on that half (Cars and ``--inductive-pools``);
* ``cost``: seconds of one ``zsadapt.refine`` call of each method as ``zsadapt refine`` runs it
  (its defaults, label-free calibration included; the default method's calibration also timed
  apart) against one fit of published ``transclip`` (``robust=False``, no calibration) on the same
  pool in the same run: per 64-image batch at C = 1000 (median of ``--repeats`` batches) and on
  one N x 1000 pool (``--large N``; the issue's 50000 takes minutes per method on 2 CPU cores).
  Every method is run once on a small pool first (imports and first-call set-up not timed).
  Synthetic pools (``zsadapt.make_pool``, 512-d, text noise 3.25 as ``synthetic-1000x7``).

Writes its tables to ``docs/results/default-method.md`` (``--no-page`` to skip).

    ZSADAPT_DATA=../shared/data python benchmarks/default_method.py --sections whole
    ZSADAPT_DATA=../shared/data python benchmarks/default_method.py --sections inductive,cost --large 10000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import numpy as np
import torch

import zsadapt
import zsadapt.api
from results_page import write_page
from timing import timed
from zsadapt.metrics import accuracy, expected_calibration_error
from zsadapt.shared_pools import PROTOTYPE_POOLS, TEXT_POOL, load_shared_pool
from zsadapt.solvers import DEFAULT_METHOD, Problem, Solver, get_solver

#: Synthetic pools in the regime of synthetic-1000x7 (benchmarks/realistic.py).
SYNTHETIC = dict(n_classes=1000, dim=512, imbalance=0.0, text_noise=3.25)
BASELINE = ("transclip", {"robust": False})


def progress(message: str) -> None:
    print(f"default_method: {message}", file=sys.stderr, flush=True)


def refine(X, T, method, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zsadapt.refine(X, T, method, **params)


def whole_section(root, methods) -> str:
    """Markdown: one row per pool, accuracy (change; ECE) per method, then the mean and worst change."""
    lines = ["| pool | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    deltas = {m: [] for m in methods}
    for name in (TEXT_POOL,) + PROTOTYPE_POOLS:
        pool = load_shared_pool(root, name)
        y = np.asarray(pool.labels)
        base = accuracy(pool.image_features @ pool.text_features.T, y)
        cells = []
        for m in methods:
            result = refine(pool.image_features, pool.text_features, m)
            acc = accuracy(result.probs, y)
            deltas[m].append(acc - base)
            cells.append(f"{acc:.2f} ({acc - base:+.2f}; ECE {expected_calibration_error(result.probs, y):.1f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        progress(lines[-1])
    lines.append("| mean change | " + " | ".join(f"{np.mean(deltas[m]):+.2f}" for m in methods) + " |")
    lines.append("| worst change | " + " | ".join(f"{np.min(deltas[m]):+.2f}" for m in methods) + " |")
    return "\n".join(lines)


def inductive_section(root, methods, pools, seed) -> str:
    """Markdown: accuracy of ``predict`` on the held-out half, per pool and method."""
    with_predict = [m for m in methods if get_solver(m).predict is not Solver.predict]
    lines = ["| pool (fit on half, predict the other) | " + " | ".join(with_predict) + " |",
             "|---" * (len(with_predict) + 1) + "|"]
    for name in pools:
        if name.startswith("synthetic"):
            pool = zsadapt.make_pool(n_images=7000, seed=0, **SYNTHETIC)
        else:
            pool = load_shared_pool(root, name)
        X, T, y = torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features), np.asarray(pool.labels)
        order = np.random.default_rng(seed).permutation(len(y))
        fit, held = order[: len(y) // 2], order[len(y) // 2:]
        cells = []
        for m in with_predict:
            solver = get_solver(m)()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                solver.fit(Problem(X[fit], T, seed=seed))
                cells.append(f"{accuracy(solver.predict(X[held]).probs, y[held]):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        progress(lines[-1])
    return "\n".join(lines)


def _seconds(method, params, X, T) -> float:
    """Seconds of one ``solver.fit`` (the published method alone: no calibration)."""
    solver = get_solver(method)(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timed(lambda: solver.fit(Problem(X, T)), X.device)[1]


def cost_section(methods, large, repeats) -> str:
    """Markdown: seconds per call of ``zsadapt.refine`` (calibration included, as ``zsadapt refine``
    runs it) of each method, and the ratio to one fit of published transclip (``robust=False``,
    no calibration) measured in the same run on the same pool."""
    timed_methods = [m for m in methods if m != "zeroshot"]
    runs = [(f"64-image batch, C = 1000 (median of {repeats})", 64, repeats), (f"N = {large}, C = 1000", large, 1)]
    header = " | ".join(f"{m} s (x transclip)" for m in timed_methods)
    lines = [f"| pool | transclip (robust=False) fit s | {header} | {DEFAULT_METHOD}: of which calibration s |",
             "|---" * (len(timed_methods) + 3) + "|"]
    warm = zsadapt.make_pool(n_images=64, seed=10 ** 6, **SYNTHETIC)
    _seconds(BASELINE[0], BASELINE[1], torch.as_tensor(warm.image_features), torch.as_tensor(warm.text_features))
    for m in timed_methods:
        refine(warm.image_features, warm.text_features, m)
    for label, n, count in runs:
        baseline, seconds, calibration = [], {m: [] for m in timed_methods}, []
        for r in range(count):
            pool = zsadapt.make_pool(n_images=n, seed=r, **SYNTHETIC)
            X, T = torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features)
            baseline.append(_seconds(BASELINE[0], BASELINE[1], X, T))
            progress(f"{label}, pool {r}: transclip (robust=False) {baseline[-1]:.3f} s")
            for m in timed_methods:
                with calibration_clock(X.device) as spent:
                    total = timed(lambda: refine(X, T, m), X.device)[1]
                seconds[m].append(total)
                if m == DEFAULT_METHOD:
                    calibration.extend(spent)
                progress(f"{label}, pool {r}: {m} {total:.3f} s")
        base = float(np.median(baseline))
        cells = [f"{np.median(seconds[m]):.3f} ({np.median(seconds[m]) / base:.2f}x)" for m in timed_methods]
        calib = f"{np.median(calibration):.3f}" if calibration else "-"
        lines.append(f"| {label} | {base:.3f} | " + " | ".join(cells) + f" | {calib} |")
        progress(lines[-1])
    return "\n".join(lines)


@contextlib.contextmanager
def calibration_clock(device):
    """Within the block, each calibration ``zsadapt.refine`` runs (``zsadapt.api.calibrate_probs``)
    is timed on its own; yields the list its seconds are appended to."""
    original, spent = zsadapt.api.calibrate_probs, []

    def clocked(*args):
        out, seconds = timed(lambda: original(*args), device)
        spent.append(seconds)
        return out

    zsadapt.api.calibrate_probs = clocked
    try:
        yield spent
    finally:
        zsadapt.api.calibrate_probs = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="whole,inductive,cost")
    parser.add_argument("--methods", default=",".join(dict.fromkeys(
        ["zeroshot", DEFAULT_METHOD, "gmm", "stata", "transclip", "zlap"])))
    parser.add_argument("--inductive-pools", default=f"{TEXT_POOL},synthetic-1000x7")
    parser.add_argument("--large", type=int, default=10000, help="N of the large cost pool (C = 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="64-image batches timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/default-method.md")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"whole", "inductive", "cost"})
    if unknown:
        sys.exit(f"unknown section(s) {', '.join(unknown)}; known: whole, inductive, cost")
    root = os.environ.get("ZSADAPT_DATA")
    if not root and ("whole" in sections or any(not p.startswith("synthetic") for p in args.inductive_pools.split(","))
                     and "inductive" in sections):
        sys.exit("set ZSADAPT_DATA to the shared/data folder")
    zsadapt.set_quiet(True)
    torch.manual_seed(args.seed)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    body = []
    if "whole" in sections:
        table = whole_section(root, methods)
        body.append("## Whole pools\n\nAccuracy % (change over the initial classifier; ECE % of the "
                    "calibrated probabilities refine returns), seed 0.\n\n" + table)
        print(body[-1], flush=True)
    if "inductive" in sections:
        table = inductive_section(root, methods, args.inductive_pools.split(","), args.seed)
        body.append("## Inductive: fit on a random half, predict the other\n\nAccuracy % on the held-out "
                    "half (zeroshot: the initial classifier on that half).\n\n" + table)
        print(body[-1], flush=True)
    if "cost" in sections:
        table = cost_section(methods, args.large, args.repeats)
        body.append("## Cost\n\nSeconds of one `zsadapt.refine` call per method as `zsadapt refine` runs it "
                    "(its defaults, label-free calibration included), and the ratio to one fit of published "
                    "transclip (robust=False, no calibration) on the same synthetic pool (512-d) in the "
                    "same run; the last column is the default method's calibration alone.\n\n" + table)
        print(body[-1], flush=True)
    if not args.no_page and body:
        path = write_page("default-method", "The default method's other targets", "\n\n".join(body),
                          intro=f"Whole pools, inductive predict and cost of the default method "
                                f"(`{DEFAULT_METHOD}`) beside the others; the realistic batches are on "
                                "[the realistic protocol page](realistic.md).")
        progress(f"wrote {path}")


if __name__ == "__main__":
    main()
