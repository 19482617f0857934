"""The ``auto`` solver (solvers/auto.py): gmm where the pool holds >= 2 images per supported class,
stata below.

Independent references: the ``gmm`` and ``stata`` solvers themselves (auto must equal the chosen
one bit for bit), the images-per-class count of a pool built with known classes, and (with
ZSADAPT_DATA) the real Cars pool with its labels: an online-protocol batch of 128 images holding
many classes, where gmm falls far below zero-shot, and the whole pool, where gmm is ahead.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.metrics import accuracy
from zsadapt.protocol import SETTINGS, setting_batches
from zsadapt.solvers import DEFAULT_METHOD, NotFittedError, Problem, get_solver

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tensors(pool):
    return torch.as_tensor(pool.image_features), torch.as_tensor(pool.text_features)


def _fit(name, X, T, **params):
    solver = get_solver(name)(**params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return solver, solver.fit(Problem(X, T))


def test_many_images_per_class_is_gmm_bit_for_bit(small_pool):
    X, T = _tensors(small_pool)  # 400 images, 8 classes: 50 per class
    _, out = _fit("auto", X, T)
    _, reference = _fit("gmm", X, T)
    assert out.info["branch"] == "gmm"
    assert out.info["images_per_class"] == pytest.approx(400 / out.info["classes_counted"])
    assert torch.equal(out.probs, reference.probs) and torch.equal(out.scores, reference.scores)


def test_the_stata_branch_is_stata_bit_for_bit(small_pool):
    X, T = _tensors(small_pool)
    _, out = _fit("auto", X[:6], T)  # 6 images, 8 classes
    _, reference = _fit("stata", X[:6], T)
    assert out.info["branch"] == "stata"
    assert out.info["images_per_class"] < 2
    assert torch.equal(out.probs, reference.probs)


def test_few_zeroshot_images_per_label_skip_the_pool_analysis(small_pool):
    """The zero-shot labels of 6 images already give N / labels < 2: the branch is stata whatever
    the analysis would keep, and the analysis is not run."""
    X, T = _tensors(small_pool)
    labels = int(torch.unique((X[:6] @ T.T).argmax(dim=1)).numel())
    assert 6 / labels < 2
    problem = Problem(X[:6], T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = get_solver("auto")().fit(problem)
    assert out.info["branch"] == "stata" and out.info["classes_counted"] == labels
    assert "presence" not in out.info and not problem.analyses


def test_images_per_class_counts_the_classes_the_pool_holds():
    """A pool of 3 of 20 classes: m counts the classes the analysis keeps, not all 20."""
    pool = zsadapt.make_pool(n_images=2000, n_classes=20, dim=64, seed=4)
    sub = subset_pool(pool, 3, seed=0)
    X, T = _tensors(sub)
    _, out = _fit("auto", X, T)
    assert out.info["classes_counted"] < 20
    assert out.info["images_per_class"] == pytest.approx(X.shape[0] / out.info["classes_counted"])
    assert out.info["images_per_class"] > X.shape[0] / 20
    assert out.info["branch"] == "gmm"
    assert accuracy(out.probs, sub.labels) > accuracy(X @ T.T, sub.labels)


@pytest.mark.parametrize("min_images, branch", [(0.0, "gmm"), (1e6, "stata")])
def test_min_images_sets_the_branch(small_pool, min_images, branch):
    X, T = _tensors(small_pool)
    _, out = _fit("auto", X, T, min_images=min_images)
    assert out.info["branch"] == branch


def test_predict_is_the_chosen_solvers(small_pool):
    X, T = _tensors(small_pool)
    solver, _ = _fit("auto", X, T)
    reference, _ = _fit("gmm", X, T)
    torch.testing.assert_close(solver.predict(X[:20]).probs, reference.predict(X[:20]).probs)
    with pytest.raises(NotFittedError):
        get_solver("auto")().predict(X[:2])


def test_fitted_state_round_trip(small_pool):
    X, T = _tensors(small_pool)
    for rows in (slice(None), slice(0, 6)):  # the gmm branch, then the stata one (6 images, 8 classes)
        solver, _ = _fit("auto", X[rows], T)
        again = get_solver("auto")()
        again.load_fitted_state(solver.fitted_state())
        assert again.branch_ == solver.branch_
        torch.testing.assert_close(again.predict(X[:5]).probs, solver.predict(X[:5]).probs)


@pytest.mark.parametrize("rows, branch", [(slice(None), "gmm"), (slice(0, 6), "stata")])
def test_logit_scale_reaches_the_pool_analysis_and_the_branch(small_pool, rows, branch):
    """An encoder with another similarity range: auto at logit scale 30 is the branch's method at
    30, bit for bit, and its pool analysis is the one at 30 (the cache key). Before, ``auto``
    refused the parameter, so the docs' advice to set it failed with the default method."""
    X, T = _tensors(small_pool)
    problem = Problem(X[rows], T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = get_solver("auto")(logit_scale=30.0).fit(problem)
    _, reference = _fit(branch, X[rows], T, logit_scale=30.0)
    _, at_100 = _fit(branch, X[rows], T)
    assert out.info["branch"] == branch
    assert torch.equal(out.probs, reference.probs)
    if branch == "stata":  # (gmm reaches the same clusters from either start on this pool)
        assert not torch.equal(out.probs, at_100.probs)
    assert all(key[0] == 30.0 for key in problem.analyses)


def test_logit_scale_survives_a_model_file(small_pool, tmp_path):
    X, T = small_pool.image_features, small_pool.text_features
    for rows in (slice(None), slice(0, 6)):  # the gmm branch, then the stata one
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = zsadapt.refine(X[rows], T, "auto", logit_scale=30.0)
            model = zsadapt.load_model(result.save(tmp_path / f"auto{rows.stop}.safetensors"))
        np.testing.assert_allclose(model.predict_proba(X[:5]), result.fitted.solver.predict(
            torch.as_tensor(X[:5])).probs.numpy(), rtol=1e-5, atol=1e-6)


def test_calibration_leans_on_zeroshot_at_the_given_logit_scale(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    cosines = torch.as_tensor(X) @ torch.as_tensor(T).T
    zeroshot = zsadapt.refine(X, T, "zeroshot", logit_scale=30.0)  # its own probabilities, left as they are
    np.testing.assert_allclose(zeroshot.probs, torch.softmax(30.0 * cosines, dim=1).numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(zeroshot.probs, zsadapt.refine(X, T, "zeroshot", logit_scale=30.0, calibrate=False).probs)
    result = zsadapt.refine(X, T, "auto", logit_scale=30.0)
    reference = torch.softmax(30.0 * cosines, dim=1).double()
    agree = torch.as_tensor(result.labels) == reference.argmax(dim=1)  # step 1's rows (all < 8191 of them)
    assert result.info["calibration"]["target"] == pytest.approx(float(reference[agree].amax(dim=1).mean()))


def test_edge_cases_through_the_api(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    with pytest.raises(ValueError, match="empty"):
        zsadapt.refine(np.zeros((0, X.shape[1]), np.float32), T, "auto")
    two = zsadapt.refine(X[:2], T, "auto")  # fewer images than classes
    assert two.info["branch"] == "stata" and np.allclose(two.probs.sum(1), 1, atol=1e-5)
    copies = zsadapt.refine(np.repeat(X[:1], 10, axis=0), T, "auto")  # one image ten times
    assert len(set(copies.labels.tolist())) == 1
    flat = zsadapt.refine(np.ones((5, 1), np.float32), np.ones((2, 1), np.float32), "auto")  # d = 1
    assert np.isfinite(flat.probs).all()
    torch_out = zsadapt.refine(torch.as_tensor(X), torch.as_tensor(T), "auto")
    assert isinstance(torch_out.probs, torch.Tensor)


def test_the_default_method_is_auto():
    assert DEFAULT_METHOD == "auto"


def test_cars_online_batch_keeps_zeroshot_where_gmm_collapses(cars_pool):
    """The first batch of an online:0.1 stream of Cars (128 images holding ~60 of the 196 classes):
    the class evidence looks balanced, m = 128 / 196 < 2, and gmm falls far below zero-shot."""
    setting = next(s for s in SETTINGS if s.name == "online:0.1")
    rows = next(b for b in setting_batches(cars_pool.labels, setting, 1, seed=0)[0]
                if len(np.unique(cars_pool.labels[b])) > 50)
    X, T = torch.as_tensor(cars_pool.image_features[rows]), torch.as_tensor(cars_pool.text_features)
    y = cars_pool.labels[rows]
    zeroshot = accuracy(X @ T.T, y)
    _, gmm = _fit("gmm", X, T)
    _, out = _fit("auto", X, T)
    assert out.info["branch"] == "stata"
    assert accuracy(gmm.probs, y) < zeroshot - 5
    assert accuracy(out.probs, y) >= zeroshot - 1


def test_cars_whole_pool_gains_over_zeroshot(cars_pool):
    X, T = _tensors(cars_pool)
    _, out = _fit("auto", X, T)
    assert out.info["branch"] == "gmm"
    assert accuracy(out.probs, cars_pool.labels) > accuracy(X @ T.T, cars_pool.labels) + 1


@pytest.mark.parametrize("n, c, d", [(1, 5, 16), (7, 1, 16), (3, 10, 16), (40, 4, 1)])
def test_edge_shapes_give_probabilities(n, c, d):
    """One image, one class, fewer images than classes, d = 1, at the solver level (the API itself
    asks for 2 classes, and gives a pool of one image the initial classifier's label)."""
    rng = np.random.default_rng(n + c + d)
    X = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((n, d)), dtype=torch.float32), dim=1)
    T = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((c, d)), dtype=torch.float32), dim=1)
    _, out = _fit("auto", X, T)
    assert out.probs.shape == (n, c) and bool(torch.isfinite(out.probs).all())
    torch.testing.assert_close(out.probs.sum(1), torch.ones(n))
    if n == 1:  # one image, one zero-shot label: stata, whose one image keeps its zero-shot label
        assert out.info["branch"] == "stata"
        assert int(out.probs.argmax()) == int((X @ T.T).argmax())
