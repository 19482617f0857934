"""``--engine spark``: one ``mapInPandas`` item per (shard, batch of rows), read where the task
runs, the model loaded once per Python worker (:func:`spark_model`); the labels come back to the
driver as ``.npy`` bytes, in input order (:func:`spark_stream`)."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .batch import empty_batch, label_batch
from .engines import EngineError, engine_error
from .shards import BadShard, read_rows

#: Models loaded by this Python worker, keyed by (path, file digest, device): see :func:`spark_model`.
_SPARK_MODELS: dict = {}


def spark_model(model_path: str, model_digest: str, device: Optional[str]) -> Any:
    """The saved model, loaded once per Spark Python worker. Spark reuses its workers across tasks
    and jobs, and runs each task's function from a fresh unpickling of it: a cache held by that
    function (a closure's globals are pickled by value) would start empty on every task, where
    this module-level one, imported by the worker, lasts. Keyed by the file's digest, so a model
    re-saved at the same path is reloaded."""
    key = (model_path, model_digest, device)
    if key not in _SPARK_MODELS:
        import torch

        from ..models import load_model

        torch.set_num_threads(1)  # Spark runs one Python worker per task slot
        _SPARK_MODELS[key] = load_model(model_path, device=device)
    return _SPARK_MODELS[key]


def spark_partition(model_path: str, model_digest: str, shards: list, device: Optional[str], top_k: int):
    """The ``mapInPandas`` function: one output row per (shard, start, stop) item, holding the
    labels as bytes; the model comes from :func:`spark_model` (once per Python worker)."""

    def run(frames):
        import pandas as pd

        model = spark_model(model_path, model_digest, device)
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
                    labels, error = empty_batch(top_k), str(err)
                out.append({"shard": int(index), "start": int(start), "error": error,
                           **{k: pack(v) for k, v in labels.items()}})
            yield pd.DataFrame(out, columns=["shard", "start", "error"] + list(empty_batch(top_k)))

    return run


def pack(array: np.ndarray) -> bytes:
    """An array as .npy bytes (shape and dtype included), for a Spark binary column."""
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def unpack(blob: bytes) -> np.ndarray:
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

    from ..io import atomic_write

    digest = hashlib.sha256(SPARK_LOG_CONFIG.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"zsadapt-spark-log4j2-{digest}.properties"
    if not path.exists():
        atomic_write(path, lambda handle: handle.write(SPARK_LOG_CONFIG), overwrite=True, mode="w")
    return str(path)


def spark_stream(model_path: Path, model_digest: str, shards: list, *, batch_size: int, device: Optional[str],
                 top_k: int, workers: Optional[int]) -> Iterator[tuple]:
    """(shard index, label batch) in order, labelled by Spark ``mapInPandas`` tasks: one item per
    (shard, batch of rows), each read where it runs (the paths must be visible to the executors).

    Uses the active SparkSession, else starts ``local[workers]`` (stopped at the end) whose Python
    workers run this interpreter.
    """
    from ..extras import require

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
        fields = ", ".join(f"{k} binary" for k in empty_batch(top_k))
        result = frame.mapInPandas(spark_partition(str(model_path), model_digest, shards, device, top_k),
                                   schema=f"shard int, start long, error string, {fields}")
        rows = result.toLocalIterator(prefetchPartitions=True)
        while True:
            try:
                row = next(rows, None)
            except Exception as err:  # a failed Spark job: its Python error, in one line
                raise EngineError(f"--engine spark: the Spark job failed ({engine_error(err)})") from None
            if row is None:
                return
            if row["error"]:
                yield row["shard"], BadShard(row["error"])
            else:
                yield row["shard"], {k: unpack(row[k]) for k in empty_batch(top_k)}
    finally:
        if started:
            spark.stop()
