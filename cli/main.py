"""The ``zsadapt`` command: parse, call the API, print. Results go to stdout, notes to stderr.

Start-up is fast: this module imports only click and light helpers, every command is loaded on
first use from :data:`COMMANDS`, and a command imports torch, scikit-learn and the solvers inside
its function (``zsadapt --help`` and every ``zsadapt COMMAND --help`` must not import torch:
tests/test_startup.py checks it). Adding a command is one line in :data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import json

import click

from .. import __version__
from .options import (
    SolverOptionsCommand,
    collect_params,
    common_options,
    initial_options,
    params_file_option,
    pool_options,
    read_json_object,
    results_only_on_stdout,
    user_errors,
)

#: Command name -> ``"module:attribute"`` of its click command, in the order ``--help`` lists them.
COMMANDS = {
    "refine": "zsadapt.cli.main:refine_command",
    "compare": "zsadapt.cli.main:compare_command",
    "demo": "zsadapt.cli.main:demo_command",
    "info": "zsadapt.cli.main:info_command",
    "tune": "zsadapt.cli.tune:tune_command",
    "encode": "zsadapt.cli.encode:encode_group",
    "stream": "zsadapt.cli.stream:stream_command",
    "label": "zsadapt.cli.label:label_command",
}


class LazyGroup(click.Group):
    """A click group whose commands are imported when they are used (or listed by ``--help``)."""

    def list_commands(self, ctx: click.Context) -> list:
        return list(COMMANDS) + sorted(set(self.commands) - set(COMMANDS))

    def get_command(self, ctx: click.Context, name: str):
        if name not in COMMANDS:
            return self.commands.get(name)
        module, _, attribute = COMMANDS[name].partition(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zsadapt")
def main() -> None:
    """Refine zero-shot CLIP predictions on an unlabeled pool of image features.

    \b
    Examples:
      zsadapt demo
      zsadapt refine pool.npz --method zlap --k 5 --out preds.npz
      zsadapt compare pool.npz --methods zeroshot,zlap
      zsadapt tune --method unem val.npz --out params.json
      zsadapt info
      zsadapt encode images photos/ --classnames names.txt --out pool.npz
      zsadapt refine sample.npz --save-model model.safetensors
      zsadapt label model.safetensors embeddings/ --out labels/
    """


def _load(pool, image_path, text_path, labels_path):
    from ..io import read_pool

    return read_pool(pool, image_features=image_path, text_features=text_path, labels=labels_path)


@click.command("refine", cls=SolverOptionsCommand)
@pool_options
@click.option("--method", "-m", default=None,
              help="Method name (see `zsadapt info`); default: auto (gmm where the pool holds two or more "
                   "images per class, else stata; zsadapt.solvers.DEFAULT_METHOD).")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write labels and probabilities to this .npz.")
@click.option("--overwrite", is_flag=True, help="Replace --out, --report and --save-model if they exist.")
@click.option("--save-model", "model_path", type=click.Path(dir_okay=False),
              help="Save the fitted model to this .safetensors file, for `zsadapt label` and "
                   "zsadapt.load_model (needs a method with an inductive predict).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a line.")
@click.option("--min-confidence", type=click.FloatRange(0.0, 1.0), default=None,
              help="Label -1 (unlabelled) in --out every image whose top probability is below this.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Calibrate the method's probabilities without labels, from the zero-shot classifier "
                   "and the method together (labels unchanged), so that --min-confidence keeps images "
                   "about as often right as it says; --no-calibrate: the method's own probabilities.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write an HTML (.html) or Markdown (.md) report: accuracy, per-class changes, "
                   "confidence, calibration, diagnostics (needs zsadapt[report]).")
@initial_options
@params_file_option
@common_options
@user_errors
def refine_command(pool, image_path, text_path, labels_path, method, out, overwrite, model_path, as_json,
                   min_confidence, report_path, weighting, initial, params_file, device, seed, quiet, calibrate,
                   **solver_options):
    """Refine the predictions for one pool and write them to --out.

    POOL is an .npz/.pt/.safetensors file with image_features (N, d) and text_features (C, d)
    or (C, P, d) per prompt template (optionally labels, classnames); or give --image-features
    and --text-features.

    \b
    Examples:
      zsadapt refine pool.npz --method zlap --k 10 --out preds.npz
      zsadapt refine pool.npz --out preds.npz --min-confidence 0.5 --report report.html
      zsadapt refine pool.npz --save-model model.safetensors
    The output .npz holds labels (N,), probs (N, C), method and params (JSON); with
    --min-confidence, labels is -1 where the top probability is below the threshold.
    """
    import numpy as np

    from .. import solvers
    from ..api import make_solver, refine
    from ..arrays import resolve_device
    from ..initial import read_init_alias
    from ..io import write_npz
    from ..messages import note
    from ..report import make_report

    method = method or solvers.DEFAULT_METHOD
    params = collect_params(params_file, method, solver_options)
    initial, params = read_init_alias(initial, params)
    # Everything the user got wrong is reported before any file is read or any work is done.
    make_solver(method, **params)
    _check_refine_outputs(out, report_path, model_path, overwrite=overwrite,
                          inputs=(pool, image_path, text_path, labels_path, params_file))
    resolve_device(device, None)
    with results_only_on_stdout():
        data = _load(pool, image_path, text_path, labels_path)
        if model_path is not None and data.n_images == 1:
            raise ValueError(f"{pool or image_path}: one image fits no model to save (--save-model); "
                             "refine without it gives the initial classifier's label")
        text = data.text_templates if data.text_templates is not None else data.text_features
        result = refine(data.image_features, text, method, device=device, seed=seed,
                        progress=not quiet, weighting=weighting, initial=initial, calibrate=calibrate,
                        **params)
        baseline, zeroshot_labels = None, None
        if data.labels is not None or (report_path is not None and method != "zeroshot"):
            baseline = refine(data.image_features, data.text_features, "zeroshot", device=device)
            zeroshot_labels = baseline.labels
            if report_path is None:
                baseline = None  # its labels are all the summary needs: free its (N, C) arrays
    labels = result.labels
    if min_confidence is not None:
        labels = np.asarray(result.confident_labels(min_confidence))
    summary = _refine_summary(method, data, result, zeroshot_labels, labels, min_confidence, out=out,
                              report_path=report_path, model_path=model_path)
    if report_path is not None:
        shown = [baseline, result] if method != "zeroshot" else [result]
        make_report(data, shown, min_confidence=min_confidence).save(report_path, overwrite=overwrite)
    if out is not None:
        write_npz(out, _predictions_npz(method, data, result, labels, min_confidence), overwrite=overwrite)
    elif model_path is None:
        note("no --out given: the predictions were not saved")
    if model_path is not None:
        with results_only_on_stdout():  # a method whose predict is weak warns on one line
            result.save(model_path, classnames=data.classnames, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2) if as_json else _summary_line(summary))


def _check_refine_outputs(out, report_path, model_path, *, overwrite: bool, inputs: tuple) -> None:
    """Refuse, before any work, an output of ``refine`` that exists (without ``overwrite``), names
    one of the ``inputs``, or has the wrong suffix; and a report without the report extra."""
    from ..io import check_output
    from ..report import check_report_path, matplotlib_pyplot

    if out is not None:
        check_output(out, overwrite=overwrite, suffix=".npz", inputs=inputs)
    if report_path is not None:
        check_report_path(report_path, overwrite=overwrite)
        check_output(report_path, overwrite=overwrite, inputs=inputs)
        matplotlib_pyplot()  # fail before the solver runs when the report extra is missing
    if model_path is not None:
        check_output(model_path, overwrite=overwrite, suffix=".safetensors", inputs=inputs)


def _refine_summary(method: str, data, result, zeroshot_labels, labels, min_confidence, *, out, report_path,
                    model_path) -> dict:
    """What ``refine`` prints (``--json``): sizes, accuracies when the pool has labels (the
    zero-shot one from ``zeroshot_labels``), seconds, the files written, and with
    ``--min-confidence`` how many images kept a label."""
    from ..metrics import accuracy

    summary = {
        "method": method,
        "n_images": data.n_images,
        "n_classes": data.n_classes,
        "accuracy": None if data.labels is None else accuracy(result.labels, data.labels),
        "zeroshot_accuracy": None if data.labels is None else accuracy(zeroshot_labels, data.labels),
        "seconds": result.info["seconds"]["total"],
        "out": out,
        "report": report_path,
        "params": result.params,
    }
    if min_confidence is not None:
        kept = labels >= 0
        summary["min_confidence"] = min_confidence
        summary["labelled"] = int(kept.sum())
        if data.labels is not None and kept.any():
            summary["accuracy_labelled"] = accuracy(labels[kept], data.labels[kept])
    summary["model"] = model_path
    return summary


def _predictions_npz(method: str, data, result, labels, min_confidence) -> dict:
    """The arrays of ``refine --out`` (docs/formats.md)."""
    import numpy as np

    arrays = {
        "labels": np.asarray(labels, dtype=np.int64),
        "probs": np.asarray(result.probs, dtype=np.float32),
        "method": np.asarray(method),
        "params": np.asarray(json.dumps(result.params)),
        "info": np.asarray(json.dumps(result.info, default=str)),
    }
    if data.classnames is not None:
        arrays["classnames"] = np.asarray(data.classnames)
    if min_confidence is not None:
        arrays["min_confidence"] = np.asarray(min_confidence)
    return arrays


def _summary_line(summary: dict) -> str:
    """``refine``'s one-line summary on stdout, from :func:`_refine_summary`'s dict."""
    n_images = summary["n_images"]
    line = f"{summary['method']}: {n_images} image{'' if n_images == 1 else 's'}, {summary['n_classes']} classes"
    if summary["accuracy"] is not None:
        line += f", accuracy {summary['accuracy']:.2f}% (zero-shot {summary['zeroshot_accuracy']:.2f}%)"
    line += f", {summary['seconds']:.2f} s"
    if "labelled" in summary:
        line += f", {summary['labelled']}/{n_images} labelled at confidence >= {summary['min_confidence']:g}"
        if "accuracy_labelled" in summary:
            line += f" (accuracy on those {summary['accuracy_labelled']:.2f}%)"
    if summary["out"] is not None:
        line += f"; wrote {summary['out']}"
    if summary["report"] is not None:
        line += f"; report {summary['report']}"
    if summary["model"] is not None:
        line += f"; saved the model to {summary['model']}"
    return line


@click.command("compare")
@pool_options
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="Comma-separated method names, or 'all'.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Also write an HTML (.html) or Markdown (.md) report of every method (needs zsadapt[report]).")
@click.option("--overwrite", is_flag=True, help="Replace --report if it exists.")
@click.option("--subset-classes", "subset", default=None,
              help="Keep only the images of m classes drawn with --seed (an int, or a percentage "
                   "of C such as 25%); the classifier keeps all C classes.")
@click.option("--params", "params_file", type=click.Path(dir_okay=False),
              help="JSON file {method: {parameter: value}} of hyper-parameters.")
@click.option("--logit-scale", "logit_scale", type=float, default=None,
              help="Zero-shot softmax(logit_scale x cosine) for every method, for an encoder whose "
                   "similarities are not CLIP's (default: each method's, 100); --params values win.")
@click.option("--prior-images", "prior_images", type=click.FloatRange(min=0.0), default=None,
              help="For prototype classifiers (class vectors that are means of k labelled images): k, "
                   "for the methods that take it (gmm, auto); --params values win.")
@initial_options
@common_options
@user_errors
def compare_command(pool, image_path, text_path, labels_path, methods_spec, as_json, report_path, overwrite,
                    subset, params_file, logit_scale, prior_images, weighting, initial, device, seed, quiet):
    """Run several methods on one pool: accuracy (when labels exist), calibration and time.

    Methods run in the order given; the delta column is each one's accuracy over the first.

    \b
    Examples:
      zsadapt compare pool.npz --methods zeroshot,zlap --json
      zsadapt compare pool.npz --methods all --report report.html
      zsadapt compare pool.npz --methods zeroshot,transclip --subset-classes 5 --seed 1
    """
    from ..api import make_solver, refine
    from ..arrays import resolve_device
    from ..evaluate import compare, parse_methods, parse_subset, rows_from_results, subset_pool
    from ..io import check_output
    from ..messages import note
    from ..report import check_report_path, make_report, matplotlib_pyplot

    names = parse_methods(methods_spec)
    if report_path is not None:
        check_report_path(report_path, overwrite=overwrite)
        check_output(report_path, overwrite=overwrite,
                     inputs=(pool, image_path, text_path, labels_path, params_file))
        matplotlib_pyplot()
    resolve_device(device, None)
    params = _method_params(params_file, names, logit_scale, prior_images)
    for name in names:  # a bad value fails now, not after the methods before it have run
        make_solver(name, **(params or {}).get(name, {}))
    with results_only_on_stdout():
        data = _load(pool, image_path, text_path, labels_path)
        if subset is not None:
            data = subset_pool(data, parse_subset(subset), seed)
            note(f"class-subset pool: {data.n_images} images of {len(data.extras['classes'])} classes")
        if report_path is None:
            rows = compare(data, names, device=device, seed=seed, params=params, progress=not quiet,
                           weighting=weighting, initial=initial)
        else:
            text = data.text_templates if data.text_templates is not None else data.text_features
            results = [refine(data.image_features, text, m, device=device, seed=seed, progress=not quiet,
                              weighting=weighting, initial=initial, **(params or {}).get(m, {})) for m in names]
            rows = rows_from_results(results, data)
            make_report(data, results, baseline=names[0]).save(report_path, overwrite=overwrite)
            note(f"wrote {report_path}")
    _print_rows(rows, as_json, data.source)


def _method_params(params_file, names, logit_scale=None, prior_images=None):
    """``{method: {parameter: value}}`` from a JSON file (methods it does not name get defaults),
    with ``logit_scale`` for every method and ``prior_images`` for the methods that have it, where
    the method's entry does not set its own."""
    from ..solvers import get_solver

    given = {"logit_scale": logit_scale, "prior_images": prior_images}
    shared = {m: {k: v for k, v in given.items() if v is not None and k in get_solver(m).params} for m in names}
    if params_file is None:
        return shared if any(shared.values()) else None
    loaded = read_json_object(params_file)
    if not all(isinstance(v, dict) for v in loaded.values()):
        raise ValueError(f"{params_file}: expected a JSON object {{method: {{parameter: value}}}}")
    from ..api import methods

    unknown = sorted(set(loaded) - set(methods()))
    if unknown:  # a misspelt method would otherwise run at its defaults, silently
        raise ValueError(f"{params_file}: unknown method(s) {', '.join(unknown)}; methods: {', '.join(methods())}")
    return {m: {**shared[m], **loaded.get(m, {})} for m in names}


def _print_rows(rows, as_json, source):
    from ..evaluate import format_table

    if as_json:
        click.echo(json.dumps({"pool": source, "rows": rows}, indent=2, default=str))
    else:
        click.echo(format_table(rows))


@click.command("demo")
@click.option("--methods", "methods_spec", default="all", show_default=True,
              help="Comma-separated method names, or 'all'.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@common_options
@user_errors
def demo_command(methods_spec, as_json, device, seed, quiet):
    """Compare the methods on the built-in synthetic pool (no files needed).

    The pool behaves like real CLIP pools: 2000 images of 100 imbalanced classes, a modality gap
    between image and text embeddings, hub classes, zero-shot errors mostly from the text side;
    zero-shot is right 58% of the time and the methods gain (or lose) points as on the shared
    real pools. Zero-shot comes first (the baseline of the delta column), then the default method.

    \b
    Example:
      zsadapt demo --methods zeroshot,zlap
    """
    from ..arrays import resolve_device
    from ..evaluate import compare, parse_methods
    from ..messages import note
    from ..solvers import DEFAULT_METHOD
    from ..synthetic import make_demo_pool

    names = _default_first(parse_methods(methods_spec), DEFAULT_METHOD)
    resolve_device(device, None)
    with results_only_on_stdout():
        pool = make_demo_pool(seed=seed)
        note(f"{pool.source}")
        rows = compare(pool, names, device=device, seed=seed, progress=not quiet)
    _print_rows(rows, as_json, pool.source)
    if not as_json:
        note(f"that was each method's accuracy on a synthetic pool with labels, and its change over the "
             f"first row (zero-shot where shown); the default is {DEFAULT_METHOD}. Next: `zsadapt refine "
             f"your_pool.npz --out preds.npz --report report.html` (README, Workflows)")


def _default_first(names: list, default: str) -> list:
    """``names`` with zero-shot first (the baseline row deltas are measured against) and the
    default method next, each where shown."""
    rest = [n for n in names if n not in ("zeroshot", default)]
    return [n for n in ("zeroshot", default) if n in names] + rest


@click.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(as_json):
    """Versions, devices, kNN backends and the registered methods.

    \b
    Example:
      zsadapt info --json
    """
    import importlib.metadata
    import platform

    import numpy as np
    import scipy
    import sklearn
    import torch

    from ..api import describe_methods
    from ..graphs import keops_available

    with results_only_on_stdout():  # importing pykeops prints its CUDA warning on stdout
        keops = keops_available()
    facts = {
        "zsadapt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "click": importlib.metadata.version("click"),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())],
        "knn_backends": ["torch"] + (["keops"] if keops else []),
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
