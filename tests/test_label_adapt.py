"""``zsadapt label ... --adapt`` / ``zsadapt.label(adapt=True)``: every output row equals what a
:class:`zsadapt.Stream` run by hand gives over the same rows in the same order (stream batches of
``adapt_batch`` rows, cut afresh at each shard); a rerun after an interruption goes on from the
saved state and writes the files of an uninterrupted run; bad input is a one-line error."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main
from zsadapt.labelling import STATE_FILE, STATE_INDEX
from zsadapt.stream import Stream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, D = 6, 16
NAMES = [f"class {c}" for c in range(C)]


@pytest.fixture(scope="module")
def pool():
    return zsadapt.make_pool(n_images=1200, n_classes=C, dim=D, seed=41)


@pytest.fixture(scope="module")
def text_file(pool, tmp_path_factory):
    """Class text embeddings with their names, as ``zsadapt encode`` / a pool file holds them."""
    path = tmp_path_factory.mktemp("text") / "text.npz"
    np.savez(path, text_features=pool.text_features, classnames=np.asarray(NAMES))
    return path


def _shards(folder, X, sizes, dtype=np.float16):
    """``folder/part_i.npy`` of consecutive rows of ``X`` (stored as ``dtype``, like clip-retrieval);
    returns the arrays as stored."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays, start = [], 0
    for i, n in enumerate(sizes):
        part = (X[start:start + n] * np.linspace(0.5, 2.0, n)[:, None]).astype(dtype)  # not unit norm
        np.save(folder / f"part_{i}.npy", part)
        arrays.append(part)
        start += n
    return arrays


def _by_hand(stream, arrays, batch=128, top_k=0):
    """The reference: ``stream.refine`` over each array's rows in batches of ``batch`` (cut afresh at
    each array, as --adapt cuts at each shard), float16 upcast; (labels, top probability, top-k)."""
    labels, confidence, tops = [], [], []
    for X in arrays:
        X = X.astype(np.float32)
        for start in range(0, len(X), batch):
            probs = np.asarray(stream.refine(X[start:start + batch]).probs)
            labels.append(probs.argmax(axis=1))
            confidence.append(probs.max(axis=1))
            tops.append(np.argsort(-probs, axis=1, kind="stable")[:, :top_k])
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, top_k), np.int64)
    return np.concatenate(labels), np.concatenate(confidence), np.concatenate(tops)


def _outputs(out, n):
    return [pq.read_table(out / f"part_{i}.parquet") for i in range(n)]


def _column(tables, name):
    """One output column over every table, as numpy ((n,) or, for lists, (n, K))."""
    if name == "top_labels":
        return np.concatenate([np.asarray(t.column(name).to_pylist(), dtype=np.int64) for t in tables if t.num_rows])
    return np.concatenate([t.column(name).to_numpy() for t in tables])


def _cli(*args):
    return CliRunner().invoke(main, ["label", *[str(a) for a in args]], catch_exceptions=True)


def _one_error_line(result, *fragments):
    assert result.exit_code in (1, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# --- what is written -------------------------------------------------------------------------------


def test_labels_equal_a_stream_run_by_hand(pool, text_file, tmp_path):
    # 300 = 2 x 128 + 44; 129 = 128 + a batch of ONE row at the end of the shard; an empty shard.
    sizes = [300, 129, 0, 271]
    arrays = _shards(tmp_path / "src", pool.image_features, sizes)
    report = zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, top_k=3, progress=False,
                           save_stream=tmp_path / "final.safetensors")
    assert report.rows == sum(sizes) and report.shards == len(sizes) and not report.skipped
    reference = Stream(pool.text_features)
    labels, confidence, tops = _by_hand(reference, arrays, top_k=3)
    tables = _outputs(tmp_path / "out", len(sizes))
    assert [t.num_rows for t in tables] == sizes
    assert tables[0].column_names == ["label", "confidence", "classname", "top_labels", "top_probs", "top_classnames"]
    np.testing.assert_array_equal(_column(tables, "label"), labels)
    np.testing.assert_allclose(_column(tables, "confidence"), confidence, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(_column(tables, "top_labels"), tops)
    assert sum((t.column("classname").to_pylist() for t in tables), []) == [NAMES[c] for c in labels]
    np.testing.assert_array_equal(report.counts, np.bincount(labels, minlength=C))
    # The final stream is the hand-run one: same batches, images and state.
    final = zsadapt.load_model(tmp_path / "final.safetensors")
    assert isinstance(final, Stream)
    assert (final.n_batches, final.n_images) == (reference.n_batches, reference.n_images) == (3 + 2 + 0 + 3, sum(sizes))
    torch.testing.assert_close(final.statistics.counts, reference.statistics.counts)
    torch.testing.assert_close(final.statistics.sums, reference.statistics.sums)


def test_shards_of_whole_batches_equal_one_pass_over_the_concatenated_rows(pool, text_file, tmp_path):
    sizes = [256, 384, 128]  # multiples of 128: cutting at each shard is cutting the concatenated rows
    arrays = _shards(tmp_path / "src", pool.image_features, sizes)
    zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, progress=False, batch_size=200)
    rows = np.concatenate(arrays)
    labels, _, _ = _by_hand(Stream(pool.text_features), [rows])
    np.testing.assert_array_equal(_column(_outputs(tmp_path / "out", 3), "label"), labels)


def test_adapt_batch_and_read_batch(pool, text_file, tmp_path):
    sizes = [200, 101]
    arrays = _shards(tmp_path / "src", pool.image_features, sizes, dtype=np.float32)
    # --batch-size 70 is not a multiple of 32: reads are 64 rows, stream batches stay 32.
    zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, adapt_batch=32, batch_size=70,
                  progress=False)
    labels, _, _ = _by_hand(Stream(pool.text_features), arrays, batch=32)
    tables = _outputs(tmp_path / "out", 2)
    np.testing.assert_array_equal(_column(tables, "label"), labels)
    handle = pq.ParquetFile(tmp_path / "out" / "part_0.parquet")
    assert [handle.metadata.row_group(g).num_rows for g in range(handle.metadata.num_row_groups)] == [70, 70, 60]


def test_saved_model_and_saved_stream_as_the_start(pool, tmp_path):
    arrays = _shards(tmp_path / "src", pool.image_features, [300, 200])
    # A saved model holds its class text embeddings: a zlap model (no stream mode) adapts with the
    # default stream method from them.
    model = zsadapt.refine(pool.image_features[:300], pool.text_features, "zlap").save(
        tmp_path / "model.safetensors", classnames=NAMES)
    torch.testing.assert_close(zsadapt.load_model(model).text_features,
                               torch.nn.functional.normalize(torch.as_tensor(pool.text_features), dim=1))
    zsadapt.label(model, tmp_path / "src", tmp_path / "out_model", adapt=True, progress=False)
    labels, _, _ = _by_hand(Stream(pool.text_features), arrays)
    tables = _outputs(tmp_path / "out_model", 2)
    np.testing.assert_array_equal(_column(tables, "label"), labels)
    assert tables[0].column("classname").to_pylist()[:3] == [NAMES[c] for c in labels[:3]]
    # A saved stream goes on from its state (and its method and parameters).
    warm = Stream(pool.text_features, forgetting=0.9)
    _by_hand(warm, [pool.image_features[600:1000]])
    warm.save(tmp_path / "warm.safetensors")
    zsadapt.label(tmp_path / "warm.safetensors", tmp_path / "src", tmp_path / "out_stream", adapt=True,
                  progress=False)
    labels, _, _ = _by_hand(warm, arrays)
    np.testing.assert_array_equal(_column(_outputs(tmp_path / "out_stream", 2), "label"), labels)


# --- resuming --------------------------------------------------------------------------------------


def test_rerun_after_a_failing_shard_goes_on_from_the_saved_state(pool, text_file, tmp_path):
    sizes = [300, 129, 250]
    good = _shards(tmp_path / "good", pool.image_features, sizes)
    zsadapt.label(text_file, tmp_path / "good", tmp_path / "uninterrupted", adapt=True, progress=False)
    broken = _shards(tmp_path / "src", pool.image_features, sizes)
    broken[2][140] = np.nan
    np.save(tmp_path / "src" / "part_2.npy", broken[2])
    with pytest.raises(ValueError, match=r"part_2\.npy: row 140 is NaN or inf"):
        zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(["part_0.parquet", "part_1.parquet", STATE_FILE, STATE_INDEX])
    assert json.loads((out / STATE_INDEX).read_text())["after"] == "part_1"
    done = {n: (out / n).stat().st_mtime_ns for n in ("part_0.parquet", "part_1.parquet")}
    np.save(tmp_path / "src" / "part_2.npy", good[2])  # fixed
    report = zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False)
    assert report.replayed == 0  # went on from the saved state: shards 0 and 1 were not read again
    assert report.rows == 250 and report.shards == 1 and len(report.skipped) == 2
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # finished files untouched
    for a, b in zip(_outputs(out, 3), _outputs(tmp_path / "uninterrupted", 3)):
        assert a.equals(b)  # the files of an uninterrupted run (columns; metadata names other inputs)
    assert json.loads((out / STATE_INDEX).read_text())["after"] == "part_2"
    # Nothing left to do: a third run writes nothing.
    assert zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False).rows == 0


def test_deleted_outputs_are_redone_and_overwrite_starts_over(pool, text_file, tmp_path):
    sizes = [200, 300, 150]
    _shards(tmp_path / "src", pool.image_features, sizes)
    out = tmp_path / "out"
    zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False)
    first = _outputs(out, 3)
    kept = (out / "part_0.parquet").stat().st_mtime_ns
    for i in (1, 2):
        (out / f"part_{i}.parquet").unlink()
    report = zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False)
    assert report.replayed == 200  # the state follows part_2, whose output is gone: shard 0 is read again
    assert report.rows == 450 and (out / "part_0.parquet").stat().st_mtime_ns == kept
    for a, b in zip(_outputs(out, 3), first):
        assert a.equals(b)
    # A lost state file: the stream starts over and passes the complete shards through.
    (out / STATE_FILE).unlink()
    (out / "part_2.parquet").unlink()
    assert zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False).replayed == 500
    assert _outputs(out, 3)[2].equals(first[2])
    # --overwrite redoes every shard from the initial stream, not from the saved state.
    report = zsadapt.label(text_file, tmp_path / "src", out, adapt=True, overwrite=True, progress=False)
    assert report.rows == sum(sizes) and not report.skipped
    for a, b in zip(_outputs(out, 3), first):
        assert a.equals(b)


def test_fingerprint_records_adapt_and_the_stream(pool, text_file, tmp_path):
    _shards(tmp_path / "src", pool.image_features, [200])
    model = zsadapt.refine(pool.image_features[:300], pool.text_features, "zlap").save(tmp_path / "m.safetensors")
    zsadapt.label(model, tmp_path / "src", tmp_path / "plain", progress=False)
    with pytest.raises(ValueError, match="another model, input or options"):  # made without --adapt
        zsadapt.label(model, tmp_path / "src", tmp_path / "plain", adapt=True, progress=False)
    zsadapt.label(model, tmp_path / "src", tmp_path / "adapted", adapt=True, progress=False)
    with pytest.raises(ValueError, match="another model, input or options"):  # made with --adapt
        zsadapt.label(model, tmp_path / "src", tmp_path / "adapted", progress=False)
    with pytest.raises(ValueError, match="another model, input or options"):  # another stream batch
        zsadapt.label(model, tmp_path / "src", tmp_path / "adapted", adapt=True, adapt_batch=64, progress=False)
    assert zsadapt.label(model, tmp_path / "src", tmp_path / "adapted", adapt=True, progress=False).rows == 0


# --- bad input -------------------------------------------------------------------------------------


def test_skip_bad_passes_a_shard_over_and_the_stream_goes_on(pool, text_file, tmp_path):
    arrays = _shards(tmp_path / "src", pool.image_features, [260, 300, 140])
    arrays[1][200] = np.nan  # after one stream batch of the shard was refined (reads of 128 rows)
    np.save(tmp_path / "src" / "part_1.npy", arrays[1])
    report = zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, skip_bad=True, batch_size=128,
                           progress=False, save_stream=tmp_path / "final.safetensors")
    assert len(report.bad) == 1 and "part_1.npy: row 200 is NaN or inf" in report.bad[0]
    assert not (tmp_path / "out" / "part_1.parquet").exists()
    reference = Stream(pool.text_features)
    labels, _, _ = _by_hand(reference, [arrays[0], arrays[2]])  # the bad shard left no trace in the state
    got = [pq.read_table(tmp_path / "out" / f"part_{i}.parquet") for i in (0, 2)]
    np.testing.assert_array_equal(_column(got, "label"), labels)
    assert zsadapt.load_model(tmp_path / "final.safetensors").n_images == 400
    # A rerun that still skips bad shards goes on from the saved state (which knows shard 1 was
    # passed over): nothing to redo; without skip_bad the bad shard is an error again.
    again = zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, skip_bad=True, batch_size=128,
                          progress=False)
    assert (again.rows, again.replayed) == (0, 0)
    with pytest.raises(ValueError, match=r"part_1\.npy: row 200"):
        zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, batch_size=128, progress=False)


def test_engines_other_than_local_refuse_adapt(text_file, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((4, D), np.float32))
    for engine in ("ray", "spark"):
        with pytest.raises(ValueError, match="needs --engine local"):
            zsadapt.label(text_file, tmp_path / "x.npy", tmp_path / "out", adapt=True, engine=engine)
        _one_error_line(_cli(text_file, tmp_path / "x.npy", "--out", tmp_path / "out", "--adapt", "--engine", engine),
                        "needs --engine local", engine)


def test_models_without_class_text_and_files_that_need_adapt(pool, text_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    np.save(tmp_path / "x.npy", pool.image_features[:10])
    model = zsadapt.refine(pool.image_features[:300], pool.text_features, "zlap").save(tmp_path / "m.safetensors")
    with safe_open(str(model), framework="pt") as handle:  # a file saved before models kept the text
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k != "text_features"}
        meta = {k: v for k, v in handle.metadata().items() if k != "class_text_sha256"}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=meta)
    assert zsadapt.load_model(tmp_path / "old.safetensors").text_features is None
    _one_error_line(_cli(tmp_path / "old.safetensors", tmp_path / "x.npy", "--out", tmp_path / "o", "--adapt"),
                    "old.safetensors", "holds no class text embeddings")
    assert _cli(tmp_path / "old.safetensors", tmp_path / "x.npy", "--out", tmp_path / "o2").exit_code == 0
    # A saved stream or a text file labels only with --adapt; --save-stream only with --adapt.
    Stream(pool.text_features).save(tmp_path / "s.safetensors")
    _one_error_line(_cli(tmp_path / "s.safetensors", tmp_path / "x.npy", "--out", tmp_path / "o3"),
                    "is a saved stream", "only with --adapt")
    _one_error_line(_cli(text_file, tmp_path / "x.npy", "--out", tmp_path / "o3"), "text.npz", "only with --adapt")
    _one_error_line(_cli(model, tmp_path / "x.npy", "--out", tmp_path / "o3", "--save-stream", tmp_path / "f.safetensors"),
                    "needs adapt / --adapt")
    # --save-stream never clobbers without --overwrite, and is checked before any work.
    _one_error_line(_cli(text_file, tmp_path / "x.npy", "--out", tmp_path / "o4", "--adapt", "--save-stream",
                         tmp_path / "s.safetensors"), "s.safetensors", "already exists")
    assert not (tmp_path / "o4").exists()
    # Shards of another dimension than the class embeddings.
    np.save(tmp_path / "wide.npy", np.ones((5, D + 1), np.float32))
    _one_error_line(_cli(text_file, tmp_path / "wide.npy", "--out", tmp_path / "o5", "--adapt"),
                    "wide.npy", f"{D + 1}-d embeddings")


def test_cli_adapt(pool, text_file, tmp_path):
    sizes = [150, 90]
    arrays = _shards(tmp_path / "src", pool.image_features, sizes)
    result = _cli(text_file, tmp_path / "src", "--out", tmp_path / "out", "--adapt", "--adapt-batch", 64,
                  "--save-stream", tmp_path / "final.safetensors", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().startswith("labelled 240 rows in 2 shards")
    labels, _, _ = _by_hand(Stream(pool.text_features), arrays, batch=64)
    np.testing.assert_array_equal(_column(_outputs(tmp_path / "out", 2), "label"), labels)
    assert os.path.exists(tmp_path / "final.safetensors")
    text = CliRunner().invoke(main, ["label", "--help"]).output
    assert "--adapt" in text and "--adapt-batch" in text and "MODEL_OR_TEXT" in text


def test_parquet_shards_carry_their_columns(pool, text_file, tmp_path):
    import pyarrow as pa

    (tmp_path / "src").mkdir()
    parts = [pool.image_features[:170], pool.image_features[170:300]]
    for i, X in enumerate(parts):
        pq.write_table(pa.table({"id": np.arange(len(X)) + 1000 * i, "emb": [row.tolist() for row in X]}),
                       tmp_path / "src" / f"part_{i}.parquet")
    zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, column="emb", device="cpu",
                  progress=False)
    tables = _outputs(tmp_path / "out", 2)
    assert tables[1].column_names[:1] == ["id"] and tables[1].column("id").to_pylist()[:2] == [1000, 1001]
    labels, _, _ = _by_hand(Stream(pool.text_features), parts)
    np.testing.assert_array_equal(_column(tables, "label"), labels)


def test_save_stream_is_never_the_input_and_a_loaded_model_works(pool, tmp_path):
    arrays = _shards(tmp_path / "src", pool.image_features, [150])
    Stream(pool.text_features).save(tmp_path / "s.safetensors")
    _one_error_line(_cli(tmp_path / "s.safetensors", tmp_path / "src", "--out", tmp_path / "o", "--adapt",
                         "--save-stream", tmp_path / "s.safetensors", "--overwrite"), "is also an input")
    model = zsadapt.refine(pool.image_features[:300], pool.text_features, "zlap").save(tmp_path / "m.safetensors")
    loaded = zsadapt.load_model(model)
    with pytest.raises(ValueError, match="is also an input"):
        zsadapt.label(loaded, tmp_path / "src", tmp_path / "o", adapt=True, save_stream=model, overwrite=True)
    zsadapt.label(loaded, tmp_path / "src", tmp_path / "o", adapt=True, progress=False)
    labels, _, _ = _by_hand(Stream(pool.text_features), arrays)
    np.testing.assert_array_equal(_column(_outputs(tmp_path / "o", 1), "label"), labels)


def test_bad_adapt_arguments_from_python(pool, text_file, tmp_path):
    """What click's option types stop on the command line, and inputs only Python can pass."""
    from safetensors.torch import save_file

    _shards(tmp_path / "src", pool.image_features, [40])
    cases = [
        ({"adapt_batch": 0}, ValueError, "adapt_batch must be >= 1, got 0"),
        ({"top_k": C + 1}, ValueError, f"top_k={C + 1} is more than the stream's {C} classes"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            zsadapt.label(text_file, tmp_path / "src", tmp_path / "out", adapt=True, progress=False, **kwargs)
    with pytest.raises(TypeError, match="takes a path to a saved stream"):
        zsadapt.label(Stream(pool.text_features), tmp_path / "src", tmp_path / "out", adapt=True)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "someone-else"})
    with pytest.raises(ValueError, match="a 'someone-else' file, not a saved model, saved stream or class text"):
        zsadapt.label(tmp_path / "other.safetensors", tmp_path / "src", tmp_path / "out", adapt=True)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_state_file_the_index_does_not_name_is_not_resumed(pool, text_file, tmp_path, capfd):
    """A state file replaced after its index was written (another run's, or edited): the stream
    starts over, says so, and the complete outputs pass through it again; the files are those of
    an uninterrupted run."""
    arrays = _shards(tmp_path / "all", pool.image_features, [200, 150, 100])
    zsadapt.label(text_file, tmp_path / "all", tmp_path / "uninterrupted", adapt=True, progress=False)
    (tmp_path / "src").mkdir()
    for i in (0, 1):
        np.save(tmp_path / "src" / f"part_{i}.npy", arrays[i])
    out = tmp_path / "out"
    zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False)
    Stream(pool.text_features).save(out / STATE_FILE, overwrite=True)  # a valid stream, not the indexed one
    np.save(tmp_path / "src" / "part_2.npy", arrays[2])  # the collection grows by a shard
    capfd.readouterr()
    zsadapt.set_quiet(False)
    report = zsadapt.label(text_file, tmp_path / "src", out, adapt=True, progress=False)
    assert "cannot resume from" in capfd.readouterr().err
    assert report.replayed == 350 and report.rows == 100
    for a, b in zip(_outputs(out, 3), _outputs(tmp_path / "uninterrupted", 3)):
        assert a.equals(b)
