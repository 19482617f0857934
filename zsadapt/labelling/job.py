"""One labelling job: :func:`label` finds the shards, skips the complete outputs, runs an engine
over the rest and writes them; :class:`LabelReport` says what it did."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..messages import note, progress as progress_bar
from .adapt import ADAPT_BATCH, adapt_fingerprints, file_format, label_adapting, open_stream
from .engines import ENGINES, counted, engine_stream
from .output import LabelColumns, file_digest, fingerprint, output_state, write_shard
from .shards import DEFAULT_BATCH, DEFAULT_COLUMN, BadShard, PathLike, discover


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
        Rows done, rows/s and the time left on stderr (also silenced by :func:`zsadapt.set_quiet`).
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
    from ..models import SavedModel

    _check_options(engine, batch_size, top_k, adapt, adapt_batch)
    start_time = time.perf_counter()
    if adapt:
        if save_stream is not None:
            from ..io import check_output

            save_stream = check_output(save_stream, overwrite=overwrite, suffix=".safetensors",
                                       inputs=[getattr(model, "path", model)])
        saved = None
    else:
        if save_stream is not None:
            raise ValueError("save_stream / --save-stream needs adapt / --adapt")
        saved = model if isinstance(model, SavedModel) else _plain_model(model, device)
        if top_k > saved.n_classes:
            raise ValueError(f"top_k={top_k} is more than the model's {saved.n_classes} classes")
    out = _output_folder(out)
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
    _refuse_input_folder(out, source, shards)
    with _new_folder_removed_on_failure(out):
        outputs = [out / f"{s.stem}.parquet" for s in shards]
        model_digest = file_digest(stream_path if adapt else saved.path)  # once: a model fitted on a big pool is large
        prints = (adapt_fingerprints(model_digest, stream, shards, top_k=top_k, adapt_batch=adapt_batch) if adapt
                  else [fingerprint(model_digest, shard, top_k) for shard in shards])
        states = [output_state(target, shard, print_) for shard, target, print_ in zip(shards, outputs, prints)]
        pending, expected, skipped = _plan(shards, outputs, prints, states, overwrite=overwrite, adapt=adapt)
        if adapt:
            report = LabelReport(0, 0, skipped, bad, 0.0, np.zeros(stream.n_classes, dtype=np.int64),
                                 stream.classnames, outputs)
            label_adapting(stream, shards, prints, states, report, out=out, top_k=top_k, batch_size=batch_size,
                           adapt_batch=int(adapt_batch), overwrite=overwrite, skip_bad=skip_bad, device=device,
                           save_stream=save_stream, progress=progress)
            report.seconds = time.perf_counter() - start_time
            return report
        counts = np.zeros(saved.n_classes, dtype=np.int64)
        report = LabelReport(0, 0, skipped, bad, 0.0, counts, saved.classnames, outputs)
        if skipped:
            note(f"label: {len(skipped)} of {len(shards)} shards already complete, skipped")
        if pending:
            stream = engine_stream(engine, saved, model_digest, pending, batch_size=batch_size, device=device,
                                    top_k=top_k, workers=workers, num_gpus=num_gpus, address=address, progress=progress)
            _write_all(stream, pending, expected, report, out=out, saved=saved, top_k=top_k,
                       batch_size=batch_size, skip_bad=skip_bad, progress=progress)
        report.seconds = time.perf_counter() - start_time
        return report


def _check_options(engine: str, batch_size: int, top_k: int, adapt: bool, adapt_batch: int) -> None:
    """One-line errors for :func:`label` options out of range or that do not go together."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if adapt and engine != "local":
        raise ValueError(f"--adapt runs one stream over the rows in collection order: it needs --engine local, "
                         f"not {engine}")
    if adapt and int(adapt_batch) < 1:
        raise ValueError(f"adapt_batch must be >= 1, got {adapt_batch}")


def _plan(shards: list, outputs: list, prints: list, states: list, *, overwrite: bool, adapt: bool) -> tuple:
    """(pending shards, their fingerprints, skipped outputs): a complete output is skipped, a
    missing one is (re)done, and any other existing output is refused, unless ``overwrite``
    (:func:`output_state` gives each output's state)."""
    pending, expected, skipped = [], [], []
    for shard, target, print_, state in zip(shards, outputs, prints, states):
        if state == "complete" and not overwrite:
            skipped.append(target)
        elif state != "missing" and not overwrite:
            raise _refused(target, state, adapt)
        else:
            pending.append(shard)
            expected.append(print_)
    return pending, expected, skipped


@contextmanager
def _new_folder_removed_on_failure(out: Path):
    """Make ``out`` (and its missing parents) for the block; if the block fails, remove the folders
    it made that are still empty: a refused run leaves no trace."""
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def _output_folder(out: PathLike) -> Path:
    """``out`` as a Path, refused when it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    return out


def _refuse_input_folder(out: Path, source: PathLike, shards: list) -> None:
    """Refuse an ``out`` that holds the source's files: the source folder, the folder of its
    shards (``SOURCE/img_emb``) or of the files carried along (``SOURCE/metadata``, parquet shards).
    Outputs there would be read as input by the next run, and a parquet shard's output has the
    shard's own name. A lone ``.npy`` file's folder is allowed: its output cannot take its name."""
    if not out.exists():
        return
    folders = {Path(source)} if Path(source).is_dir() else set()
    for shard in shards:
        if shard.kind != "npy" or Path(source).is_dir():
            folders.add(shard.path.parent)
        if shard.carried is not None:
            folders.add(shard.carried.parent)
    for folder in folders:
        if folder.exists() and os.path.samefile(out, folder):
            what = "the source folder" if folder == Path(source) else f"the folder of the source's files ({folder})"
            raise ValueError(f"{out}: is {what}; write the outputs to another folder")


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


def _plain_model(model: PathLike, device: Any) -> Any:
    """The saved model of ``label`` without ``adapt``; a one-line error for a saved stream or a
    class text embeddings file, which label only with ``adapt``."""
    from ..models import load_model

    path = Path(model)
    kind = file_format(path)
    if kind == "zsadapt-stream" or (kind is None and path.suffix.lower() in (".npy", ".npz", ".pt", ".pth")):
        what = "a saved stream" if kind else "a class text embeddings file (not a saved model)"
        raise ValueError(f"{path}: is {what}; it labels only with --adapt / adapt=True")
    return load_model(model, device=device)


def _write_all(stream: Iterator[tuple], pending: list, expected: list, report: LabelReport, *, out: Path,
               saved: Any, top_k: int, batch_size: int, skip_bad: bool, progress: bool) -> None:
    """Consume an engine's (shard index, batch or BadShard) stream, in shard order, and write each
    shard's output (``expected``: the shards' fingerprints)."""
    columns = LabelColumns(saved.classnames, top_k)
    bar = progress_bar(sum(s.rows for s in pending), "label: rows", show=progress, eta=True, unit="rows")
    source = stream
    stream = itertools.groupby(source, key=lambda item: item[0])
    try:
        next_group = next(stream, None)
        for index, shard in enumerate(pending):
            matched = next_group is not None and next_group[0] == index
            batches = counted(next_group[1] if matched else (), bar)
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
