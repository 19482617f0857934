"""Validation of in-memory inputs: every check gives a one-line error naming the array; accepted
inputs come out float32 with unit rows (checked against a float64 numpy reference)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.arrays import like_input, resolve_device, to_tensor
from zsadapt.validation import check_classnames, check_labels, l2_normalise, orient_text, prepare_features

CPU = torch.device("cpu")


def features(n=10, c=3, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(c, d)).astype(np.float32)


def unit_rows(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_prepare_features_output():
    X, T = features()
    Xt, Tt = prepare_features(X, T, CPU)
    assert Xt.dtype == torch.float32 and Tt.dtype == torch.float32
    assert Xt.device == CPU and tuple(Xt.shape) == (10, 5) and tuple(Tt.shape) == (3, 5)
    np.testing.assert_allclose(Xt.numpy(), unit_rows(X), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Tt.numpy(), unit_rows(T), rtol=1e-6, atol=1e-6)


def test_inputs_are_not_modified():
    X, T = features()
    X0, T0 = X.copy(), T.copy()
    Xtorch = torch.from_numpy(X.copy())
    prepare_features(X, T, CPU)
    prepare_features(Xtorch, T, CPU)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(T, T0)
    np.testing.assert_array_equal(Xtorch.numpy(), X0)


@pytest.mark.parametrize(
    "image, text, exc, message",
    [
        (np.ones(5), None, ValueError, r"^image_features: expected a 2-d array \(N, d\), got shape \(5,\)$"),
        (np.ones((1, 10, 5)), None, ValueError, r"^image_features: expected a 2-d array \(N, d\), got shape \(1, 10, 5\)$"),
        (None, np.ones(5), ValueError, r"^text_features: expected a 2-d array \(C, d\), got shape \(5,\)$"),
        (np.ones((0, 5)), None, ValueError, r"^image_features: the pool is empty \(0 images\)$"),
        (np.ones((10, 0)), None, ValueError, r"^image_features: has 0 feature dimensions$"),
        (None, np.ones((1, 5)), ValueError, r"^text_features: needs at least 2 classes, got 1$"),
        (None, np.ones((3, 4)), ValueError, r"^text_features: shape \(3, 4\) does not match the image feature dimension d = 5$"),
        (np.array([["a"] * 5] * 10), None, TypeError, r"^image_features: expected a numeric array, got dtype <U1$"),
        (np.array([[object()] * 5] * 10), None, TypeError, r"^image_features: expected a numeric array, got dtype object$"),
        (np.ones((10, 5), np.complex64), None, TypeError, r"^image_features: complex values are not supported$"),
        (np.full((10, 5), 1e300), None, ValueError, r"^image_features: values too large for float32$"),
    ],
)
def test_shape_and_dtype_errors(image, text, exc, message):
    X, T = features()
    msg = one_line_error(exc, prepare_features, X if image is None else image, T if text is None else text, CPU)
    assert re.search(message, msg), msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_first_bad_row(bad):
    X, T = features()
    X[7, 2] = bad
    X[9, 0] = bad
    msg = one_line_error(ValueError, prepare_features, X, T, CPU, image_name="pool.npz: image_features")
    assert msg == "pool.npz: image_features: contains NaN or infinite values (first in row 7)"
    X, T = features()
    T[1, 1] = bad
    msg = one_line_error(ValueError, prepare_features, X, T, CPU)
    assert msg == "text_features: contains NaN or infinite values (first in row 1)"


def test_zero_rows_are_refused():
    X, T = features()
    X[4] = 0
    assert one_line_error(ValueError, prepare_features, X, T, CPU) == "image_features: row 4 is all zeros (no direction)"
    X, T = features()
    T[2] = 0
    assert one_line_error(ValueError, prepare_features, X, T, CPU) == "text_features: row 2 is all zeros (no direction)"


def test_float16_and_integer_inputs_are_upcast():
    X, T = features()
    for image in (X.astype(np.float16), torch.from_numpy(X).half(), torch.from_numpy(X).bfloat16()):
        Xt, _ = prepare_features(image, T, CPU)
        assert Xt.dtype == torch.float32
        ref = image.float().numpy() if isinstance(image, torch.Tensor) else image.astype(np.float32)
        np.testing.assert_allclose(Xt.numpy(), unit_rows(ref), rtol=1e-6, atol=1e-6)
    Xt, _ = prepare_features(np.arange(1, 51).reshape(10, 5), T, CPU)
    np.testing.assert_allclose(Xt.numpy(), unit_rows(np.arange(1, 51).reshape(10, 5)), rtol=1e-6)


def test_orientation():
    X, T = features(d=5, c=3)
    # (d, C): transposed.
    _, Tt = prepare_features(X, T.T, CPU)
    np.testing.assert_allclose(Tt.numpy(), unit_rows(T), rtol=1e-6, atol=1e-6)
    # Square: rows are classes.
    S = np.random.default_rng(2).normal(size=(5, 5)).astype(np.float32)
    _, Ts = prepare_features(X, S, CPU)
    np.testing.assert_allclose(Ts.numpy(), unit_rows(S), rtol=1e-6, atol=1e-6)


def test_orientation_notes(capsys):
    zsadapt.set_quiet(False)
    d = 4
    orient_text(torch.ones(3, d), d, "t")
    assert capsys.readouterr().err == ""
    orient_text(torch.ones(d, 3), d, "t")
    assert "t has shape (4, 3); reading it as (d, C) and transposing to (C, d)" in capsys.readouterr().err
    orient_text(torch.ones(d, d), d, "t")
    assert "t is square (4 x 4); reading it as (C, d) = one class per row" in capsys.readouterr().err


def test_one_note_when_not_normalised(capsys):
    zsadapt.set_quiet(False)
    X, T = features()
    prepare_features(X, T, CPU)
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err == "zsadapt: image_features and text_features were not L2-normalised; normalising rows\n"
    prepare_features(unit_rows(X), unit_rows(T), CPU)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("scale", [1e25, 1e-30, 1e-42])
def test_extreme_magnitudes_normalise_correctly(scale):
    """Squaring these in float32 overflows or underflows; the rows must still come out as the
    float64 reference says, not as zeros or a false "all zeros" error."""
    X, T = features()
    big = (X.astype(np.float64) * scale).astype(np.float32)
    Xt, _ = prepare_features(big, T, CPU)
    np.testing.assert_allclose(Xt.numpy(), unit_rows(big), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(Xt.numpy(), axis=1), 1.0, rtol=1e-6)


def test_l2_normalise_allow_zero_keeps_zero_rows():
    t = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e30, 0.0]])
    out, changed = l2_normalise(t, "X", allow_zero=True)
    np.testing.assert_allclose(out.numpy(), [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    assert changed
    out, changed = l2_normalise(torch.tensor([[0.6, 0.8]]), "X")
    assert not changed


def test_check_labels():
    np.testing.assert_array_equal(check_labels([0, 1, 2, 1], 4, 3), [0, 1, 2, 1])
    assert check_labels(torch.tensor([0, 1]), 2, 2).dtype == np.int64
    assert check_labels(np.array([0.0, 2.0]), 2, 3).dtype == np.int64
    assert one_line_error(ValueError, check_labels, [0, 3], 2, 3, "y") == "y: values must lie in 0..2, found 0..3"
    assert one_line_error(ValueError, check_labels, [0, -1], 2, 3, "y") == "y: values must lie in 0..2, found -1..0"
    assert one_line_error(ValueError, check_labels, [0, 1, 1], 2, 3, "y") == "y: expected shape (2,), got (3,)"
    assert one_line_error(ValueError, check_labels, [0.5, 1], 2, 3, "y") == "y: expected integer class indices, got dtype float64"
    assert one_line_error(ValueError, check_labels, ["a", "b"], 2, 3, "y") == "y: expected integer class indices, got dtype <U1"
    assert one_line_error(ValueError, check_labels, [True, False], 2, 3, "y") == "y: expected integer class indices, got dtype bool"


def test_check_classnames():
    assert check_classnames(None, 3, "n") is None
    assert check_classnames(np.array(["a", "b"]), 2, "n") == ["a", "b"]
    assert check_classnames(("a", "b"), 2, "n") == ["a", "b"]
    assert one_line_error(ValueError, check_classnames, ["a"], 2, "pool.npz: classnames") == "pool.npz: classnames: 1 names for 2 classes"


def test_pool_validated_names_the_source():
    X, T = features()
    pool = zsadapt.Pool(X, T[:, :2], source="feats.pt")
    msg = one_line_error(ValueError, pool.validated)
    assert msg.startswith("feats.pt: text_features: shape (3, 2)")
    pool = zsadapt.Pool(X, T, labels=np.zeros(3, np.int64), source="feats.pt")
    assert one_line_error(ValueError, pool.validated).startswith("feats.pt: labels: expected shape (10,)")
    assert one_line_error(ValueError, pool.validated, labels_name="y.npy").startswith("y.npy: expected shape (10,)")


def test_resolve_device():
    assert resolve_device(None, np.ones(2)) == CPU
    assert resolve_device("cpu", np.ones(2)) == CPU
    meta = torch.empty(2, device="meta")
    assert resolve_device(None, meta) == torch.device("meta")  # the input's device
    assert one_line_error(ValueError, resolve_device, "gpu0", None) == (
        "device 'gpu0' is not a torch device (e.g. cpu, cuda, cuda:1)"
    )
    if not torch.cuda.is_available():
        assert "CUDA is not available" in one_line_error(ValueError, resolve_device, "cuda", None)
    else:
        n = torch.cuda.device_count()
        assert f"there are {n} CUDA devices" in one_line_error(ValueError, resolve_device, f"cuda:{n}", None)


def test_to_tensor_and_like_input():
    t = to_tensor([[1, 2], [3, 4]], "x", CPU)
    assert t.dtype == torch.float32
    assert isinstance(like_input(t, np.ones(1)), np.ndarray)
    back = like_input(t, torch.ones(1))
    assert isinstance(back, torch.Tensor) and back.device == CPU
    assert one_line_error(TypeError, to_tensor, [["a"]], "x", CPU) == "x: expected a numeric array, got dtype <U1"


def test_classnames_as_bytes_are_decoded():
    assert check_classnames(np.array([b"cat", b"dog"]), 2, "n") == ["cat", "dog"]
