"""Tests of ``unem`` (unrolled EM), its parameters, ``zsadapt tune`` and the shipped defaults."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from sklearn.exceptions import ConvergenceWarning

import zsadapt
from zsadapt.cli.main import main
from zsadapt.solvers import get_solver
from zsadapt.solvers.unem import TuningPool, UnrolledParameters, default_params, tune, unrolled_em


@pytest.fixture(scope="module")
def clip_like():
    return zsadapt.make_pool(n_images=300, n_classes=6, dim=32, seed=4)


@pytest.mark.parametrize("likelihood", ["gaussian", "dirichlet"])
def test_unem_with_constant_layers_equals_em_run_for_as_many_iterations(clip_like, likelihood):
    layers, lam, T, tau, beta = 4, 0.7, 3.0, 50.0, 0.5
    em_params = dict(lam=lam, temperature=T, logit_scale=tau, prior=beta, likelihood=likelihood)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        em = zsadapt.refine(clip_like.image_features, clip_like.text_features, "em",
                            max_iter=layers, tol=0.0, **em_params)
    unem = zsadapt.refine(clip_like.image_features, clip_like.text_features, "unem", layers=layers,
                          lam=(lam,), temperature=(T,), logit_scale=tau, prior=beta, likelihood=likelihood)
    assert em.info["iterations"] == layers
    np.testing.assert_allclose(unem.probs, em.probs, atol=2e-5)
    # and L layers are not L + 1: the comparison can fail
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        more = zsadapt.refine(clip_like.image_features, clip_like.text_features, "em",
                              max_iter=layers + 1, tol=0.0, **em_params)
    assert np.abs(more.probs - unem.probs).max() > 1e-4


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    X = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((12, 3))), dim=1)
    W = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((3, 3))), dim=1)
    y = torch.from_numpy(rng.integers(0, 3, 12))
    start = UnrolledParameters.from_natural([0.5, 1.0], [2.0, 3.0], 5.0, 0.8, dtype=torch.float64)

    def loss(a, b, c, e):
        u, _, _ = unrolled_em(X, W, UnrolledParameters(a, b, c, e), var_prior=2.0, mean_prior=1.0)
        return torch.nn.functional.nll_loss(torch.log(u), y)

    inputs = [t.clone().requires_grad_(True) for t in start.tensors()]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def test_dirichlet_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    X = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((10, 4))), dim=1)
    W = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((3, 4))), dim=1)
    y = torch.from_numpy(rng.integers(0, 3, 10))
    start = UnrolledParameters.from_natural([0.5, 1.0], [2.0, 1.5], 4.0, 0.5, dtype=torch.float64)

    def loss(a, b, c, e):
        u, _, _ = unrolled_em(X, W, UnrolledParameters(a, b, c, e), likelihood="dirichlet")
        return torch.nn.functional.nll_loss(torch.log(u), y)

    inputs = [t.clone().requires_grad_(True) for t in start.tensors()]
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def test_tune_lowers_the_cross_entropy(clip_like):
    pool = clip_like.validated()
    data = TuningPool(torch.from_numpy(pool.image_features), torch.from_numpy(pool.text_features),
                      torch.from_numpy(pool.labels))
    result = tune([data], layers=3, steps=6, lr=0.1)
    assert result["loss"][1] < result["loss"][0]
    learned = result["unem"]
    assert len(learned["lam"]) == len(learned["temperature"]) == learned["layers"] == 3
    assert min(learned["temperature"]) > 1.0 and min(learned["lam"]) > 0.0
    kept = tune([data], layers=2, steps=2, lr=0.1, frozen=("logit_scale", "prior"),
                init={"logit_scale": 40.0, "prior": 1.5})["unem"]
    assert kept["logit_scale"] == pytest.approx(40.0, rel=1e-5) and kept["prior"] == pytest.approx(1.5, rel=1e-5)
    with pytest.raises(ValueError, match="cannot freeze"):
        tune([data], layers=2, steps=1, frozen=("tau",))


def test_tune_writes_params_that_refine_reads_back(tmp_path, clip_like):
    pool_file = tmp_path / "val.npz"
    zsadapt.write_pool(pool_file, clip_like)
    out = tmp_path / "params.json"
    runner = CliRunner()
    tuned = runner.invoke(main, ["tune", "--method", "unem", str(pool_file), "--out", str(out),
                                 "--layers", "3", "--steps", "2", "--no-subsets", "-q"])
    assert tuned.exit_code == 0, tuned.output
    learned = json.loads(out.read_text())["unem"]
    again = runner.invoke(main, ["tune", str(pool_file), "--out", str(out), "--steps", "1", "-q"])
    assert again.exit_code == 1 and "already exists" in again.output
    preds = tmp_path / "preds.npz"
    refined = runner.invoke(main, ["refine", str(pool_file), "--method", "unem", "--params", str(out),
                                   "--out", str(preds), "-q"])
    assert refined.exit_code == 0, refined.output
    used = json.loads(str(np.load(preds)["params"]))
    assert used["layers"] == 3
    np.testing.assert_allclose(used["lam"], learned["lam"], rtol=1e-6)
    np.testing.assert_allclose(used["temperature"], learned["temperature"], rtol=1e-6)
    assert used["logit_scale"] == pytest.approx(learned["logit_scale"])
    # the learned parameters are what was run: the same labels as the API with them
    direct = zsadapt.refine(clip_like.image_features, clip_like.text_features, "unem", **learned)
    np.testing.assert_array_equal(np.load(preds)["labels"], direct.labels)


def test_tune_refuses_unlabelled_pools(tmp_path, clip_like):
    pool_file = tmp_path / "nolabels.npz"
    zsadapt.write_pool(pool_file, zsadapt.Pool(clip_like.image_features, clip_like.text_features))
    result = CliRunner().invoke(main, ["tune", str(pool_file), "--out", str(tmp_path / "p.json"), "-q"])
    assert result.exit_code == 1 and "no labels" in result.output


def test_per_layer_parameters_parse_and_check():
    solver = get_solver("unem")(lam="0.5, 1,2", temperature=2.0)
    values = solver.resolved()
    assert values["layers"] == 3 and values["lam"] == [0.5, 1.0, 2.0] and values["temperature"] == [2.0] * 3
    with pytest.raises(ValueError, match="lam must be a list of numbers"):
        get_solver("unem")(lam="a,b")
    with pytest.raises(ValueError, match="temperature must be >= 1"):
        get_solver("unem")(temperature=(0.5,))
    with pytest.raises(ValueError, match="3 values for layers=2"):
        get_solver("unem")(layers=2, lam=(1, 2, 3)).resolved()


def test_shipped_defaults_load_and_run(clip_like):
    shipped = default_params()
    assert shipped["layers"] == len(shipped["lam"]) == len(shipped["temperature"])
    result = zsadapt.refine(clip_like.image_features, clip_like.text_features, "unem")
    assert result.params["lam"] is None  # the defaults were resolved inside the solver
    assert result.info["layers"] == shipped["layers"]
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-5)


def test_shipped_defaults_not_below_zeroshot_on_cars(cars_pool):
    zs = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "zeroshot")
    unem = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "unem")
    assert zsadapt.accuracy(unem.labels, cars_pool.labels) >= zsadapt.accuracy(zs.labels, cars_pool.labels) - 1.0


def test_subset_pools_stay_at_least_near_zeroshot(cars_pool):
    from test_em import subset_gaps

    synthetic = zsadapt.make_pool(n_images=1200, n_classes=40, dim=128, seed=5)
    for pool in (cars_pool, synthetic):
        for m in sorted({2, 5, 10, pool.n_classes // 4}):
            # a 2-class Cars pool holds ~17 images (one image = 6 points): average over 10 draws
            gaps = subset_gaps(pool, m, seeds=10 if m == 2 else 3, method="unem")
            assert np.mean(gaps) >= -1.0, (pool.source, m, gaps)


@pytest.mark.parametrize("case", ["d=1", "N=2", "one class present", "C>N"])
def test_edge_cases_give_finite_probabilities(case):
    rng = np.random.default_rng(0)
    texts = rng.standard_normal((6, 8))
    images = {
        "d=1": rng.choice([-1.0, 1.0], size=(30, 1)),
        "N=2": rng.standard_normal((2, 8)),
        "one class present": texts[2] + 0.1 * rng.standard_normal((40, 8)),
        "C>N": rng.standard_normal((4, 8)),
    }[case]
    if case == "d=1":
        texts = np.array([[1.0], [-1.0]])
    result = zsadapt.refine(images, texts, "unem")
    assert np.isfinite(result.probs).all()
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-4)


def test_inductive_predict_uses_the_last_layer(clip_like):
    model = zsadapt.UNEM(text_features=clip_like.text_features).fit(clip_like.image_features[:200])
    probs = model.predict_proba(clip_like.image_features[200:])
    assert probs.shape == (100, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_unem_estimator_passes_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(zsadapt.UNEM())
