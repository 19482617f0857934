"""``zsadapt label MODEL_OR_TEXT SOURCE --out DIR [--adapt]``: label a collection of embedding shards
with a saved model, or with a stream that adapts as it goes."""

from __future__ import annotations

import json

import click

from .options import quiet_option, results_only_on_stdout, threads_option, user_errors


@click.command("label")
@click.argument("model", metavar="MODEL_OR_TEXT", type=click.Path(dir_okay=False))
@click.argument("source", type=click.Path())
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for the outputs: one <shard stem>.parquet per input shard (created if missing).")
@click.option("--column", default="embedding", show_default=True,
              help="The embedding column of parquet shards (a list of floats per row).")
@click.option("--top-k", "top_k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also write the K most probable labels and their probabilities per row.")
@click.option("--batch-size", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Rows per batch: memory is bounded by it whatever the shard size; also the "
                   "outputs' row-group size.")
@click.option("--engine", type=click.Choice(["local", "ray", "spark"]), default="local", show_default=True,
              help="local: a streaming reader on this machine; ray: Ray Data (zsadapt[ray]); "
                   "spark: Spark mapInPandas (zsadapt[spark]).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray labelling actors (default: one per CPU of the cluster, or per GPU with "
                   "--device cuda) / Spark local threads (default: local[*]).")
@click.option("--num-gpus", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GPUs per Ray actor (with --engine ray --device cuda).")
@click.option("--address", default=None,
              help="Ray cluster address (e.g. auto, or ray://head:10001); default: a local Ray.")
@click.option("--adapt", is_flag=True,
              help="Adapt as you label: one zsadapt.Stream refines the rows shard after shard in collection "
                   "order, in batches of --adapt-batch, each with what the earlier batches taught it. Costs "
                   "one small transductive solve per batch (far slower than a saved model's predict), runs "
                   "on --engine local only, and a rerun goes on from the state saved after each shard.")
@click.option("--adapt-batch", type=click.IntRange(min=1), default=128, show_default=True,
              help="Rows per stream batch with --adapt (a batch never spans two shards).")
@click.option("--save-stream", "save_stream", type=click.Path(dir_okay=False), default=None,
              help="With --adapt: save the final stream to this .safetensors (refused if it exists, "
                   "unless --overwrite).")
@click.option("--overwrite", is_flag=True,
              help="Redo every shard, replacing existing outputs (with --adapt: from the initial stream).")
@click.option("--skip-bad", is_flag=True,
              help="List bad shards (wrong dimension, corrupt, NaN rows) on stderr and go on.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a line.")
@click.option("--device", default=None,
              help="Torch device to label on (cpu, cuda, cuda:1); float16 shards are upcast per batch "
                   "there. Default: cpu.")
@threads_option
@quiet_option
@user_errors
def label_command(model, source, out, column, top_k, batch_size, engine, workers, num_gpus, address,
                  adapt, adapt_batch, save_stream, overwrite, skip_bad, as_json, device, quiet):
    """Label every row of SOURCE with a saved model (or, with --adapt, a stream that adapts as it
    goes); one parquet file per shard in --out.

    MODEL_OR_TEXT is a .safetensors file from `zsadapt refine --save-model`; with --adapt also
    a saved stream (`zsadapt stream --save-stream`: it goes on from its state) or a class text
    embeddings file (as `zsadapt refine --text-features` reads). SOURCE is one .npy (N, d),
    a folder of .npy shards (clip-retrieval's img_emb/ with metadata/ beside it: the metadata
    columns are carried into the outputs row for row), or parquet file(s) with an embedding
    --column. Each output holds the carried columns, label (int64), confidence (float32) and
    classname (when the model knows the names), in input row order. A rerun skips the outputs that
    are complete and redoes the rest.

    \b
    Examples:
      zsadapt refine sample.npz --save-model model.safetensors
      zsadapt label model.safetensors embeddings/ --out labels/
      zsadapt label model.safetensors data.parquet --column emb --top-k 5 --out labels/
      zsadapt label model.safetensors embeddings/ --out labels/ --engine ray --workers 8
      zsadapt label text.npy embeddings/ --out labels/ --adapt --save-stream stream.safetensors

    With --adapt, the state after each finished shard is kept in --out (.zsadapt-stream.*): a
    rerun skips the complete shards and goes on from it, giving the files of an uninterrupted run.
    """
    from ..labelling import EngineError, label

    with results_only_on_stdout():
        try:
            report = label(model, source, out, engine=engine, column=column, batch_size=batch_size,
                           top_k=top_k, device=device, overwrite=overwrite, skip_bad=skip_bad,
                           workers=workers, num_gpus=num_gpus, address=address, progress=not quiet,
                           adapt=adapt, adapt_batch=adapt_batch, save_stream=save_stream)
        except EngineError as err:
            raise click.ClickException(str(err)) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(report.summary())
