"""The engines: what turns shards into a stream of (shard index, label batch) in collection
order, for the driver to write.

* ``local``: :func:`label_in_order`, one reader thread ahead of the compute. It takes any
  per-batch callable, which is where a labeller that adapts as it goes plugs in;
* ``ray``: :mod:`zsadapt.labelling.on_ray`;
* ``spark``: :mod:`zsadapt.labelling.on_spark`.

:func:`engine_stream` picks one; a batch that fails comes through the stream as a
:class:`~zsadapt.labelling.shards.BadShard` in its place, and a Ray or Spark job that fails for
another reason raises :class:`EngineError`.
"""

from __future__ import annotations

import functools
import queue
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

from ..messages import heartbeat
from .batch import label_batch
from .shards import BadShard, read_batches

ENGINES = ("local", "ray", "spark")


class EngineError(RuntimeError):
    """A Ray or Spark run failed for a reason other than a bad shard (one line: what failed)."""

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


def engine_error(err: BaseException) -> str:
    """The last line of the Python traceback inside a Spark or Ray error (``ModuleNotFoundError:
    ...``), else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    python = [line for line in lines if re.match(r"^[A-Za-z_.]+(Error|Exception): ", line)]
    return python[-1] if python else (lines[0] if lines else type(err).__name__)


def engine_stream(engine: str, saved: Any, model_digest: str, pending: list, *, batch_size: int, device: Any,
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
        from .on_ray import ray_stream

        return ray_stream(saved.path, pending, batch_size=batch_size, device=torch_device, top_k=top_k,
                           workers=workers, num_gpus=num_gpus, address=address)
    if progress:
        heartbeat("label: starting Spark and its Python workers (each imports torch and loads the model)")
    from .on_spark import spark_stream

    return spark_stream(saved.path, model_digest, pending, batch_size=batch_size, device=torch_device,
                         top_k=top_k, workers=workers)


def counted(items: Iterable[tuple], bar: Any) -> Iterator[dict]:
    """The batches of an engine's (shard index, batch or error) ``items``, in order: an error is
    raised, and each batch moves the progress ``bar`` on by its rows."""
    for _, item in items:
        if isinstance(item, BaseException):
            raise item
        bar.update(bar.done + len(item["label"]))
        yield item
