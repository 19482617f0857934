"""scikit-learn estimators: every registered method has one, each passes check_estimator, and
each agrees with zsadapt.refine on the same pool."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.utils.estimator_checks import check_estimator

import zsadapt


def test_every_method_has_an_estimator():
    assert set(zsadapt.ESTIMATORS) == set(zsadapt.methods())
    for name, cls in zsadapt.ESTIMATORS.items():
        assert cls.method == name


#: Shorter schedules for the iterative methods, so that ~40 checks x fits stay fast on a CPU.
FAST = {"inmap": {"max_iter": 30}, "self_training": {"epochs": 5, "growth": 0.5},
        # anchored's anchors m_c = g + s Sigma t_c sit s sqrt(t_c' Sigma t_c) from the pool mean: ~30
        # standard deviations at CLIP's s = 100 on scikit-learn's 2-d blobs, where the binary check
        # collapses to one class (accuracy 0.50; 0.95 at s = 30). A known limit of the anchor at
        # CLIP's scale in low dimensions, not of the estimator contract this test checks.
        "anchored": {"logit_scale": 30.0}}


@pytest.mark.parametrize("name", sorted(zsadapt.ESTIMATORS))
def test_check_estimator(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(zsadapt.ESTIMATORS[name](**FAST.get(name, {})), on_fail=None)
    failed = [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("name", sorted(zsadapt.ESTIMATORS))
def test_estimator_matches_refine(name, small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    model = zsadapt.ESTIMATORS[name](text_features=T, **FAST.get(name, {})).fit(X)
    # The estimators return the method's own probabilities; refine calibrates them by default.
    result = zsadapt.refine(X, T, name, calibrate=False, **FAST.get(name, {}))
    np.testing.assert_array_equal(model.transduction_, result.labels)
    np.testing.assert_allclose(model.label_distributions_, result.probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model.classes_, np.arange(T.shape[0]))
    assert model.result_.params == result.params
    probs = model.predict_proba(X[:10])
    assert probs.shape == (10, T.shape[0])
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_estimator_parameters_reach_the_solver(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    model = zsadapt.ZLaP(text_features=T, k=9, alpha=0.5).fit(X)
    assert model.result_.params["k"] == 9 and model.result_.params["alpha"] == 0.5
    np.testing.assert_array_equal(model.transduction_, zsadapt.refine(X, T, "zlap", k=9, alpha=0.5).labels)
    assert clone(model).get_params()["k"] == 9


def test_prototype_mode_learns_from_labels(small_pool):
    X, y = small_pool.image_features, small_pool.labels
    names = np.array([f"c{v}" for v in y])
    model = zsadapt.ZLaP().fit(X, names)
    assert set(model.classes_) == set(names)
    assert model.score(X, names) > 0.9


def test_class_prototypes_are_normalised_class_means():
    X = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    prototypes, classes = zsadapt.class_prototypes(X, ["a", "b", "a", "b"])
    np.testing.assert_array_equal(classes, ["a", "b"])
    np.testing.assert_allclose(prototypes, [[1.0, 0.0], [0.0, 1.0]])


def test_text_features_dimension_mismatch_is_a_clear_error(small_pool):
    with pytest.raises(ValueError, match="does not match the image feature dimension"):
        zsadapt.ZLaP(text_features=small_pool.text_features[:, :5]).fit(small_pool.image_features)


def test_predict_refuses_an_all_zero_row_as_fit_does(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    model = zsadapt.ZeroShot(text_features=T).fit(X)
    zero = np.zeros((2, X.shape[1]), dtype=np.float32)
    for call in (model.predict, model.predict_proba):
        with pytest.raises(ValueError, match="row 0 is all zeros"):
            call(zero)
    with pytest.raises(ValueError, match="row 0 is all zeros"):
        zsadapt.ZeroShot(text_features=T).fit(np.concatenate([zero, X]))


@pytest.mark.parametrize("seed, kind", [(1.5, TypeError), ("abc", TypeError), (None, TypeError), (-1, ValueError),
                                        (2**64, ValueError)])
def test_a_bad_seed_is_the_same_one_line_error_as_refine(small_pool, seed, kind):
    X, T = small_pool.image_features, small_pool.text_features
    with pytest.raises(kind, match="seed: "):
        zsadapt.GMM(text_features=T, seed=seed, init="kmeans++").fit(X)
    with pytest.raises(kind, match="seed: "):
        zsadapt.Auto(text_features=T, seed=seed).fit(X)
    with pytest.raises(kind, match="seed: "):
        zsadapt.Stream(T, seed=seed)


def test_y_of_another_length_is_refused_even_when_ignored(small_pool):
    """With text_features, fit ignores y; one of another length is still a mistake (a pipeline that
    passed the wrong labels), refused as scikit-learn refuses it."""
    X, T, y = small_pool.image_features[:40], small_pool.text_features, small_pool.labels[:40]
    model = zsadapt.ZeroShot(text_features=T)
    np.testing.assert_array_equal(model.fit(X, y).transduction_, model.fit(X).transduction_)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        model.fit(X, y[:39])
