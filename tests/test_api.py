"""The arrays-in/arrays-out contract of ``zsadapt.refine`` and the method registry's public face."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.solvers import get_solver

METHODS = ("zeroshot", "zlap")


@pytest.fixture(scope="module")
def pool():
    return zsadapt.make_pool(n_images=120, n_classes=5, dim=16, seed=11)


def check_numpy_result(result, n, c):
    assert isinstance(result.labels, np.ndarray) and isinstance(result.probs, np.ndarray)
    assert isinstance(result.scores, np.ndarray)
    assert result.labels.dtype == np.int64 and result.labels.shape == (n,)
    assert result.probs.shape == (n, c) and result.scores.shape == (n, c)
    assert result.probs.dtype == np.float32 and result.scores.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (result.probs >= 0).all()
    np.testing.assert_array_equal(result.labels, result.probs.argmax(axis=1))
    assert result.labels.min() >= 0 and result.labels.max() < c


def test_methods_lists_the_baseline_and_zlap():
    names = zsadapt.methods()
    assert isinstance(names, list) and {"zeroshot", "zlap"} <= set(names)
    described = {m["name"]: m for m in zsadapt.describe_methods()}
    assert set(described) == set(names)
    assert described["zlap"]["params"]["k"].default == 5


def test_results_compare_by_identity(pool):
    first = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    again = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    assert first == first and first != again  # no "truth value of an array is ambiguous"


@pytest.mark.parametrize("method", METHODS)
def test_numpy_in_numpy_out(pool, method):
    result = zsadapt.refine(pool.image_features, pool.text_features, method)
    check_numpy_result(result, pool.n_images, pool.n_classes)
    assert result.method == method
    assert result.info["seconds"]["total"] >= 0 and "converged" in result.info and "iterations" in result.info


@pytest.mark.parametrize("method", METHODS)
def test_torch_in_torch_out_same_device(pool, method):
    X = torch.from_numpy(pool.image_features)
    T = torch.from_numpy(pool.text_features)
    result = zsadapt.refine(X, T, method)
    for name in ("labels", "probs", "scores"):
        value = getattr(result, name)
        assert isinstance(value, torch.Tensor) and value.device == X.device, name
    assert result.labels.dtype == torch.int64
    reference = zsadapt.refine(pool.image_features, pool.text_features, method)
    np.testing.assert_array_equal(result.labels.numpy(), reference.labels)
    np.testing.assert_allclose(result.probs.numpy(), reference.probs, rtol=1e-5, atol=1e-7)
    # Text as numpy with torch images: the kind follows the image features.
    mixed = zsadapt.refine(X, pool.text_features, method)
    assert isinstance(mixed.labels, torch.Tensor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_in_cuda_out(pool, method):
    X = torch.from_numpy(pool.image_features).cuda()
    T = torch.from_numpy(pool.text_features).cuda()
    result = zsadapt.refine(X, T, method)  # device=None: the input's device
    assert result.labels.device == X.device and result.probs.device == X.device
    on_cpu = zsadapt.refine(X, T, method, device="cpu")  # computed on CPU, returned on the input's device
    assert on_cpu.labels.device == X.device
    reference = zsadapt.refine(pool.image_features, pool.text_features, method)
    assert (result.labels.cpu().numpy() == reference.labels).mean() > 0.99


def test_device_none_means_the_inputs_device(pool, monkeypatch):
    """Spy on the device the solver receives: the input's with device=None, the asked one else."""
    from zsadapt import api

    seen = []
    real = api.prepare_text

    def spy(image, text, device, **kwargs):
        seen.append(device)
        return real(image, text, device, **kwargs)

    monkeypatch.setattr(api, "prepare_text", spy)
    zsadapt.refine(torch.from_numpy(pool.image_features), pool.text_features, "zeroshot")
    zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    zsadapt.refine(pool.image_features, pool.text_features, "zeroshot", device="cpu")
    assert seen == [torch.device("cpu")] * 3
    with pytest.raises(ValueError, match="is not a torch device"):
        zsadapt.refine(pool.image_features, pool.text_features, "zeroshot", device="nowhere")


@pytest.mark.parametrize("method", METHODS)
def test_float16_input(pool, method):
    half_x = pool.image_features.astype(np.float16)
    half_t = pool.text_features.astype(np.float16)
    result = zsadapt.refine(half_x, half_t, method)
    check_numpy_result(result, pool.n_images, pool.n_classes)
    # Upcasting is exact, so float16 input equals its float32 upcast as input.
    reference = zsadapt.refine(half_x.astype(np.float32), half_t.astype(np.float32), method)
    np.testing.assert_array_equal(result.labels, reference.labels)
    np.testing.assert_allclose(result.probs, reference.probs, rtol=1e-6, atol=1e-7)
    torch_half = zsadapt.refine(torch.from_numpy(half_x), torch.from_numpy(half_t), method)
    assert torch_half.probs.dtype == torch.float32
    np.testing.assert_array_equal(torch_half.labels.numpy(), reference.labels)


@pytest.mark.parametrize("method", METHODS)
def test_scale_and_text_orientation_do_not_matter(pool, method):
    reference = zsadapt.refine(pool.image_features, pool.text_features, method)
    scales = np.linspace(0.5, 3.0, pool.n_images, dtype=np.float32)[:, None]
    scaled = zsadapt.refine(pool.image_features * scales, 7.0 * pool.text_features.T, method)
    np.testing.assert_array_equal(scaled.labels, reference.labels)
    np.testing.assert_allclose(scaled.probs, reference.probs, rtol=1e-4, atol=1e-6)


def test_inputs_are_left_untouched(pool):
    X = pool.image_features * 2.0
    T = pool.text_features.copy()
    X0, T0 = X.copy(), T.copy()
    Xt = torch.from_numpy(X.copy())
    zsadapt.refine(X, T, "zlap")
    zsadapt.refine(Xt, T, "zlap")
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(T, T0)
    np.testing.assert_array_equal(Xt.numpy(), X0)


@pytest.mark.parametrize("method", METHODS)
def test_params_hold_every_default(pool, method):
    result = zsadapt.refine(pool.image_features, pool.text_features, method)
    defaults = {name: spec.default for name, spec in get_solver(method).params.items()}
    assert result.params == defaults


def test_params_hold_given_values_converted(pool):
    result = zsadapt.refine(pool.image_features, pool.text_features, "zlap", k="7", alpha=0.5)
    assert result.params["k"] == 7 and isinstance(result.params["k"], int)
    assert result.params["alpha"] == 0.5
    assert result.params["gamma"] == get_solver("zlap").params["gamma"].default


def test_unknown_method_is_a_one_line_value_error(pool):
    with pytest.raises(ValueError) as err:
        zsadapt.refine(pool.image_features, pool.text_features, "labelprop9000")
    message = str(err.value)
    assert "\n" not in message and "unknown method 'labelprop9000'" in message and "zlap" in message


def test_unknown_parameter_is_a_one_line_type_error(pool):
    with pytest.raises(TypeError) as err:
        zsadapt.refine(pool.image_features, pool.text_features, "zlap", kk=3)
    message = str(err.value)
    assert "\n" not in message and "unknown parameter(s) kk" in message and "k, gamma, alpha" in message


@pytest.mark.parametrize(
    "params, fragment",
    [({"k": "abc"}, "parameter k must be int"), ({"alpha": 2}, "parameter alpha must be <= 0.999"),
     ({"k": 0}, "parameter k must be >= 1"), ({"knn_backend": "faiss"}, "must be one of"),
     ({"k": True}, "parameter k must be int, got True"), ({"alpha": False}, "parameter alpha must be float")],
)
def test_invalid_parameter_values(pool, params, fragment):
    with pytest.raises(ValueError) as err:
        zsadapt.refine(pool.image_features, pool.text_features, "zlap", **params)
    assert "\n" not in str(err.value) and fragment in str(err.value)


def test_bad_arrays_give_one_line_errors():
    X = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    T = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    cases = [
        ((np.hstack([X, X[:, :1]]), T), ValueError, "text_features: shape (3, 4) does not match"),
        ((np.where(X > 1, np.nan, X), T), ValueError, "NaN or infinite"),
        ((X.astype(str), T), TypeError, "expected a numeric array"),
        ((X, T[:1]), ValueError, "at least 2 classes"),
    ]
    for args, exc, fragment in cases:
        with pytest.raises(exc) as err:
            zsadapt.refine(*args, method="zeroshot")
        assert "\n" not in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("method", zsadapt.methods())
def test_a_pool_of_one_image_gets_the_initial_classifiers_answer(pool, method, tmp_path):
    """One image holds no pool to adapt to: every method returns the zero-shot probabilities
    computed directly (cosine x 100, softmax), numpy in numpy out and torch in torch out, and
    there is no model to save."""
    X, T = pool.image_features[3:4] * 2.0, pool.text_features
    logits = 100.0 * (X / np.linalg.norm(X)).astype(np.float64) @ (
        T / np.linalg.norm(T, axis=1, keepdims=True)).T.astype(np.float64)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    result = zsadapt.refine(X, T, method)
    assert result.info["single_image"] is True and result.method == method
    np.testing.assert_allclose(result.probs, expected, rtol=1e-3, atol=1e-6)
    assert result.labels.tolist() == [int(logits.argmax())] and result.labels.dtype == np.int64
    tensor = zsadapt.refine(torch.as_tensor(X), torch.as_tensor(T), method)
    assert isinstance(tensor.labels, torch.Tensor) and tensor.labels.tolist() == result.labels.tolist()
    with pytest.raises(ValueError, match="one image") as err:
        result.save(tmp_path / "model.safetensors")
    assert "\n" not in str(err.value) and not (tmp_path / "model.safetensors").exists()


def test_zeroshot_is_cosine_times_100_softmax(pool):
    """The baseline against a direct numpy computation."""
    X = pool.image_features * 3.0
    T = pool.text_features
    result = zsadapt.refine(X, T, "zeroshot")
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Tn = T / np.linalg.norm(T, axis=1, keepdims=True)
    logits = 100.0 * Xn.astype(np.float64) @ Tn.T.astype(np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(result.scores, logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(result.probs, probs, rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(result.labels, logits.argmax(axis=1))


def test_result_repr_and_accuracy(pool):
    result = zsadapt.refine(pool.image_features, pool.text_features, "zeroshot")
    text = repr(result)
    assert "method='zeroshot'" in text and f"N={pool.n_images}" in text and "arrays=numpy" in text
    assert result.accuracy(pool.labels) == pytest.approx(100.0 * np.mean(result.labels == pool.labels))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("params", [{"alpha": float("nan")}, {"gamma": float("nan")}, {"tol": float("nan")},
                                    {"gamma": float("inf")}])
def test_non_finite_parameter_values_are_refused(pool, params):
    with pytest.raises(ValueError, match="must be"):
        zsadapt.refine(pool.image_features, pool.text_features, "zlap", max_iter=2, **params)


@pytest.mark.parametrize("method", ["zeroshot", "gmm"])
def test_outputs_are_contiguous_whatever_the_class_count(method):
    """Products are written into row-padded blocks (zsadapt.graphs.blocks); what the user gets back
    has plain rows: a C-contiguous numpy array, a contiguous tensor (37 classes: rows of 37 floats
    padded to 48 inside)."""
    pool = zsadapt.make_pool(n_images=200, n_classes=37, dim=16, seed=0)
    out = zsadapt.refine(pool.image_features, pool.text_features, method)
    assert out.scores.flags["C_CONTIGUOUS"] and out.probs.flags["C_CONTIGUOUS"]
    out = zsadapt.refine(torch.from_numpy(pool.image_features), torch.from_numpy(pool.text_features), method)
    assert out.scores.is_contiguous() and out.probs.is_contiguous()
    assert out.scores.view(-1).shape == (200 * 37,)
