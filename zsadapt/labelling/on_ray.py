"""``--engine ray``: Ray Data over one item per (shard, batch of rows), ``map_batches`` with
:class:`RayLabeller` (the model loaded once per actor, which reads its own rows) and
``preserve_order``: the driver receives the labels in input order (:func:`ray_stream`)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .batch import empty_batch, label_batch
from .engines import EngineError, engine_error
from .shards import BadShard, read_rows


class RayLabeller:
    """Ray Data ``map_batches`` callable: loads the model once per actor; each call labels the row
    ranges it is given (``shard``, ``start``, ``stop`` columns), read by the actor itself."""

    def __init__(self, model_path: str, shards: list, device: Optional[str], top_k: int) -> None:
        import torch

        from ..models import load_model

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
                out = {k: np.zeros((1,) + v.shape[1:], v.dtype) for k, v in empty_batch(self.top_k).items()}
                out["error"] = np.array([str(err)], dtype=object)
            out["shard"] = np.full(len(out["label"]), int(index), dtype=np.int64)
            parts.append(out)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def ray_stream(model_path: Path, shards: list, *, batch_size: int, device: Optional[str], top_k: int,
               workers: Optional[int], num_gpus: Optional[float], address: Optional[str]) -> Iterator[tuple]:
    """(shard index, label batch) in order, labelled by Ray Data actors (:class:`RayLabeller`,
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

    from ..extras import require

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
                RayLabeller, fn_constructor_kwargs={"model_path": str(model_path), "shards": shards,
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
                raise EngineError(f"--engine ray: the Ray Data job failed ({engine_error(err)})") from None
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
