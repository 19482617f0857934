"""Feature I/O: round trips through every supported format, the pool-file and separate-file paths
of ``read_pool``, text orientation, upcasting, normalisation notes, and atomic writes.

Expected values are computed independently with numpy (float64 row normalisation), never taken
from the code under test.
"""

from __future__ import annotations

import fractions
import json
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.io import atomic_write, check_output, read_array, read_arrays, read_pool, write_npz, write_pool

N, C, D = 12, 3, 6


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Reference L2 normalisation in float64."""
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture
def raw():
    """Un-normalised features, labels and class names of a tiny pool."""
    rng = np.random.default_rng(0)
    return {
        "image_features": (3.0 * rng.normal(size=(N, D))).astype(np.float32),
        "text_features": (0.5 * rng.normal(size=(C, D))).astype(np.float32),
        "labels": rng.integers(0, C, size=N).astype(np.int64),
        "classnames": ["cat", "dog", "bird"],
    }


def assert_pool_matches(pool, raw, *, classnames=True):
    assert pool.image_features.dtype == np.float32 and pool.text_features.dtype == np.float32
    np.testing.assert_allclose(pool.image_features, unit_rows(raw["image_features"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pool.text_features, unit_rows(raw["text_features"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pool.labels, raw["labels"])
    assert pool.labels.dtype == np.int64
    if classnames:
        assert pool.classnames == raw["classnames"]


def no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


# --- round trips -----------------------------------------------------------------------------


def test_npz_round_trip_through_write_pool(tmp_path, raw):
    pool = zsadapt.Pool(raw["image_features"], raw["text_features"], raw["labels"], raw["classnames"])
    path = write_pool(tmp_path / "pool.npz", pool)
    back = read_pool(path)
    assert_pool_matches(back, raw)
    assert back.source == str(path)
    # The written file is a plain npz that numpy reads without pickle.
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"image_features", "text_features", "labels", "classnames"}


def test_npz_written_by_numpy(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in raw.items()})
    assert_pool_matches(read_pool(path), raw)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_round_trip(tmp_path, raw, suffix):
    path = tmp_path / f"pool{suffix}"
    torch.save(
        {
            "image_features": torch.from_numpy(raw["image_features"]),
            "text_features": torch.from_numpy(raw["text_features"]),
            "labels": torch.from_numpy(raw["labels"]),
            "classnames": raw["classnames"],
            "model": "ViT-B/32",  # metadata that is not an array is skipped
            "epoch": 3,
        },
        path,
    )
    pool = read_pool(path)
    assert_pool_matches(pool, raw)
    assert "model" not in pool.extras and "epoch" not in pool.extras


def test_torch_file_is_loaded_weights_only(tmp_path, raw):
    """A .pt that pickles an arbitrary Python object is refused, not unpickled."""
    path = tmp_path / "pool.pt"
    torch.save(
        {
            "image_features": torch.from_numpy(raw["image_features"]),
            "text_features": torch.from_numpy(raw["text_features"]),
            "ratio": fractions.Fraction(1, 3),
        },
        path,
    )
    with pytest.raises(ValueError, match=r"pool\.pt: cannot be read as \.pt with weights_only=True"):
        read_pool(path)
    # A plain pickle named .pt: the same one line, without torch's warning about its protocol first.
    raw_pickle = tmp_path / "raw.pt"
    raw_pickle.write_bytes(pickle.dumps({"image_features": raw["image_features"]}, protocol=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"raw\.pt: cannot be read as \.pt with weights_only=True"):
            read_pool(raw_pickle)


def test_npy_that_is_not_an_array_file_is_refused_without_unpickling(tmp_path):
    """Garbage named .npy and an object-dtype .npy: one line saying what the file is, never
    np.load's suggestion to unpickle it."""
    garbage, objects = tmp_path / "garbage.npy", tmp_path / "objects.npy"
    garbage.write_bytes(b"\x80\x04junk")
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"^.*garbage\.npy: cannot be read as \.npy \(no NUMPY header") as err:
        read_arrays(garbage)
    assert "pickle" not in str(err.value)
    with pytest.raises(ValueError, match=r"objects\.npy: cannot be read as \.npy \(it holds Python objects"):
        read_arrays(objects)


def test_torch_bfloat16_and_single_tensor(tmp_path, raw):
    path = tmp_path / "pool.pt"
    torch.save(
        {
            "image_features": torch.from_numpy(raw["image_features"]).bfloat16(),
            "text_features": torch.from_numpy(raw["text_features"]),
        },
        path,
    )
    pool = read_pool(path)
    assert pool.image_features.dtype == np.float32
    expected = unit_rows(torch.from_numpy(raw["image_features"]).bfloat16().float().numpy())
    np.testing.assert_allclose(pool.image_features, expected, rtol=1e-6, atol=1e-6)
    single = tmp_path / "image.pt"
    torch.save(torch.from_numpy(raw["image_features"]), single)
    np.testing.assert_array_equal(read_array(single, "image_features"), raw["image_features"])


def test_torch_labels_as_a_plain_list(tmp_path, raw):
    path = tmp_path / "pool.pt"
    torch.save({"image_features": torch.from_numpy(raw["image_features"]),
                "text_features": torch.from_numpy(raw["text_features"]),
                "labels": raw["labels"].tolist()}, path)
    np.testing.assert_array_equal(read_pool(path).labels, raw["labels"])


def test_torch_pool_key_that_is_not_an_array(tmp_path, raw):
    path = tmp_path / "pool.pt"
    torch.save({"image_features": {"a": 1}, "text_features": torch.from_numpy(raw["text_features"])}, path)
    with pytest.raises(ValueError, match=r"pool\.pt: image_features: holds a dict, expected an array"):
        read_pool(path)


def test_safetensors_round_trip_with_classnames_in_metadata(tmp_path, raw):
    from safetensors.torch import save_file

    path = tmp_path / "pool.safetensors"
    save_file(
        {
            "image_features": torch.from_numpy(raw["image_features"]),
            "text_features": torch.from_numpy(raw["text_features"]),
            "labels": torch.from_numpy(raw["labels"]),
        },
        str(path),
        metadata={"classnames": json.dumps(raw["classnames"])},
    )
    assert_pool_matches(read_pool(path), raw)


def test_safetensors_bad_classnames_metadata(tmp_path, raw):
    from safetensors.torch import save_file

    path = tmp_path / "pool.safetensors"
    tensors = {k: torch.from_numpy(raw[k]) for k in ("image_features", "text_features")}
    save_file(tensors, str(path), metadata={"classnames": "cat, dog, bird"})
    with pytest.raises(ValueError, match=r"pool\.safetensors: metadata 'classnames' must be a JSON list"):
        read_pool(path)


def test_separate_npy_files(tmp_path, raw):
    for key in ("image_features", "text_features", "labels"):
        np.save(tmp_path / f"{key}.npy", raw[key])
    pool = read_pool(
        image_features=tmp_path / "image_features.npy",
        text_features=tmp_path / "text_features.npy",
        labels=tmp_path / "labels.npy",
    )
    assert_pool_matches(pool, raw, classnames=False)
    assert pool.classnames is None


def test_separate_files_may_be_pool_files(tmp_path, raw):
    """--image-features/--text-features may point at files holding several arrays: the one with
    the matching name is used."""
    both = tmp_path / "both.npz"
    np.savez(both, image_features=raw["image_features"], text_features=raw["text_features"])
    pool = read_pool(image_features=both, text_features=both)
    np.testing.assert_allclose(pool.text_features, unit_rows(raw["text_features"]), rtol=1e-6, atol=1e-6)
    other = tmp_path / "other.npz"
    np.savez(other, a=raw["image_features"], b=raw["image_features"])
    with pytest.raises(ValueError, match=r"other\.npz: no array named 'image_features' \(found: a, b\)"):
        read_pool(image_features=other, text_features=both)


def test_separate_file_errors_name_the_right_file(tmp_path, raw):
    np.save(tmp_path / "img.npy", raw["image_features"])
    np.save(tmp_path / "txt.npy", raw["text_features"][:, :4])
    np.save(tmp_path / "lab.npy", raw["labels"][:5])
    np.save(tmp_path / "txt_ok.npy", raw["text_features"])
    with pytest.raises(ValueError) as err:
        read_pool(image_features=tmp_path / "img.npy", text_features=tmp_path / "txt.npy")
    assert str(err.value).startswith(f"{tmp_path / 'txt.npy'}: shape (3, 4) does not match")
    with pytest.raises(ValueError) as err:
        read_pool(image_features=tmp_path / "img.npy", text_features=tmp_path / "txt_ok.npy",
                  labels=tmp_path / "lab.npy")
    assert str(err.value).startswith(f"{tmp_path / 'lab.npy'}: expected shape ({N},), got (5,)")


def test_labels_file_overrides_pool_labels(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"],
             labels=raw["labels"])
    other = (raw["labels"] + 1) % C
    np.save(tmp_path / "labels.npy", other)
    np.testing.assert_array_equal(read_pool(path, labels=tmp_path / "labels.npy").labels, other)
    np.save(tmp_path / "bad.npy", np.full(N, C))
    with pytest.raises(ValueError, match=r"bad\.npy: values must lie in 0\.\.2"):
        read_pool(path, labels=tmp_path / "bad.npy")


def test_pool_file_and_separate_files_are_exclusive(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"])
    with pytest.raises(ValueError, match="not both"):
        read_pool(path, image_features=path)
    with pytest.raises(ValueError, match="both --image-features and --text-features"):
        read_pool(image_features=path)


# --- orientation, dtype, normalisation ---------------------------------------------------------


def test_text_as_d_by_c_is_transposed_with_a_note(tmp_path, raw, capsys):
    zsadapt.set_quiet(False)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"].T)
    pool = read_pool(path)
    np.testing.assert_allclose(pool.text_features, unit_rows(raw["text_features"]), rtol=1e-6, atol=1e-6)
    err = capsys.readouterr().err
    assert f"{path}: text_features has shape ({D}, {C}); reading it as (d, C)" in err


def test_square_text_is_read_as_c_by_d_with_a_note(tmp_path, raw, capsys):
    zsadapt.set_quiet(False)
    square = np.random.default_rng(1).normal(size=(D, D)).astype(np.float32)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=square)
    pool = read_pool(path)
    # Rows stay rows: class c is row c of the file.
    np.testing.assert_allclose(pool.text_features, unit_rows(square), rtol=1e-6, atol=1e-6)
    err = capsys.readouterr().err
    assert "is square" in err and "reading it as (C, d)" in err


def test_text_matching_neither_orientation(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"pool\.npz: text_features: shape \(4, 5\) does not match .* d = 6"):
        read_pool(path)


def test_float16_is_upcast(tmp_path, raw):
    half = {k: raw[k].astype(np.float16) for k in ("image_features", "text_features")}
    path = tmp_path / "pool.npz"
    np.savez(path, **half)
    pool = read_pool(path)
    assert pool.image_features.dtype == np.float32 and pool.text_features.dtype == np.float32
    np.testing.assert_allclose(pool.image_features, unit_rows(half["image_features"]), rtol=1e-6, atol=1e-6)


def test_normalisation_note_once_on_stderr(tmp_path, raw, capsys):
    zsadapt.set_quiet(False)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"])
    pool = read_pool(path)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "not L2-normalised" in lines[0] and "image_features" in lines[0] and "text_features" in lines[0]
    # An already normalised pool: no note at all, also when it is refined.
    write_pool(tmp_path / "unit.npz", pool)
    again = read_pool(tmp_path / "unit.npz")
    zsadapt.refine(again.image_features, again.text_features, "zeroshot")
    assert capsys.readouterr() == ("", "")


def test_only_the_unnormalised_array_is_named(tmp_path, raw, capsys):
    zsadapt.set_quiet(False)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=unit_rows(raw["image_features"]), text_features=raw["text_features"])
    read_pool(path)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "text_features" in err and "image_features" not in err


def test_quiet_silences_the_note(tmp_path, raw, capsys):
    zsadapt.set_quiet(True)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"])
    read_pool(path)
    assert capsys.readouterr().err == ""


# --- labels and class names --------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.full(N, 3), r"values must lie in 0\.\.2, found 3\.\.3"),
        (np.full(N, -1), r"values must lie in 0\.\.2, found -1\.\.-1"),
        (np.zeros(N - 1, np.int64), rf"expected shape \({N},\), got \({N - 1},\)"),
        (np.zeros((N, 1), np.int64), rf"expected shape \({N},\), got \({N}, 1\)"),
        (np.full(N, 0.5), "expected integer class indices, got dtype float64"),
        (np.full(N, np.nan), "expected integer class indices, got dtype float64"),
    ],
)
def test_bad_labels(tmp_path, raw, labels, message):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"], labels=labels)
    with pytest.raises(ValueError, match=rf"pool\.npz: labels: {message}"):
        read_pool(path)


def test_integral_float_labels_are_accepted(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"],
             labels=raw["labels"].astype(np.float32))
    pool = read_pool(path)
    assert pool.labels.dtype == np.int64
    np.testing.assert_array_equal(pool.labels, raw["labels"])


def test_classnames_length(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"],
             classnames=np.array(["cat", "dog"]))
    with pytest.raises(ValueError, match=r"pool\.npz: classnames: 2 names for 3 classes"):
        read_pool(path)


# --- unreadable files --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("pool.npz", b"not a zip file at all", r"cannot be read as \.npz \(not a zip archive"),
        ("pool.pt", b"\x80\x02garbage", r"cannot be read as \.pt with weights_only=True"),
        ("pool.safetensors", b"garbage!!", r"cannot be read as \.safetensors"),
        ("pool.npy", b"\x93NUMPY garbage", r"cannot be read as \.npy"),
        ("pool.npz", b"", r"cannot be read as \.npz"),
    ],
)
def test_corrupt_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_arrays(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_truncated_npz(tmp_path, raw):
    good = tmp_path / "good.npz"
    np.savez(good, image_features=raw["image_features"], text_features=raw["text_features"])
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: cannot be read as \.npz"):
        read_pool(cut)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj\.npy: cannot be read as \.npy"):
        read_arrays(path)


def test_missing_folder_and_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"nope\.npz: no such file"):
        read_arrays(tmp_path / "nope.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(ValueError, match=r"dir\.npz: is a folder"):
        read_arrays(tmp_path / "dir.npz")
    (tmp_path / "pool.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"pool\.csv: unsupported file type '\.csv'"):
        read_arrays(tmp_path / "pool.csv")
    np.save(tmp_path / "x.npy", np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"x\.npy: unsupported file type '\.npy'; expected one of \.npz"):
        read_pool(tmp_path / "x.npy")


def test_missing_keys_are_listed(tmp_path, raw):
    path = tmp_path / "pool.npz"
    np.savez(path, feats=raw["image_features"])
    with pytest.raises(ValueError, match=r"pool\.npz: missing image_features and text_features \(found: feats\)"):
        read_pool(path)


# --- writing -----------------------------------------------------------------------------------


def test_write_refuses_to_overwrite(tmp_path, raw):
    path = tmp_path / "out.npz"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match=r"out\.npz: already exists"):
        write_npz(path, {"a": np.ones(3)})
    assert path.read_bytes() == b"precious"
    write_npz(path, {"a": np.arange(3)}, overwrite=True)
    with np.load(path) as data:
        np.testing.assert_array_equal(data["a"], np.arange(3))
    assert no_temp_files(tmp_path)


def test_failed_write_leaves_no_trace(tmp_path):
    path = tmp_path / "out.npz"
    path.write_bytes(b"precious")

    def fail(handle):
        handle.write(b"half of a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(ValueError, match=r"out\.npz: cannot write \(No space left on device\)"):
        atomic_write(path, fail, overwrite=True)
    assert path.read_bytes() == b"precious"
    assert no_temp_files(tmp_path)

    fresh = tmp_path / "fresh.npz"
    with pytest.raises(RuntimeError):
        atomic_write(fresh, lambda handle: (_ for _ in ()).throw(RuntimeError("bug")))
    assert not fresh.exists() and no_temp_files(tmp_path)


def test_check_output(tmp_path):
    with pytest.raises(ValueError, match=r"out\.txt: output must be a \.npz file"):
        check_output(tmp_path / "out.txt", suffix=".npz")
    with pytest.raises(ValueError, match=r"out\.npz: folder .*missing does not exist"):
        check_output(tmp_path / "missing" / "out.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match=r"d\.npz: is a folder"):
        check_output(tmp_path / "d.npz", overwrite=True)
    assert check_output(tmp_path / "ok.npz", suffix=".npz") == tmp_path / "ok.npz"


def test_unreadable_file(tmp_path, raw, monkeypatch):
    path = tmp_path / "locked.npz"
    np.savez(path, image_features=raw["image_features"], text_features=raw["text_features"])
    if os.geteuid() != 0:  # root reads anything: simulate the permission error there instead
        path.chmod(0)
    else:
        def denied(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(zsadapt.io, "open", denied, raising=False)
    with pytest.raises(ValueError) as err:
        read_pool(path)
    assert str(err.value) == f"{path}: cannot be opened (Permission denied)"
