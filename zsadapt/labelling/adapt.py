"""Labelling that adapts as it goes (``label(adapt=True)``, ``zsadapt label --adapt``).

A :class:`zsadapt.Stream` (:func:`open_stream`: from a saved stream, a saved model's class text
embeddings, or a text file) refines the rows shard after shard, in stream batches of
``adapt_batch`` rows cut afresh at each shard (:func:`label_batch_adapting`), local engine only.
Each output's fingerprint chains those of the shards before it (:func:`adapt_fingerprints`): its
labels depend on every earlier row. After each finished shard the stream is saved to
``OUT/.zsadapt-stream.safetensors`` and ``OUT/.zsadapt-stream.json`` names the shard it follows
and the state file's digest; a rerun whose complete outputs reach that shard goes on from the
state, otherwise the stream starts over and the rows of complete outputs pass through it again
(they are not rewritten). A bad shard passed over (``skip_bad``) leaves the state as it was
before the shard.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .._version import __version__
from ..messages import first_line, note, progress as progress_bar
from .batch import check_rows
from .engines import counted, label_in_order
from .output import LabelColumns, file_digest, fingerprint, write_shard
from .shards import BadShard

if TYPE_CHECKING:
    from .job import LabelReport

# --- adapting as it goes (--adapt) -------------------------------------------------------------

#: Rows per stream batch of ``label(adapt=True)``: the online protocol's batch (benchmarks/realistic.py).
ADAPT_BATCH = 128
#: The stream state after the last finished shard, beside the outputs (``adapt``), and what it follows.
STATE_FILE = ".zsadapt-stream.safetensors"
STATE_INDEX = ".zsadapt-stream.json"


def file_format(path: Path) -> Optional[str]:
    """The ``format`` metadata entry of a ``.safetensors`` file (``zsadapt-model``, ``zsadapt-stream``),
    else None (other files, or a safetensors file without one)."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    from ..models import _check_header

    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception as err:
        raise ValueError(f"{path}: not a readable .safetensors file ({first_line(err)})") from None


def _class_text_file(path: Path) -> tuple:
    """``(text (C, d) or (C, P, d) or (d, C), classnames or None)`` of a class text embeddings file
    (what ``zsadapt refine --text-features`` reads: ``.npy``, or a pool format holding one array or
    ``text_features``, with its per-template embeddings when ``zsadapt encode`` wrote them)."""
    from ..io import _read_named, _text_of, read_arrays

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
    from ..models import SavedModel, class_text, load_model
    from ..stream import Stream, _streams

    if isinstance(model, Stream):
        raise TypeError("label(adapt=True) takes a path to a saved stream (Stream.save), not a Stream object")
    path = Path(model.path if isinstance(model, SavedModel) else model)
    kind = file_format(path)
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
    check_rows(t, name, first_row)  # before any refine: a bad row changes nothing
    labels, confidence, top_labels, top_probs = [], [], [], []
    for start in range(0, t.shape[0], adapt_batch):
        try:
            probs = stream.refine(t[start:start + adapt_batch]).probs.float()  # (b', C)
        except ValueError as err:
            raise BadShard(f"{name}: rows {first_row + start} to {first_row + min(start + adapt_batch, len(t)) - 1}: "
                           f"{first_line(err)}") from None
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
    from ..stream import Stream

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
        note(f"label --adapt: cannot resume from {state} ({first_line(err)}); starting the stream over")
        return -1, None, []


def _write_state(out: Path, stream: Any, print_: str, stem: str, bad: list) -> None:
    """The stream state after the shard of fingerprint ``print_``, then the index that names it
    (both atomic; a crash between them leaves an index that does not match: not resumed)."""
    from ..io import atomic_write

    stream.save(out / STATE_FILE, overwrite=True)
    index = json.dumps({"fingerprint": print_, "after": stem, "bad": bad, "state_sha256": file_digest(out / STATE_FILE),
                        "zsadapt": __version__})
    atomic_write(out / STATE_INDEX, lambda handle: handle.write(index), overwrite=True, mode="w")


def label_adapting(stream: Any, shards: list, prints: list, states: list, report: LabelReport, *, out: Path,
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
            note(f"label --adapt: going on from the stream saved after {shards[p].stem} "
                 f"({resumed.n_images} images seen)")
    todo = [i for i in range(first, len(shards)) if not complete[i]]
    last = len(shards) - 1 if save_stream is not None else (todo[-1] if todo else first - 1)
    through = [i for i in range(first, last + 1) if complete[i]]
    report.replayed = sum(shards[i].rows for i in through)
    if through:
        note(f"label --adapt: {sum(shards[i].rows for i in through)} rows of {len(through)} complete shards pass "
             "through the stream again (not rewritten) to rebuild its state")
    report.skipped = [out / f"{s.stem}.parquet" for i, s in enumerate(shards) if complete[i]]
    report.bad = list(report.bad)
    columns = LabelColumns(stream.classnames, top_k)
    read_size = adapt_batch * max(1, batch_size // adapt_batch)  # a multiple: stream batches never depend on it
    rows = sum(shards[i].rows for i in range(first, last + 1))
    bar = progress_bar(rows, "label --adapt: rows", show=progress, eta=True, unit="rows")
    try:
        for i in range(first, last + 1):
            shard, target = shards[i], out / f"{shards[i].stem}.parquet"
            before = copy.deepcopy(stream)  # a bad shard is passed over: the state as before it
            per_batch = functools.partial(label_batch_adapting, stream, adapt_batch=adapt_batch, top_k=top_k)

            def batches(shard=shard, per_batch=per_batch):
                return counted(label_in_order([shard], per_batch, batch_size=read_size), bar)

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
