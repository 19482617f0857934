"""Writing the outputs: one parquet file per shard, written atomically, and the fingerprint that
makes it resumable.

Each output holds the carried columns, then ``label`` (int64, the column of the model's
probabilities), ``confidence`` (float32, its probability), ``classname`` when the model knows the
names, and with ``top_k`` K > 0 ``top_labels`` / ``top_probs`` (/ ``top_classnames``), lists of K.
Rows keep the input order, and row groups hold ``batch_size`` rows whatever engine made them
(:func:`rechunk`), so every engine writes byte-identical files. The parquet metadata records the
row count and a :func:`fingerprint` of the model file, the input shard (name, size, modification
time) and the options (:func:`output_state` reads them back): a rerun skips the shards whose output
is complete for the same fingerprint, and an output made by another model or input is an error
unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from .._version import __version__
from .batch import empty_batch
from .shards import BadShard, CarriedColumns, Shard

#: Output parquet key-value metadata entry that makes an output resumable.
META_KEY = b"zsadapt.label"
#: Bumped when the output columns change (part of the fingerprint).
OUTPUT_VERSION = 1

# --- writing -----------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(model_digest: str, shard: Shard, top_k: int) -> str:
    """SHA-256 of the model file's :func:`file_digest`, the input shard's name, size and mtime,
    and the options: what makes an output the one this run would write."""
    digest = hashlib.sha256(model_digest.encode())
    stat = shard.path.stat()
    extra = [shard.path.name, stat.st_size, stat.st_mtime_ns, shard.column, top_k, OUTPUT_VERSION]
    if shard.carried is not None and shard.carried != shard.path:
        carried = shard.carried.stat()
        extra += [shard.carried.name, carried.st_size, carried.st_mtime_ns]
    digest.update(json.dumps(extra).encode())
    return digest.hexdigest()


def output_state(out: Path, shard: Shard, expected: str) -> str:
    """``"missing"``, ``"complete"`` (same fingerprint and row count), ``"broken"`` (not a
    readable parquet file) or ``"other"`` (made by another model, input or options)."""
    if not out.exists():
        return "missing"
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(out)
        meta = json.loads((handle.schema_arrow.metadata or {}).get(META_KEY, b"{}"))
        rows = handle.metadata.num_rows
    except Exception:
        return "broken"
    return "complete" if meta.get("fingerprint") == expected and meta.get("rows") == rows == shard.rows else "other"


class LabelColumns:
    """Turns label batches into pyarrow columns: class names as dictionary arrays (one copy of
    each name per row group, not per row)."""

    def __init__(self, classnames: Optional[list], top_k: int) -> None:
        import pyarrow as pa

        self.pa = pa
        self.names = None if classnames is None else pa.array(classnames, type=pa.string())
        self.top_k = top_k

    def table(self, batch: dict, carried: Any) -> Any:
        pa = self.pa
        label = pa.array(batch["label"], type=pa.int64())
        columns = {"label": label, "confidence": pa.array(batch["confidence"], type=pa.float32())}
        if self.names is not None:
            columns["classname"] = pa.DictionaryArray.from_arrays(pa.array(batch["label"], type=pa.int32()), self.names)
        if self.top_k:
            k = batch["top_labels"].shape[1]
            columns["top_labels"] = pa.FixedSizeListArray.from_arrays(
                pa.array(batch["top_labels"].reshape(-1), type=pa.int64()), k)
            columns["top_probs"] = pa.FixedSizeListArray.from_arrays(
                pa.array(batch["top_probs"].reshape(-1), type=pa.float32()), k)
            if self.names is not None:
                columns["top_classnames"] = pa.FixedSizeListArray.from_arrays(pa.DictionaryArray.from_arrays(
                    pa.array(batch["top_labels"].reshape(-1), type=pa.int32()), self.names), k)
        if carried is None:
            return pa.table(columns)
        clash = sorted(set(columns) & set(carried.column_names))
        if clash:
            raise BadShard(f"carried columns {clash} clash with the label columns")
        return pa.Table.from_arrays(carried.columns + list(columns.values()),
                                    names=carried.column_names + list(columns))


def rechunk(batches: Iterable[dict], size: int) -> Iterator[dict]:
    """Label batches of any sizes as batches of exactly ``size`` rows (the last may be shorter):
    row groups then do not depend on the engine."""
    pending: list = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(batch["label"])
        while held >= size:
            joined = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in joined.items()}
            pending = [{k: v[size:] for k, v in joined.items()}]
            held -= size
    if held:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


def write_shard(out: Path, shard: Shard, batches: Iterable[dict], *, columns: LabelColumns, expected: str,
                batch_size: int, counts: np.ndarray) -> int:
    """Write the labels of ``shard`` (an iterable of :func:`label_batch` outputs, in row order) to
    ``out`` atomically (:func:`zsadapt.io.atomic_write`: a temporary file renamed into place, with
    a plain write's permissions); adds the labels to ``counts``.
    Returns the rows written; :class:`BadShard` when the rows do not add up to the shard's.
    ``expected`` is the shard's :func:`fingerprint`, recorded in the file."""
    import pyarrow.parquet as pq

    from ..io import atomic_write

    meta = {META_KEY: json.dumps({"fingerprint": expected, "rows": shard.rows, "source": shard.path.name,
                                  "zsadapt": __version__}).encode()}
    carried = CarriedColumns(shard, batch_size)
    local = np.zeros_like(counts)
    rows = 0

    def write(handle) -> None:
        nonlocal rows
        writer = None
        try:
            empty = [] if shard.rows else [empty_batch(columns.top_k)]  # an empty shard: its columns, no rows
            for chunk in itertools.chain(rechunk(batches, batch_size), empty):
                table = columns.table(chunk, carried.take(len(chunk["label"])))
                if writer is None:
                    writer = pq.ParquetWriter(handle, table.schema.with_metadata(meta))
                writer.write_table(table, row_group_size=batch_size)
                local[:] += np.bincount(chunk["label"], minlength=len(counts))
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise BadShard("no rows came back from the engine")
        if rows != shard.rows:
            raise BadShard(f"{rows} rows labelled, expected {shard.rows}")

    try:
        atomic_write(out, write, overwrite=True)
    except BadShard as err:
        message = str(err)
        raise BadShard(message if message.startswith(str(shard.path)) else f"{shard.path}: {message}") from None
    counts += local
    return rows
