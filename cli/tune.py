"""``zsadapt tune``: learn a method's parameters on labelled pools and write them as JSON."""

from __future__ import annotations

import json

import click

from .options import common_options, user_errors

#: Methods with learnable parameters.
TUNABLE = ("unem",)


@click.command("tune")
@click.argument("pools", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--method", "-m", default="unem", show_default=True, type=click.Choice(TUNABLE),
              help="Method whose parameters to learn.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="JSON file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--layers", type=click.IntRange(min=1), default=10, show_default=True, help="Unrolled layers L.")
@click.option("--steps", type=click.IntRange(min=0), default=100, show_default=True, help="Adam steps.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="Adam learning rate (relative to each parameter's size).")
@click.option("--likelihood", type=click.Choice(["gaussian", "dirichlet"]), default="gaussian", show_default=True)
@click.option("--subsets/--no-subsets", default=True, show_default=True,
              help="Also learn on subset pools holding 2, 5, 10 and C/4 of each pool's classes.")
@common_options
@user_errors
def tune_command(pools, method, out, overwrite, layers, steps, lr, likelihood, subsets, device, seed, quiet):
    """Learn METHOD's parameters on labelled POOLS (files with image_features, text_features and
    labels) by backpropagation, and write them to --out for `zsadapt refine --params`.

    \b
    Example:
      zsadapt tune --method unem val1.npz val2.npz --out params.json
      zsadapt refine test.npz --method unem --params params.json
    """
    from ..io import atomic_write, check_output, read_pool
    from ..messages import note
    from ..tuning import tune_unem

    check_output(out, overwrite=overwrite, inputs=pools)
    loaded = [read_pool(path) for path in pools]
    for path, pool in zip(pools, loaded):
        if pool.labels is None:
            raise ValueError(f"{path}: has no labels; tune needs labelled pools")
    note(f"tune: learning {method} ({layers} layers) on {len(loaded)} pool(s)")
    result = tune_unem(loaded, layers=layers, steps=steps, lr=lr, likelihood=likelihood, subsets=subsets,
                       seed=seed, device=device, progress=not quiet)
    # Only {"unem": {...}}: `refine --params` reads a file keyed by method names alone.
    text = json.dumps({method: result[method]}, indent=2) + "\n"
    atomic_write(out, lambda handle: handle.write(text), overwrite=overwrite, mode="w")
    click.echo(f"{method}: cross-entropy {result['loss'][0]:.4f} -> {result['loss'][1]:.4f} "
               f"over {steps} steps; wrote {out}")
