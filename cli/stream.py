"""``zsadapt stream POOL --batch-size 128``: refine a pool batch after batch in its row order,
carrying per-class statistics forward (:class:`zsadapt.Stream`). Thin: parse, call the API, print."""

from __future__ import annotations

import json
import math

import click

from .options import (
    collect_params,
    common_options,
    params_file_option,
    pool_options,
    results_only_on_stdout,
    solver_parameter_options,
    user_errors,
)


class StreamCommand(click.Command):
    """A command that also takes every solver parameter as an option (as ``refine`` does), less
    those whose name the command uses itself: ``--batch-size`` is the stream's batch here, not
    ``self_training``'s mini-batch (that method has no stream mode)."""

    def get_params(self, ctx: click.Context) -> list:
        if not getattr(self, "_solver_options_added", False):
            own = {param.name for param in self.params}
            self.params.extend(option for option in solver_parameter_options() if option.name not in own)
            self._solver_options_added = True
        return super().get_params(ctx)


@click.command("stream", cls=StreamCommand)
@pool_options
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per batch, taken in the pool's row order (the last batch may be smaller).")
@click.option("--method", "-m", default=None,
              help="A method with a stream mode; default: the library's default method if it has one, "
                   "else anchored (zsadapt.stream.stream_method).")
@click.option("--forgetting", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Forgetting factor gamma per batch (1: never forget); default: zsadapt.stream.FORGETTING.")
@click.option("--resume", "resume_path", type=click.Path(dir_okay=False),
              help="Start from a stream saved by --save-stream (its method, parameters and state).")
@click.option("--save-stream", "save_path", type=click.Path(dir_okay=False),
              help="Save the stream (state, method, parameters) to this .safetensors at the end.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write labels and probabilities to this .npz.")
@click.option("--overwrite", is_flag=True, help="Replace --out and --save-stream if they exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a line.")
@params_file_option
@common_options
@user_errors
def stream_command(pool, image_path, text_path, labels_path, batch_size, method, forgetting, resume_path, save_path,
                   out, overwrite, as_json, params_file, device, seed, quiet, **solver_options):
    """Refine the pool as a stream of batches, adapting as it goes.

    POOL is a pool file (as for `zsadapt refine`) whose rows arrive in file order; each batch is
    refined with what the earlier batches taught the stream, then added to its state.

    \b
    Examples:
      zsadapt stream pool.npz --batch-size 128 --out preds.npz --save-stream stream.safetensors
      zsadapt stream next.npz --resume stream.safetensors --save-stream stream2.safetensors
    The output .npz holds labels (N,), probs (N, C), batch (N,) (the batch of each row), method and
    params (JSON).
    """
    import numpy as np
    import torch

    from ..api import refine
    from ..io import check_output, read_pool, write_npz
    from ..memory import check_fits
    from ..messages import note
    from ..metrics import accuracy
    from ..stream import FORGETTING, Stream, stream_method

    if resume_path is not None and (method is not None or params_file is not None
                                    or any(v is not None for v in solver_options.values())):
        raise click.UsageError("--resume takes the method and parameters from the saved stream: "
                               "give no --method, --params or method options with it")
    inputs = [pool, image_path, text_path, labels_path, params_file, resume_path]  # never an output
    if out is not None:
        check_output(out, overwrite=overwrite, suffix=".npz", inputs=inputs)
    if save_path is not None:
        check_output(save_path, overwrite=overwrite, suffix=".safetensors", inputs=inputs)
    with results_only_on_stdout():
        if resume_path is not None:
            stream = Stream.load(resume_path, device=device)
            if forgetting is not None:
                stream.forgetting = forgetting
        else:
            name = stream_method(method)
            params = collect_params(params_file, name, solver_options)
            stream = None  # built once the pool's class embeddings are read
        data = read_pool(pool, image_features=image_path, text_features=text_path, labels=labels_path)
        if stream is None:
            stream = Stream(data.text_features, name, forgetting=FORGETTING if forgetting is None else forgetting,
                            device=device, seed=seed, classnames=data.classnames, **params)
        else:
            try:
                stream.check_classes(data.text_features)
            except ValueError as err:
                raise ValueError(f"{pool or text_path}: {err} ({resume_path})") from None
        if out is not None:  # refused now, not after the whole stream has run
            check_fits(4 * data.n_images * data.n_classes, torch.device("cpu"),
                       f"{data.n_images} images x {data.n_classes} classes: the (N, C) float32 probabilities "
                       "--out holds", "stream the pool in parts (--save-stream, then --resume) or drop --out")
        labels, probs, seconds = _refine_batches(stream, data.image_features, batch_size, keep_probs=out is not None,
                                                 quiet=quiet)
        zeroshot_labels = None
        if data.labels is not None:  # batch by batch: the (N, C) zero-shot scores need not fit at once
            zeroshot_labels = np.concatenate([refine(data.image_features[start:start + batch_size],
                                                     data.text_features, "zeroshot").labels
                                              for start in range(0, data.n_images, batch_size)])
    n_batches = math.ceil(data.n_images / batch_size)
    summary = {
        "method": stream.method, "n_images": data.n_images, "n_classes": data.n_classes,
        "batch_size": batch_size, "batches": n_batches, "forgetting": stream.forgetting,
        "accuracy": None if data.labels is None else accuracy(labels, data.labels),
        "zeroshot_accuracy": None if data.labels is None else accuracy(zeroshot_labels, data.labels),
        "seconds": seconds, "seconds_per_batch": seconds / n_batches,
        "out": out, "saved_stream": save_path, "params": stream.params,
    }
    if out is not None:
        arrays = {"labels": labels.astype(np.int64), "probs": probs,
                  "batch": np.repeat(np.arange(n_batches), batch_size)[:data.n_images],
                  "method": np.asarray(stream.method), "params": np.asarray(json.dumps(stream.params))}
        if data.classnames is not None:
            arrays["classnames"] = np.asarray(data.classnames)
        write_npz(out, arrays, overwrite=overwrite)
    else:
        note("no --out given: the predictions were not saved")
    if save_path is not None:
        stream.save(save_path, overwrite=overwrite)
    click.echo(json.dumps(summary, indent=2) if as_json else _summary_line(summary))


def _refine_batches(stream, X, batch_size: int, *, keep_probs: bool, quiet: bool) -> tuple:
    """Labels (N,), float32 probabilities (N, C) (None unless ``keep_probs``) and solver seconds
    of ``stream`` refining the rows of ``X`` (N, d) batch after batch, in order; a progress line
    with the time left on stderr unless ``quiet``."""
    import numpy as np

    from ..messages import progress

    labels, probs, seconds = [], [], 0.0
    starts = range(0, X.shape[0], batch_size)
    with progress(len(starts), "stream: batches", show=not quiet, eta=True) as bar:
        for number, start in enumerate(starts, 1):
            result = stream.refine(X[start:start + batch_size])
            labels.append(np.asarray(result.labels))
            if keep_probs:
                probs.append(np.asarray(result.probs, dtype=np.float32))
            seconds += result.info["seconds"]["total"]
            bar.update(number, f"({stream.n_images} images seen)")
    return np.concatenate(labels), np.concatenate(probs) if keep_probs else None, seconds


def _summary_line(summary: dict) -> str:
    """``stream``'s one-line summary on stdout, from its ``--json`` dict."""
    images, batches = summary["n_images"], summary["batches"]
    line = (f"{summary['method']} stream: {images} image{'s' * (images != 1)} in {batches} "
            f"batch{'es' * (batches != 1)} of {summary['batch_size']}, {summary['n_classes']} classes")
    if summary["accuracy"] is not None:
        line += f", accuracy {summary['accuracy']:.2f}% (zero-shot {summary['zeroshot_accuracy']:.2f}%)"
    line += f", {summary['seconds_per_batch'] * 1000:.1f} ms per batch"
    if summary["out"] is not None:
        line += f"; wrote {summary['out']}"
    if summary["saved_stream"] is not None:
        line += f"; saved the stream to {summary['saved_stream']}"
    return line
