"""Side-by-side evaluation of methods on one pool (what ``zsadapt compare`` and ``demo`` print)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from .api import methods as registered_methods
from .api import refine
from .messages import note
from .metrics import accuracy, expected_calibration_error
from .pool import Pool
from .result import Result


def parse_methods(spec: str) -> list:
    """Method names from a comma-separated list; ``"all"`` means every registered method."""
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if names == ["all"]:  # the baseline first: deltas are measured against the first row
        return sorted(registered_methods(), key=lambda m: m != "zeroshot")
    unknown = [m for m in names if m not in registered_methods()]
    if unknown:
        raise ValueError(
            f"unknown method(s) {', '.join(unknown)}; available: {', '.join(registered_methods())}"
        )
    if not names:
        raise ValueError("no method given")
    return names


def compare(
    pool: Pool,
    methods: Sequence[str],
    *,
    device: Optional[str] = None,
    seed: int = 0,
    params: Optional[dict] = None,
    progress: bool = False,
    weighting: str = "mean",
    initial: str = "text",
) -> list:
    """Run each method on ``pool`` and collect one row per method.

    Parameters
    ----------
    pool : Pool
        With ``labels`` for accuracy and calibration; without, rows hold timings only.
    methods : sequence of str
    params : dict, optional
        ``{method: {parameter: value}}`` overrides of the defaults.
    weighting, initial : str
        The initial classifier of every method (see :func:`zsadapt.refine`); per-template text is
        ``pool.text_templates``.

    Returns
    -------
    list of dict
        ``method``, ``accuracy`` (percent or None), ``delta`` (points over the first method, or
        None), ``ece`` (percent or None), ``seconds``, ``iterations``, ``converged``, ``params``.
    """
    params = params or {}
    rows = []
    for number, method in enumerate(methods, 1):
        if progress:
            note(f"running {method} ({number} of {len(methods)}) on {pool.n_images} images, {pool.n_classes} classes")
        text = pool.text_templates if pool.text_templates is not None else pool.text_features
        # Only the row is kept (no name holds the result): a result's (N, C) arrays and fitted
        # state go before the next method runs, so comparing many methods needs the memory of one.
        rows.append(_row(refine(pool.image_features, text, method, device=device, seed=seed, progress=progress,
                                weighting=weighting, initial=initial, **params.get(method, {})), pool))
    return _with_deltas(rows, pool)


def rows_from_results(results: Sequence[Result], pool: Pool) -> list:
    """The :func:`compare` rows of results already computed on ``pool`` (deltas over the first)."""
    return _with_deltas([_row(result, pool) for result in results], pool)


def _row(result: Result, pool: Pool) -> dict:
    """One :func:`compare` row (``delta`` still None)."""
    row: dict[str, Any] = {
        "method": result.method,
        "accuracy": None,
        "delta": None,
        "ece": None,
        "seconds": result.info["seconds"]["total"],
        "iterations": result.info.get("iterations"),
        "converged": result.info.get("converged"),
        "params": result.params,
    }
    if pool.labels is not None:
        row["accuracy"] = accuracy(result.labels, pool.labels)
        row["ece"] = expected_calibration_error(result.probs, pool.labels)
    return row


def _with_deltas(rows: list, pool: Pool) -> list:
    """``rows`` with each ``delta``: accuracy points over the first row (None without labels)."""
    if pool.labels is not None and rows:
        for row in rows:
            row["delta"] = row["accuracy"] - rows[0]["accuracy"]
    return rows


def format_table(rows: list) -> str:
    """A plain-text table of :func:`compare` rows."""
    header = ["method", "accuracy %", f"vs {rows[0]['method']}" if rows else "delta", "ECE %", "seconds", "iters",
              "converged"]
    lines = []
    for row in rows:
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        delta = "-" if row["delta"] is None else f"{row['delta']:+.2f}"
        ece = "-" if row["ece"] is None else f"{row['ece']:.2f}"
        iters = "-" if row["iterations"] is None else str(row["iterations"])
        conv = "-" if row["converged"] is None else ("yes" if row["converged"] else "NO")
        lines.append([row["method"], acc, delta, ece, f"{row['seconds']:.3f}", iters, conv])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines])


def parse_subset(spec: str) -> Union[int, float]:
    """``"5"`` -> 5 classes; ``"25%"`` -> the fraction 0.25 of C (for ``--subset-classes``)."""
    text = str(spec).strip()
    try:
        if text.endswith("%"):
            fraction = float(text[:-1]) / 100
            if not 0 < fraction < 1:
                raise ValueError
            return fraction
        count = int(text)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise ValueError(f"--subset-classes: expected a count >= 1 or a percentage in (0, 100), got {spec!r}") from None


def subset_pool(pool: Pool, m: Union[int, float], seed: int = 0) -> Pool:
    """The part of ``pool`` whose images belong to ``m`` of its classes, drawn at random.

    The classifier keeps all C classes (the text side does not know which classes the pool holds),
    so a method must still choose among C: the setting of a pool that holds a handful of the
    classes.

    Parameters
    ----------
    pool : Pool
        With ``labels``.
    m : int or float
        How many classes to keep: an int >= 1, or a fraction 0 < m < 1 of C (rounded, at least 1).
        Only classes with at least one image are drawn.
    seed : int
        Seed of the draw (``numpy.random.default_rng``).

    Returns
    -------
    Pool
        The rows of the chosen classes (in their original order), all C text embeddings, labels in
        ``0..C-1`` as before, and ``extras["classes"]``: the chosen class indices, sorted.
    """
    if pool.labels is None:
        raise ValueError(f"{pool.source}: a class-subset pool needs labels")
    labels = np.asarray(pool.labels)
    present = np.unique(labels)
    if isinstance(m, float) and not float(m).is_integer():
        if not 0 < m < 1:
            raise ValueError(f"subset: m = {m} must be an int >= 1 or a fraction in (0, 1)")
        count = max(1, int(round(m * pool.n_classes)))
    else:
        count = int(m)
    if not 1 <= count <= present.size:
        raise ValueError(f"{pool.source}: cannot draw {count} classes; the pool holds {present.size}")
    classes = np.sort(np.random.default_rng(seed).choice(present, size=count, replace=False))
    rows = np.isin(labels, classes)
    return Pool(
        pool.image_features[rows], pool.text_features, labels[rows], pool.classnames,
        source=f"{pool.source} [{count} of {pool.n_classes} classes, seed {seed}]",
        extras=dict(pool.extras, classes=classes),
    )
