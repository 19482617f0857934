"""``zsadapt encode images|text``: parse, call :mod:`zsadapt.encode`, write the pool file."""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import numpy as np

from ..encode import TEMPLATE_SETS  # zsadapt.encode imports torch and open_clip where they are used
from .options import quiet_option, threads_option, user_errors


def model_options(command):
    """``--model``, ``--pretrained``, ``--model-config``, ``--device``, ``--batch-size``, ``--threads``,
    ``--quiet``."""
    command = quiet_option(command, "No notes or progress bar on stderr.")
    command = threads_option(command)
    command = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                           help="Images (or prompts) per forward pass.")(command)
    command = click.option("--device", default="cpu", show_default=True,
                           help="Torch device for the model (cuda uses float16 mixed precision).")(command)
    command = click.option("--model-config", type=click.Path(dir_okay=False),
                           help="An open_clip model config JSON to register (its file stem names the model).")(command)
    command = click.option("--pretrained", default="openai", show_default=True,
                           help="Pretrained tag (downloaded once), or a local checkpoint file (offline).")(command)
    command = click.option("--model", "model_name", default="ViT-B-32", show_default=True,
                           help="open_clip architecture (open_clip.list_models()).")(command)
    return command


def text_options(command):
    command = click.option(
        "--templates", default="openai-imagenet", show_default=True,
        help=f"Prompt templates: {' or '.join(TEMPLATE_SETS)} (open_clip's lists), or a file with one "
             "template per line, {} standing for the class name.")(command)
    return command


def _text_arrays(encoding) -> dict:
    return {
        "text_features": encoding.mean,
        "text_features_per_template": encoding.per_template,
        "classnames": np.asarray(encoding.classnames, dtype=str),
        "templates": np.asarray(encoding.templates, dtype=str),
    }


@click.group("encode")
def encode_group() -> None:
    """Encode images and class names with an open_clip model (needs zsadapt[clip]).

    \b
    Example:
      zsadapt encode images photos/ --classnames names.txt --out pool.npz
      zsadapt refine pool.npz --method zlap --out preds.npz --report report.html
    """


@encode_group.command("images")
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Pool file to write (.npz).")
@click.option("--classnames", type=click.Path(dir_okay=False),
              help="Also encode these class names (one per line) into the same file: a complete pool.")
@text_options
@click.option("--labels-from-folders", "folder_labels", is_flag=True,
              help="Ground truth from an ImageFolder layout: each image's folder name is its class name.")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True,
              help="Threads decoding images.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@model_options
@user_errors
def encode_images_command(source, out, classnames, templates, folder_labels, workers, overwrite,
                          model_name, pretrained, model_config, device, batch_size, quiet):
    """Encode the images of SOURCE (a folder, searched recursively, or a file listing paths).

    Unreadable or corrupt images are skipped, listed on stderr and counted. The run is resumable:
    finished batches are kept in OUT.partial/, and running the same command again after an
    interruption continues where it stopped. The pool file holds image_features (N, d) and paths
    (N,); with --classnames also text_features (C, d), text_features_per_template (C, P, d) and
    classnames, so `zsadapt refine` reads it directly.

    \b
    Examples:
      zsadapt encode images photos/ --classnames names.txt --out pool.npz
      zsadapt encode images list.txt --pretrained ~/weights/ViT-B-32.pt --device cuda --out img.npz
    """
    from ..encode import (image_features, labels_from_folders, list_images, load_model, load_templates, read_lines,
                          text_features)
    from ..io import check_output, write_npz
    from ..messages import note

    if folder_labels and classnames is None:
        raise ValueError("--labels-from-folders needs --classnames (folder names are matched to them)")
    paths = list_images(source)
    check_output(out, overwrite=overwrite, suffix=".npz",
                 inputs=[source, classnames, templates, model_config, pretrained, *paths])
    names = read_lines(classnames, "class names") if classnames is not None else None
    if names is not None:  # a bad template file is refused now, not after every image is encoded
        templates = load_templates(templates)
    model, preprocess, tokenizer = load_model(model_name, pretrained, device=device, model_config=model_config)
    note(f"encoding {len(paths)} images with {model_name} ({pretrained}) on {device}")
    partial = Path(f"{out}.partial")
    encoding = image_features(model, preprocess, paths, batch_size=batch_size, device=device,
                              num_workers=workers, resume_dir=partial, progress=not quiet)
    for path, reason in encoding.skipped:
        note(f"skipped {path}: {reason}")
    if not encoding.paths:
        raise ValueError(f"{source}: none of the {len(paths)} images could be read")
    arrays = {
        "image_features": encoding.features,
        "paths": np.asarray(encoding.paths, dtype=str),
        "skipped_paths": np.asarray([p for p, _ in encoding.skipped], dtype=str),
        "model": np.asarray(f"{model_name}/{pretrained}"),
    }
    if names is not None:
        arrays.update(_text_arrays(text_features(model, tokenizer, names, templates, device=device)))
        if folder_labels:
            arrays["labels"] = labels_from_folders(encoding.paths, names)
    write_npz(out, arrays, overwrite=overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    summary = f"encoded {len(encoding.paths)} images"
    if names is not None:
        summary += f" and {len(names)} classes"
    summary += f", skipped {len(encoding.skipped)}; wrote {out}"
    click.echo(summary)


@encode_group.command("text")
@click.option("--classnames", required=True, type=click.Path(dir_okay=False),
              help="File with one class name per line.")
@text_options
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="File to write (.npz).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@model_options
@user_errors
def encode_text_command(classnames, templates, out, overwrite, model_name, pretrained, model_config,
                        device, batch_size, quiet):
    """Encode class names with prompt templates: text_features (C, d), the mean over templates,
    and text_features_per_template (C, P, d).

    \b
    Example:
      zsadapt encode text --classnames names.txt --templates simple --out text.npz
      zsadapt refine --image-features img.npz --text-features text.npz --out preds.npz
    """
    from ..encode import load_model, load_templates, read_lines, text_features
    from ..io import check_output, write_npz

    check_output(out, overwrite=overwrite, suffix=".npz", inputs=[classnames, templates, model_config, pretrained])
    names = read_lines(classnames, "class names")
    templates = load_templates(templates)  # before the model: loading it takes a while
    model, _, tokenizer = load_model(model_name, pretrained, device=device, model_config=model_config)
    encoding = text_features(model, tokenizer, names, templates, device=device, batch_size=batch_size)
    arrays = _text_arrays(encoding)
    arrays["model"] = np.asarray(f"{model_name}/{pretrained}")
    write_npz(out, arrays, overwrite=overwrite)
    click.echo(f"encoded {len(names)} classes x {len(encoding.templates)} templates; wrote {out}")
