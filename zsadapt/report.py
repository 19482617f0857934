"""Reports people can look at: accuracy per method, per-class changes, confidence, calibration.

:func:`make_report` turns the :class:`~zsadapt.result.Result` of one or more methods on a pool
into a :class:`Report` (tables as plain data, figures as PNG bytes); ``Report.save`` writes it as a
self-contained HTML or Markdown file with the plots embedded (base64 data URIs). The plots need
matplotlib (``pip install 'zsadapt[report]'``); the numbers (:func:`reliability_bins`,
:func:`per_class_accuracy`, :func:`method_rows`) do not.

Calibration: a method's confidence is the largest class probability of an image. The reliability
diagram splits [0, 1] into equal-width bins and plots each bin's accuracy against its mean
confidence; the expected calibration error is sum_b (n_b / N) |acc_b - conf_b| (Guo et al., On
Calibration of Modern Neural Networks, ICML 2017), in percent.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ._version import __version__
from .extras import require
from .io import atomic_write
from .metrics import accuracy
from .pool import Pool
from .result import Result

REPORT_SUFFIXES = (".html", ".htm", ".md")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``MissingExtra`` naming
    ``pip install 'zsadapt[report]'``."""
    matplotlib = require("matplotlib", "report", "a report (its plots)")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- numbers


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> dict:
    """Per-bin calibration statistics of the top-1 prediction.

    Parameters
    ----------
    probs : array (N, C), rows sum to 1
    labels : array (N,) of int
    n_bins : int
        Equal-width confidence bins over [0, 1]; bin b holds confidences in (b/n, (b+1)/n]
        (the first bin also holds 0).

    Returns
    -------
    dict of numpy arrays
        ``edges`` (n_bins + 1,), ``count`` (n_bins,), ``confidence`` and ``accuracy`` (n_bins,,
        mean confidence and fraction correct per bin, NaN in empty bins), and ``ece`` (float,
        percent): sum_b (count_b / N) |accuracy_b - confidence_b|.
    """
    p, y = _numpy(probs).astype(np.float64), _numpy(labels)
    confidence = p.max(axis=1)  # (N,)
    correct = (p.argmax(axis=1) == y).astype(np.float64)  # (N,)
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (N,)
    count = np.bincount(index, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        mean_acc = np.bincount(index, weights=correct, minlength=n_bins) / count
    gaps = np.where(count > 0, np.abs(mean_acc - mean_conf), 0.0)
    ece = float(100.0 * np.sum(count / max(1, len(y)) * gaps))
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": mean_conf,
            "accuracy": mean_acc, "ece": ece}


def per_class_accuracy(predicted: Any, labels: Any, n_classes: int) -> np.ndarray:
    """Accuracy in percent of each class (C,), over the images whose true class it is; NaN for a
    class with no image in the pool."""
    pred, true = _numpy(predicted), _numpy(labels)
    total = np.bincount(true, minlength=n_classes).astype(np.float64)
    right = np.bincount(true[pred == true], minlength=n_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100.0 * right / total, np.nan)


def method_rows(results: Sequence[Result], labels: Optional[Any] = None, *,
                baseline: Optional[str] = None, min_confidence: Optional[float] = None,
                n_bins: int = 15) -> list:
    """One summary dict per result.

    Keys: ``method``; ``accuracy``, ``delta`` (points over ``baseline``), ``ece`` (percent) when
    ``labels`` are given (else None); ``mean_confidence``; ``changed`` (percent of images whose
    label differs from the baseline's); ``coverage`` and ``selective_accuracy`` (percent of images
    with confidence >= ``min_confidence``, and the accuracy on those) when a threshold is given;
    ``iterations``, ``converged``, ``seconds``.
    """
    y = None if labels is None else _numpy(labels)
    base = _pick_baseline(results, baseline)
    base_labels = _numpy(base.labels) if base is not None else None
    base_acc = accuracy(base.labels, y) if (base is not None and y is not None) else None
    rows = []
    for result in results:
        pred, probs = _numpy(result.labels), _numpy(result.probs)
        confidence = probs.max(axis=1)
        row = {
            "method": result.method,
            "accuracy": None, "delta": None, "ece": None,
            "mean_confidence": float(100.0 * confidence.mean()),
            "changed": None if base_labels is None else float(100.0 * np.mean(pred != base_labels)),
            "coverage": None, "selective_accuracy": None,
            "iterations": result.info.get("iterations"),
            "converged": result.info.get("converged"),
            "seconds": result.info.get("seconds", {}).get("total"),
        }
        if y is not None:
            row["accuracy"] = accuracy(pred, y)
            row["delta"] = None if base_acc is None else row["accuracy"] - base_acc
            row["ece"] = reliability_bins(probs, y, n_bins)["ece"]
        if min_confidence is not None:
            kept = confidence >= min_confidence
            row["coverage"] = float(100.0 * kept.mean())
            if y is not None and kept.any():
                row["selective_accuracy"] = accuracy(pred[kept], y[kept])
        rows.append(row)
    return rows


def _pick_baseline(results: Sequence[Result], baseline: Optional[str]) -> Optional[Result]:
    by_name = {r.method: r for r in results}
    if baseline is not None:
        if baseline not in by_name:
            raise ValueError(f"baseline {baseline!r} is not among the results ({', '.join(by_name)})")
        return by_name[baseline]
    if "zeroshot" in by_name:
        return by_name["zeroshot"]
    return results[0] if results else None


def class_changes(baseline: Result, result: Result, labels: Any, classnames: Sequence[str],
                  top: int = 5) -> dict:
    """Per-class accuracy of ``result`` against ``baseline``.

    Returns
    -------
    dict
        ``delta`` (C,) accuracy change in points (NaN for absent classes), and ``gained`` /
        ``lost``: up to ``top`` rows (class, images, baseline %, method %, change) of the classes
        that gained / lost most.
    """
    y = _numpy(labels)
    n_classes = len(classnames)
    before = per_class_accuracy(baseline.labels, y, n_classes)
    after = per_class_accuracy(result.labels, y, n_classes)
    delta = after - before
    sizes = np.bincount(y, minlength=n_classes)
    present = np.flatnonzero(~np.isnan(delta))
    order = present[np.argsort(-delta[present], kind="stable")]

    def rows(indices):
        return [{"class": str(classnames[c]), "images": int(sizes[c]), "baseline": float(before[c]),
                 "method": float(after[c]), "change": float(delta[c])} for c in indices]

    gained = [c for c in order[:top] if delta[c] > 0]
    lost = [c for c in order[::-1][:top] if delta[c] < 0]
    return {"delta": delta, "gained": rows(gained), "lost": rows(lost)}


def main_parameter(method: str) -> Optional[str]:
    """The hyper-parameter a sweep varies: the first int or float parameter with a numeric
    default in the method's table (by convention its main one, e.g. zlap's ``k``; a parameter
    whose default is None, chosen at run time, has no value to sweep around), or None."""
    from .api import describe_methods

    for described in describe_methods():
        if described["name"] == method:
            for name, spec in described["params"].items():
                if spec.type in (int, float) and spec.default is not None:
                    return name
            return None
    raise ValueError(f"unknown method {method!r}")


def sweep_values(spec: Any) -> list:
    """Three values around a parameter's default: half, default, double (within its bounds;
    0, 1, 2 for an int defaulting to 0; 0.1, 1, 10 times 1 for a float defaulting to 0)."""
    default = spec.default
    if spec.type is int:
        values = [0, 1, 2] if default == 0 else [max(1, default // 2), default, 2 * default]
    else:
        values = [0.1, 1.0, 10.0] if default == 0 else [default / 2, default, default * 2]
    low = -np.inf if spec.minimum is None else spec.minimum
    high = np.inf if spec.maximum is None else spec.maximum
    return sorted({spec.type(min(max(v, low), high)) for v in values})


def parameter_sweep(pool: Pool, method: str, name: Optional[str] = None,
                    values: Optional[Sequence[Any]] = None, **refine_kwargs: Any) -> list:
    """Refine ``pool`` with ``method`` for each value of one hyper-parameter.

    Parameters
    ----------
    name : str, optional
        Default: :func:`main_parameter`.
    values : sequence, optional
        Default: :func:`sweep_values` of the parameter.
    **refine_kwargs
        Passed to :func:`zsadapt.refine` (device, seed, other parameters).

    Returns
    -------
    list of dict
        ``value``, ``accuracy`` and ``ece`` (percent; None without labels), ``mean_confidence``,
        ``seconds``.
    """
    from .api import describe_methods, refine

    name = name or main_parameter(method)
    if name is None:
        raise ValueError(f"{method} has no numeric parameter to sweep")
    spec = next(d for d in describe_methods() if d["name"] == method)["params"][name]
    rows = []
    for value in (values if values is not None else sweep_values(spec)):
        result = refine(pool.image_features, pool.text_features, method, **{name: value}, **refine_kwargs)
        row = method_rows([result], pool.labels)[0]
        rows.append({"value": value, "accuracy": row["accuracy"], "ece": row["ece"],
                     "mean_confidence": row["mean_confidence"], "seconds": row["seconds"]})
    return rows


# ----------------------------------------------------------------------------- plots


def plot_reliability(ax, probs: Any, labels: Any, title: str = "", n_bins: int = 15) -> float:
    """Reliability diagram on the matplotlib axes ``ax``: per-bin accuracy (bars) and mean
    confidence (dots) against the diagonal of perfect calibration. Returns the ECE (percent)."""
    stats = reliability_bins(probs, labels, n_bins)
    edges, filled = stats["edges"], stats["count"] > 0
    centres = (edges[:-1] + edges[1:]) / 2
    ax.bar(centres[filled], stats["accuracy"][filled], width=1.0 / n_bins, edgecolor="black", color="tab:blue")
    ax.plot([0, 1], [0, 1], "--", color="gray")
    ax.plot(stats["confidence"][filled], stats["accuracy"][filled], "o", color="tab:orange", markersize=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}: ECE {stats['ece']:.2f}%" if title else f"ECE {stats['ece']:.2f}%", fontsize=9)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    return stats["ece"]


def plot_confidence(ax, probs: Any, labels: Optional[Any] = None, title: str = "") -> None:
    """Histogram of the top-1 probability on ``ax``; stacked correct / wrong when ``labels``."""
    probs = _numpy(probs)
    confidence = probs.max(axis=1)
    bins = np.linspace(0, 1, 21)
    if labels is None:
        ax.hist(confidence, bins=bins, color="tab:blue")
    else:
        right = probs.argmax(axis=1) == _numpy(labels)
        ax.hist([confidence[right], confidence[~right]], bins=bins, stacked=True,
                color=["tab:green", "tab:red"], label=["correct", "wrong"])
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("images")


def plot_class_changes(ax, delta: Any, title: str = "") -> None:
    """Per-class accuracy changes (C,) as bars sorted from largest gain to largest loss on ``ax``
    (NaN classes, absent from the pool, left out)."""
    delta = np.asarray(delta, dtype=np.float64)
    delta = np.sort(delta[~np.isnan(delta)])[::-1]
    ax.bar(np.arange(len(delta)), delta, color=np.where(delta >= 0, "tab:green", "tab:red"), width=1.0)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("classes, sorted")
    ax.set_ylabel("accuracy change (points)")


# ----------------------------------------------------------------------------- the report


@dataclass
class Report:
    """A rendered-agnostic report: title, facts, sections of tables and figures.

    ``sections`` is a list of dicts with ``title``, ``text`` (str), ``tables`` (list of
    ``(header, rows)``) and ``figures`` (list of ``(caption, png_bytes)``).
    """

    title: str
    facts: list
    rows: list
    sections: list = field(default_factory=list)

    def html(self) -> str:
        """A self-contained HTML page (figures as base64 data URIs)."""
        esc = html.escape
        out = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{esc(self.title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;"
            "padding:3px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child"
            "{text-align:left}img{max-width:100%}</style></head><body>",
            f"<h1>{esc(self.title)}</h1>", "<ul>",
        ]
        out += [f"<li>{esc(fact)}</li>" for fact in self.facts]
        out.append("</ul>")
        for section in self.sections:
            out.append(f"<h2>{esc(section['title'])}</h2>")
            if section.get("text"):
                out.append(f"<p>{esc(section['text'])}</p>")
            for header, rows in section.get("tables", []):
                out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows]
                out.append("</table>")
            for caption, png in section.get("figures", []):
                out.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,'
                           f'{base64.b64encode(png).decode()}"><figcaption>{esc(caption)}</figcaption></figure>')
        out.append("</body></html>")
        return "\n".join(out) + "\n"

    def markdown(self) -> str:
        """A Markdown document (figures as base64 data-URI images)."""
        out = [f"# {self.title}", ""] + [f"- {fact}" for fact in self.facts] + [""]
        for section in self.sections:
            out += [f"## {section['title']}", ""]
            if section.get("text"):
                out += [section["text"], ""]
            for header, rows in section.get("tables", []):
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
                out.append("")
            for caption, png in section.get("figures", []):
                out += [f"![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})", ""]
        return "\n".join(out)

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> Path:
        """Write ``.html``/``.htm`` or ``.md`` (by suffix) atomically; never over a file unless
        ``overwrite``."""
        path = Path(path)
        check_report_path(path, overwrite=overwrite)
        text = self.markdown() if path.suffix.lower() == ".md" else self.html()
        return atomic_write(path, lambda handle: handle.write(text), overwrite=overwrite, mode="w")


def check_report_path(path: Union[str, Path], *, overwrite: bool = False) -> None:
    """``ValueError`` when ``path`` has no report suffix or exists (without ``overwrite``)."""
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise ValueError(f"{path}: a report must end in {', '.join(REPORT_SUFFIXES)}")
    if path.exists() and not overwrite:
        raise ValueError(f"{path}: already exists (pass --overwrite to replace it)")


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def make_report(pool: Pool, results: Union[Sequence[Result], Mapping[str, Result]], *,
                baseline: Optional[str] = None, min_confidence: Optional[float] = None,
                n_bins: int = 15, top: int = 5, title: Optional[str] = None) -> Report:
    """Build the report of ``results`` (one per method) on ``pool``.

    Parameters
    ----------
    pool : Pool
        Its ``labels`` (optional) give accuracy, per-class changes and calibration; its
        ``classnames`` name the classes.
    results : sequence (or dict) of Result, all on ``pool``
    baseline : str, optional
        Method the others are compared with; default ``zeroshot`` when present, else the first.
    min_confidence : float, optional
        Threshold for the coverage / selective-accuracy columns (auto-labelling).
    n_bins : int
        Reliability-diagram bins.
    top : int
        Classes listed as gaining / losing most.

    Returns
    -------
    Report
        Needs matplotlib for the figures (``MissingExtra`` otherwise).
    """
    plt = matplotlib_pyplot()
    results = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not results:
        raise ValueError("make_report: no results given")
    for result in results:
        if tuple(result.probs.shape) != (pool.n_images, pool.n_classes):
            raise ValueError(f"make_report: {result.method} has probs {tuple(result.probs.shape)}, "
                             f"the pool is ({pool.n_images}, {pool.n_classes})")
    labels = pool.labels
    base = _pick_baseline(results, baseline)
    names = pool.classnames or [f"class {c}" for c in range(pool.n_classes)]
    rows = method_rows(results, labels, baseline=base.method, min_confidence=min_confidence, n_bins=n_bins)
    facts = [f"pool: {pool.source}", f"{pool.n_images} images, {pool.n_classes} classes",
             "ground-truth labels: " + ("yes" if labels is not None else "no (accuracy and calibration "
                                        "need labels; shown: confidence and agreement)"),
             f"baseline: {base.method}", f"zsadapt {__version__}"]
    report = Report(title or f"zsadapt report: {', '.join(r.method for r in results)}", facts, rows)
    report.sections.append(_methods_section(rows, min_confidence, base.method))
    others = [r for r in results if r is not base]
    if labels is not None and others:
        report.sections.append(_class_section(plt, base, others, labels, names, top))
    elif others:
        report.sections.append(_prediction_count_section(base, others, names, top))
    report.sections.append(_confidence_section(plt, results, labels))
    if labels is not None:
        report.sections.append(_reliability_section(plt, results, labels, n_bins))
    report.sections.append(_diagnostics_section(results))
    return report


def _methods_section(rows: list, min_confidence: Optional[float], baseline: str) -> dict:
    header = ["method", "accuracy %", f"Δ vs {baseline}", "ECE %", "mean confidence %",
              f"changed vs {baseline} %"]
    if min_confidence is not None:
        header += [f"coverage @ {min_confidence:g} %", "accuracy on covered %"]
    header += ["iterations", "converged", "seconds"]
    table = []
    for row in rows:
        cells = [row["method"], _fmt(row["accuracy"]), _fmt(row["delta"], "+.2f"), _fmt(row["ece"]),
                 _fmt(row["mean_confidence"]), _fmt(row["changed"])]
        if min_confidence is not None:
            cells += [_fmt(row["coverage"]), _fmt(row["selective_accuracy"])]
        cells += [_fmt(row["iterations"], "d"), _fmt(row["converged"]), _fmt(row["seconds"], ".3f")]
        table.append(cells)
    return {"title": "Methods", "tables": [(header, table)],
            "text": "ECE: expected calibration error of the top-1 confidence (lower is better calibrated)."}


def _figure_png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _grid(plt, n: int, width: float = 3.4, height: float = 2.8):
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _class_section(plt, base: Result, others: list, labels, names, top: int) -> dict:
    section = {"title": f"Per-class accuracy change vs {base.method}", "tables": [], "figures": [],
               "text": "Classes absent from the pool are left out."}
    fig, axes = _grid(plt, len(others), width=4.5)
    header = ["class", "images", f"{base.method} %", "method %", "change"]
    for ax, result in zip(axes, others):
        changes = class_changes(base, result, labels, names, top)
        for kind in ("gained", "lost"):
            rows = [[r["class"], r["images"], _fmt(r["baseline"]), _fmt(r["method"]), _fmt(r["change"], "+.2f")]
                    for r in changes[kind]]
            if rows:
                section["tables"].append(([f"{result.method}: {kind} most"] + header[1:], rows))
        plot_class_changes(ax, changes["delta"], f"{result.method}: per-class change")
    section["figures"].append(("Per-class accuracy change, classes sorted by change", _figure_png(plt, fig)))
    return section


def _prediction_count_section(base: Result, others: list, names, top: int) -> dict:
    """Without labels: how many images each class gains or loses (predicted counts)."""
    header = ["class", f"{base.method} count", "method count", "change"]
    base_counts = np.bincount(_numpy(base.labels), minlength=len(names))
    tables = []
    for result in others:
        counts = np.bincount(_numpy(result.labels), minlength=len(names))
        change = counts - base_counts
        order = np.argsort(-np.abs(change), kind="stable")[:top]
        rows = [[str(names[c]), int(base_counts[c]), int(counts[c]), f"{int(change[c]):+d}"]
                for c in order if change[c] != 0]
        if rows:
            tables.append(([f"{result.method}: class"] + header[1:], rows))
    return {"title": f"Predicted class sizes vs {base.method}", "tables": tables,
            "text": "No labels: the classes whose predicted size changed most."}


def _confidence_section(plt, results: list, labels) -> dict:
    fig, axes = _grid(plt, len(results))
    for ax, result in zip(axes, results):
        plot_confidence(ax, result.probs, labels, result.method)
    return {"title": "Confidence", "figures": [("Histogram of each image's top-1 probability",
                                                 _figure_png(plt, fig))]}


def _reliability_section(plt, results: list, labels, n_bins: int) -> dict:
    fig, axes = _grid(plt, len(results), height=3.2)
    for ax, result in zip(axes, results):
        plot_reliability(ax, result.probs, labels, result.method, n_bins)
    return {"title": "Calibration (reliability diagrams)",
            "text": "Bars: accuracy of the images in each confidence bin; dots: their mean confidence; "
                    "dashed: perfect calibration. Bars below the diagonal mean over-confident, above "
                    "under-confident.",
            "figures": [(f"Reliability diagrams ({n_bins} bins)", _figure_png(plt, fig))]}


def _diagnostics_section(results: list) -> dict:
    header = ["method", "parameters", "diagnostics"]
    rows = [[r.method, json.dumps(r.params, sort_keys=True, default=str),
             json.dumps(_rounded(r.info), sort_keys=True, default=str)] for r in results]
    return {"title": "Solver diagnostics", "tables": [(header, rows)],
            "text": "Every parameter each method ran with, and what its solver reported "
                    "(iterations, convergence, seconds per stage, ...)."}


def _rounded(value: Any) -> Any:
    """``value`` with floats at 4 significant digits (nested dicts and lists too)."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value
