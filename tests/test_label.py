"""``zsadapt label`` / ``zsadapt.label`` with the local engine: every output row equals the saved
model's ``predict`` / ``predict_proba`` on the input row, in input order, with carried metadata;
resuming leaves finished files untouched; bad shards are one-line errors naming the file (or
skipped with ``skip_bad``) and lose nothing already written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main
from zsadapt.labelling import BadShard, discover, read_batches, read_rows
from zsadapt.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, D = 6, 16
NAMES = [f"class {c}" for c in range(C)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    pool = zsadapt.make_pool(n_images=300, n_classes=C, dim=D, seed=21)
    result = zsadapt.refine(pool.image_features, pool.text_features, "zlap")
    return result.save(tmp_path_factory.mktemp("model") / "model.safetensors", classnames=NAMES)


@pytest.fixture(scope="module")
def model(model_path):
    return load_model(model_path)


def _embeddings(n, seed, dtype=np.float16):
    """New images like the pool's, not unit-norm, stored as clip-retrieval stores them (float16)."""
    X = zsadapt.make_pool(n_images=max(n, 2), n_classes=C, dim=D, seed=seed).image_features[:n]
    return (X * np.random.default_rng(seed).uniform(0.5, 2.0, (n, 1))).astype(dtype)


def _clip_retrieval(root, sizes, seed=30):
    """``root/img_emb/img_emb_i.npy`` + ``root/metadata/metadata_i.parquet`` (url, caption)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    arrays, start = [], 0
    for i, n in enumerate(sizes):
        X = _embeddings(n, seed + i)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", X)
        ids = np.arange(start, start + n)
        pq.write_table(pa.table({"url": [f"https://x/{j}.jpg" for j in ids], "key": ids}),
                       root / "metadata" / f"metadata_{i}.parquet")
        arrays.append(X)
        start += n
    return arrays


def _check_rows(table, model, X, top_k=0):
    """The output table's label columns against the model's own predictions on ``X``."""
    probs = model.predict_proba(X.astype(np.float32))  # (n, C)
    assert table.column("label").type == pa.int64() and table.column("confidence").type == pa.float32()
    np.testing.assert_array_equal(table.column("label").to_numpy(), model.predict(X.astype(np.float32)))
    np.testing.assert_allclose(table.column("confidence").to_numpy(), probs.max(axis=1), rtol=0, atol=1e-6)
    assert table.column("classname").to_pylist() == [NAMES[c] for c in probs.argmax(axis=1)]
    if top_k:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        top_labels = np.array(table.column("top_labels").to_pylist())
        top_probs = np.array(table.column("top_probs").to_pylist())
        np.testing.assert_allclose(top_probs, np.take_along_axis(probs, order, axis=1), atol=1e-6)
        np.testing.assert_array_equal(top_labels[:, 0], probs.argmax(axis=1))
        np.testing.assert_allclose(np.take_along_axis(probs, top_labels, axis=1), top_probs, atol=1e-6)
        assert table.column("top_classnames").to_pylist() == [[NAMES[c] for c in row] for row in top_labels]


def _cli(*args):
    return CliRunner().invoke(main, ["label", *[str(a) for a in args]], catch_exceptions=True)


def _one_error_line(result, *fragments):
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def _state(folder):
    """(inode, mtime_ns, bytes) of every file in ``folder`` (not in its subfolders)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())
            if p.is_file()}


# --- what is written -------------------------------------------------------------------------------


def test_single_npy_equals_predict(model_path, model, tmp_path):
    X = _embeddings(257, seed=1)
    np.save(tmp_path / "emb.npy", X)
    result = _cli(model_path, tmp_path / "emb.npy", "--out", tmp_path / "out", "--batch-size", 100, "--quiet")
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith("labelled 257 rows in 1 shards") and "rows/s" in line
    counts = np.bincount(model.predict(X.astype(np.float32)), minlength=C)
    top = int(np.argmax(counts))
    assert f"{NAMES[top]} {100 * counts[top] / 257:.1f}%" in line  # the class histogram head
    handle = pq.ParquetFile(tmp_path / "out" / "emb.parquet")
    assert [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)] == [100, 100, 57]
    table = handle.read()
    assert table.column_names == ["label", "confidence", "classname"]
    _check_rows(table, model, X)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["emb.parquet"]  # no temporary file


def test_clip_retrieval_folder_carries_metadata(model_path, model, tmp_path):
    sizes = [120, 75, 0, 90, 33, 61, 40, 10, 12, 20, 14]  # 11 shards: img_emb_10 sorts after img_emb_9
    arrays = _clip_retrieval(tmp_path / "coll", sizes)
    report = zsadapt.label(model_path, tmp_path / "coll", tmp_path / "out", batch_size=50, top_k=3)
    assert report.rows == sum(sizes) and report.shards == len(sizes) and not report.skipped
    assert [p.name for p in report.outputs] == [f"img_emb_{i}.parquet" for i in range(len(sizes))]
    np.testing.assert_array_equal(report.counts, np.bincount(
        model.predict(np.concatenate(arrays).astype(np.float32)), minlength=C))
    start = 0
    for i, X in enumerate(arrays):
        table = pq.read_table(tmp_path / "out" / f"img_emb_{i}.parquet")
        assert table.column_names[:2] == ["url", "key"]  # the metadata columns, row for row
        assert table.column("key").to_pylist() == list(range(start, start + len(X)))
        assert table.column("url").to_pylist() == [f"https://x/{j}.jpg" for j in range(start, start + len(X))]
        if len(X):
            _check_rows(table, model, X, top_k=3)
        else:
            assert table.num_rows == 0 and "label" in table.column_names
        start += len(X)
    # The img_emb folder itself is a source too, with its metadata beside it.
    again = zsadapt.label(model_path, tmp_path / "coll" / "img_emb", tmp_path / "out2", batch_size=50, top_k=3)
    assert again.rows == sum(sizes)
    assert pq.read_table(tmp_path / "out2" / "img_emb_3.parquet").equals(
        pq.read_table(tmp_path / "out" / "img_emb_3.parquet"))


def test_parquet_with_an_embedding_column(model_path, model, tmp_path):
    (tmp_path / "src").mkdir()
    parts = [_embeddings(n, seed=40 + n, dtype=np.float32) for n in (70, 45)]
    for i, X in enumerate(parts):
        values = pa.array(X.reshape(-1), type=pa.float32())
        emb = (pa.FixedSizeListArray.from_arrays(values, D) if i == 0 else
               pa.ListArray.from_arrays(pa.array(np.arange(0, X.size + 1, D), type=pa.int32()), values))
        pq.write_table(pa.table({"id": np.arange(len(X)) + 1000 * i, "emb": emb, "caption": [f"c{j}" for j in range(len(X))]}),
                       tmp_path / "src" / f"part-{i}.parquet", row_group_size=20)
    result = _cli(model_path, tmp_path / "src", "--column", "emb", "--out", tmp_path / "out", "--batch-size", 32,
                  "--top-k", 2, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == 115 and summary["shards"] == 2 and summary["bad"] == []
    for i, X in enumerate(parts):
        table = pq.read_table(tmp_path / "out" / f"part-{i}.parquet")
        assert table.column_names[:2] == ["id", "caption"]  # other columns carried, not the embeddings
        assert table.column("id").to_pylist() == list(np.arange(len(X)) + 1000 * i)
        _check_rows(table, model, X, top_k=2)
    # Row ranges (the Spark engine's reads) across parquet row groups, against the whole column.
    shard = discover(tmp_path / "src", column="emb")[1]
    np.testing.assert_array_equal(read_rows(shard, 13, 41), parts[1][13:41])
    assert [len(b) for b in read_batches(shard, 32)] == [32, 13]
    # Writable arrays, not views of Arrow's read-only buffers: torch.from_numpy warns on those.
    assert read_rows(shard, 0, 45).flags.writeable and all(b.flags.writeable for b in read_batches(shard, 32))
    wrong = _cli(model_path, tmp_path / "src", "--out", tmp_path / "out3")
    _one_error_line(wrong, "part-0.parquet", "no column 'embedding'", "--column")


def test_python_api_accepts_a_loaded_model_and_numpy_float32(model, tmp_path):
    X = _embeddings(64, seed=2, dtype=np.float32)
    np.save(tmp_path / "x.npy", X)
    report = zsadapt.label(model, tmp_path / "x.npy", tmp_path / "out")
    assert report.rows == 64 and report.as_dict()["rows"] == 64
    _check_rows(pq.read_table(tmp_path / "out" / "x.parquet"), model, X)


def test_progress_with_rows_per_second_on_stderr(model_path, tmp_path, monkeypatch):
    import zsadapt.messages as messages

    monkeypatch.setattr(messages, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(messages, "LOG_INTERVAL", 0.0)
    _clip_retrieval(tmp_path / "coll", [40, 40])
    result = _cli(model_path, tmp_path / "coll", "--out", tmp_path / "out", "--batch-size", 20)
    assert result.exit_code == 0, result.output
    progress = [line for line in result.stderr.splitlines() if "label: rows" in line]
    assert progress and progress[-1].startswith("zsadapt: label: rows: 80/80") and "rows/s" in progress[-1]
    assert result.stdout.count("\n") == 1 and "rows/s" in result.stdout  # stdout: only the summary


# --- resuming ----------------------------------------------------------------------------------


def test_resume_skips_finished_shards_untouched(model_path, tmp_path):
    _clip_retrieval(tmp_path / "coll", [50, 60, 70])
    out = tmp_path / "out"
    first = _cli(model_path, tmp_path / "coll", "--out", out, "--batch-size", 25, "--quiet")
    assert first.exit_code == 0, first.output
    finished = _state(out)
    reference = pq.read_table(out / "img_emb_1.parquet")
    (out / "img_emb_1.parquet").unlink()
    second = _cli(model_path, tmp_path / "coll", "--out", out, "--batch-size", 25, "--quiet")
    assert second.exit_code == 0, second.output
    assert "labelled 60 rows in 1 shards" in second.stdout and "2 complete shards skipped" in second.stdout
    now = _state(out)
    for name in ("img_emb_0.parquet", "img_emb_2.parquet"):
        assert now[name] == finished[name]  # same inode, mtime and bytes: not rewritten
    assert pq.read_table(out / "img_emb_1.parquet").equals(reference)
    third = _cli(model_path, tmp_path / "coll", "--out", out, "--batch-size", 25, "--quiet")
    assert "labelled 0 rows in 0 shards" in third.stdout and _state(out) == now

    redone = _cli(model_path, tmp_path / "coll", "--out", out, "--batch-size", 25, "--overwrite", "--quiet")
    assert redone.exit_code == 0 and "labelled 180 rows in 3 shards" in redone.stdout
    after = _state(out)
    assert all(after[n][0] != now[n][0] for n in now)  # every file replaced (renamed into place)
    assert all(after[n][2] == now[n][2] for n in now)  # with the same content


def test_outputs_from_other_runs_are_not_replaced(model_path, tmp_path):
    _clip_retrieval(tmp_path / "coll", [30])
    out = tmp_path / "out"
    zsadapt.label(model_path, tmp_path / "coll", out)
    before = _state(out)
    other = _cli(model_path, tmp_path / "coll", "--out", out, "--top-k", 2)  # other options
    _one_error_line(other, "img_emb_0.parquet", "another model, input or options", "--overwrite")
    half = out / "img_emb_0.parquet"
    half.write_bytes(half.read_bytes()[:200])  # an interrupted copy: not a complete output
    broken = _cli(model_path, tmp_path / "coll", "--out", out)
    _one_error_line(broken, "img_emb_0.parquet", "not a readable parquet file", "--overwrite")
    assert half.stat().st_size == 200
    assert _cli(model_path, tmp_path / "coll", "--out", out, "--overwrite", "--quiet").exit_code == 0
    assert _state(out)["img_emb_0.parquet"][2] == before["img_emb_0.parquet"][2]


# --- bad shards --------------------------------------------------------------------------------


def test_dimension_mismatch(model_path, tmp_path):
    np.save(tmp_path / "wide.npy", np.ones((5, D + 1), np.float16))
    _one_error_line(_cli(model_path, tmp_path / "wide.npy", "--out", tmp_path / "out"),
                    "wide.npy", f"{D + 1}-d embeddings", f"expects {D}")
    assert not (tmp_path / "out" / "wide.parquet").exists()


def test_bad_shards_name_the_file_and_lose_nothing(model_path, model, tmp_path):
    arrays = _clip_retrieval(tmp_path / "coll", [40, 40, 40, 40])
    X = arrays[2].copy()
    X[17, 3] = np.nan
    np.save(tmp_path / "coll" / "img_emb" / "img_emb_2.npy", X)
    out = tmp_path / "out"
    result = _cli(model_path, tmp_path / "coll", "--out", out, "--batch-size", 16)
    _one_error_line(result, "img_emb_2.npy", "row 17", "NaN")
    # The shards before the bad one are complete; nothing half-written is left.
    assert sorted(p.name for p in out.iterdir()) == ["img_emb_0.parquet", "img_emb_1.parquet"]
    _check_rows(pq.read_table(out / "img_emb_1.parquet"), model, arrays[1])

    zero = arrays[3].copy()
    zero[5] = 0
    np.save(tmp_path / "coll" / "img_emb" / "img_emb_3.npy", zero)
    corrupt = tmp_path / "coll" / "img_emb" / "img_emb_0.npy"
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # truncated
    _one_error_line(_cli(model_path, tmp_path / "coll", "--out", out), "img_emb_0.npy")

    skipped = _cli(model_path, tmp_path / "coll", "--out", out, "--skip-bad", "--batch-size", 16)
    assert skipped.exit_code == 0, skipped.output
    bad = [line for line in skipped.stderr.splitlines() if "bad shard skipped" in line]
    assert len(bad) == 3 and "img_emb_0.npy" in bad[0] and "row 17" in bad[1] and "row 5 is all zeros" in bad[2]
    assert "1 complete shards skipped" in skipped.stdout and "3 bad shards skipped" in skipped.stdout
    assert sorted(p.name for p in out.iterdir()) == ["img_emb_0.parquet", "img_emb_1.parquet"]
    report = zsadapt.label(model_path, tmp_path / "coll", out, skip_bad=True)
    assert len(report.bad) == 3 and report.as_dict()["bad"] == report.bad


def test_metadata_with_another_row_count(model_path, tmp_path):
    _clip_retrieval(tmp_path / "coll", [30])
    pq.write_table(pa.table({"url": ["a"] * 29}), tmp_path / "coll" / "metadata" / "metadata_0.parquet")
    _one_error_line(_cli(model_path, tmp_path / "coll", "--out", tmp_path / "out"),
                    "img_emb_0.npy", "30 rows", "has 29")


def test_wrong_arguments_are_one_line(model_path, tmp_path):
    np.save(tmp_path / "x.npy", _embeddings(8, seed=3))
    (tmp_path / "file").write_text("")
    cases = [
        ((model_path, tmp_path / "missing", "--out", tmp_path / "o"), ("missing", "no such file or folder")),
        ((model_path, tmp_path / "x.npy", "--out", tmp_path / "file"), ("file",)),
        ((model_path, tmp_path / "x.npy", "--out", tmp_path / "o", "--top-k", C + 1),
         (f"top_k={C + 1}", f"{C} classes")),
        ((tmp_path / "x.npy", tmp_path / "x.npy", "--out", tmp_path / "o"), ("x.npy",)),
        ((model_path, tmp_path / "x.npy", "--out", tmp_path / "o", "--batch-size", 0), ("batch-size",)),
    ]
    for args, fragments in cases:
        _one_error_line(_cli(*args), *fragments)
    _one_error_line(_cli(model_path, tmp_path, "--out", tmp_path), "is the source folder")
    # The folders a source reads, however the source is named: outputs there would be read (or,
    # for a parquet shard, named) as input; nothing is written.
    coll = tmp_path / "coll"
    _clip_retrieval(coll, [12])
    pq.write_table(pa.table({"embedding": [list(row) for row in _embeddings(5, seed=4).astype(np.float32)]}),
                   tmp_path / "x.parquet")
    before = {folder: _state(folder) for folder in (coll / "img_emb", coll / "metadata", tmp_path)}
    for source, out in [(coll, coll / "img_emb"), (coll, coll / "metadata"), (coll / "img_emb", coll / "img_emb"),
                        (coll / "img_emb", coll / "metadata"), (tmp_path / "x.parquet", tmp_path)]:
        _one_error_line(_cli(model_path, source, "--out", out, "--overwrite"), str(out), "another folder")
    assert before == {folder: _state(folder) for folder in before}
    # A lone .npy file's folder is fine: x.parquet cannot be x.npy.
    (tmp_path / "lone").mkdir()
    np.save(tmp_path / "lone" / "x.npy", _embeddings(8, seed=3))
    assert _cli(model_path, tmp_path / "lone" / "x.npy", "--out", tmp_path / "lone").exit_code == 0
    assert (tmp_path / "lone" / "x.parquet").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error_line(_cli(model_path, empty, "--out", tmp_path / "o"), "no .npy or .parquet")
    np.save(tmp_path / "ints.npy", np.ones((4, D), np.int64))
    _one_error_line(_cli(model_path, tmp_path / "ints.npy", "--out", tmp_path / "o"), "ints.npy", "float")
    with pytest.raises(ValueError, match="engine must be one of"):
        zsadapt.label(model_path, tmp_path / "x.npy", tmp_path / "o", engine="dask")
    # From Python, where click's option types do not stand in front.
    for kwargs, message in (({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                            ({"top_k": -1}, "top_k must be >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            zsadapt.label(model_path, tmp_path / "x.npy", tmp_path / "o", **kwargs)
    with pytest.raises(ValueError, match="file: exists and is not a folder"):
        zsadapt.label(model_path, tmp_path / "x.npy", tmp_path / "file")
    assert not os.path.exists(tmp_path / "o" / "x.parquet")


def test_skip_bad_passes_over_a_shard_of_another_dimension(model_path, tmp_path):
    (tmp_path / "src").mkdir()
    np.save(tmp_path / "src" / "a.npy", _embeddings(12, seed=5))
    np.save(tmp_path / "src" / "b.npy", np.ones((3, D + 2), np.float32))
    with pytest.raises(ValueError, match=rf"b\.npy: {D + 2}-d embeddings, the model model.safetensors expects {D}"):
        zsadapt.label(model_path, tmp_path / "src", tmp_path / "out")
    report = zsadapt.label(model_path, tmp_path / "src", tmp_path / "out", skip_bad=True)
    assert report.rows == 12 and len(report.bad) == 1 and f"b.npy: {D + 2}-d embeddings" in report.bad[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.parquet"]


def test_a_bad_batch_near_the_end_of_a_shard_stops_the_reader(model_path, tmp_path):
    # The reader thread runs two batches ahead of the compute: when batch 1 of 4 fails, the reader
    # has queued batches 2 and 3 and must still stop although nobody takes its end marker (this
    # once hung in that final put).
    import threading

    X = _embeddings(40, seed=7)
    X[15] = np.inf
    np.save(tmp_path / "short.npy", X)
    for _ in range(3):
        with pytest.raises(ValueError, match="short.npy: row 15 is NaN or inf"):
            zsadapt.label(model_path, tmp_path / "short.npy", tmp_path / "out", batch_size=10)
    assert not [t for t in threading.enumerate() if t.name == "zsadapt-label-reader"]


def test_outputs_get_a_plain_writes_permissions(model_path, tmp_path):
    """Issue 13 item 10 for label outputs: mode 0644 under umask 022, not the temporary file's 0600."""
    np.save(tmp_path / "emb.npy", _embeddings(20, seed=4))
    previous = os.umask(0o022)
    try:
        result = _cli(model_path, tmp_path / "emb.npy", "--out", tmp_path / "out", "--quiet")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "emb.parquet").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_npy_rows_are_the_stored_rows(tmp_path, order, dtype):
    """Positioned reads of a .npy shard give np.load's rows, in the stored dtype, for any range and
    batch size (a Fortran-order file, whose rows are not contiguous, too)."""
    X = np.asarray(_embeddings(37, seed=3, dtype=dtype), order=order)
    np.save(tmp_path / "emb.npy", X)
    shard = discover(tmp_path / "emb.npy")[0]
    for start, stop in [(0, 37), (5, 6), (13, 41), (36, 37), (20, 20)]:
        rows = read_rows(shard, start, stop)
        assert rows.dtype == dtype
        np.testing.assert_array_equal(rows, X[start:stop])
    batches = list(read_batches(shard, 16))
    assert [len(b) for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate(batches), X)


def test_a_shard_cut_short_after_discovery_is_a_bad_shard(tmp_path):
    np.save(tmp_path / "emb.npy", _embeddings(40, seed=4))
    shard = discover(tmp_path / "emb.npy")[0]
    size = (tmp_path / "emb.npy").stat().st_size
    with open(tmp_path / "emb.npy", "r+b") as handle:
        handle.truncate(size - 10 * D * 2)  # the last 10 float16 rows
    with pytest.raises(BadShard, match=r"emb\.npy: cannot be read"):
        list(read_batches(shard, 16))


@pytest.mark.parametrize("content, reason", [
    (b"not numpy at all", "no NUMPY header"),
    (b"", "no NUMPY header"),
    (None, "Python objects, a pickle, which zsadapt never loads"),
])
def test_a_file_that_is_no_embedding_npy_says_why_without_unpickling(tmp_path, content, reason):
    """np.load's own message for these suggests loading the file as a pickle; the shard's error
    says what it is instead (garbage, empty, or an object array), and nothing is unpickled."""
    path = tmp_path / "emb.npy"
    if content is None:
        np.save(path, np.array([{"rows": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    with pytest.raises(BadShard) as err:
        discover(path)
    message = str(err.value)
    assert message.startswith(f"{path}: cannot be read as .npy") and reason in message
    assert "pickle.load" not in message and "\n" not in message


def test_sources_whose_rows_are_not_embeddings_are_one_line(model_path, tmp_path):
    """Shards that hold something other than one float vector per row, and folders whose outputs
    would collide: one error line naming the file and the problem, nothing written."""
    X = _embeddings(6, seed=50, dtype=np.float32)
    np.save(tmp_path / "cube.npy", X.reshape(2, 3, D))
    words = tmp_path / "words.parquet"
    pq.write_table(pa.table({"emb": [f"row {i}" for i in range(6)]}), words)
    lists_of_words = tmp_path / "lists_of_words.parquet"
    pq.write_table(pa.table({"emb": [["a"] * D for _ in range(6)]}), lists_of_words)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"emb": pa.array([list(map(float, X[0])), None] * 3, type=pa.list_(pa.float32()))}), nulls)
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"emb": [list(map(float, X[0]))] * 5 + [list(map(float, X[0, :-1]))]}), ragged)
    clash = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"emb": [list(map(float, row)) for row in X], "label": np.arange(6)}), clash)
    cases = [
        (cube := tmp_path / "cube.npy", ("cube.npy", "expected a 2-D array of embeddings", "(2, 3, 16)")),
        (words, ("words.parquet", "column 'emb' holds string", "expected a list of floats per row")),
        (lists_of_words, ("lists_of_words.parquet", "holds lists of string", "expected floats")),
        (nulls, ("nulls.parquet", "empty (null) rows")),
        (ragged, ("ragged.parquet", f"have {D - 1} to {D}")),
        (clash, ("clash.parquet", "carried columns ['label'] clash with the label columns")),
    ]
    for source, fragments in cases:
        _one_error_line(_cli(model_path, source, "--column", "emb", "--out", tmp_path / "new" / "out"), *fragments)
        assert not (tmp_path / "new").exists(), source  # the folders a refused run made are removed
    assert cube.exists()
    (tmp_path / "emb.csv").write_text("0.1,0.2\n")
    _one_error_line(_cli(model_path, tmp_path / "emb.csv", "--out", tmp_path / "out"),
                    "emb.csv", "unsupported file type '.csv'; expected .npy or .parquet")


def test_a_folder_of_both_formats_says_which_it_reads(model_path, model, tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    X = _embeddings(6, seed=51)
    np.save(both / "a.npy", X)
    pq.write_table(pa.table({"embedding": [list(map(float, row)) for row in X]}), both / "b.parquet")
    result = _cli(model_path, both, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "labelling its 1 .npy shards; the 1 .parquet files beside them are not read" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.parquet"]
    _check_rows(pq.read_table(tmp_path / "out" / "a.parquet"), model, X)


def test_parquet_reads_hold_a_batch_not_the_file(tmp_path):
    """A parquet shard is read as a stream: Arrow's memory follows the batch, whatever the file or
    its row groups. pyarrow's default pre-buffers every row group of the column first (a 40 MB
    shard in one row group, 500-row batches: about 50 MB of Arrow memory before; Ray and Spark's
    row ranges read the whole group per range). Measured in a fresh process, whose peak is its own."""
    import subprocess
    import sys

    rows, d = 80_000, 128  # 41 MB of float32 in one row group
    X = np.random.default_rng(0).normal(size=(rows, d)).astype(np.float32)
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), d)}),
                   tmp_path / "a.parquet", row_group_size=rows)
    script = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from zsadapt.labelling import discover, read_batches, read_rows\n"
        "shard = discover(sys.argv[1])[0]\n"
        "if sys.argv[2] == 'batches':\n"
        "    total = float(sum(X.astype(np.float64).sum() for X in read_batches(shard, 500)))\n"
        "else:\n"
        "    total = float(read_rows(shard, 52_000, 52_500).astype(np.float64).sum())\n"
        "print(total, pa.default_memory_pool().max_memory())\n"
    )
    expected = {"batches": X.astype(np.float64).sum(), "rows": X[52_000:52_500].astype(np.float64).sum()}
    for mode in ("batches", "rows"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a.parquet"), mode],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        total, peak = done.stdout.split()
        assert float(total) == pytest.approx(expected[mode], rel=1e-9)  # every row read, in full
        assert int(peak) < 12 << 20, (mode, int(peak) >> 20)  # the file is 41 MB; a batch 0.25 MB
