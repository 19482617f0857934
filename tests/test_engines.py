"""``zsadapt label --engine ray|spark`` write byte-identical files to the local engine (Ray in local
mode, one cluster for the test session; Spark in ``local[2]``, skipped with the reason when there is
no Java), report bad shards as the local engine does, and a missing extra is a one-line error
saying what to install."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main
from zsadapt.extras import MissingExtra

C, D = 5, 12


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A model, a clip-retrieval folder (4 shards, one empty, float16, metadata) and a parquet
    folder (2 files, small row groups), labelled once by the local engine as the reference."""
    root = tmp_path_factory.mktemp("engines")
    pool = zsadapt.make_pool(n_images=200, n_classes=C, dim=D, seed=51)
    model = zsadapt.refine(pool.image_features, pool.text_features, "transclip").save(
        root / "model.safetensors", classnames=[f"k{c}" for c in range(C)])
    X = zsadapt.make_pool(n_images=700, n_classes=C, dim=D, seed=52).image_features
    (root / "coll" / "img_emb").mkdir(parents=True)
    (root / "coll" / "metadata").mkdir()
    (root / "pq").mkdir()
    bounds = [(0, 230), (230, 230), (230, 530), (530, 700)]
    for i, (a, b) in enumerate(bounds):
        np.save(root / "coll" / "img_emb" / f"img_emb_{i}.npy", X[a:b].astype(np.float16))
        pq.write_table(pa.table({"key": np.arange(a, b)}), root / "coll" / "metadata" / f"metadata_{i}.parquet")
    for i, (a, b) in enumerate([(0, 400), (400, 700)]):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(X[a:b].reshape(-1)), D)
        pq.write_table(pa.table({"id": np.arange(a, b), "emb": emb}), root / "pq" / f"part{i}.parquet",
                       row_group_size=64)
    for source, column in (("coll", "embedding"), ("pq", "emb")):
        zsadapt.label(model, root / source, root / f"local-{source}", column=column, batch_size=96, top_k=2)
    return root


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ray_writes_the_local_files(collection, ray_local, tmp_path):
    root = collection
    report = zsadapt.label(root / "model.safetensors", root / "coll", tmp_path / "npy", engine="ray",
                           batch_size=96, top_k=2, workers=2)
    assert report.rows == 700 and report.shards == 4
    _same_files(root / "local-coll", tmp_path / "npy")
    zsadapt.label(root / "model.safetensors", root / "pq", tmp_path / "pq", engine="ray", column="emb",
                  batch_size=96, top_k=2)
    _same_files(root / "local-pq", tmp_path / "pq")
    assert ray_local.is_initialized()  # a Ray the caller started is left running
    # Resuming works across engines: the local engine finds the Ray outputs complete.
    again = zsadapt.label(root / "model.safetensors", root / "coll", tmp_path / "npy", batch_size=96, top_k=2)
    assert again.rows == 0 and len(again.skipped) == 4


def test_ray_leaves_stderr_to_zsadapt(collection, ray_local, tmp_path, capfd):
    """A Ray run says on stderr only what zsadapt says (its start, progress): before, Ray Data's
    actors added an error line from Ray's C++ core for each actor (constructor arguments in the
    object store with restarts on) and a "progress bars disabled" warning."""
    zsadapt.label(collection / "model.safetensors", collection / "coll", tmp_path / "out", engine="ray",
                  batch_size=96, workers=2, progress=True)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert all(line.startswith("zsadapt:") for line in lines), lines


def test_ray_bad_shard_as_local(collection, ray_local, tmp_path):
    root = collection
    X = np.load(root / "coll" / "img_emb" / "img_emb_2.npy")
    X[123] = np.nan
    (tmp_path / "img_emb").mkdir()
    for i in range(4):
        data = X if i == 2 else np.load(root / "coll" / "img_emb" / f"img_emb_{i}.npy")
        np.save(tmp_path / "img_emb" / f"img_emb_{i}.npy", data)
    errors = {}
    for engine in ("local", "ray"):
        with pytest.raises(ValueError) as info:
            zsadapt.label(root / "model.safetensors", tmp_path / "img_emb", tmp_path / f"out-{engine}",
                          engine=engine, batch_size=96)
        errors[engine] = str(info.value)
        assert "img_emb_2.npy" in errors[engine] and "NaN" in errors[engine]
        report = zsadapt.label(root / "model.safetensors", tmp_path / "img_emb", tmp_path / f"out-{engine}",
                               engine=engine, batch_size=96, skip_bad=True)
        assert len(report.bad) == 1 and report.shards == 1  # shard 3 (0 and 1 were done before the error)
    assert "row 123" in errors["local"] and errors["ray"] == errors["local"]
    _same_files(tmp_path / "out-local", tmp_path / "out-ray")


def test_spark_writes_the_local_files(collection, spark_local, tmp_path):
    root = collection
    report = zsadapt.label(root / "model.safetensors", root / "coll", tmp_path / "npy", engine="spark",
                           batch_size=96, top_k=2)
    assert report.rows == 700
    _same_files(root / "local-coll", tmp_path / "npy")
    zsadapt.label(root / "model.safetensors", root / "pq", tmp_path / "pq", engine="spark", column="emb",
                  batch_size=96, top_k=2)
    _same_files(root / "local-pq", tmp_path / "pq")
    # Spark reuses its Python workers: a model re-saved at the same path must be reloaded there.
    pool = zsadapt.make_pool(n_images=200, n_classes=C, dim=D, seed=51)
    path = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot").save(tmp_path / "m.safetensors")
    zsadapt.label(path, root / "coll", tmp_path / "first", engine="spark", batch_size=96)
    zsadapt.refine(pool.image_features, pool.text_features, "gmm").save(path, overwrite=True)
    zsadapt.label(path, root / "coll", tmp_path / "spark2", engine="spark", batch_size=96)
    zsadapt.label(path, root / "coll", tmp_path / "local2", batch_size=96)
    _same_files(tmp_path / "local2", tmp_path / "spark2")


def test_spark_tasks_of_one_worker_load_the_model_once(collection, monkeypatch):
    """Spark runs every task from a fresh unpickling of the ``mapInPandas`` function; the model
    cache must outlive it, in the worker's imported module. Before, it was a global of the pickled
    closure, copied empty into each task: one load per task, where once per worker was meant."""
    cloudpickle = pytest.importorskip("pyspark.cloudpickle")
    import pandas as pd

    from zsadapt import labelling, models
    from zsadapt.labelling import on_spark

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(on_spark, "_SPARK_MODELS", {})
    shards = labelling.discover(collection / "coll")
    path = str(collection / "model.safetensors")
    task = cloudpickle.dumps(on_spark.spark_partition(path, labelling.file_digest(Path(path)), shards, None, 0))
    for start in (0, 96):  # two tasks of the same worker
        frame = pd.DataFrame({"shard": [0], "start": [start], "stop": [start + 96]})
        (out,) = list(pickle.loads(task)([frame]))
        assert out["error"][0] == "" and len(on_spark.unpack(out["label"][0])) == 96
    assert len(loads) == 1


def test_spark_command_leaves_stderr_to_zsadapt(collection, spark_local, tmp_path):
    """``zsadapt label --engine spark`` in a fresh process (it starts its own local Spark): stderr
    holds zsadapt's lines and the JVM's notice of incubator modules, nothing else. Before, Spark's
    start-up log lines (default profile, host name, native libraries, "Setting default log
    level") and PySpark's warning about pandas 3 came with them."""
    done = subprocess.run([sys.executable, "-c", "from zsadapt.cli.main import main; main()", "label",
                           str(collection / "model.safetensors"), str(collection / "coll"), "--out",
                           str(tmp_path / "out"), "--engine", "spark", "--workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert all(line.startswith("zsadapt:") or "incubator modules" in line for line in lines), lines


@pytest.mark.parametrize("engine, module, extra", [("ray", "ray", "ray"), ("spark", "pyspark.sql", "spark")])
def test_missing_extra_is_one_line(collection, engine, module, extra, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=rf"--engine {engine} needs .*pip install 'zsadapt\[{extra}\]'"):
        zsadapt.label(collection / "model.safetensors", collection / "coll", tmp_path / "out", engine=engine)
    result = CliRunner().invoke(main, ["label", str(collection / "model.safetensors"), str(collection / "coll"),
                                       "--out", str(tmp_path / "out2"), "--engine", engine])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"pip install 'zsadapt[{extra}]'" in errors[0]
