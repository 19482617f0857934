"""``zsadapt label``: label every row of a collection of embedding shards with a saved model.

Where you are: the model comes from :mod:`zsadapt.models`; this module finds the shards, reads them
in bounded batches, runs the one per-batch function (:func:`label_batch`) on a local streaming
reader, on Ray Data or on Spark, and writes one parquet file per shard.

Sources (:func:`discover`):

* one ``.npy`` file (N, d), any float dtype (float16 is read as it is and upcast per batch);
* a folder of ``.npy`` shards, or clip-retrieval's layout ``img_emb/img_emb_N.npy`` with
  ``metadata/metadata_N.parquet`` beside it, whose columns are carried into the output row for row;
* one parquet file or a folder of them, with the embeddings in a list column (``column``); the
  other columns are carried along (a folder with both kinds of file: its ``.npy`` shards, and a note).

Outputs: ``OUT/<shard stem>.parquet`` with the carried columns, then ``label`` (int64, the column of
the model's probabilities), ``confidence`` (float32, its probability), ``classname`` when the model
knows the names, and with ``top_k`` K > 0 ``top_labels`` / ``top_probs`` (/ ``top_classnames``),
lists of K. Rows keep the input order, and row groups hold ``batch_size`` rows whatever engine made
them, so every engine writes byte-identical files.

Resuming: each output is written to a temporary file and renamed into place, and its parquet
metadata records the row count and a fingerprint of the model file, the input shard (name, size,
modification time) and the options. A rerun skips shards whose output is complete for the same
fingerprint; an output made by another model or input is an error unless ``overwrite``.

Engines hand the writer (shard index, labels of a batch) in collection order; the driver writes
every file, so all engines share the resume and error rules:

* ``local``: :func:`label_in_order`, one reader thread ahead of the compute. It takes any
  per-batch callable, which is where a labeller that adapts as it goes plugs in;
* ``ray``: Ray Data over (shard, batch of rows) items, ``map_batches`` with :class:`_RayLabeller`
  (the model loaded once per actor; it reads its rows), ``preserve_order``;
* ``spark``: one ``mapInPandas`` item per (shard, batch of rows), read where the task runs.

Adapting as it goes (``adapt=True``, ``zsadapt label --adapt``): a :class:`zsadapt.Stream`
(:func:`open_stream`: from a saved stream, a saved model's class text embeddings, or a text file)
refines the rows shard after shard, in stream batches of ``adapt_batch`` rows cut afresh at each
shard (:func:`label_batch_adapting`), local engine only. Each output's fingerprint chains those of
the shards before it (:func:`adapt_fingerprints`): its labels depend on every earlier row. After
each finished shard the stream is saved to ``OUT/.zsadapt-stream.safetensors`` and
``OUT/.zsadapt-stream.json`` names the shard it follows and the state file's digest; a rerun whose
complete outputs reach that shard goes on from the state, otherwise the stream starts over and
the rows of complete outputs pass through it again (they are not rewritten). A bad shard passed
over (``skip_bad``) leaves the state as it was before the shard.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import queue
import re
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from ._version import __version__
from .messages import heartbeat, note, progress as progress_bar
from .validation import l2_normalise, plain_unit_rows

PathLike = Union[str, os.PathLike]

ENGINES = ("local", "ray", "spark")
#: Output parquet key-value metadata entry that makes an output resumable.
META_KEY = b"zsadapt.label"
#: Bumped when the output columns change (part of the fingerprint).
OUTPUT_VERSION = 1
DEFAULT_BATCH = 65536
DEFAULT_COLUMN = "embedding"


class BadShard(ValueError):
    """A shard that cannot be labelled (wrong dimension, corrupt, NaN rows); the message names it."""


class EngineError(RuntimeError):
    """A Ray or Spark run failed for a reason other than a bad shard (one line: what failed)."""


@dataclasses.dataclass
class Shard:
    """One input file and where its labels go.

    Attributes
    ----------
    path : Path
        The ``.npy`` or ``.parquet`` file.
    stem : str
        Output name: ``OUT/<stem>.parquet``.
    kind : {"npy", "parquet"}
    rows, dim : int
        N and d (d is 0 when unknown: an empty parquet shard).
    carried : Path or None
        A parquet file whose columns go into the output row for row (clip-retrieval metadata, or the
        shard itself for parquet input).
    column : str or None
        The embedding column of a parquet shard.
    """

    path: Path
    stem: str
    kind: str
    rows: int
    dim: int
    carried: Optional[Path] = None
    column: Optional[str] = None


@dataclasses.dataclass
class LabelReport:
    """What :func:`label` did.

    Attributes
    ----------
    rows : int
        Rows labelled in this run (skipped shards not counted).
    shards : int
        Shards written in this run.
    skipped : list of Path
        Outputs that were already complete.
    bad : list of str
        One line per bad shard passed over (``skip_bad``).
    seconds : float
    counts : numpy array (C,)
        Predicted-label histogram of the rows labelled in this run.
    classnames : list of str or None
    outputs : list of Path
        Every output of the source (written now or before).
    replayed : int
        With ``adapt``: rows of complete outputs that passed through the stream again (not
        rewritten) to rebuild its state, when a rerun could not go on from the saved state.
    """

    rows: int
    shards: int
    skipped: list
    bad: list
    seconds: float
    counts: np.ndarray
    classnames: Optional[list]
    outputs: list
    replayed: int = 0

    def as_dict(self, head: int = 5) -> dict:
        """The report as JSON-ready values (``zsadapt label --json``); ``top_classes``: the ``head``
        most predicted classes with their share of the rows (percent)."""
        top = np.argsort(-self.counts, kind="stable")[:head] if self.rows else []
        names = self.classnames or [str(c) for c in range(len(self.counts))]
        return {
            "rows": self.rows, "shards": self.shards, "seconds": self.seconds,
            "rows_per_second": self.rows / self.seconds if self.seconds > 0 else 0.0,
            "skipped": [str(p) for p in self.skipped], "bad": list(self.bad),
            "outputs": [str(p) for p in self.outputs], "replayed": self.replayed,
            "top_classes": [{"label": int(c), "classname": names[c], "percent": 100.0 * self.counts[c] / self.rows}
                            for c in top if self.counts[c]],
        }

    def summary(self, head: int = 5) -> str:
        """One line: rows, shards, seconds, rows/s and the head of the class histogram."""
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        line = (f"labelled {self.rows} rows in {self.shards} shards, {self.seconds:.1f} s "
                f"({rate:,.0f} rows/s)")
        if self.skipped:
            line += f"; {len(self.skipped)} complete shards skipped"
        if self.bad:
            line += f"; {len(self.bad)} bad shards skipped"
        if self.replayed:
            line += f"; {self.replayed} rows of complete shards passed through the stream again"
        if self.rows:
            top = np.argsort(-self.counts, kind="stable")[:head]
            names = self.classnames or [str(c) for c in range(len(self.counts))]
            line += "; top classes: " + ", ".join(
                f"{names[c]} {100.0 * self.counts[c] / self.rows:.1f}%" for c in top if self.counts[c])
        return line


# --- finding the shards ------------------------------------------------------------------------


def _natural(path: Path) -> tuple:
    """Sort key: img_emb_2 before img_emb_10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def _npy_shape(path: Path) -> tuple:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        from .io import npy_problem

        raise BadShard(f"{path}: cannot be read as .npy ({npy_problem(path) or _first_line(err)})") from None
    if array.ndim != 2:
        raise BadShard(f"{path}: expected a 2-D array of embeddings (N, d), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BadShard(f"{path}: expected float embeddings, got dtype {array.dtype}")
    return array.shape


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise BadShard(f"{path}: cannot be read as parquet ({_first_line(err)})") from None


def _parquet_dim(path: Path, column: str) -> int:
    """d of the embedding column (0 for an empty file); BadShard when the column is not a list of
    numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if column not in schema.names:
        raise BadShard(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                       "name the embedding column with --column")
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise BadShard(f"{path}: column {column!r} holds {kind}, expected a list of floats per row")
    if not (pa.types.is_floating(kind.value_type)):
        raise BadShard(f"{path}: column {column!r} holds lists of {kind.value_type}, expected floats")
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1, columns=[column]):
        return len(batch.column(0)[0]) if batch.num_rows and batch.column(0)[0].is_valid else 0
    return 0


def _npy_shard(path: Path, carried: Optional[Path]) -> Shard:
    rows, dim = _npy_shape(path)
    if carried is not None and _parquet_rows(carried) != rows:
        raise BadShard(f"{path}: {rows} rows, but its metadata {carried} has {_parquet_rows(carried)}")
    return Shard(path, path.stem, "npy", int(rows), int(dim), carried)


def _parquet_shard(path: Path, column: str) -> Shard:
    rows = _parquet_rows(path)
    return Shard(path, path.stem, "parquet", rows, _parquet_dim(path, column), path, column)


def discover(source: PathLike, *, column: str = DEFAULT_COLUMN,
             on_bad: Optional[Callable[[str], None]] = None) -> list:
    """The shards of ``source`` in order (module docstring). A shard that cannot be opened raises
    :class:`BadShard`, or is passed to ``on_bad`` (its message) and left out."""
    source = Path(source)
    if not source.exists():
        raise ValueError(f"{source}: no such file or folder")
    metadata = None
    if source.is_file():
        files = [source]
    elif (source / "img_emb").is_dir():  # clip-retrieval: SOURCE/img_emb, SOURCE/metadata
        files, metadata = sorted((source / "img_emb").glob("*.npy"), key=_natural), source / "metadata"
    else:
        npy, parquet = sorted(source.glob("*.npy"), key=_natural), sorted(source.glob("*.parquet"), key=_natural)
        files = npy or parquet
        if npy and parquet:  # one format per folder: say so rather than leave rows out silently
            note(f"{source}: labelling its {len(npy)} .npy shards; the {len(parquet)} .parquet files beside "
                 "them are not read (give them as a source of their own)")
        if source.name == "img_emb" and (source.parent / "metadata").is_dir():
            metadata = source.parent / "metadata"
    if not files:
        raise ValueError(f"{source}: no .npy or .parquet embedding files found")
    shards = []
    for path in files:
        try:
            suffix = path.suffix.lower()
            if suffix == ".npy":
                shards.append(_npy_shard(path, _metadata_file(path, metadata)))
            elif suffix == ".parquet":
                shards.append(_parquet_shard(path, column))
            else:
                raise ValueError(f"{path}: unsupported file type {suffix!r}; expected .npy or .parquet")
        except BadShard as err:
            if on_bad is None:
                raise
            on_bad(str(err))
    return shards  # one folder, one suffix: the stems, so the output names, are distinct


def _metadata_file(path: Path, folder: Optional[Path]) -> Optional[Path]:
    """clip-retrieval's ``metadata/metadata_N.parquet`` for ``img_emb/img_emb_N.npy``, if present."""
    if folder is None:
        return None
    candidate = folder / (path.stem.replace("img_emb", "metadata", 1) + ".parquet")
    return candidate if candidate.is_file() else None


# --- reading -----------------------------------------------------------------------------------


def read_batches(shard: Shard, batch_size: int) -> Iterator[np.ndarray]:
    """The shard's embeddings as (b, d) arrays of at most ``batch_size`` rows, in order, in their
    stored dtype (memory-mapped ``.npy`` slices; pyarrow ``iter_batches`` for parquet)."""
    if shard.kind == "npy":
        for start in range(0, shard.rows, batch_size):
            yield _npy_rows(shard, start, min(start + batch_size, shard.rows))
        return
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=batch_size, columns=[shard.column]):
            yield _embedding_array(batch.column(0), shard)
    except BadShard:
        raise
    except Exception as err:
        raise BadShard(f"{shard.path}: cannot be read as parquet ({_first_line(err)})") from None


def read_rows(shard: Shard, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the shard (for engines that hand out row ranges); a parquet shard
    reads only the row groups that hold them."""
    if shard.kind == "npy":
        return _npy_rows(shard, start, stop)
    if stop <= start:
        return np.zeros((0, shard.dim), dtype=np.float32)
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(shard.path)
        groups, first, offset = [], None, 0
        for g in range(handle.metadata.num_row_groups):
            size = handle.metadata.row_group(g).num_rows
            if offset < stop and offset + size > start:
                groups.append(g)
                first = offset if first is None else first
            offset += size
        column = handle.read_row_groups(groups, columns=[shard.column]).column(0)
        column = column.slice(start - first, stop - start).combine_chunks()
    except Exception as err:
        raise BadShard(f"{shard.path}: cannot be read as parquet ({_first_line(err)})") from None
    return _embedding_array(column, shard)


def _npy_rows(shard: Shard, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` shard in its stored dtype, copied out of a memory map (so
    the read happens on the calling thread); :class:`BadShard` for a file shorter than its header
    says (cut short since it was discovered)."""
    try:
        return np.array(np.load(shard.path, mmap_mode="r", allow_pickle=False)[start:stop])
    except (OSError, ValueError) as err:
        raise BadShard(f"{shard.path}: cannot be read ({_first_line(err)})") from None


def _embedding_array(column: Any, shard: Shard) -> np.ndarray:
    """A pyarrow list column (b rows of d floats) as a (b, d) numpy array."""
    if column.null_count:
        raise BadShard(f"{shard.path}: column {shard.column!r} has empty (null) rows")
    lengths = column.value_lengths().to_numpy() if hasattr(column, "value_lengths") else None
    if lengths is not None and len(lengths) and not (lengths == shard.dim).all():
        raise BadShard(f"{shard.path}: rows of column {shard.column!r} have {int(lengths.min())} to "
                       f"{int(lengths.max())} values, expected {shard.dim}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    if not values.flags.writeable:  # a view of Arrow's buffer: torch.from_numpy warns on read-only arrays
        values = values.copy()
    return values.reshape(len(column), shard.dim)


class CarriedColumns:
    """The columns a shard carries into its output (clip-retrieval metadata, or a parquet shard's
    other columns), read in order as the labels are written: :meth:`take` the next n rows."""

    def __init__(self, shard: Shard) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.names: list = []
        if shard.carried is not None:
            handle = pq.ParquetFile(shard.carried)
            self.names = [n for n in handle.schema_arrow.names if n != shard.column]
            self.schema = handle.schema_arrow
        self.source = handle.iter_batches(batch_size=DEFAULT_BATCH, columns=self.names) if self.names else None
        self.pending: list = []
        self.held = 0

    def take(self, rows: int) -> Any:
        """A pyarrow Table of the next ``rows`` rows (None when nothing is carried)."""
        if self.source is None:
            return None
        while self.held < rows:
            batch = next(self.source, None)
            if batch is None:
                raise BadShard(f"carried columns end after {self.held} more rows, {rows} needed")
            self.pending.append(batch)
            self.held += batch.num_rows
        if not self.pending:
            return self.schema.empty_table().select(self.names)
        table = self.pa.Table.from_batches(self.pending).combine_chunks()
        rest = table.slice(rows)
        self.pending, self.held = rest.to_batches(), rest.num_rows
        return table.slice(0, rows)


# --- the per-batch function --------------------------------------------------------------------


#: On the CPU, :func:`label_batch` converts, checks and predicts a read batch in blocks of this
#: many (row, feature) or (row, class) entries (2 MiB in float32), which stay in the CPU's cache
#: from the float16 upcast to the labels (models fitted on Stanford Cars, 65,536 float16 rows, one
#: thread: ``zeroshot`` 0.50 to 0.56 s at once, 0.27 s in blocks; ``auto`` 0.85 to 0.87 s, 0.64 s).
#: Every engine labels the same read batches, so the same blocks: BLAS picks its kernels, and
#: with them the last bits of a row's probabilities, by the shape of the block the row is in.
LABEL_BLOCK_ELEMENTS = 1 << 19

#: ... of at least this many rows: very many classes would otherwise make blocks of a few rows,
#: each paying the fixed cost of a ``predict`` call (C = 20,000, d = 512, 8,192 float16 rows, one
#: thread: ``zeroshot`` 5.8 s in blocks of 26 rows, 2.6 s of 256; ``gmm`` 38.9 s and 8.9 s, with
#: the neighbour transfer's floor below).
LABEL_BLOCK_MIN_ROWS = 256


def label_batch(model: Any, X: np.ndarray, *, device: Any = None, top_k: int = 0, name: str = "batch",
                first_row: int = 0) -> dict:
    """Label one batch: every engine runs this.

    Parameters
    ----------
    model : zsadapt.models.SavedModel
    X : (b, d) array, any float dtype (float16 is upcast to float32 here, on ``device``)
    device : torch device, optional (default: the model's, else CPU)
    top_k : int
        Also return the K most probable columns and their probabilities.
    name, first_row : where the rows come from, for error messages (``name: row first_row + i``)

    Returns
    -------
    dict of numpy arrays
        ``label`` (b,) int64, ``confidence`` (b,) float32; with ``top_k``: ``top_labels`` (b, K)
        int64 and ``top_probs`` (b, K) float32.
    """
    import torch

    where = model._compute_device(X, device)
    source = torch.from_numpy(X)  # (b, d) as read (float16 stays float16 until its block)
    if source.ndim != 2 or source.shape[1] != model.n_features_in_:
        raise BadShard(f"{name}: has {source.shape[-1]}-d embeddings, the model expects {model.n_features_in_}")
    solver = model.solver(where)
    n, k = source.shape[0], min(top_k, model.n_classes)
    label, confidence = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
    top_labels, top_probs = torch.empty(n, k, dtype=torch.int64), torch.empty(n, k, dtype=torch.float32)
    step = max(1, n)  # on a GPU, the whole batch at once
    if where.type == "cpu":
        step = max(LABEL_BLOCK_MIN_ROWS, LABEL_BLOCK_ELEMENTS // max(source.shape[1], model.n_classes))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        unit = _check_rows(source[rows].to(where).float(), name, first_row + start)  # (b', d) unit rows
        probs = solver.predict(unit).probs.float()  # (b', C)
        best = probs.max(dim=1)
        confidence[rows], label[rows] = best.values.cpu(), best.indices.cpu()
        if k:
            values, columns = probs.topk(k, dim=1)
            top_probs[rows], top_labels[rows] = values.cpu(), columns.cpu()
    out = {"label": label.numpy(), "confidence": confidence.numpy()}
    if k:
        out["top_labels"], out["top_probs"] = top_labels.numpy(), top_probs.numpy()
    return out


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


class _Columns:
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


def write_shard(out: Path, shard: Shard, batches: Iterable[dict], *, columns: _Columns, expected: str,
                batch_size: int, counts: np.ndarray) -> int:
    """Write the labels of ``shard`` (an iterable of :func:`label_batch` outputs, in row order) to
    ``out`` atomically (:func:`zsadapt.io.atomic_write`: a temporary file renamed into place, with
    a plain write's permissions); adds the labels to ``counts``.
    Returns the rows written; :class:`BadShard` when the rows do not add up to the shard's.
    ``expected`` is the shard's :func:`fingerprint`, recorded in the file."""
    import pyarrow.parquet as pq

    from .io import atomic_write

    meta = {META_KEY: json.dumps({"fingerprint": expected, "rows": shard.rows, "source": shard.path.name,
                                  "zsadapt": __version__}).encode()}
    carried = CarriedColumns(shard)
    local = np.zeros_like(counts)
    rows = 0

    def write(handle) -> None:
        nonlocal rows
        writer = None
        try:
            for chunk in itertools.chain(rechunk(batches, batch_size), [] if shard.rows else [_empty(columns.top_k)]):
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


def _empty(top_k: int) -> dict:
    """A label batch of 0 rows (the columns of an empty shard's output)."""
    out = {"label": np.zeros(0, np.int64), "confidence": np.zeros(0, np.float32)}
    if top_k:
        out["top_labels"], out["top_probs"] = np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
    return out


# --- engines -----------------------------------------------------------------------------------


def _prefetched(iterator: Iterator, depth: int = 2) -> Iterator:
    """``iterator`` run on a reader thread, ``depth`` items ahead (I/O overlaps the compute)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Queue ``item``; False once the consumer has stopped (it will never take it)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    thread = threading.Thread(target=run, name="zsadapt-label-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def label_in_order(shards: list, per_batch: Callable[..., dict], *, batch_size: int) -> Iterator[tuple]:
    """The local engine: run ``per_batch`` over every shard's rows, shard after shard, batch after
    batch in row order, one reader thread ahead of the compute.

    Parameters
    ----------
    shards : list of Shard
    per_batch : callable ``per_batch(X, name=..., first_row=...) -> dict``
        Labels one (b, d) batch of a shard (``name``: the shard's path, ``first_row``: the row of
        the shard the batch starts at): :func:`label_batch` with a model bound, or any function
        returning the same arrays. Batches arrive strictly in collection order, so a callable that
        adapts as it labels (``zsadapt label --adapt``: a :class:`zsadapt.Stream`) sees the rows in
        the order the outputs hold them.
    batch_size : int
        Rows per batch.

    Yields
    ------
    (shard index, dict of arrays) per batch, or (shard index, BadShard) once for a bad shard (its
    remaining rows are not read).
    """
    for index, shard in enumerate(shards):
        start = 0
        try:
            for X in _prefetched(read_batches(shard, batch_size)):
                yield index, per_batch(X, name=str(shard.path), first_row=start)
                start += len(X)
        except BadShard as err:
            yield index, err


class _RayLabeller:
    """Ray Data ``map_batches`` callable: loads the model once per actor; each call labels the row
    ranges it is given (``shard``, ``start``, ``stop`` columns), read by the actor itself."""

    def __init__(self, model_path: str, shards: list, device: Optional[str], top_k: int) -> None:
        import torch

        from .models import load_model

        torch.set_num_threads(1)  # one actor per CPU: Ray runs several side by side
        self.model = load_model(model_path, device=device)
        self.shards, self.device, self.top_k = shards, device, top_k

    def __call__(self, batch: dict) -> dict:
        parts = []
        for index, start, stop in zip(batch["shard"], batch["start"], batch["stop"]):
            shard = self.shards[int(index)]
            try:
                X = read_rows(shard, int(start), int(stop))
                out = label_batch(self.model, X, device=self.device, top_k=self.top_k, name=str(shard.path),
                                  first_row=int(start))
                out["error"] = np.full(len(X), "", dtype=object)
            except BadShard as err:  # one row that carries the message
                out = {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in _empty(self.top_k).items()}
                out["error"] = np.array([str(err)], dtype=object)
            out["shard"] = np.full(len(out["label"]), int(index), dtype=np.int64)
            parts.append(out)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _ray_stream(model_path: Path, shards: list, *, batch_size: int, device: Optional[str], top_k: int,
                workers: Optional[int], num_gpus: Optional[float], address: Optional[str]) -> Iterator[tuple]:
    """(shard index, label batch) in order, labelled by Ray Data actors (:class:`_RayLabeller`,
    ``workers`` of them); the driver receives the labels in input order and writes the files.

    The dataset is one item per (shard, batch of rows), exactly the local engine's batches, and
    each actor reads its rows itself (the paths must be visible to every node). Not Ray Data's own
    readers, for two reasons. Memory: ``read_numpy`` reads a whole ``.npy`` file per read task
    (Ray 2.60: the file's bytes, a BytesIO copy, then the array), so a 1 GB shard costs some 3 GB
    whatever ``batch_size``, and ``read_parquet`` reads whole row groups. Identical files: both
    cut the shards into blocks whose edges fall anywhere, so the batches would differ from the
    local engine's, and a pool-based ``predict`` gives last-bit different probabilities for
    batches of a few rows (a (b, d) x (d, N) product takes another BLAS path for small b).
    Measured with a Ray Data read stage (tasks reading the same items ahead of the actors, rows
    handed over through the object store): no faster on one machine (2M rows, ``zeroshot``:
    8.3-9.2 s after the first batch against 7.4-9.1 s).

    A Ray started here (no ``ray.init`` before) is shut down at the end.
    """
    import logging

    from .extras import require

    ray = require("ray", "ray", "--engine ray")
    require("ray.data", "ray", "--engine ray")
    started = not ray.is_initialized()
    if started:
        # ERROR: Ray's start-up warnings (token authentication, ...) are not the user's business;
        # its failures still raise, and reach the user as one line (EngineError).
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 **({} if address else {"num_cpus": workers}))
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-dataset INFO or "progress bars disabled" lines
    context = ray.data.DataContext.get_current()
    saved_context = (context.execution_options.preserve_order, context.enable_progress_bars)
    batches = None
    try:
        context.execution_options.preserve_order = True  # rows come back in input order
        context.enable_progress_bars = False
        resources = ray.cluster_resources()
        if device is not None and str(device).startswith("cuda"):
            # Ray hides the GPUs from actors that reserve none: one GPU per actor unless told.
            num_gpus = num_gpus or 1.0
            workers = workers or max(1, int(float(resources.get("GPU", 0.0)) / num_gpus))
        workers = workers or max(1, int(float(resources.get("CPU", 1.0))))
        items = [{"shard": i, "start": start, "stop": min(start + batch_size, s.rows)}
                 for i, s in enumerate(shards) for start in range(0, s.rows, batch_size)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        with warnings.catch_warnings():
            # max_restarts goes through map_batches' extra keyword arguments, which Ray 2.60 warns
            # are deprecated but names no replacement for; Ray Data's own code documents
            # map_batches(..., max_restarts=0) as the way to turn actor restarts off.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ds.map_batches(
                _RayLabeller, fn_constructor_kwargs={"model_path": str(model_path), "shards": shards,
                                                     "device": device, "top_k": top_k},
                batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                # No restarts: a failed actor fails the job with its error (one line, below; a rerun
                # redoes only the unfinished shards), and with restarts on, Ray logs an error line on
                # stderr for every actor, whose constructor arguments sit in the object store
                # (ray-project/ray#53727), though nothing is wrong.
                num_cpus=1, max_restarts=0, **({"num_gpus": num_gpus} if num_gpus else {}),
            )
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        while True:
            try:
                batch = next(batches, None)
            except Exception as err:  # an actor that failed: the first line of its error
                raise EngineError(f"--engine ray: the Ray Data job failed ({_engine_error(err)})") from None
            if batch is None:
                return
            for index, rows in _runs(batch["shard"]):
                failed = [e for e in batch["error"][rows] if e]
                if failed:
                    yield int(index), BadShard(str(failed[0]))
                    continue
                yield int(index), {k: v[rows] for k, v in batch.items() if k not in ("shard", "error")}
    finally:
        close = getattr(batches, "close", None) if batches is not None else None
        if close is not None:
            close()  # shuts the Ray Data executor and its actors down
        context.execution_options.preserve_order, context.enable_progress_bars = saved_context
        if started:
            ray.shutdown()


def _runs(values: np.ndarray) -> Iterator[tuple]:
    """(value, slice) for each run of equal consecutive values."""
    start = 0
    for value, group in itertools.groupby(values):
        length = sum(1 for _ in group)
        yield value, slice(start, start + length)
        start += length


#: Models loaded by this Python worker, keyed by (path, file digest, device): see :func:`_spark_model`.
_SPARK_MODELS: dict = {}


def _spark_model(model_path: str, model_digest: str, device: Optional[str]) -> Any:
    """The saved model, loaded once per Spark Python worker. Spark reuses its workers across tasks
    and jobs, and runs each task's function from a fresh unpickling of it: a cache held by that
    function (a closure's globals are pickled by value) would start empty on every task, where
    this module-level one, imported by the worker, lasts. Keyed by the file's digest, so a model
    re-saved at the same path is reloaded."""
    key = (model_path, model_digest, device)
    if key not in _SPARK_MODELS:
        import torch

        from .models import load_model

        torch.set_num_threads(1)  # Spark runs one Python worker per task slot
        _SPARK_MODELS[key] = load_model(model_path, device=device)
    return _SPARK_MODELS[key]


def _spark_partition(model_path: str, model_digest: str, shards: list, device: Optional[str], top_k: int):
    """The ``mapInPandas`` function: one output row per (shard, start, stop) item, holding the
    labels as bytes; the model comes from :func:`_spark_model` (once per Python worker)."""

    def run(frames):
        import pandas as pd

        model = _spark_model(model_path, model_digest, device)
        for frame in frames:
            out = []
            for index, start, stop in zip(frame["shard"], frame["start"], frame["stop"]):
                shard = shards[int(index)]
                try:
                    X = read_rows(shard, int(start), int(stop))
                    labels = label_batch(model, X, device=device, top_k=top_k, name=str(shard.path),
                                         first_row=int(start))
                    error = ""
                except BadShard as err:
                    labels, error = _empty(top_k), str(err)
                out.append({"shard": int(index), "start": int(start), "error": error,
                            **{k: _pack(v) for k, v in labels.items()}})
            yield pd.DataFrame(out, columns=["shard", "start", "error"] + list(_empty(top_k)))

    return run


def _pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes (shape and dtype included), for a Spark binary column."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _unpack(blob: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)


#: Log4j 2 configuration of a Spark started by ``--engine spark``: errors only, on stderr. Without
#: it the JVM prints Spark's start-up lines (default profile, host name, native libraries) before
#: ``setLogLevel`` can act, and the shell's "Setting default log level" lines unless the loggers of
#: the shell's main classes are set (to the root's level). The JVM's own notice of incubator
#: modules remains.
SPARK_LOG_CONFIG = """\
rootLogger.level = error
rootLogger.appenderRef.stderr.ref = console
logger.repl.name = org.apache.spark.repl.Main
logger.repl.level = error
logger.gateway.name = org.apache.spark.api.python.PythonGatewayServer
logger.gateway.level = error
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n
"""


def _spark_log_config() -> str:
    """Path of a file holding :data:`SPARK_LOG_CONFIG` (written once into the temporary folder)."""
    import tempfile

    from .io import atomic_write

    digest = hashlib.sha256(SPARK_LOG_CONFIG.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"zsadapt-spark-log4j2-{digest}.properties"
    if not path.exists():
        atomic_write(path, lambda handle: handle.write(SPARK_LOG_CONFIG), overwrite=True, mode="w")
    return str(path)


def _spark_stream(model_path: Path, model_digest: str, shards: list, *, batch_size: int, device: Optional[str],
                  top_k: int, workers: Optional[int]) -> Iterator[tuple]:
    """(shard index, label batch) in order, labelled by Spark ``mapInPandas`` tasks: one item per
    (shard, batch of rows), each read where it runs (the paths must be visible to the executors).

    Uses the active SparkSession, else starts ``local[workers]`` (stopped at the end) whose Python
    workers run this interpreter.
    """
    from .extras import require

    # PySpark 4 warns that it does not fully support pandas 3; mapInPandas as used here is tested
    # with it (tests/test_engines.py), so the warning would only be noise on stderr.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    sql = require("pyspark.sql", "spark", "--engine spark")
    spark = sql.SparkSession.getActiveSession()
    started = spark is None
    if started:
        # Spark's Python workers run PYSPARK_PYTHON (default: the first python3 on PATH, which may
        # lack torch); here, this interpreter unless the user chose one.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        spark = (sql.SparkSession.builder.master(f"local[{workers or '*'}]").appName("zsadapt label")
                 .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
                 .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_spark_log_config()}")
                 .getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
    try:
        items = [(i, start, min(start + batch_size, s.rows)) for i, s in enumerate(shards)
                 for start in range(0, s.rows, batch_size)]
        slices = max(1, min(len(items), 4 * (workers or spark.sparkContext.defaultParallelism)))
        frame = spark.sparkContext.parallelize(items, slices).toDF("shard int, start long, stop long")
        fields = ", ".join(f"{k} binary" for k in _empty(top_k))
        result = frame.mapInPandas(_spark_partition(str(model_path), model_digest, shards, device, top_k),
                                   schema=f"shard int, start long, error string, {fields}")
        rows = result.toLocalIterator(prefetchPartitions=True)
        while True:
            try:
                row = next(rows, None)
            except Exception as err:  # a failed Spark job: its Python error, in one line
                raise EngineError(f"--engine spark: the Spark job failed ({_engine_error(err)})") from None
            if row is None:
                return
            if row["error"]:
                yield row["shard"], BadShard(row["error"])
            else:
                yield row["shard"], {k: _unpack(row[k]) for k in _empty(top_k)}
    finally:
        if started:
            spark.stop()


def _engine_error(err: BaseException) -> str:
    """The last line of the Python traceback inside a Spark or Ray error (``ModuleNotFoundError:
    ...``), else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    python = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)]
    return python[-1] if python else (lines[0] if lines else type(err).__name__)


# --- adapting as it goes (--adapt) -------------------------------------------------------------

#: Rows per stream batch of ``label(adapt=True)``: the online protocol's batch (benchmarks/realistic.py).
ADAPT_BATCH = 128
#: The stream state after the last finished shard, beside the outputs (``adapt``), and what it follows.
STATE_FILE = ".zsadapt-stream.safetensors"
STATE_INDEX = ".zsadapt-stream.json"


def _file_format(path: Path) -> Optional[str]:
    """The ``format`` metadata entry of a ``.safetensors`` file (``zsadapt-model``, ``zsadapt-stream``),
    else None (other files, or a safetensors file without one)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    from .models import _check_header

    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({_first_line(err)})") from None


def _class_text_file(path: Path) -> tuple:
    """``(text (C, d) or (C, P, d) or (d, C), classnames or None)`` of a class text embeddings file
    (what ``zsadapt refine --text-features`` reads: ``.npy``, or a pool format holding one array or
    ``text_features``, with its per-template embeddings when ``zsadapt encode`` wrote them)."""
    from .io import _read_named, _text_of, read_arrays

    arrays = read_arrays(path)
    if "text_features" in arrays:
        text, _ = _text_of(arrays, path)
    else:
        text, _ = _read_named(path, "text_features")
    names = arrays.get("classnames")
    return np.asarray(text), (None if names is None else [str(n) for n in list(names)])


def open_stream(model: Any, *, dim: Optional[int] = None, device: Any = None) -> tuple:
    """``(stream, path)``: the :class:`zsadapt.Stream` that ``label(adapt=True)`` starts from.

    ``model`` is a saved stream (``Stream.save`` / ``zsadapt stream --save-stream``: it goes on
    from its state, method and parameters), a saved model (``refine --save-model``: a new stream
    on its class text embeddings and class names, with its method and parameters when the method
    has a stream mode, else the default stream method; its fitted state is not used), or a class
    text embeddings file (a new stream with the default method). ``dim``: the shards' d, to read
    a (d, C) text array as refine does. One-line ``ValueError`` for anything else.
    """
    from .models import SavedModel, class_text, load_model
    from .stream import Stream, _streams

    if isinstance(model, Stream):
        raise TypeError("label(adapt=True) takes a path to a saved stream (Stream.save), not a Stream object")
    path = Path(model.path if isinstance(model, SavedModel) else model)
    kind = _file_format(path)
    if kind == "zsadapt-stream":
        return Stream.load(path, device=device), path
    if kind == "zsadapt-model" or isinstance(model, SavedModel):
        saved = model if isinstance(model, SavedModel) else load_model(path)
        if saved.text_features is None:
            raise ValueError(f"{path}: this saved model holds no class text embeddings (saved before model files "
                             "kept them, or fitted on class prototypes): re-save it with `zsadapt refine "
                             "--save-model`, or give the class text embeddings file to label --adapt")
        own = _streams(saved.method)
        stream = Stream(saved.text_features, saved.method if own else None, device=device or "cpu",
                        classnames=saved.classnames, **(saved.metadata["params"] if own else {}))
        if not own:
            note(f"label --adapt: {saved.method} has no stream mode; adapting with {stream.method} from the "
                 f"model's class text embeddings")
        return stream, path
    if path.suffix.lower() == ".safetensors" and kind is not None:
        raise ValueError(f"{path}: a {kind!r} file, not a saved model, saved stream or class text embeddings")
    text, names = _class_text_file(path)
    return Stream(class_text(text, dim), None, device=device or "cpu", classnames=names), path


def _check_rows(t: Any, name: str, first_row: int) -> Any:
    """Unit rows of the (b, d) float32 tensor ``t``; :class:`BadShard` naming the row for a NaN,
    inf or all-zero row.

    One pass for the common case (:func:`~zsadapt.validation.plain_unit_rows`; benchmarks/bench_label.py:
    checking every entry with isfinite, abs and amax cost more than the model). Rows whose norm is
    not plain take the full checks and l2_normalise's rescaling."""
    import torch

    unit = plain_unit_rows(t)
    if unit is not None:
        return unit
    bad = ~torch.isfinite(t).all(dim=1) | (t.abs().amax(dim=1) == 0)  # (b,) NaN/inf or all-zero rows
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        what = "NaN or inf" if not bool(torch.isfinite(t[row]).all()) else "all zeros"
        raise BadShard(f"{name}: row {first_row + row} is {what}")
    return l2_normalise(t, name)[0]  # as SavedModel.predict and zsadapt.refine normalise


def label_batch_adapting(stream: Any, X: np.ndarray, *, adapt_batch: int = ADAPT_BATCH, top_k: int = 0,
                name: str = "batch", first_row: int = 0) -> dict:
    """Label a (b, d) read batch with ``stream``, adapting as it goes: ``stream.refine`` on rows
    ``[0, adapt_batch)``, ``[adapt_batch, 2 adapt_batch)``, ... of ``X`` in order (the last
    may be shorter), each batch refined with what the earlier ones taught the stream. Returns the
    arrays of :func:`label_batch`; :class:`BadShard` (the stream's state as it was before the bad
    stream batch) for a wrong dimension, NaN, inf or all-zero rows."""
    import torch

    X = np.ascontiguousarray(X) if X.flags.writeable else np.array(X)  # parquet reads are read-only views
    t = torch.from_numpy(X).to(stream.device).float()  # float16 upcast here
    if t.ndim != 2 or t.shape[1] != stream.dim:
        raise BadShard(f"{name}: has {t.shape[-1]}-d embeddings, the stream's class embeddings have d = {stream.dim}")
    _check_rows(t, name, first_row)  # before any refine: a bad row changes nothing
    labels, confidence, top_labels, top_probs = [], [], [], []
    for start in range(0, t.shape[0], adapt_batch):
        try:
            probs = stream.refine(t[start:start + adapt_batch]).probs.float()  # (b', C)
        except ValueError as err:
            raise BadShard(f"{name}: rows {first_row + start} to {first_row + min(start + adapt_batch, len(t)) - 1}: "
                           f"{_first_line(err)}") from None
        value, label = probs.max(dim=1)
        labels.append(label.to(torch.int64).cpu().numpy())
        confidence.append(value.cpu().numpy())
        if top_k:
            values, columns = probs.topk(min(top_k, probs.shape[1]), dim=1)
            top_labels.append(columns.cpu().numpy())
            top_probs.append(values.cpu().numpy())
    out = {"label": np.concatenate(labels), "confidence": np.concatenate(confidence)}
    if top_k:
        out["top_labels"], out["top_probs"] = np.concatenate(top_labels), np.concatenate(top_probs)
    return out


def adapt_fingerprints(model_digest: str, stream: Any, shards: list, *, top_k: int, adapt_batch: int) -> list:
    """One fingerprint per shard for ``label(adapt=True)``: shard i's output depends on the stream
    file or text, the stream's method, parameters, forgetting, seed and batch, and on every shard
    before it, so fingerprint i hashes fingerprint i - 1 with shard i's :func:`fingerprint` (none
    equals an output made without ``adapt``)."""
    signature = json.dumps({"adapt": True, "adapt_batch": int(adapt_batch), "method": stream.method,
                            "params": stream.params, "forgetting": stream.forgetting, "seed": stream.seed},
                           sort_keys=True, default=str)
    previous = hashlib.sha256((model_digest + signature).encode()).hexdigest()
    prints = []
    for shard in shards:
        previous = hashlib.sha256((previous + fingerprint(previous, shard, top_k)).encode()).hexdigest()
        prints.append(previous)
    return prints


def _saved_state(out: Path, prints: list, complete: list, skip_bad: bool, device: Any) -> tuple:
    """``(p, stream, bad)``: the stream state saved after shard p of this run's chain, when every
    output up to p is complete (or its shard was passed over as bad, with ``skip_bad``) and the
    state file is the one the index names; else ``(-1, None, [])``."""
    from .stream import Stream

    index, state = out / STATE_INDEX, out / STATE_FILE
    try:
        meta = json.loads(index.read_text())
        p, bad = prints.index(meta["fingerprint"]), [int(b) for b in meta.get("bad", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return -1, None, []
    if bad and not skip_bad:
        return -1, None, []
    if not all(complete[i] or i in bad for i in range(p + 1)):
        return -1, None, []
    try:
        if file_digest(state) != meta.get("state_sha256"):
            raise ValueError("the state file is not the one its index names")
        return p, Stream.load(state, device=device), bad
    except (OSError, ValueError) as err:
        note(f"label --adapt: cannot resume from {state} ({_first_line(err)}); starting the stream over")
        return -1, None, []


def _write_state(out: Path, stream: Any, print_: str, stem: str, bad: list) -> None:
    """The stream state after the shard of fingerprint ``print_``, then the index that names it
    (both atomic; a crash between them leaves an index that does not match: not resumed)."""
    from .io import atomic_write

    stream.save(out / STATE_FILE, overwrite=True)
    index = json.dumps({"fingerprint": print_, "after": stem, "bad": bad, "state_sha256": file_digest(out / STATE_FILE),
                        "zsadapt": __version__})
    atomic_write(out / STATE_INDEX, lambda handle: handle.write(index), overwrite=True, mode="w")


def _label_adapting(stream: Any, shards: list, prints: list, states: list, report: LabelReport, *, out: Path,
                    top_k: int, batch_size: int, adapt_batch: int, overwrite: bool, skip_bad: bool, device: Any,
                    save_stream: Optional[Path], progress: bool) -> Any:
    """``label(adapt=True)``'s run: shard after shard in collection order, resuming from the saved
    state when its chain matches; returns the final stream. Complete outputs after the resume
    point are not rewritten, but their rows pass through the stream (its state needs them)."""
    import copy

    complete = [state == "complete" and not overwrite for state in states]
    first, bad = 0, []
    if not overwrite:
        p, resumed, bad = _saved_state(out, prints, complete, skip_bad, device)
        if resumed is not None:
            stream, first = resumed, p + 1
            note(f"label --adapt: going on from the stream saved after {shards[p].stem} ({resumed.n_images} images seen)")
    todo = [i for i in range(first, len(shards)) if not complete[i]]
    last = len(shards) - 1 if save_stream is not None else (todo[-1] if todo else first - 1)
    through = [i for i in range(first, last + 1) if complete[i]]
    report.replayed = sum(shards[i].rows for i in through)
    if through:
        note(f"label --adapt: {sum(shards[i].rows for i in through)} rows of {len(through)} complete shards pass "
             "through the stream again (not rewritten) to rebuild its state")
    report.skipped = [out / f"{s.stem}.parquet" for i, s in enumerate(shards) if complete[i]]
    report.bad = list(report.bad)
    columns = _Columns(stream.classnames, top_k)
    read_size = adapt_batch * max(1, batch_size // adapt_batch)  # a multiple: stream batches never depend on it
    bar = progress_bar(sum(shards[i].rows for i in range(first, last + 1)), "label --adapt: rows", show=progress)
    started = time.perf_counter()
    try:
        for i in range(first, last + 1):
            shard, target = shards[i], out / f"{shards[i].stem}.parquet"
            before = copy.deepcopy(stream)  # a bad shard is passed over: the state as before it
            per_batch = functools.partial(label_batch_adapting, stream, adapt_batch=adapt_batch, top_k=top_k)

            def batches(shard=shard, per_batch=per_batch):
                return _counted(label_in_order([shard], per_batch, batch_size=read_size), bar, started)

            try:
                if complete[i]:
                    for _ in batches():
                        pass
                else:
                    report.rows += write_shard(target, shard, batches(), columns=columns, expected=prints[i],
                                               batch_size=batch_size, counts=report.counts)
                    report.shards += 1
            except BadShard as err:
                if not skip_bad:
                    raise
                stream = before
                bad.append(i)
                report.bad.append(str(err))
                note(f"bad shard skipped: {err}")
            _write_state(out, stream, prints[i], shard.stem, bad)
    finally:
        bar.close()
    if save_stream is not None:
        stream.save(save_stream, overwrite=overwrite)
    return stream


# --- the entry point ---------------------------------------------------------------------------


def label(model: Any, source: PathLike, out: PathLike, *, engine: str = "local", column: str = DEFAULT_COLUMN,
          batch_size: int = DEFAULT_BATCH, top_k: int = 0, device: Any = None, overwrite: bool = False,
          skip_bad: bool = False, workers: Optional[int] = None, num_gpus: Optional[float] = None,
          address: Optional[str] = None, progress: bool = True, adapt: bool = False,
          adapt_batch: int = ADAPT_BATCH, save_stream: Optional[PathLike] = None) -> LabelReport:
    """Label every row of the embedding shards of ``source`` with a saved model.

    Parameters
    ----------
    model : path to a ``.safetensors`` model (or a :class:`zsadapt.models.SavedModel`); with
        ``adapt``, also a saved stream or a class text embeddings file (:func:`open_stream`)
    source : path
        A ``.npy`` file, a folder of ``.npy`` shards (clip-retrieval layout included), or parquet
        file(s) with an embedding ``column``.
    out : path
        Folder for ``<shard stem>.parquet`` outputs (created if missing).
    engine : {"local", "ray", "spark"}
    batch_size : int
        Rows per batch (memory is bounded by it) and per output row group.
    top_k : int
        Also write the K most probable labels and their probabilities.
    device : str, optional
        Torch device (``cuda``); default the CPU.
    overwrite : bool
        Redo every shard, replacing existing outputs.
    skip_bad : bool
        Pass over bad shards (listed in the report) instead of stopping at the first.
    workers : int, optional
        Ray labelling actors, each reading its own rows (default: one per CPU of the cluster; with
        ``device="cuda"``, its GPUs divided by ``num_gpus``) / Spark local threads (default: all).
    num_gpus : float, optional
        GPUs per Ray actor (default 1 with ``device="cuda"``: Ray hides GPUs from actors without).
    address : str, optional
        Ray cluster address (``ray.init(address=...)``); default a local Ray.
    progress : bool
        Rows done and rows/s on stderr (also silenced by :func:`zsadapt.set_quiet`).
    adapt : bool
        Label with a :class:`zsadapt.Stream` that adapts as it goes: the shards in collection
        order, each cut into stream batches of ``adapt_batch`` rows (a batch never spans two
        shards: a shard's last batch may be smaller, even one row), each batch refined with what
        the earlier ones taught the stream. Local engine only. After each finished shard the
        state is written to ``OUT/.zsadapt-stream.safetensors`` (with ``OUT/.zsadapt-stream.json``
        naming the shard it follows); a rerun goes on from it, so its files equal an
        uninterrupted run's. A bad shard passed over (``skip_bad``) leaves the state as before it.
    adapt_batch : int
        Rows per stream batch (default 128, the online protocol's batch).
    save_stream : path, optional
        With ``adapt``: write the final stream to this ``.safetensors`` (``zsadapt.load_model``
        / ``Stream.load`` read it; refused if it exists, unless ``overwrite``).

    Returns
    -------
    LabelReport
    """
    from .models import SavedModel

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    start_time = time.perf_counter()
    if adapt:
        if engine != "local":
            raise ValueError(f"--adapt runs one stream over the rows in collection order: it needs --engine local, "
                             f"not {engine}")
        if int(adapt_batch) < 1:
            raise ValueError(f"adapt_batch must be >= 1, got {adapt_batch}")
        if save_stream is not None:
            from .io import check_output

            save_stream = check_output(save_stream, overwrite=overwrite, suffix=".safetensors",
                                       inputs=[getattr(model, "path", model)])
        saved = None
    else:
        if save_stream is not None:
            raise ValueError("save_stream / --save-stream needs adapt / --adapt")
        saved = model if isinstance(model, SavedModel) else _plain_model(model, device)
        if top_k > saved.n_classes:
            raise ValueError(f"top_k={top_k} is more than the model's {saved.n_classes} classes")
    out = _output_folder(out, source)
    bad: list = []

    def passed_over(message: str) -> None:
        bad.append(message)
        note(f"bad shard skipped: {message}")

    shards = discover(source, column=column, on_bad=passed_over if skip_bad else None)
    if adapt:
        stream, stream_path = open_stream(model, dim=next((s.dim for s in shards if s.rows), None), device=device)
        if top_k > stream.n_classes:
            raise ValueError(f"top_k={top_k} is more than the stream's {stream.n_classes} classes")
        dim, model_name = stream.dim, stream_path.name
    else:
        dim, model_name = saved.n_features_in_, saved.path.name
    shards = _matching_dimension(shards, dim, model_name, passed_over if skip_bad else None)
    out.mkdir(parents=True, exist_ok=True)
    outputs = [out / f"{s.stem}.parquet" for s in shards]
    pending, expected, skipped = [], [], []
    model_digest = file_digest(stream_path if adapt else saved.path)  # once: a model fitted on a big pool is large
    prints = (adapt_fingerprints(model_digest, stream, shards, top_k=top_k, adapt_batch=adapt_batch) if adapt
              else [fingerprint(model_digest, shard, top_k) for shard in shards])
    states = [output_state(target, shard, print_) for shard, target, print_ in zip(shards, outputs, prints)]
    for shard, target, print_, state in zip(shards, outputs, prints, states):
        if state == "complete" and not overwrite:
            skipped.append(target)
        elif state != "missing" and not overwrite:
            raise _refused(target, state, adapt)
        else:
            pending.append(shard)
            expected.append(print_)
    if adapt:
        report = LabelReport(0, 0, skipped, bad, 0.0, np.zeros(stream.n_classes, dtype=np.int64),
                             stream.classnames, outputs)
        _label_adapting(stream, shards, prints, states, report, out=out, top_k=top_k, batch_size=batch_size,
                        adapt_batch=int(adapt_batch), overwrite=overwrite, skip_bad=skip_bad, device=device,
                        save_stream=save_stream, progress=progress)
        report.seconds = time.perf_counter() - start_time
        return report
    counts = np.zeros(saved.n_classes, dtype=np.int64)
    report = LabelReport(0, 0, skipped, bad, 0.0, counts, saved.classnames, outputs)
    if skipped:
        note(f"label: {len(skipped)} of {len(shards)} shards already complete, skipped")
    if pending:
        stream = _engine_stream(engine, saved, model_digest, pending, batch_size=batch_size, device=device,
                                top_k=top_k, workers=workers, num_gpus=num_gpus, address=address, progress=progress)
        _write_all(stream, pending, expected, report, out=out, saved=saved, top_k=top_k,
                   batch_size=batch_size, skip_bad=skip_bad, progress=progress)
    report.seconds = time.perf_counter() - start_time
    return report


def _output_folder(out: PathLike, source: PathLike) -> Path:
    """``out`` as a Path, refused when it is a file or the source folder itself."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if Path(source).is_dir() and out.exists() and os.path.samefile(out, source):
        # Outputs beside parquet shards would be read as input shards by the next run.
        raise ValueError(f"{out}: is the source folder; write the outputs to another folder")
    return out


def _matching_dimension(shards: list, dim: int, model_name: str, on_bad: Optional[Callable[[str], None]]) -> list:
    """The shards whose embeddings have the model's dimension ``dim``; another one is a
    :class:`BadShard` error, or, with ``on_bad``, reported to it and left out."""
    kept = []
    for shard in shards:
        if shard.rows and shard.dim != dim:
            error = BadShard(f"{shard.path}: {shard.dim}-d embeddings, the model {model_name} expects {dim}")
            if on_bad is None:
                raise error
            on_bad(str(error))
        else:
            kept.append(shard)
    return kept


def _refused(target: Path, state: str, adapt: bool) -> ValueError:
    """The error for an existing output ``target`` (:func:`output_state` ``"other"`` or
    ``"broken"``) that a run without ``overwrite`` must not replace."""
    if state == "other":
        return ValueError(f"{target}: exists and was made from another model, input or options"
                          f"{' (with --adapt: or earlier shards, or without --adapt)' if adapt else ''} "
                          "(pass --overwrite / overwrite=True to redo it)")
    return ValueError(f"{target}: exists but is not a readable parquet file (copied or edited "
                      "after zsadapt wrote it?); pass --overwrite / overwrite=True to redo it")


def _engine_stream(engine: str, saved: Any, model_digest: str, pending: list, *, batch_size: int, device: Any,
                   top_k: int, workers: Optional[int], num_gpus: Optional[float], address: Optional[str],
                   progress: bool) -> Iterator[tuple]:
    """The (shard index, batch or BadShard) stream of ``engine`` over the ``pending`` shards."""
    if engine == "local":
        per_batch = functools.partial(label_batch, saved, device=device, top_k=top_k)
        return label_in_order(pending, per_batch, batch_size=batch_size)
    torch_device = None if device is None else str(device)
    if engine == "ray":
        if progress:  # what the user waits for until the first labels (4-6 s here, docs/label.md)
            heartbeat("label: starting Ray and its labelling actors (each imports torch and loads the model)")
        return _ray_stream(saved.path, pending, batch_size=batch_size, device=torch_device, top_k=top_k,
                           workers=workers, num_gpus=num_gpus, address=address)
    if progress:
        heartbeat("label: starting Spark and its Python workers (each imports torch and loads the model)")
    return _spark_stream(saved.path, model_digest, pending, batch_size=batch_size, device=torch_device,
                         top_k=top_k, workers=workers)


def _counted(items: Iterable[tuple], bar: Any, started: float) -> Iterator[dict]:
    """The batches of an engine's (shard index, batch or error) ``items``, in order: an error is
    raised, and each batch moves the progress ``bar`` on by its rows, with rows/s since ``started``."""
    for _, item in items:
        if isinstance(item, BaseException):
            raise item
        done = bar.done + len(item["label"])
        bar.update(done, f"({done / max(time.perf_counter() - started, 1e-9):,.0f} rows/s)")
        yield item


def _plain_model(model: PathLike, device: Any) -> Any:
    """The saved model of ``label`` without ``adapt``; a one-line error for a saved stream or a
    class text embeddings file, which label only with ``adapt``."""
    from .models import load_model

    path = Path(model)
    kind = _file_format(path)
    if kind == "zsadapt-stream" or (kind is None and path.suffix.lower() in (".npy", ".npz", ".pt", ".pth")):
        what = "a saved stream" if kind else "a class text embeddings file (not a saved model)"
        raise ValueError(f"{path}: is {what}; it labels only with --adapt / adapt=True")
    return load_model(model, device=device)


def _write_all(stream: Iterator[tuple], pending: list, expected: list, report: LabelReport, *, out: Path,
               saved: Any, top_k: int, batch_size: int, skip_bad: bool, progress: bool) -> None:
    """Consume an engine's (shard index, batch or BadShard) stream, in shard order, and write each
    shard's output (``expected``: the shards' fingerprints)."""
    columns = _Columns(saved.classnames, top_k)
    bar = progress_bar(sum(s.rows for s in pending), "label: rows", show=progress)
    started = time.perf_counter()
    source = stream
    stream = itertools.groupby(source, key=lambda item: item[0])
    try:
        next_group = next(stream, None)
        for index, shard in enumerate(pending):
            matched = next_group is not None and next_group[0] == index
            batches = _counted(next_group[1] if matched else (), bar, started)
            try:
                report.rows += write_shard(out / f"{shard.stem}.parquet", shard, batches, columns=columns,
                                           expected=expected[index], batch_size=batch_size, counts=report.counts)
                report.shards += 1
            except BadShard as err:
                if not skip_bad:
                    raise
                report.bad.append(str(err))
                note(f"bad shard skipped: {err}")
            if matched:
                next_group = next(stream, None)  # groupby drops what the failed shard left unread
    finally:
        bar.close()
        # Stop the engine now, not when the generator is collected: a Ray job left running keeps
        # its actors' CPUs, and the next job on the same Ray would wait for them forever.
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
