"""ZLaP against a dense float64 re-derivation of the same linear system (numpy, no code shared
with the solver), the dual (inductive) scores against direct solves, edge cases, the published
result on real CLIP features, and ``robust``'s graph on the supported classes (class-subset pools).

Tests of the published graph pass ``robust=False`` where a pool could read as holding only some of
its classes (small or one-class pools); ``robust=True`` is checked against the same dense solve
on the kept classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

import zsadapt
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers.zlap import image_edges


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def dense_laplacian(X, T, k=5, gamma=5.0, alpha=0.3):
    """L = I - alpha D^-1/2 W D^-1/2 over [classes; images], built densely as the paper describes."""
    X, T = _unit(X.astype(np.float64)), _unit(T.astype(np.float64))
    n, c = len(X), len(T)
    W = np.zeros((c + n, c + n))
    image_sims, text_sims = X @ X.T, X @ T.T
    for i in range(n):
        for j in np.argsort(-image_sims[i], kind="stable")[: min(k, n)]:
            W[c + i, c + j] += max(image_sims[i, j], 0.0)
        for t in np.argsort(-text_sims[i], kind="stable")[: min(k, c)]:
            W[c + i, t] += max(text_sims[i, t], 0.0) ** gamma
    W = W + W.T
    np.fill_diagonal(W, 0.0)
    degree = W.sum(1)
    degree[degree == 0] = 1.0
    Wn = W / np.sqrt(np.outer(degree, degree))
    return np.eye(c + n) - alpha * Wn


def dense_zlap_scores(X, T, **kw):
    L = dense_laplacian(X, T, **kw)
    c = len(T)
    Z = np.linalg.solve(L, np.eye(len(L))[:, :c])  # (C+N, C)
    return Z[c:]


@pytest.mark.parametrize("k, gamma, alpha", [(5, 5.0, 0.3), (3, 1.0, 0.8), (10, 2.0, 0.5)])
def test_scores_match_dense_direct_solve(small_pool, k, gamma, alpha):
    X, T = small_pool.image_features[:150], small_pool.text_features
    result = zsadapt.refine(X, T, "zlap", k=k, gamma=gamma, alpha=alpha, tol=1e-8, max_iter=200)
    expected = dense_zlap_scores(X, T, k=k, gamma=gamma, alpha=alpha)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(result.labels, expected.argmax(1))
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-5)
    assert result.info["converged"] and result.info["iterations"] > 0


def test_beats_zero_shot_on_synthetic_pool(small_pool):
    X, T, y = small_pool.image_features, small_pool.text_features, small_pool.labels
    zero_shot = zsadapt.refine(X, T, "zeroshot").accuracy(y)
    zlap = zsadapt.refine(X, T, "zlap").accuracy(y)
    assert zero_shot < 90, "the fixture pool must leave room to improve"
    assert zlap > zero_shot + 5


def _fitted_solver(X, T, **params):
    solver = get_solver("zlap")(**dict({"robust": False}, **params))
    solver.fit(Problem(torch.from_numpy(_unit(X)).float(), torch.from_numpy(_unit(T)).float()))
    return solver


def _direct_inductive_scores(X, T, Q, k=5, gamma=5.0, alpha=0.3):
    """Attach each new image to the pool graph as a source: solve L x = y with y = its edge
    weights on its k nearest pool images and k nearest classes, and read x at the class nodes."""
    L = dense_laplacian(X, T, k=k, gamma=gamma, alpha=alpha)
    X, T, Q = _unit(X.astype(np.float64)), _unit(T.astype(np.float64)), _unit(Q.astype(np.float64))
    c = len(T)
    out = []
    for q in Q:
        y = np.zeros(len(L))
        image_sims, text_sims = X @ q, T @ q
        for j in np.argsort(-image_sims, kind="stable")[:k]:
            y[c + j] = max(image_sims[j], 0.0)
        for t in np.argsort(-text_sims, kind="stable")[:k]:
            y[t] = max(text_sims[t], 0.0) ** gamma
        out.append(np.linalg.solve(L, y)[:c])
    return np.array(out)


def test_dual_inductive_scores_equal_direct_solves(small_pool):
    X, T = small_pool.image_features[:120], small_pool.text_features
    Q = small_pool.image_features[300:320]
    solver = _fitted_solver(X, T, tol=1e-9, max_iter=200)
    scores = solver._own_predict(torch.from_numpy(_unit(Q)).float()).scores.numpy()
    np.testing.assert_allclose(scores, _direct_inductive_scores(X, T, Q), rtol=1e-4, atol=1e-7)


def test_sparsified_dual_keeps_top_entries_per_row(small_pool):
    X, T = small_pool.image_features[:120], small_pool.text_features
    Q = small_pool.image_features[300:320]
    dense = _fitted_solver(X, T, tol=1e-9, max_iter=200)
    top1 = _fitted_solver(X, T, tol=1e-9, max_iter=200, dual_topk=1)
    Z = stored_dual(dense)
    Z1 = np.where(Z == Z.max(1, keepdims=True), Z, 0.0)  # the paper's sparse Z: argmax entry per row
    q = torch.from_numpy(_unit(Q)).float()
    edges = image_edges(q, dense.pool_, dense.classifier_, k=5, gamma=5.0, scale=dense.scale_)
    expected = np.einsum("mk,mkc->mc", edges.weights.numpy(), Z1[edges.nodes.numpy()])
    np.testing.assert_allclose(top1._own_predict(q).scores.numpy(), expected, rtol=1e-5, atol=1e-8)
    full = _fitted_solver(X, T, tol=1e-9, max_iter=200, dual_topk=T.shape[0])
    np.testing.assert_allclose(full._own_predict(q).scores.numpy(), dense._own_predict(q).scores.numpy(), rtol=1e-6)


def test_fewer_classes_than_neighbours():
    pool = zsadapt.make_pool(n_images=80, n_classes=3, dim=16, seed=1)
    X, T = pool.image_features, pool.text_features
    result = zsadapt.refine(X, T, "zlap", k=5, tol=1e-9, max_iter=200)
    np.testing.assert_allclose(result.scores, dense_zlap_scores(X, T, k=5), rtol=1e-4, atol=1e-7)


def test_pool_smaller_than_k():
    pool = zsadapt.make_pool(n_images=3, n_classes=4, dim=16, seed=2)
    X, T = pool.image_features, pool.text_features
    # min(k, N) image neighbours (self included) and min(k, C) class neighbours, through refine
    # too: k is not reduced to N - 1 (that would drop a class neighbour and a pool neighbour).
    result = get_solver("zlap")(k=5, tol=1e-9, max_iter=200, robust=False).fit(Problem(torch.tensor(X), torch.tensor(T)))
    np.testing.assert_allclose(result.scores.numpy(), dense_zlap_scores(X, T, k=5), rtol=1e-4, atol=1e-7)
    assert result.info["neighbours"] == {"images": 3, "classes": 4}
    refined = zsadapt.refine(X, T, "zlap", k=5, tol=1e-9, max_iter=200, robust=False)
    np.testing.assert_allclose(refined.scores, dense_zlap_scores(X, T, k=5), rtol=1e-4, atol=1e-7)
    assert "reduced" not in refined.info
    reduced = zsadapt.refine(X, T, "zlap", k=2, tol=1e-9, max_iter=200, robust=False)
    assert not np.allclose(reduced.scores, refined.scores)  # k = N - 1 is another graph
    robust = zsadapt.refine(X, T, "zlap", k=5)
    assert robust.labels.shape == (3,) and np.allclose(robust.probs.sum(1), 1.0, atol=1e-5)


def test_duplicate_rows_get_identical_predictions(small_pool):
    X = np.concatenate([small_pool.image_features[:100], small_pool.image_features[:20]])
    result = zsadapt.refine(X, small_pool.text_features, "zlap")
    np.testing.assert_array_equal(result.labels[:20], result.labels[100:])
    np.testing.assert_allclose(result.probs[:20], result.probs[100:], rtol=1e-4, atol=1e-6)


def test_pool_of_one_class_and_absent_classes():
    """The published method penalises a class that every image links to (its scores carry
    1/sqrt(degree)); degree_power=1 removes that penalty, and the default (robust) graph leaves
    the absent classes out: both stay at zero-shot level or above."""
    pool = zsadapt.make_pool(n_images=600, n_classes=10, dim=32, seed=4, imbalance=0.0)
    one_class = pool.labels == 3
    X, T = pool.image_features[one_class], pool.text_features
    zero_shot = zsadapt.refine(X, T, "zeroshot").accuracy(pool.labels[one_class])
    official = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200, robust=False)
    assert official.probs.shape == (one_class.sum(), 10)
    np.testing.assert_allclose(official.scores, dense_zlap_scores(X, T), rtol=1e-4, atol=1e-7)
    undamped = zsadapt.refine(X, T, "zlap", degree_power=1.0, robust=False)
    assert undamped.accuracy(pool.labels[one_class]) >= zero_shot - 1.0
    robust = zsadapt.refine(X, T, "zlap")
    assert robust.accuracy(pool.labels[one_class]) >= zero_shot - 1.0
    assert robust.info["presence"]["classes_kept"] < 10


def test_degree_power_scales_class_columns_by_degree(small_pool):
    X, T = small_pool.image_features[:150], small_pool.text_features
    c = len(T)
    Xu, Tu = _unit(X.astype(np.float64)), _unit(T.astype(np.float64))
    raw = np.zeros((c, len(X)))
    text_sims = Xu @ Tu.T
    for i in range(len(X)):
        for t in np.argsort(-text_sims[i], kind="stable")[:5]:
            raw[t, i] += max(text_sims[i, t], 0.0) ** 5
    degrees = raw.sum(1)  # class nodes only link to images: their degree in W + W^T
    official = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200)
    corrected = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200, degree_power=0.5)
    np.testing.assert_allclose(corrected.scores, official.scores * degrees ** 0.25, rtol=1e-4, atol=1e-8)


def test_one_dimensional_features():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((40, 1)).astype(np.float32)
    T = np.array([[1.0], [-1.0]], dtype=np.float32)
    result = zsadapt.refine(X, T, "zlap")
    np.testing.assert_array_equal(result.labels, (X[:, 0] < 0).astype(np.int64))
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-5)


def test_many_classes_match_dense_solve():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((60, 16)).astype(np.float32)
    T = rng.standard_normal((1500, 16)).astype(np.float32)
    result = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200)
    np.testing.assert_allclose(result.scores, dense_zlap_scores(X, T), rtol=1e-4, atol=1e-7)


def test_classes_no_image_links_to_score_and_predict_as_the_whole_system():
    """C >> N k: most class nodes have no edge, and the solve covers only the linked classes
    (``ZLaPSolver._propagate``); the others must still score, and predict for new images that
    link to them, as the direct solve of the whole system says."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((20, 8)).astype(np.float32)
    T = rng.standard_normal((400, 8)).astype(np.float32)
    L = dense_laplacian(X, T)
    lone = np.flatnonzero(np.abs(L[:400, 400:]).sum(1) == 0)
    assert len(lone) > 300, "most classes must link to no image"
    Q = T[lone[:10]] + 0.05 * rng.standard_normal((10, 8)).astype(np.float32)  # new images near lone classes
    solver = _fitted_solver(X, T, tol=1e-9, max_iter=200)
    Z = stored_dual(solver)
    np.testing.assert_allclose(Z, np.linalg.solve(L, np.eye(len(L))[:, :400]), rtol=1e-4, atol=1e-7)
    assert solver.dual_.shape == (420, 400 - len(lone)), "only the linked classes' columns are stored"
    q = torch.from_numpy(_unit(Q)).float()
    expected = _direct_inductive_scores(X, T, Q)
    np.testing.assert_allclose(solver._own_predict(q).scores.numpy(), expected, rtol=1e-4, atol=1e-7)
    assert np.isin(expected.argmax(1), lone).all()  # the lone classes do win these images
    # the same with the top-s entries of each row kept, s above and below the linked classes' count
    for s in (2, 400 - len(lone) + 5):
        top = _fitted_solver(X, T, tol=1e-9, max_iter=200, dual_topk=s)
        Zs = np.where(Z >= -np.sort(-Z, axis=1)[:, [s - 1]], Z, 0.0)  # the top-s entries of each row
        edges = image_edges(q, top.pool_, top.classifier_, k=5, gamma=5.0, scale=top.scale_)
        np.testing.assert_allclose(top._own_predict(q).scores.numpy(),
                                   np.einsum("mk,mkc->mc", edges.weights.numpy(), Zs[edges.nodes.numpy()]),
                                   rtol=1e-4, atol=1e-7)
    # degree_power scales class c's column of Z by d_c^(p/2): a lone class (d_c = 0) by tiny^(p/2)
    powered = _fitted_solver(X, T, tol=1e-9, max_iter=200, degree_power=0.5)
    Zp = stored_dual(powered)
    linked = np.setdiff1d(np.arange(400), lone)
    ratio = Zp[:, linked] / np.where(Z[:, linked] != 0, Z[:, linked], np.nan)  # (C+N, K'): constant per column
    np.testing.assert_allclose(np.nanmax(ratio, 0), np.nanmin(ratio, 0), rtol=1e-5)
    np.testing.assert_allclose(Zp[lone, lone] / Z[lone, lone], np.finfo(np.float32).tiny ** 0.25, rtol=1e-5)
    assert np.count_nonzero(Zp[:, lone]) == len(lone)


def stored_dual(solver) -> np.ndarray:
    """The (C+N, C) Z = L^-1 E_C a fitted zlap keeps for predict, rebuilt from its compact form."""
    n_rows = solver.pool_.shape[0] + solver.classifier_.shape[0]
    Z = np.zeros((n_rows, solver.classifier_.shape[0]))
    columns = slice(None) if solver.dual_columns_ is None else solver.dual_columns_.numpy()
    Z[:, columns] = solver.dual_.numpy()
    lone = solver.dual_lone_.numpy()
    Z[lone, lone] = solver.dual_lone_values_.numpy()
    return Z


def test_image_without_positive_similarity_falls_back_to_zero_shot():
    # Images pointing away from every class and every other image have no positive edge.
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1e-3]], dtype=np.float32)
    T = np.array([[0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    result = zsadapt.refine(X, T, "zlap", k=1, calibrate=False)  # zlap's own probabilities
    zero_shot = zsadapt.refine(X, T, "zeroshot", calibrate=False)
    np.testing.assert_allclose(result.probs[2], zero_shot.probs[2], rtol=1e-5)
    assert result.labels[2] == zero_shot.labels[2]


def test_iteration_cap_warns():
    pool = zsadapt.make_pool(n_images=200, n_classes=5, dim=16, seed=7)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        result = zsadapt.refine(pool.image_features, pool.text_features, "zlap", max_iter=1, tol=1e-12)
    assert result.info["converged"] is False and result.info["iterations"] == 1


def test_scale_sim_follows_official_min_max_scaling(small_pool):
    X, T = small_pool.image_features[:100], small_pool.text_features
    Xu, Tu = _unit(X.astype(np.float64)), _unit(T.astype(np.float64))
    sims = np.concatenate([np.sort(Xu @ Xu.T, 1)[:, -5:].ravel(), np.sort(Xu @ Tu.T, 1)[:, -5:].ravel()])
    low, high = sims.min(), sims.max()
    solver = _fitted_solver(X, T, scale_sim=True)
    assert solver.scale_.low == pytest.approx(low, abs=1e-5)
    assert solver.scale_.high == pytest.approx(high, abs=1e-5)


def test_torch_in_torch_out_and_deterministic(small_pool):
    X = torch.from_numpy(small_pool.image_features)
    T = torch.from_numpy(small_pool.text_features)
    first = zsadapt.refine(X, T, "zlap")
    second = zsadapt.refine(X, T, "zlap")
    assert isinstance(first.labels, torch.Tensor) and first.labels.device == X.device
    assert first.labels.dtype == torch.int64
    assert torch.equal(first.scores, second.scores)


def test_keops_backend_gives_same_result(small_pool):
    if not zsadapt.graphs.keops_available():
        pytest.skip("pykeops is not installed")
    X, T = small_pool.image_features[:200], small_pool.text_features
    torch_result = zsadapt.refine(X, T, "zlap", knn_backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keops_result = zsadapt.refine(X, T, "zlap", knn_backend="keops")
    np.testing.assert_array_equal(keops_result.labels, torch_result.labels)
    np.testing.assert_allclose(keops_result.scores, torch_result.scores, rtol=1e-4, atol=1e-7)


@pytest.mark.realdata
def test_reproduces_published_setting_on_stanford_cars(cars_pool):
    """ZLaP at its defaults beats zero-shot (58.96%) and matches a straightforward
    re-implementation of the official code (59.76%, shared/data/README.md)."""
    zero_shot = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "zeroshot")
    zlap = zsadapt.refine(cars_pool.image_features, cars_pool.text_features, "zlap")
    assert zero_shot.accuracy(cars_pool.labels) == pytest.approx(58.96, abs=0.01)
    assert zlap.accuracy(cars_pool.labels) > zero_shot.accuracy(cars_pool.labels)
    assert zlap.accuracy(cars_pool.labels) == pytest.approx(59.76, abs=0.1)


def test_zeroshot_calibration_matches_mean_confidence_and_keeps_labels(small_pool):
    X, T = small_pool.image_features, small_pool.text_features
    mass = zsadapt.refine(X, T, "zlap", calibration="mass", calibrate=False)
    matched = zsadapt.refine(X, T, "zlap", calibrate=False)
    zero_shot = zsadapt.refine(X, T, "zeroshot")
    np.testing.assert_array_equal(matched.labels, mass.labels)
    np.testing.assert_allclose(matched.scores, mass.scores)
    shares = np.clip(mass.scores, 0, None) / np.clip(mass.scores, 0, None).sum(1, keepdims=True)
    np.testing.assert_allclose(mass.probs, shares, rtol=1e-4, atol=1e-7)
    assert matched.probs.max(1).mean() == pytest.approx(zero_shot.probs.max(1).mean(), abs=1e-3)
    beta = matched.info["probability_power"]
    powered = shares ** beta / (shares ** beta).sum(1, keepdims=True)
    np.testing.assert_allclose(matched.probs, powered, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("case", ["below every power", "above every power"])
def test_zeroshot_calibration_takes_the_bracket_end_when_no_power_reaches_the_target(small_pool, case):
    """A zero-shot target outside [g(1e-3), g(1e3)] gives that end of the bracket (the ends are
    evaluated only where the search needs them, solvers/zlap.py, so these cases reach them).
    Below: identical class embeddings make the zero-shot target 1 / C, and mass on one class per
    row keeps g above 1 / C at every beta. Above: mass spread evenly keeps g at 1 / C at every
    beta, below the pool's real zero-shot target."""
    X = torch.as_tensor(small_pool.image_features)
    T = torch.as_tensor(small_pool.text_features)
    n, c = X.shape[0], T.shape[0]
    solver = get_solver("zlap")(robust=False)
    solver.fit(Problem(X, T))
    if case == "below every power":
        solver.classifier_ = T[:1].expand(c, -1)  # zero-shot probabilities exactly 1 / C
        scores = torch.nn.functional.one_hot(torch.arange(n) % c, c).float()
        expected = 1e-3
    else:
        scores = torch.full((n, c), 0.5)
        expected = 1e3
    assert solver._fit_power(scores, X) == pytest.approx(expected)


@pytest.mark.realdata
def test_zeroshot_calibration_lowers_ece_on_stanford_cars(cars_pool):
    X, T, y = cars_pool.image_features, cars_pool.text_features, cars_pool.labels
    mass = zsadapt.refine(X, T, "zlap", calibration="mass", calibrate=False)
    matched = zsadapt.refine(X, T, "zlap", calibrate=False)
    assert zsadapt.expected_calibration_error(matched.probs, y) < zsadapt.expected_calibration_error(mass.probs, y) / 2


# ---------------------------------------------------------------- robust: the supported classes only


def _kept_classes(X, T):
    from zsadapt.solvers.pool_analysis import supported_classes

    Xt, Tt = torch.from_numpy(_unit(X)).float(), torch.from_numpy(_unit(T)).float()
    return supported_classes(Xt, torch.log_softmax(100 * Xt @ Tt.T, dim=1)).kept.numpy()


def test_robust_graph_is_the_published_one_on_the_kept_classes(small_pool):
    X, T = small_pool.image_features[:120], small_pool.text_features
    kept = _kept_classes(X, T)
    assert 1 < kept.sum() < len(T), "the fixture must read as holding only some classes"
    result = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200, degree_power=0.0)
    np.testing.assert_allclose(result.scores[:, kept], dense_zlap_scores(X, T[kept]), rtol=1e-4, atol=1e-7)
    assert (result.scores[:, ~kept] == 0).all() and (result.probs[:, ~kept] == 0).all()
    np.testing.assert_allclose(result.probs.sum(1), 1.0, rtol=1e-5)
    assert result.info["presence"]["classes_kept"] == kept.sum()
    default = zsadapt.refine(X, T, "zlap", tol=1e-9, max_iter=200)
    assert default.info["degree_power"] == 0.5  # classes were left out: the penalty is halved
    balanced = zsadapt.refine(small_pool.image_features, T, "zlap")
    assert balanced.info["degree_power"] == 0.0 and "classes_kept" in balanced.info["presence"]


def test_robust_inductive_scores_equal_direct_solves_on_the_kept_classes(small_pool):
    X, T = small_pool.image_features[:120], small_pool.text_features
    Q = small_pool.image_features[300:320]
    kept = _kept_classes(X, T)
    solver = _fitted_solver(X, T, tol=1e-9, max_iter=200, robust=True, degree_power=0.0)
    out = solver._own_predict(torch.from_numpy(_unit(Q)).float())
    np.testing.assert_allclose(out.scores.numpy()[:, kept], _direct_inductive_scores(X, T[kept], Q),
                               rtol=1e-4, atol=1e-7)
    assert (out.probs.numpy()[:, ~kept] == 0).all()


def _mean_subset_accuracies(pool, m, seeds, **params):
    from zsadapt.evaluate import subset_pool

    zero, ours = [], []
    for seed in seeds:
        sub = subset_pool(pool, m, seed)
        zero.append(zsadapt.refine(sub.image_features, sub.text_features, "zeroshot").accuracy(sub.labels))
        ours.append(zsadapt.refine(sub.image_features, sub.text_features, "zlap", **params).accuracy(sub.labels))
    return float(np.mean(zero)), float(np.mean(ours))


@pytest.mark.parametrize("m", [2, 5, 10, 25])
def test_defaults_on_synthetic_class_subsets(m):
    pool = zsadapt.make_pool(n_images=1500, n_classes=100, dim=64, text_noise=1.5, seed=1)
    zero, ours = _mean_subset_accuracies(pool, m, range(6))
    assert ours >= zero - 1.0, (m, zero, ours)


@pytest.mark.parametrize("m", [2, 5, 10, 0.25])
def test_defaults_on_cars_class_subsets(cars_pool, m):
    zero, ours = _mean_subset_accuracies(cars_pool, m, range(10))
    assert ours >= zero - 1.0, (m, zero, ours)


def test_published_graph_collapses_on_cars_class_subsets(cars_pool):
    """Why ``robust`` exists: on 2-class pools the published graph gives the images to absent classes."""
    zero, published = _mean_subset_accuracies(cars_pool, 2, range(10), robust=False)
    assert published < zero - 20, (zero, published)
