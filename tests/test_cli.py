"""The ``zsadapt`` command through click's CliRunner: every malformed input gives exit code 1 or 2
and one ``Error:`` line naming the file and the problem (no traceback); outputs are written
atomically and never over an existing file; stdout carries only results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt.cli.main import main

N, C, D = 40, 4, 8


@pytest.fixture
def runner():
    return CliRunner()  # click >= 8.2: result.stdout and result.stderr are kept apart


@pytest.fixture
def arrays():
    """A small labelled pool whose features are deliberately not L2-normalised."""
    pool = zsadapt.make_pool(n_images=N, n_classes=C, dim=D, seed=5)
    rng = np.random.default_rng(0)
    return {
        "image_features": pool.image_features * rng.uniform(0.5, 2.0, size=(N, 1)).astype(np.float32),
        "text_features": pool.text_features * 3.0,
        "labels": pool.labels,
        "classnames": np.array([f"class {c}" for c in range(C)]),
    }


@pytest.fixture
def pool_file(tmp_path, arrays):
    path = tmp_path / "pool.npz"
    np.savez(path, **arrays)
    return path


def run(runner, args):
    """Invoke the CLI with string arguments (paths converted)."""
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=True)


def assert_user_error(result, *fragments):
    """Exit code 1 or 2, exactly one ``Error:`` line containing every fragment, no traceback,
    nothing on stdout."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (1, 2), result.exit_code
    assert "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# --- every malformed input ----------------------------------------------------------------------


def _save(tmp_path, name, **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _with(arrays, **changes):
    out = {k: v for k, v in arrays.items() if k != "classnames"}
    out.update(changes)
    return {k: v for k, v in out.items() if v is not None}


def bad_pools(tmp_path, a):
    """(name, path, fragments of the expected message) for malformed pool files."""
    X, T = a["image_features"], a["text_features"]
    nan = X.copy()
    nan[3, 1] = np.nan
    inf = T.copy()
    inf[2, 0] = np.inf
    zero = X.copy()
    zero[5] = 0
    cases = [
        ("missing key", _save(tmp_path, "mk.npz", image_features=X), ["missing text_features"]),
        ("1-d", _save(tmp_path, "d1.npz", **_with(a, image_features=X[0])), ["image_features", "expected a 2-d array", "(8,)"]),
        ("3-d", _save(tmp_path, "d3.npz", **_with(a, image_features=X[None])), ["image_features", "expected a 2-d array", f"(1, {N}, {D})"]),
        # a 3-d text array is (C, P, d) per-template text: here one class of C templates
        ("3-d text", _save(tmp_path, "t3.npz", **_with(a, text_features=T[None])), ["text_features", "needs at least 2 classes"]),
        ("NaN", _save(tmp_path, "nan.npz", **_with(a, image_features=nan)), ["image_features", "NaN or infinite", "row 3"]),
        ("inf", _save(tmp_path, "inf.npz", **_with(a, text_features=inf)), ["text_features", "NaN or infinite", "row 2"]),
        ("dimension mismatch", _save(tmp_path, "dim.npz", **_with(a, text_features=T[:, :5])), ["text_features", "(4, 5)", f"d = {D}"]),
        ("empty pool", _save(tmp_path, "empty.npz", **_with(a, image_features=X[:0], labels=None)), ["image_features", "empty (0 images)"]),
        ("1-class pool", _save(tmp_path, "onec.npz", **_with(a, text_features=T[:1], labels=None)), ["text_features", "at least 2 classes, got 1"]),
        ("zero row", _save(tmp_path, "zero.npz", **_with(a, image_features=zero)), ["image_features", "row 5 is all zeros"]),
        ("non-numeric", _save(tmp_path, "str.npz", **_with(a, image_features=X.astype(str))), ["image_features", "numeric array"]),
        ("labels length", _save(tmp_path, "ll.npz", **_with(a, labels=a["labels"][:7])), ["labels", f"expected shape ({N},), got (7,)"]),
        ("labels range", _save(tmp_path, "lr.npz", **_with(a, labels=a["labels"] + C)), ["labels", "values must lie in 0..3"]),
        ("classnames length", _save(tmp_path, "cn.npz", **_with(a, classnames=np.array(["a", "b"]))), ["classnames", "2 names for 4 classes"]),
    ]
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"\x00\x01 definitely not numpy")
    cases.append(("corrupt npz", corrupt, ["cannot be read as .npz"]))
    good = tmp_path / "good.npz"
    np.savez(good, **a)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    cases.append(("truncated npz", truncated, ["cannot be read as .npz"]))
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"corrupt{suffix}"
        path.write_bytes(b"garbage" * 5)
        cases.append((f"corrupt {suffix}", path, [f"cannot be read as {suffix}"]))
    txt = tmp_path / "pool.txt"
    txt.write_text("1 2 3\n")
    cases.append(("wrong extension", txt, ["unsupported file type '.txt'"]))
    npy = tmp_path / "pool.npy"
    np.save(npy, X)
    cases.append(("npy as pool", npy, ["unsupported file type '.npy'"]))
    cases.append(("missing file", tmp_path / "absent.npz", ["no such file"]))
    unreadable = tmp_path / "locked.npz"
    unreadable.write_bytes(good.read_bytes())
    unreadable.chmod(0)
    if not os.access(unreadable, os.R_OK):  # root reads anything
        cases.append(("unreadable file", unreadable, ["cannot be opened (Permission denied)"]))
    return cases


def test_every_malformed_pool_file(runner, tmp_path, arrays):
    cases = bad_pools(tmp_path, arrays)
    assert len(cases) >= 20
    for name, path, fragments in cases:
        for command in (["refine", path, "--method", "zeroshot"], ["compare", path, "--methods", "zeroshot"]):
            result = run(runner, command)
            try:
                line = assert_user_error(result, str(path), *fragments)
            except AssertionError as err:
                raise AssertionError(f"{name} ({command[0]}): {err}\nstderr: {result.stderr}") from None
            assert line.startswith(f"Error: {path}"), (name, line)


def test_unreadable_pool(runner, pool_file, monkeypatch):
    """As root every file is readable, so the permission error is simulated."""
    import zsadapt.io

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(zsadapt.io, "open", denied, raising=False)
    assert_user_error(run(runner, ["refine", pool_file]), str(pool_file), "cannot be opened (Permission denied)")


def test_a_folder_as_pool(runner, tmp_path):
    (tmp_path / "dir.npz").mkdir()
    assert_user_error(run(runner, ["refine", tmp_path / "dir.npz"]), "dir.npz", "is a directory")


def test_separate_files_errors_name_each_file(runner, tmp_path, arrays):
    img, txt, lab = tmp_path / "img.npy", tmp_path / "txt.npy", tmp_path / "lab.npy"
    np.save(img, arrays["image_features"])
    np.save(txt, arrays["text_features"][:, :3])
    np.save(lab, arrays["labels"][:5])
    common = ["refine", "--method", "zeroshot", "--image-features", img]
    line = assert_user_error(run(runner, common + ["--text-features", txt]), "does not match")
    assert line.startswith(f"Error: {txt}: shape")
    np.save(txt, arrays["text_features"])
    line = assert_user_error(run(runner, common + ["--text-features", txt, "--labels", lab]))
    assert line.startswith(f"Error: {lab}: expected shape ({N},)")
    assert_user_error(run(runner, common), "both --image-features and --text-features")
    assert_user_error(run(runner, ["refine"]), "give a pool file")
    assert_user_error(run(runner, ["refine", img.with_suffix(".npz"), "--image-features", img,
                                   "--text-features", txt]), "not both")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--method", "nope"], ["unknown method 'nope'", "zlap"]),
        (["--method", "zeroshot", "--k", "3"], ["zeroshot: unknown parameter(s) k"]),
        (["--k", "abc"], ["parameter k must be int", "'abc'"]),
        (["--k", "0"], ["parameter k must be >= 1"]),
        (["--k", "2.5"], ["parameter k must be int"]),
        (["--alpha", "2"], ["parameter alpha must be <= 0.999"]),
        (["--gamma", "-1"], ["parameter gamma must be >= 1e-06"]),
        (["--gamma", "0"], ["parameter gamma must be >= 1e-06"]),  # every similarity^0 = 1: no class wins
        (["--method", "zeroshot", "--logit-scale", "0"], ["parameter logit_scale must be >= 1e-06"]),
        (["--method", "gmm", "--logit-scale", "0"], ["parameter logit_scale must be >= 1e-06"]),
        (["--knn-backend", "faiss"], ["parameter knn_backend must be one of"]),
        (["--scale-sim", "maybe"], ["parameter scale_sim must be bool"]),
        (["--device", "tpu9"], ["device 'tpu9' is not a torch device"]),
        (["--seed", "x"], ["'--seed'", "'x' is not a valid integer"]),
        (["--no-such-option"], ["No such option", "--no-such-option"]),
    ],
)
def test_bad_options(runner, pool_file, args, fragments):
    method = [] if "--method" in args else ["--method", "zlap"]  # zlap's parameters, whatever the default
    assert_user_error(run(runner, ["refine", pool_file, *method] + args), *fragments)


def test_bad_params_file(runner, tmp_path, pool_file):
    cases = {
        "broken.json": ("{k: 3", "not valid JSON"),
        "list.json": ("[3]", "expected a JSON object"),
        "unknown.json": ('{"kk": 3}', "unknown parameter(s) kk"),
        "badvalue.json": ('{"alpha": "high"}', "parameter alpha must be float"),
    }
    for name, (text, fragment) in cases.items():
        (tmp_path / name).write_text(text)
        line = assert_user_error(run(runner, ["refine", pool_file, "--method", "zlap", "--params", tmp_path / name]),
                                 fragment)
        if name in ("broken.json", "list.json"):
            assert line.startswith(f"Error: {tmp_path / name}:")
    assert_user_error(run(runner, ["refine", pool_file, "--params", tmp_path / "absent.json"]),
                      "absent.json", "no such file")


def test_bad_out(runner, tmp_path, pool_file):
    line = assert_user_error(run(runner, ["refine", pool_file, "--out", tmp_path / "preds.txt"]),
                             "preds.txt", "must be a .npz file")
    line = assert_user_error(run(runner, ["refine", pool_file, "--out", tmp_path / "nope" / "p.npz"]),
                             "p.npz", "does not exist")
    assert not (tmp_path / "nope").exists()
    assert not (tmp_path / "preds.txt").exists()


def test_bad_methods_for_compare(runner, pool_file):
    assert_user_error(run(runner, ["compare", pool_file, "--methods", "zeroshot,nope"]), "unknown method(s) nope")
    assert_user_error(run(runner, ["compare", pool_file, "--methods", ","]), "no method given")
    assert_user_error(run(runner, ["demo", "--methods", "nope"]), "unknown method(s) nope")
    params = pool_file.parent / "params.json"
    params.write_text(json.dumps({"zlapp": {"k": 7}, "zeroshot": {}}))  # a misspelt method: not silently defaults
    assert_user_error(run(runner, ["compare", pool_file, "--methods", "zeroshot,zlap", "--params", params]),
                      "params.json", "unknown method(s) zlapp")


# --- refine: outputs ----------------------------------------------------------------------------


def test_init_inmap_on_the_line_is_initial_inmap(runner, tmp_path, pool_file, arrays):
    """``--init inmap`` (the papers' spelling) starts zlap from InMaP proxies, as ``--initial inmap``."""
    out = tmp_path / "preds.npz"
    result = run(runner, ["refine", pool_file, "--method", "zlap", "--init", "inmap", "--out", out])
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as data:
        labels, params = data["labels"], json.loads(str(data["params"]))
    expected = zsadapt.refine(arrays["image_features"], arrays["text_features"], "zlap", initial="inmap")
    np.testing.assert_array_equal(labels, expected.labels)
    assert params["initial"] == "inmap" and "init" not in params


def test_refine_writes_the_output(runner, tmp_path, pool_file, arrays):
    out = tmp_path / "preds.npz"
    result = run(runner, ["refine", pool_file, "--method", "zlap", "--k", "4", "--out", out])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with np.load(out, allow_pickle=False) as data:
        assert {"labels", "probs", "method", "params"} <= set(data.files)
        labels, probs = data["labels"], data["probs"]
        method, params = str(data["method"]), json.loads(str(data["params"]))
        classnames = list(data["classnames"])
    # Independent of the CLI: the API on the same arrays.
    expected = zsadapt.refine(arrays["image_features"], arrays["text_features"], "zlap", k=4)
    assert labels.dtype == np.int64 and labels.shape == (N,)
    assert probs.shape == (N, C)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, expected.labels)
    # zlap's probabilities are a power (beta ~ 5) of the propagated mass, which multiplies float32
    # round-off in the mass by beta.
    np.testing.assert_allclose(probs, expected.probs, rtol=1e-4, atol=1e-7)
    assert method == "zlap"
    assert params == expected.params and params["k"] == 4
    assert classnames == [f"class {c}" for c in range(C)]


def test_refine_a_pool_of_one_image(runner, tmp_path, arrays):
    """One image: the default method writes the zero-shot label; --save-model is refused before
    anything is written (one image fits no model)."""
    path = _save(tmp_path, "one.npz", **_with(arrays, image_features=arrays["image_features"][2:3], labels=None))
    out = tmp_path / "preds.npz"
    result = run(runner, ["refine", path, "--out", out])
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as data:
        labels = data["labels"]
    expected = np.argmax(arrays["image_features"][2:3] @ arrays["text_features"].T, axis=1)
    assert labels.tolist() == expected.tolist()
    again = tmp_path / "again.npz"
    result = run(runner, ["refine", path, "--out", again, "--save-model", tmp_path / "model.safetensors"])
    assert_user_error(result, "one.npz", "one image", "--save-model")
    assert not again.exists() and not (tmp_path / "model.safetensors").exists()


def test_refine_never_overwrites_without_flag(runner, tmp_path, pool_file):
    out = tmp_path / "preds.npz"
    out.write_bytes(b"old results")
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--out", out])
    assert_user_error(result, str(out), "already exists", "--overwrite")
    assert out.read_bytes() == b"old results"
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--out", out, "--overwrite"])
    assert result.exit_code == 0, result.output
    with np.load(out, allow_pickle=False) as data:
        assert str(data["method"]) == "zeroshot"
    assert sorted(os.listdir(tmp_path)) == ["pool.npz", "preds.npz"]


def test_refine_failed_write_leaves_nothing(runner, tmp_path, pool_file, monkeypatch):
    """A write that fails half way gives a one-line error, keeps the old file, no temp file."""
    out = tmp_path / "preds.npz"
    out.write_bytes(b"old results")

    def failing_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", failing_savez)
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--out", out, "--overwrite"])
    assert_user_error(result, str(out), "No space left on device")
    assert out.read_bytes() == b"old results"
    new = tmp_path / "new.npz"
    assert_user_error(run(runner, ["refine", pool_file, "--method", "zeroshot", "--out", new]), "new.npz")
    assert sorted(os.listdir(tmp_path)) == ["pool.npz", "preds.npz"]


def test_an_output_that_is_an_input_is_refused(runner, tmp_path, pool_file, arrays):
    """Issue 13 item 9: ``--out`` naming an input file, directly or through a link, is refused
    whatever the flags, before anything is computed; the inputs are untouched."""
    image, text = tmp_path / "image.npz", tmp_path / "text.npz"
    np.savez(image, image_features=arrays["image_features"])
    np.savez(text, text_features=arrays["text_features"])
    link = tmp_path / "link.npz"
    link.symlink_to(pool_file)
    before = {path: path.read_bytes() for path in (pool_file, image, text)}
    separate = ["--image-features", image, "--text-features", text]
    for args in (["refine", pool_file, "--out", pool_file, "--overwrite"],
                 ["refine", pool_file, "--out", link, "--overwrite"],
                 ["refine", *separate, "--out", image, "--overwrite"],
                 ["refine", *separate, "--out", text, "--overwrite"]):
        assert_user_error(run(runner, args), "is also an input")
    assert {path: path.read_bytes() for path in before} == before


@pytest.mark.parametrize("umask, existing, expected", [(0o022, None, 0o644), (0o077, None, 0o600),
                                                        (0o022, 0o640, 0o640)])
def test_outputs_get_the_permissions_of_a_plain_write(runner, tmp_path, pool_file, umask, existing, expected):
    """Issue 13 item 10: a new output gets 0666 less the umask (not the temporary file's 0600);
    a replaced one keeps its mode."""
    out = tmp_path / "preds.npz"
    if existing is not None:
        out.write_bytes(b"old")
        out.chmod(existing)
    previous = os.umask(umask)
    try:
        result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--out", out, "--overwrite"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == expected


def test_an_unwritable_out_fails_before_any_computation(runner, tmp_path, pool_file, monkeypatch):
    """Issue 13 item 11: a folder that exists but refuses new files (``/sys``, even for root)
    fails at once, as a missing folder does: the solver is never called."""
    from zsadapt import api

    if not sys.platform.startswith("linux") or not os.path.isdir("/sys"):
        pytest.skip("needs Linux's /sys")

    def no_solve(*args, **kwargs):
        raise AssertionError("refine ran although --out cannot be written")

    monkeypatch.setattr(api, "refine", no_solve)  # the command imports it when it runs
    assert_user_error(run(runner, ["refine", pool_file, "--out", "/sys/o.npz"]), "/sys/o.npz", "cannot write in /sys")
    assert_user_error(run(runner, ["refine", pool_file, "--report", "/sys/r.html"]), "/sys/r.html")
    assert_user_error(run(runner, ["refine", pool_file, "--save-model", "/sys/m.safetensors"]), "/sys/m.safetensors")


def test_refine_json_stdout_is_clean(runner, tmp_path, pool_file, arrays):
    out = tmp_path / "p.npz"
    result = run(runner, ["refine", pool_file, "--method", "zlap", "--json", "--out", out])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but the JSON
    expected = zsadapt.refine(arrays["image_features"], arrays["text_features"], "zlap")
    base = zsadapt.refine(arrays["image_features"], arrays["text_features"], "zeroshot")
    assert summary["method"] == "zlap" and summary["n_images"] == N and summary["n_classes"] == C
    assert summary["accuracy"] == pytest.approx(zsadapt.accuracy(expected.labels, arrays["labels"]))
    assert summary["zeroshot_accuracy"] == pytest.approx(zsadapt.accuracy(base.labels, arrays["labels"]))
    assert summary["out"] == str(out)
    # Notes (the pool is not normalised; progress) went to stderr only, the normalisation once.
    assert result.stderr.count("not L2-normalised") == 1
    assert "zsadapt:" not in result.stdout


def test_refine_line_summary_and_unsaved_note(runner, pool_file):
    result = run(runner, ["refine", pool_file, "--method", "zeroshot"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"zeroshot: {N} images, {C} classes, accuracy ")
    assert result.stdout.count("\n") == 1
    assert "predictions were not saved" in result.stderr


def test_refine_summary_of_a_one_image_pool_says_image(runner, tmp_path, arrays):
    path = tmp_path / "single.npz"
    np.savez(path, image_features=arrays["image_features"][:1], text_features=arrays["text_features"])
    result = run(runner, ["refine", str(path), "--method", "zeroshot"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"zeroshot: 1 image, {C} classes, ")


def test_refine_with_separate_files_and_params_file(runner, tmp_path, arrays):
    for key in ("image_features", "text_features", "labels"):
        np.save(tmp_path / f"{key}.npy", arrays[key])
    (tmp_path / "params.json").write_text(json.dumps({"zlap": {"k": 3, "alpha": 0.5}}))
    out = tmp_path / "p.npz"
    result = run(runner, [
        "refine", "--image-features", tmp_path / "image_features.npy",
        "--text-features", tmp_path / "text_features.npy", "--labels", tmp_path / "labels.npy",
        "--params", tmp_path / "params.json", "--alpha", "0.2", "--out", out, "--method", "zlap",
    ])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        params = json.loads(str(data["params"]))
        labels = data["labels"]
    assert params["k"] == 3 and params["alpha"] == 0.2  # the command line wins over the file
    expected = zsadapt.refine(arrays["image_features"], arrays["text_features"], "zlap", k=3, alpha=0.2)
    np.testing.assert_array_equal(labels, expected.labels)


def test_refine_reads_torch_and_safetensors_pools(runner, tmp_path, arrays):
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(np.asarray(arrays[k])) for k in ("image_features", "text_features", "labels")}
    torch.save(tensors, tmp_path / "pool.pt")
    save_file(tensors, str(tmp_path / "pool.safetensors"))
    outputs = []
    for name in ("pool.pt", "pool.safetensors"):
        result = run(runner, ["refine", tmp_path / name, "--method", "zeroshot", "--json"])
        assert result.exit_code == 0, result.output
        outputs.append(json.loads(result.stdout)["accuracy"])
    assert outputs[0] == outputs[1] is not None


def test_quiet_silences_notes(runner, pool_file):
    loud = run(runner, ["refine", pool_file, "--method", "zlap"])
    assert loud.exit_code == 0 and "not L2-normalised" in loud.stderr
    quiet = run(runner, ["refine", pool_file, "--method", "zlap", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert quiet.stdout.split(", ")[:3] == loud.stdout.split(", ")[:3]
    quiet = run(runner, ["compare", pool_file, "--methods", "zeroshot,zlap", "-q"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_a_slow_start_shows_a_heartbeat_until_the_first_note(runner, pool_file, monkeypatch):
    """Issue 13 item 7: the seconds before a command's first note (importing torch and the
    solvers, reading the inputs) show a line every few seconds; it ends with the command, and
    ``--quiet`` silences it."""
    from zsadapt import io, messages

    monkeypatch.setattr(messages, "PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(messages, "LOG_INTERVAL", 0.05)
    real = io.read_pool

    def slow_read(*args, **kwargs):
        time.sleep(0.5)  # a slow start: nothing is printed before the pool is read
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "read_pool", slow_read)  # the command imports it when it runs
    loud = run(runner, ["refine", pool_file, "--method", "zeroshot"])
    assert loud.exit_code == 0, loud.output
    beats = [line for line in loud.stderr.splitlines() if line.startswith("zsadapt: refine: starting (")]
    assert len(beats) >= 3 and beats[-1].endswith(" s)")
    assert messages._heartbeat is None  # stopped when the command ended
    quiet = run(runner, ["refine", pool_file, "--method", "zeroshot", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    failed = run(runner, ["refine", pool_file, "--threads", "2", "--no-such-option"])
    assert failed.exit_code == 2 and messages._heartbeat is None  # a parse error after --threads


def test_warnings_are_one_line_on_stderr(runner, pool_file):
    """A solver warning (CG at its iteration cap) reaches the user as one line, not a source
    excerpt, and never on stdout."""
    result = run(runner, ["refine", pool_file, "--method", "zlap", "--max-iter", "1", "--tol", "1e-12", "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    lines = [line for line in result.stderr.splitlines() if "stopped at max_iter=1" in line]
    assert len(lines) == 1 and lines[0].startswith("zsadapt: warning: zlap:"), result.stderr
    assert "ConvergenceWarning" not in result.stderr and "refine(" not in result.stderr


# --- compare, demo, info, help ------------------------------------------------------------------


def test_compare_table_and_json(runner, pool_file, arrays):
    table = run(runner, ["compare", pool_file, "--methods", "zeroshot,zlap"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["method", "accuracy"]
    assert [line.split()[0] for line in lines[2:]] == ["zeroshot", "zlap"]
    assert "running zeroshot (1 of 2) on" in table.stderr and "running zlap (2 of 2) on" in table.stderr
    as_json = run(runner, ["compare", pool_file, "--methods", "zeroshot,zlap", "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["pool"] == str(pool_file)
    rows = {row["method"]: row for row in data["rows"]}
    for method in ("zeroshot", "zlap"):
        expected = zsadapt.refine(arrays["image_features"], arrays["text_features"], method)
        assert rows[method]["accuracy"] == pytest.approx(zsadapt.accuracy(expected.labels, arrays["labels"]))
        assert rows[method]["seconds"] >= 0
        # The table prints the same numbers.
        cells = next(line.split() for line in lines[2:] if line.split()[0] == method)
        assert cells[1] == f"{rows[method]['accuracy']:.2f}"
    assert rows["zlap"]["delta"] == pytest.approx(rows["zlap"]["accuracy"] - rows["zeroshot"]["accuracy"])
    assert as_json.stderr.count("not L2-normalised") == 1


def test_compare_without_labels(runner, tmp_path, arrays):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, image_features=arrays["image_features"], text_features=arrays["text_features"])
    result = run(runner, ["compare", path, "--methods", "zeroshot,zlap", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["accuracy"] for r in rows] == [None, None]
    table = run(runner, ["compare", path, "--methods", "zeroshot"])
    assert table.stdout.strip().splitlines()[2].split()[1] == "-"


def test_demo(runner):
    result = run(runner, ["demo", "--methods", "zeroshot,zlap", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pool"].startswith("demo pool (synthetic")
    rows = {row["method"]: row for row in data["rows"]}
    assert set(rows) == {"zeroshot", "zlap"}
    # The demo pool behaves like the shared real pools: zero-shot clearly imperfect, far from chance.
    assert 40 < rows["zeroshot"]["accuracy"] < 75
    table = run(runner, ["demo", "--methods", "zeroshot,zlap", "--quiet"])
    assert table.exit_code == 0 and table.stderr == ""
    cells = {line.split()[0]: line.split() for line in table.stdout.strip().splitlines()[2:]}
    assert cells["zlap"][1] == f"{rows['zlap']['accuracy']:.2f}"  # deterministic: same numbers
    # Zero-shot is the baseline of the delta column however the methods are listed, and the
    # column says so.
    reordered = run(runner, ["demo", "--methods", "zlap,zeroshot", "--quiet"]).stdout.strip().splitlines()
    assert reordered[0].split()[3:5] == ["vs", "zeroshot"]  # method, accuracy %, vs zeroshot
    assert [line.split()[0] for line in reordered[2:]] == ["zeroshot", "zlap"]


def test_info(runner):
    text = run(runner, ["info"])
    assert text.exit_code == 0, text.output
    assert "zsadapt: " + zsadapt.__version__ in text.stdout
    assert "zeroshot" in text.stdout and "zlap" in text.stdout
    as_json = run(runner, ["info", "--json"])
    assert as_json.exit_code == 0
    facts = json.loads(as_json.stdout)
    assert facts["zsadapt"] == zsadapt.__version__ and facts["torch"] == torch.__version__
    assert {"zeroshot", "zlap"} <= set(facts["methods"])
    assert "torch" in facts["knn_backends"] and facts["devices"][0] == "cpu"


def test_info_json_stdout_is_clean_in_a_fresh_process():
    """Importing pykeops prints "[KeOps] Warning : CUDA libraries not found" with print(); in a
    fresh interpreter (pykeops not yet imported) stdout must still be pure JSON."""
    proc = subprocess.run(
        [sys.executable, "-m", "zsadapt.cli.main", "info", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert "zlap" in facts["methods"]
    assert "[KeOps]" not in proc.stdout


def test_every_command_help_shows_an_example(runner):
    result = run(runner, ["--help"])
    assert result.exit_code == 0 and "Examples:" in result.stdout
    for name in main.commands:
        result = run(runner, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.stdout and f"zsadapt {name}" in result.stdout, name


def test_refine_help_lists_solver_parameters(runner):
    help_text = run(runner, ["refine", "--help"]).stdout
    for option in ("--k", "--gamma", "--alpha", "--logit-scale", "--params", "--overwrite", "--json"):
        assert option in help_text
    assert "--k INTEGER" in help_text and "--alpha FLOAT" in help_text
    assert "--knn-backend [auto|torch|keops]" in help_text
    # The default the help names is the one refine runs.
    assert f"default: {zsadapt.solvers.DEFAULT_METHOD} (" in " ".join(help_text.split())


def test_version(runner):
    result = run(runner, ["--version"])
    assert result.exit_code == 0 and zsadapt.__version__ in result.stdout


def test_library_prints_are_kept_off_stdout(runner, pool_file, monkeypatch):
    """Third-party code that prints during a command (pykeops does, on import) lands on stderr;
    stdout stays parseable."""
    from zsadapt import api

    real = api.refine

    def chatty_refine(*args, **kwargs):
        print("[KeOps] Warning : CUDA libraries not found or could not be loaded")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "refine", chatty_refine)  # the command imports it when it runs
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "zeroshot"
    assert "[KeOps] Warning" in result.stderr
    # --quiet: nowhere (the command's results still on stdout, its warnings still on stderr)
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "zeroshot"
    assert "[KeOps]" not in result.stderr and "[KeOps]" not in result.stdout


def test_params_file_keyed_by_method(runner, tmp_path, pool_file):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"zlap": {"k": 3}, "zeroshot": {"logit_scale": 50}}))
    for method, key, value in (("zlap", "k", 3), ("zeroshot", "logit_scale", 50.0)):
        result = run(runner, ["refine", pool_file, "--method", method, "--params", path, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["params"][key] == value
    path.write_text(json.dumps({"zlap": {"k": 3}}))
    result = run(runner, ["refine", pool_file, "--method", "zeroshot", "--params", path, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["logit_scale"] == 100.0


def test_compare_prior_images_reaches_the_methods_that_take_it(runner, tmp_path, pool_file, arrays):
    """``compare --prior-images K`` is gmm's and auto's ``prior_images`` (the other methods have no
    such parameter and run as without it); a --params entry wins."""
    X, T, y = arrays["image_features"], arrays["text_features"], arrays["labels"]
    expected = {m: zsadapt.accuracy(zsadapt.refine(X, T, m, **kw).labels, y)
                for m, kw in (("gmm", {"prior_images": 1e4}), ("zlap", {}))}
    assert expected["gmm"] != zsadapt.accuracy(zsadapt.refine(X, T, "gmm").labels, y)  # the prior matters here
    out = run(runner, ["compare", pool_file, "--methods", "gmm,zlap", "--prior-images", "1e4", "--json"])
    assert out.exit_code == 0, out.output
    rows = {row["method"]: row["accuracy"] for row in json.loads(out.stdout)["rows"]}
    assert rows == pytest.approx(expected)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"gmm": {"prior_images": 0}}))
    out = run(runner, ["compare", pool_file, "--methods", "gmm", "--prior-images", "1e4", "--params", params, "--json"])
    plain = zsadapt.accuracy(zsadapt.refine(X, T, "gmm").labels, y)
    assert json.loads(out.stdout)["rows"][0]["accuracy"] == pytest.approx(plain)
    assert_user_error(run(runner, ["compare", pool_file, "--prior-images", "-1"]), "--prior-images")
