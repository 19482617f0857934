"""The shards of a source: finding them (:func:`discover`) and reading their rows in bounded
batches, in their stored dtype, with the columns they carry into the outputs.

Sources:

* one ``.npy`` file (N, d), any float dtype (float16 is read as it is and upcast per batch);
* a folder of ``.npy`` shards, or clip-retrieval's layout ``img_emb/img_emb_N.npy`` with
  ``metadata/metadata_N.parquet`` beside it, whose columns are carried into the output row for row;
* one parquet file or a folder of them, with the embeddings in a list column (``column``); the
  other columns are carried along (a folder with both kinds of file: its ``.npy`` shards, and a note).

A shard that cannot be read is a :class:`BadShard`, whose message names the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from ..messages import first_line, note

PathLike = Union[str, os.PathLike]

#: Bytes of the buffered stream through which a parquet file is read (sequential reads, which
#: suit local and network file systems alike). pyarrow's default (``pre_buffer=True`` in recent
#: versions) instead fetches every selected column chunk of the file, all row groups, up front:
#: reading a 400,000 x 512 float32 shard (820 MB) in batches of 16,384 rows held 870 MB of Arrow
#: memory in row groups of 65,536 rows as in one, against 100 MB through a 1 MiB stream (2,048-row
#: batches: 800 MB against 15 MB), and took 3.2-4.0 s against 1.3-2.0 s.
PARQUET_READ_BUFFER = 1 << 20

DEFAULT_BATCH = 65536
DEFAULT_COLUMN = "embedding"


class BadShard(ValueError):
    """A shard that cannot be labelled (wrong dimension, corrupt, NaN rows); the message names it."""


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

# --- finding the shards ------------------------------------------------------------------------


def _natural(path: Path) -> tuple:
    """Sort key: img_emb_2 before img_emb_10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def _npy_shape(path: Path) -> tuple:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        from ..io import npy_problem

        raise BadShard(f"{path}: cannot be read as .npy ({npy_problem(path) or first_line(err)})") from None
    if array.ndim != 2:
        raise BadShard(f"{path}: expected a 2-D array of embeddings (N, d), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise BadShard(f"{path}: expected float embeddings, got dtype {array.dtype}")
    return array.shape


def open_parquet(path: Path) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` that reads as a stream (:data:`PARQUET_READ_BUFFER`):
    memory follows the batch read, not the file or its row groups."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)


def _parquet_rows(path: Path) -> int:
    try:
        return open_parquet(path).metadata.num_rows
    except Exception as err:
        raise BadShard(f"{path}: cannot be read as parquet ({first_line(err)})") from None


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
    for batch in open_parquet(path).iter_batches(batch_size=1, columns=[column]):
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
    try:
        for batch in open_parquet(shard.path).iter_batches(batch_size=batch_size, columns=[shard.column]):
            yield _embedding_array(batch.column(0), shard)
    except BadShard:
        raise
    except Exception as err:
        raise BadShard(f"{shard.path}: cannot be read as parquet ({first_line(err)})") from None


def read_rows(shard: Shard, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the shard (for engines that hand out row ranges). A parquet shard
    is read from the first row group that holds them, in batches of ``stop - start`` rows, up to
    ``stop``: the rows of that group before ``start`` are decoded and dropped (parquet has no
    cheaper way to them), but memory stays that of one batch however large the group."""
    if shard.kind == "npy":
        return _npy_rows(shard, start, stop)
    if stop <= start:
        return np.zeros((0, shard.dim), dtype=np.float32)
    import pyarrow as pa

    try:
        handle = open_parquet(shard.path)
        groups, offset = [], None
        row = 0
        for g in range(handle.metadata.num_row_groups):
            size = handle.metadata.row_group(g).num_rows
            if row < stop and row + size > start:
                groups.append(g)
                offset = row if offset is None else offset  # the first row of the groups read
            row += size
        parts = []
        for batch in handle.iter_batches(batch_size=stop - start, row_groups=groups, columns=[shard.column]):
            low, high = max(start - offset, 0), min(stop - offset, batch.num_rows)
            if high > low:
                parts.append(batch.column(0).slice(low, high - low))
            offset += batch.num_rows
            if offset >= stop:
                break
        column = pa.concat_arrays(parts)
    except Exception as err:
        raise BadShard(f"{shard.path}: cannot be read as parquet ({first_line(err)})") from None
    return _embedding_array(column, shard)


def _npy_rows(shard: Shard, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a ``.npy`` shard in its stored dtype, copied out of a memory map (so
    the read happens on the calling thread); :class:`BadShard` for a file shorter than its header
    says (cut short since it was discovered)."""
    try:
        return np.array(np.load(shard.path, mmap_mode="r", allow_pickle=False)[start:stop])
    except (OSError, ValueError) as err:
        raise BadShard(f"{shard.path}: cannot be read ({first_line(err)})") from None


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
    other columns), read in order as the labels are written: :meth:`take` the next n rows, read
    ``batch_size`` rows at a time."""

    def __init__(self, shard: Shard, batch_size: int) -> None:
        import pyarrow as pa

        self.pa = pa
        self.names: list = []
        if shard.carried is not None:
            handle = open_parquet(shard.carried)
            self.names = [n for n in handle.schema_arrow.names if n != shard.column]
            self.schema = handle.schema_arrow
        self.source = handle.iter_batches(batch_size=batch_size, columns=self.names) if self.names else None
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
