"""The per-batch function every engine runs: a read batch of embeddings in, labels out.

:func:`label_batch` upcasts, checks (:func:`check_rows`) and predicts a (b, d) batch with a saved
model, in cache-sized blocks on the CPU; :func:`empty_batch` is the 0-row result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..validation import l2_normalise, plain_unit_rows
from .shards import BadShard

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
        unit = check_rows(source[rows].to(where).float(), name, first_row + start)  # (b', d) unit rows
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


def check_rows(t: Any, name: str, first_row: int) -> Any:
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


def empty_batch(top_k: int) -> dict:
    """A label batch of 0 rows (the columns of an empty shard's output)."""
    out = {"label": np.zeros(0, np.int64), "confidence": np.zeros(0, np.float32)}
    if top_k:
        out["top_labels"], out["top_probs"] = np.zeros((0, top_k), np.int64), np.zeros((0, top_k), np.float32)
    return out
