"""Prototype classifiers of 1 to 16 labelled shots: the plain mixture against the prototypes' prior.

A user with a few labelled images per class builds the initial classifier from them
(:func:`zsadapt.class_prototypes`: the mean of each class's examples) and refines the predictions
for an unlabelled pool. The more shots, the better the classifier, and the plain ``gmm`` (the
default ``auto``'s whole-pool branch), which keeps the classifier only as EM's start, falls below
it where the pool's Gaussian clusters are not its classes (docs/methods/auto.md).
``prior_images=K`` anchors each class mean at its prototype with the weight of the K images it
averages (a conjugate Normal prior, MAP-EM; :class:`zsadapt.solvers.mixture.MeanPrior`).

For each of the six prototype pools of ``../shared/data`` (test split; prototypes from K seeded
train features per class, DTD's from val, ``load_shared_pool(..., shots=K)``) and each K: accuracy
% of the prototypes (``zeroshot``), ``gmm`` and ``auto`` at their defaults, both with
``prior_images=K``, and ``stata``; the change over the prototypes in parentheses, then the mean
change and the worst pool per K. Raw probabilities (``calibrate=False``; labels are the same).
Then images outside the fit: ``zsadapt.Auto`` (without and with the prior) fitted on the val split
and its ``predict`` on the test images (DTD left out: its prototypes come from val).

    ZSADAPT_DATA=../shared/data python benchmarks/prototype_prior.py        # about 5 minutes on 2 cores
    ZSADAPT_DATA=../shared/data python benchmarks/prototype_prior.py --shots 16 --pools dtd --no-page
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import zsadapt
from results_page import echo, write_page
from zsadapt.shared_pools import PROTOTYPE_POOLS, load_shared_pool

#: (column, method, parameters given K shots)
RUNS = (
    ("zeroshot", "zeroshot", lambda k: {}),
    ("gmm", "gmm", lambda k: {}),
    ("gmm prior=K", "gmm", lambda k: {"prior_images": k}),
    ("auto", "auto", lambda k: {}),
    ("auto prior=K", "auto", lambda k: {"prior_images": k}),
    ("stata", "stata", lambda k: {}),
)


def predict_accuracies(root, pool_name: str, shots: int, seed: int, test) -> tuple:
    """Accuracy % on the ``test`` pool of ``Auto`` fitted on the val split (prototypes of
    ``shots``), without and with ``prior_images=shots``."""
    val = load_shared_pool(root, pool_name, shots=shots, seed=seed, split="val")
    accuracies = []
    for prior in (0.0, float(shots)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = zsadapt.Auto(text_features=val.text_features, prior_images=prior, seed=seed).fit(val.image_features)
            accuracies.append(zsadapt.accuracy(model.predict(test.image_features), test.labels))
    return tuple(accuracies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", default="1,2,4,16", help="comma-separated K")
    parser.add_argument("--pools", default=",".join(PROTOTYPE_POOLS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-page", action="store_true", help="do not write docs/results/prototype_prior.md")
    args = parser.parse_args()
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        sys.exit("set ZSADAPT_DATA to the shared/data folder")
    zsadapt.set_quiet(True)
    columns = [name for name, _, _ in RUNS]
    lines: list = []
    echo(lines, "| shots | pool | " + " | ".join(columns) + " |")
    echo(lines, "|---" * (len(columns) + 2) + "|")
    summary, inductive = [], []
    for shots in (int(k) for k in args.shots.split(",")):
        changes: dict = {name: [] for name in columns[1:]}
        for pool_name in args.pools.split(","):
            pool = load_shared_pool(root, pool_name, shots=shots, seed=args.seed)
            X, T, y = pool.image_features, pool.text_features, pool.labels
            cells, initial = [], None
            for name, method, params in RUNS:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = zsadapt.refine(X, T, method, calibrate=False, seed=args.seed, **params(shots))
                accuracy = zsadapt.accuracy(result.labels, y)
                if initial is None:
                    initial = accuracy
                    cells.append(f"{accuracy:.2f}")
                else:
                    changes[name].append((accuracy - initial, pool_name))
                    cells.append(f"{accuracy:.2f} ({accuracy - initial:+.2f})")
            echo(lines, f"| {shots} | {pool_name} | " + " | ".join(cells) + " |")
            if pool_name != "dtd":
                predicted = predict_accuracies(root, pool_name, shots, args.seed, pool)
                inductive.append((shots, pool_name, initial, predicted))
        summary.append((shots, changes))
    echo(lines, "")
    echo(lines, "| shots | " + " | ".join(f"{name}: mean change (worst)" for name in columns[1:]) + " |")
    echo(lines, "|---" * len(columns) + "|")
    for shots, changes in summary:
        cells = []
        for name in columns[1:]:
            values = changes[name]
            worst = min(values)
            cells.append(f"{sum(v for v, _ in values) / len(values):+.2f} ({worst[0]:+.2f} {worst[1]})")
        echo(lines, f"| {shots} | " + " | ".join(cells) + " |")
    echo(lines, "")
    echo(lines, "Fit on val, predict test (`zsadapt.Auto(...).fit(val).predict(test)`), accuracy % on test "
                "(change over the prototypes):")
    echo(lines, "")
    echo(lines, "| shots | pool | zeroshot | auto predict | auto prior=K predict |")
    echo(lines, "|---|---|---|---|---|")
    for shots, pool_name, initial, (plain, prior) in inductive:
        echo(lines, f"| {shots} | {pool_name} | {initial:.2f} | {plain:.2f} ({plain - initial:+.2f}) | "
                    f"{prior:.2f} ({prior - initial:+.2f}) |")
    if not args.no_page:
        page = write_page("prototype_prior", "Prototype classifiers: the prototypes' prior", "\n".join(lines), intro=(
            "Accuracy % on the six prototype pools of `../shared/data` with prototypes of K labelled "
            "shots per class, and in parentheses the change over the prototypes: the plain mixture "
            "against the one whose class means are anchored at the prototypes with the weight of "
            "the K images each averages (`prior_images=K`); see the [GMM page](../methods/gmm.md)."))
        print(f"wrote {page}", file=sys.stderr)


if __name__ == "__main__":
    main()
