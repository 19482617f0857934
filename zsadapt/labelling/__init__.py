"""``zsadapt label``: label every row of a collection of embedding shards with a saved model.

Where you are: the model comes from :mod:`zsadapt.models`; this package finds the shards, reads
them in bounded batches, runs one per-batch function on a local streaming reader, on Ray Data or
on Spark, and writes one parquet file per shard. Data flows through its modules in this order:

* :mod:`~zsadapt.labelling.shards`: the shards of a source (``.npy`` files, clip-retrieval's
  ``img_emb/`` with its ``metadata/``, parquet files with an embedding column) and their rows;
* :mod:`~zsadapt.labelling.batch`: :func:`label_batch`, the one function every engine runs on a
  read batch;
* :mod:`~zsadapt.labelling.engines`: the local engine, and the choice of engine;
  :mod:`~zsadapt.labelling.on_ray` and :mod:`~zsadapt.labelling.on_spark` run the same
  per-batch function on a cluster;
* :mod:`~zsadapt.labelling.output`: one parquet file per shard, written atomically, with the
  fingerprint that makes a rerun skip what is complete;
* :mod:`~zsadapt.labelling.adapt`: labelling that adapts as it goes (``adapt=True``);
* :mod:`~zsadapt.labelling.job`: :func:`label`, the entry point, and its :class:`LabelReport`.

Engines hand the writer (shard index, labels of a batch) in collection order; the driver writes
every file, so all engines share the resume and error rules, and write byte-identical files.
"""

from .adapt import ADAPT_BATCH, STATE_FILE, STATE_INDEX, label_batch_adapting, open_stream
from .batch import label_batch
from .engines import ENGINES, EngineError, label_in_order
from .job import LabelReport, label
from .output import file_digest, fingerprint, output_state, write_shard
from .shards import DEFAULT_BATCH, DEFAULT_COLUMN, BadShard, Shard, discover, read_batches, read_rows

__all__ = [
    "ADAPT_BATCH", "DEFAULT_BATCH", "DEFAULT_COLUMN", "ENGINES", "STATE_FILE", "STATE_INDEX", "BadShard",
    "EngineError", "LabelReport", "Shard", "discover", "file_digest", "fingerprint", "label", "label_batch",
    "label_batch_adapting", "label_in_order", "open_stream", "output_state", "read_batches", "read_rows",
    "write_shard",
]
