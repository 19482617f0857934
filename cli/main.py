"""The ``zsadapt`` command: parse, call the API, print. Results go to stdout, notes to stderr."""

from __future__ import annotations

import json
import platform

import click
import numpy as np

from .. import __version__
from ..api import describe_methods, refine
from ..evaluate import compare, format_table, parse_methods
from ..graphs import keops_available
from ..io import read_pool, write_npz
from ..messages import note
from ..metrics import accuracy
from ..synthetic import make_pool
from .options import (
    apply_quiet,
    collect_params,
    common_options,
    initial_options,
    pool_options,
    solver_parameter_options,
    user_errors,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zsadapt")
def main() -> None:
    """Refine zero-shot CLIP predictions on an unlabeled pool of image features.

    \b
    Examples:
      zsadapt demo
      zsadapt refine pool.npz --method zlap --k 5 --out preds.npz
      zsadapt compare pool.npz --methods zeroshot,zlap
      zsadapt info
    """


def _load(pool, image_path, text_path, labels_path):
    return read_pool(pool, image_features=image_path, text_features=text_path, labels=labels_path)


@main.command("refine")
@pool_options
@click.option("--method", "-m", default="zlap", show_default=True, help="Method name (see `zsadapt info`).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write labels and probabilities to this .npz.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@initial_options
@solver_parameter_options
@common_options
@user_errors
def refine_command(pool, image_path, text_path, labels_path, method, out, overwrite, weighting, init,
                   params_file, device, seed, quiet, **solver_options):
    """Refine the predictions for one pool and write them to --out.

    POOL is an .npz/.pt/.safetensors file with image_features (N, d) and text_features (C, d)
    or (C, P, d) per prompt template (optionally labels, classnames); or give --image-features
    and --text-features.

    \b
    Example:
      zsadapt refine pool.npz --method zlap --k 10 --out preds.npz
    The output .npz holds labels (N,), probs (N, C), method and params (JSON).
    """
    apply_quiet(quiet)
    params = collect_params(params_file, method, solver_options)
    data = _load(pool, image_path, text_path, labels_path)
    if out is not None and not overwrite:
        from pathlib import Path

        if Path(out).exists():
            raise ValueError(f"{out}: already exists (pass --overwrite to replace it)")
    text = data.text_templates if data.text_templates is not None else data.text_features
    result = refine(data.image_features, text, method, device=device, seed=seed,
                    progress=not quiet, weighting=weighting, init=init, **params)
    summary = f"{method}: {data.n_images} images, {data.n_classes} classes"
    if data.labels is not None:
        baseline = refine(data.image_features, data.text_features, "zeroshot", device=device)
        summary += (f", accuracy {accuracy(result.labels, data.labels):.2f}%"
                    f" (zero-shot {accuracy(baseline.labels, data.labels):.2f}%)")
    summary += f", {result.info['seconds']['total']:.2f} s"
    if out is not None:
        arrays = {
            "labels": np.asarray(result.labels, dtype=np.int64),
            "probs": np.asarray(result.probs, dtype=np.float32),
            "method": np.asarray(method),
            "params": np.asarray(json.dumps(result.params)),
            "info": np.asarray(json.dumps(result.info, default=str)),
        }
        if data.classnames is not None:
            arrays["classnames"] = np.asarray(data.classnames)
        write_npz(out, arrays, overwrite=overwrite)
        summary += f"; wrote {out}"
    click.echo(summary)


@main.command("compare")
@pool_options
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="Comma-separated method names, or 'all'.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@initial_options
@common_options
@user_errors
def compare_command(pool, image_path, text_path, labels_path, methods_spec, as_json, weighting, init,
                    device, seed, quiet):
    """Run several methods on one pool: accuracy (when labels exist), calibration and time.

    \b
    Example:
      zsadapt compare pool.npz --methods zeroshot,zlap --json
    """
    apply_quiet(quiet)
    names = parse_methods(methods_spec)
    data = _load(pool, image_path, text_path, labels_path)
    rows = compare(data, names, device=device, seed=seed, progress=not quiet, weighting=weighting, init=init)
    _print_rows(rows, as_json, data.source)


def _print_rows(rows, as_json, source):
    if as_json:
        click.echo(json.dumps({"pool": source, "rows": rows}, indent=2, default=str))
    else:
        click.echo(format_table(rows))


@main.command("demo")
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="Comma-separated method names, or 'all'.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@common_options
@user_errors
def demo_command(methods_spec, as_json, device, seed, quiet):
    """Compare the methods on the built-in synthetic pool (no files needed).

    The pool has CLIP-like geometry: classes on the sphere, a modality gap between image and text
    embeddings, and Zipf-imbalanced classes, so zero-shot is clearly imperfect.

    \b
    Example:
      zsadapt demo --methods zeroshot,zlap
    """
    apply_quiet(quiet)
    pool = make_pool(seed=seed)
    note(f"demo pool: {pool.source}")
    rows = compare(pool, parse_methods(methods_spec), device=device, seed=seed, progress=not quiet)
    _print_rows(rows, as_json, pool.source)


@main.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(as_json):
    """Versions, devices, kNN backends and the registered methods."""
    import scipy
    import sklearn
    import torch

    facts = {
        "zsadapt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "click": click.__version__ if hasattr(click, "__version__") else "?",
        "cuda": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "knn_backends": ["torch"] + (["keops"] if keops_available() else []),
        "methods": {m["name"]: m["summary"] for m in describe_methods()},
    }
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "methods":
            click.echo("methods:")
            for name, summary in value.items():
                click.echo(f"  {name:<14} {summary}")
        else:
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


if __name__ == "__main__":  # pragma: no cover
    main()
