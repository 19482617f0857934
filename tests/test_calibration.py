"""Label-free calibration (zsadapt.solvers.calibration) and its use in refine.

Checked against independent things: the ECE against a direct per-bin loop written here; the fitted
temperature against the mean confidence it must produce; a synthetic pool whose calibrated
posterior is known (the method's probabilities are that posterior raised to a power 5, the initial
classifier is that posterior: calibration must undo the power); and the real Cars pool with labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.metrics import expected_calibration_error
from zsadapt.shared_pools import load_shared_pool
from zsadapt.solvers import DEFAULT_METHOD, get_solver
from zsadapt.solvers.calibration import (MIN_MARGIN, T_MAX, calibrate, fit_temperature, log_probabilities,
                                         row_temperatures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def direct_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al. (2017) with bins (j/n, (j+1)/n] (the first also holds 0), one image at a time."""
    total = {j: [0, 0.0, 0.0] for j in range(n_bins)}  # count, sum correct, sum confidence
    for row, label in zip(probs, labels):
        confidence = float(row.max())
        j = 0
        while j < n_bins - 1 and confidence > (j + 1) / n_bins:
            j += 1
        total[j][0] += 1
        total[j][1] += float(int(row.argmax()) == int(label))
        total[j][2] += confidence
    n = len(labels)
    return 100.0 * sum(c / n * abs(s_ok / c - s_conf / c) for c, s_ok, s_conf in total.values() if c)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ece_against_a_direct_loop():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(0, 3, (500, 7)))
    labels = rng.integers(0, 7, 500)
    assert expected_calibration_error(probs, labels) == pytest.approx(direct_ece(probs, labels), abs=1e-9)
    # A hand-made case: 2 images at confidence 0.9 (one right), 2 at 0.6 (both right):
    # ECE = 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.6| = 40%.
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    assert expected_calibration_error(p, np.array([0, 1, 0, 1])) == pytest.approx(40.0)


def two_view_pool(second=0.5, n=6000, c=20, first=1.5, seed=0):
    """Labels y uniform; two independent noisy views z_v = s_v * onehot(y) + N(0, I). The posterior
    given view 1 (the initial classifier) and given both views (the method's information) are
    exactly softmax(s_1 z_1) and softmax(s_1 z_1 + s_2 z_2): both calibrated."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    views = []
    for strength in (first, second):
        z = rng.normal(0.0, 1.0, (n, c))
        z[np.arange(n), y] += strength
        views.append(strength * z)
    return softmax(views[0]), softmax(views[0] + views[1]), y


def calibrated_two_view(second):
    initial, posterior, y = two_view_pool(second)
    method = softmax(5.0 * np.log(posterior))  # the posterior's labels, far too confident
    out = calibrate(torch.log(torch.from_numpy(method)), torch.from_numpy(method), torch.from_numpy(initial))
    np.testing.assert_array_equal(out.probs.numpy().argmax(axis=1), method.argmax(axis=1))
    return method, posterior, y, out


def test_calibration_undoes_overconfidence_on_a_pool_with_known_posteriors():
    """A method 2.6 points above the initial classifier (39% -> 41%, as refined methods on real
    text pools): step 1 recovers the power 5 to 10%, and the ECE falls from 45 to a few points."""
    method, posterior, y, out = calibrated_two_view(0.5)
    raw, truth = expected_calibration_error(method, y), expected_calibration_error(posterior, y)
    assert raw > 40 and truth < 3  # very overconfident, and a calibrated answer exists
    assert out.temperature == pytest.approx(5.0, rel=0.1)
    assert expected_calibration_error(out.probs.numpy(), y) < truth + 3.0


def test_a_large_gain_is_left_as_underconfidence():
    """The targets come from the initial classifier, which cannot know of what the method gained
    (here 39% -> 60%): the ECE still falls, and what is left errs on the side of caution."""
    method, _, y, out = calibrated_two_view(1.5)
    probs = out.probs.numpy()
    assert expected_calibration_error(probs, y) < expected_calibration_error(method, y)
    assert probs.max(axis=1).mean() < (probs.argmax(axis=1) == y).mean()


def test_each_row_is_the_method_tempered_to_the_pooled_confidence():
    """Against a direct numpy computation of the three steps: m = softmax(l / T), r ∝ sqrt(p0 m),
    and the calibrated row is softmax(l / t_i) with top probability r(label)."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (200, 6))
    initial = softmax(rng.normal(0, 2, (200, 6)) + 0.5 * logits)
    out = calibrate(torch.from_numpy(logits), torch.from_numpy(softmax(logits)), torch.from_numpy(initial))
    probs, labels = out.probs.numpy(), logits.argmax(axis=1)
    m = softmax(logits / out.temperature)
    pooled = np.sqrt(initial * m)
    pooled /= pooled.sum(axis=1, keepdims=True)
    # A top probability below 1/C is out of a distribution's reach: such rows become the flattest
    # tempered row that keeps the label ahead by MIN_MARGIN in log-probability.
    gaps = logits - logits.max(axis=1, keepdims=True)
    cap = np.minimum(T_MAX, -np.sort(gaps, axis=1)[:, -2] / MIN_MARGIN)
    flattest = 1.0 / np.exp(gaps / cap[:, None]).sum(axis=1)
    assert (pooled[np.arange(200), labels] < flattest).any()
    np.testing.assert_allclose(probs.max(axis=1), np.maximum(pooled[np.arange(200), labels], flattest), rtol=1e-6)
    np.testing.assert_array_equal(probs.argmax(axis=1), labels)
    # a tempered row: log q_c - log q_c' = (l_c - l_c') / t_i, one t_i > 0 per row
    log_q = np.log(probs)
    t = (logits[:, 1:] - logits[:, :1]) / (log_q[:, 1:] - log_q[:, :1])  # (200, 5)
    assert (t > 0).all()
    np.testing.assert_allclose(t, np.repeat(t[:, :1], 5, axis=1), rtol=1e-5)
    agree = labels == initial.argmax(axis=1)  # step 1's target: zero-shot's confidence on A
    assert m[agree].max(axis=1).mean() == pytest.approx(initial[agree].max(axis=1).mean(), abs=1e-6)
    assert out.rows == int(agree.sum())


def test_same_labels_as_the_initial_classifier_recover_the_power_exactly():
    """Where the method agrees with the initial classifier everywhere, matching the initial mean
    confidence recovers p0 itself from p0^5 (up to the bisection)."""
    initial, _, _ = two_view_pool(seed=1)
    method = softmax(5.0 * np.log(initial))
    out = calibrate(torch.from_numpy(5.0 * np.log(initial)), torch.from_numpy(method), torch.from_numpy(initial))
    assert out.temperature == pytest.approx(5.0, rel=1e-3)
    assert out.rows == initial.shape[0]
    # Rows whose top two classes are within MIN_MARGIN in log-probability of p0 cannot be flattened to
    # t = 5 (they would tie): they stay sharper, with their label.
    log_initial = np.sort(np.log(initial), axis=1)
    capped = 5.0 * (log_initial[:, -1] - log_initial[:, -2]) < 5.0 * MIN_MARGIN
    np.testing.assert_allclose(out.probs.numpy()[~capped], initial[~capped], atol=1e-6)
    assert capped.mean() < 0.01


def test_fit_temperature_reaches_its_target_and_its_ends():
    log_p = torch.log_softmax(torch.randn(300, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4,
                              dim=1)
    for target in (0.2, 0.5, 0.9):
        t = fit_temperature(log_p, target)
        assert float(torch.softmax(log_p / t, dim=1).amax(dim=1).mean()) == pytest.approx(target, abs=1e-6)
    assert fit_temperature(log_p, 1.0) == pytest.approx(1e-3)  # out of reach: the sharp end
    assert fit_temperature(log_p, 1.0 / 9) == pytest.approx(1e6)  # uniform: the flat end


def gmm_like_log_posteriors(n=400, c=300, seed=0):
    """Log-posteriors as a fitted mixture gives them (gaps of tens to hundreds of nats, more classes
    than the warm start's top 16) and a mild, text-like spread, in float64."""
    g = torch.Generator().manual_seed(seed)
    peaked = torch.log_softmax(torch.randn(n // 2, c, dtype=torch.float64, generator=g) * 60, dim=1)
    mild = torch.log_softmax(torch.randn(n - n // 2, c, dtype=torch.float64, generator=g) * 3, dim=1)
    return torch.cat([peaked, mild])


def direct_mean_confidence(log_p: np.ndarray, log_t: float) -> float:
    """mean_i max_c softmax(l_i / e^s)_c, written out in numpy."""
    z = log_p / np.exp(log_t)
    z = z - z.max(axis=1, keepdims=True)
    return float((1.0 / np.exp(z).sum(axis=1)).mean())


@pytest.mark.parametrize("target", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_fit_temperature_against_a_direct_scipy_solve(target):
    """The safeguarded Newton search (warm-started on each row's top classes) against scipy's
    brentq on the same objective, h(log T) = target, over the same bracket."""
    optimize = pytest.importorskip("scipy.optimize")
    log_p = gmm_like_log_posteriors()
    expected = np.exp(optimize.brentq(lambda s: direct_mean_confidence(log_p.numpy(), s) - target,
                                      np.log(1e-3), np.log(1e6), xtol=1e-12, rtol=1e-12))
    assert fit_temperature(log_p, target) == pytest.approx(expected, rel=1e-6)


def test_a_search_that_lands_on_its_target_stops_there(monkeypatch):
    """h strictly decreasing: a step whose mean confidence equals the target exactly is the root.
    (It was taken for a plateau, and the search went to the bracket's far end and came back by
    bisection: about 30 passes over (n, C) instead of one, seen on Stanford Cars for zlap and
    anchored.)"""
    from zsadapt.solvers import calibration

    log_p = gmm_like_log_posteriors()
    gaps = log_p - log_p.amax(dim=1, keepdim=True)
    s0 = -0.25  # exactly representable; the target is h there, as the search computes it
    target, slope = calibration._mean_confidence(gaps, gaps, s0, (torch.empty_like(gaps), torch.empty_like(gaps)))
    assert slope < 0
    evaluations = []
    original = calibration._mean_confidence
    monkeypatch.setattr(calibration, "_mean_confidence",
                        lambda *args: evaluations.append(args[2]) or original(*args))
    assert calibration._solve_log_temperature(gaps, target, np.log(1e-3), np.log(1e6), s0) == s0
    assert evaluations == [s0]


@pytest.mark.parametrize("seed", range(4))
def test_the_top_k_bounds_decide_t_equal_one_as_the_full_rows_do(seed):
    """fit_temperature returns exactly 1.0 where T = 1 meets the target within 1e-6; the check
    settles most pools on the rows' top classes (bounds on the rest of each row's sum): it must
    agree with the check over every class, on both sides of the target and at it."""
    from zsadapt.solvers.calibration import WARM_START_CLASSES, _temperature_one_fits

    log_p = gmm_like_log_posteriors(seed=seed) if seed % 2 else torch.log_softmax(
        torch.randn(300, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2, dim=1)
    gaps = log_p - log_p.amax(dim=1, keepdim=True)
    top = torch.topk(gaps, WARM_START_CLASSES, dim=1).values
    at_one = float((1.0 / torch.exp(gaps).sum(dim=1)).mean())
    for target in (at_one, at_one + 5e-7, at_one - 5e-7, at_one + 2e-6, at_one - 2e-6, 0.5 * at_one,
                   min(1.0, 1.5 * at_one)):
        direct = abs(at_one - target) <= 1e-6
        assert _temperature_one_fits(gaps, top, target) == direct, target
        assert (fit_temperature(log_p, target) == 1.0) == direct, target


def test_row_temperatures_against_a_direct_scipy_solve():
    """Per row, the temperature whose top probability is the target, against brentq on each row
    (rows whose target is reachable within the bracket)."""
    optimize = pytest.importorskip("scipy.optimize")
    log_p = gmm_like_log_posteriors(n=60)
    targets = torch.rand(60, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    t = row_temperatures(log_p, targets).numpy()
    for i, (row, target) in enumerate(zip(log_p.numpy(), targets.numpy())):
        expected = np.exp(optimize.brentq(lambda s: direct_mean_confidence(row[None], s) - target,
                                          np.log(1e-3), np.log(1e6), xtol=1e-12, rtol=1e-12))
        assert t[i] == pytest.approx(expected, rel=1e-4), i


def test_log_probabilities_keep_the_order_of_one_hot_rows():
    scores = torch.tensor([[0.0, -300.0, -900.0], [0.0, -500.0, -600.0]])  # gmm-like log-joints
    probs = torch.softmax(scores, dim=1)  # both rows are one-hot in float32
    torch.testing.assert_close(log_probabilities(scores, probs), torch.log_softmax(scores, dim=1))
    out = calibrate(scores, probs, torch.full((2, 3), 1 / 3) + torch.tensor([[0.1, -0.05, -0.05]] * 2))
    assert float(out.probs[0, 0]) > float(out.probs[1, 0])  # the larger gap stays more confident
    mass = torch.tensor([[3.0, 1.0, 0.0]])  # zlap-like mass: scores are not logits of the probs
    torch.testing.assert_close(log_probabilities(mass, mass / 4), torch.log(mass / 4))


def test_no_agreement_falls_back_to_every_image():
    initial = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64)
    method = torch.tensor([[0.05, 0.9, 0.05], [0.05, 0.05, 0.9]], dtype=torch.float64)
    out = calibrate(torch.log(method), method, initial)
    assert out.rows == 2 and out.target == pytest.approx(0.65)
    tempered = torch.softmax(torch.log(method) / out.temperature, dim=1)
    assert float(tempered.amax(dim=1).mean()) == pytest.approx(0.65, abs=1e-6)
    assert torch.equal(out.probs.argmax(dim=1), method.argmax(dim=1))


def test_calibrate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        calibrate(torch.zeros(3, 2), torch.full((3, 2), 0.5), torch.full((3, 4), 0.25))


@pytest.fixture(scope="module")
def pool():
    return zsadapt.make_pool(n_images=300, n_classes=6, dim=16, seed=5)


@pytest.mark.parametrize("method", ["zeroshot", "zlap", "gmm", "em", "transclip", "anchored"])
def test_refine_keeps_the_published_labels_and_probabilities(pool, method):
    X, T = pool.image_features, pool.text_features
    published = zsadapt.refine(X, T, method, calibrate=False)
    calibrated = zsadapt.refine(X, T, method)
    np.testing.assert_array_equal(calibrated.labels, published.labels)  # bit for bit
    np.testing.assert_array_equal(calibrated.scores, published.scores)
    np.testing.assert_array_equal(calibrated.probs.argmax(axis=1), published.labels)
    np.testing.assert_allclose(calibrated.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert isinstance(calibrated.probs, np.ndarray) and calibrated.probs.dtype == np.float32
    assert "calibration" in calibrated.info and "calibration" not in published.info
    # calibrate=False is the solver's own output, fitted directly here.
    problem = zsadapt.solvers.Problem(torch.from_numpy(X / np.linalg.norm(X, axis=1, keepdims=True)),
                                      torch.from_numpy(T / np.linalg.norm(T, axis=1, keepdims=True)))
    direct = get_solver(method)().fit(problem)
    np.testing.assert_allclose(published.probs, direct.probs.numpy(), rtol=1e-4, atol=1e-6)
    if method == "zeroshot":
        assert calibrated.info["calibration"]["temperature"] == 1.0
        assert calibrated.info["calibration"]["rows"] == X.shape[0]  # it agrees with itself everywhere
        assert calibrated.info["calibration"]["target"] == pytest.approx(published.probs.max(axis=1).mean(), rel=1e-6)
        np.testing.assert_array_equal(calibrated.probs, published.probs)


def test_refine_torch_in_torch_out_and_bad_flag(pool):
    X, T = torch.from_numpy(pool.image_features), torch.from_numpy(pool.text_features)
    result = zsadapt.refine(X, T, "gmm")
    assert isinstance(result.probs, torch.Tensor) and result.probs.device == X.device
    with pytest.raises(TypeError, match="calibrate"):
        zsadapt.refine(X, T, "gmm", calibrate="yes")


@pytest.fixture(scope="module")
def cars_results(shared_data):
    """Every method on whole Cars, calibrated (refine's default)."""
    pool = load_shared_pool(shared_data, "stanford_cars_val")
    return pool.labels, {m: zsadapt.refine(pool.image_features, pool.text_features, m) for m in zsadapt.methods()}


#: Known unmet targets (issue 10), one reason each.
CARS_EXPECTED_FAILURES = {
    "moon": "moon labels whole Cars at 37% (zero-shot 59%): half of its labels differ from zero-shot's, "
            "mostly wrongly; the pooled confidence sees much of it (ECE 49.6 -> 15.3), not all",
}


@pytest.mark.realdata
@pytest.mark.parametrize("method", [m for m in zsadapt.methods() if m != "zeroshot"])
def test_cars_every_method_within_5_points_of_zeroshot_ece(cars_results, method, request):
    if method in CARS_EXPECTED_FAILURES:
        request.applymarker(pytest.mark.xfail(strict=True, reason=CARS_EXPECTED_FAILURES[method]))
    labels, results = cars_results
    zeroshot = expected_calibration_error(results["zeroshot"].probs, labels)
    ece = expected_calibration_error(results[method].probs, labels)
    assert ece <= zeroshot + 5.0, f"{method}: ECE {ece:.2f} against zero-shot {zeroshot:.2f}"


@pytest.mark.realdata
def test_cars_default_within_2_points_and_confident_images_are_right(cars_results):
    labels, results = cars_results
    zeroshot = expected_calibration_error(results["zeroshot"].probs, labels)
    default = results[DEFAULT_METHOD]
    assert expected_calibration_error(default.probs, labels) <= zeroshot + 2.0
    kept = default.probs.max(axis=1) >= 0.9  # --min-confidence 0.9 keeps images at least 90% right
    assert 0 < kept.sum() < len(labels) / 2
    assert (default.labels[kept] == labels[kept]).mean() >= 0.9


def test_cli_calibrates_by_default_and_says_so(tmp_path, pool):
    from click.testing import CliRunner

    from zsadapt.cli.main import main

    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features, labels=pool.labels)
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["refine", "--help"]).output.split())
    assert "--no-calibrate" in help_text and "without labels" in help_text
    outputs = {}
    for flag in ("--calibrate", "--no-calibrate"):
        out = tmp_path / f"{flag.strip('-')}.npz"
        result = runner.invoke(main, ["refine", str(path), "--method", "gmm", "--out", str(out), flag, "--quiet"])
        assert result.exit_code == 0, result.output
        with np.load(out, allow_pickle=False) as data:
            outputs[flag] = data["probs"], data["labels"]
    for flag, calibrate_flag in (("--calibrate", True), ("--no-calibrate", False)):
        expected = zsadapt.refine(pool.image_features, pool.text_features, "gmm", calibrate=calibrate_flag)
        # atol: entries below 1e-6 of rows near certainty hang on the last digits of their temperature
        np.testing.assert_allclose(outputs[flag][0], expected.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(outputs[flag][1], expected.labels)
    assert not np.allclose(outputs["--calibrate"][0], outputs["--no-calibrate"][0])


@pytest.mark.slow
def test_benchmark_page_agrees_with_refine(tmp_path):
    """benchmarks/calibration.py on the synthetic pool: the page is written where asked, and its
    calibrated ECE for gmm is the one refine's default probabilities give."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    env = dict(os.environ, ZSADAPT_RESULTS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("ZSADAPT_DATA", None)
    done = subprocess.run([sys.executable, "calibration.py", "--pools", "synthetic", "--methods", "gmm"],
                          cwd=benchmarks, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "calibration.md").read_text()
    row = re.search(r"^\| gmm \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", page, flags=re.M)
    pool = zsadapt.make_pool()
    result = zsadapt.refine(pool.image_features, pool.text_features, "gmm")
    assert float(row.group(1)) == pytest.approx(result.accuracy(pool.labels), abs=0.01)
    assert float(row.group(3)) == pytest.approx(expected_calibration_error(result.probs, pool.labels), abs=0.01)


def test_softmax_match_is_checked_over_every_chunk(monkeypatch):
    from zsadapt.solvers import calibration

    monkeypatch.setattr(calibration, "CHUNK_ELEMENTS", 12)  # 3 rows of 4 classes a chunk
    log_p = torch.log_softmax(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    probs = log_p.exp()
    assert calibration._softmax_matches(log_p, probs, 1e-4)
    far = probs.clone()
    far[9, 0] += 1e-3  # in the last, short chunk
    assert not calibration._softmax_matches(log_p, far, 1e-4)
    nan = probs.clone()
    nan[4, 2] = float("nan")
    assert not calibration._softmax_matches(log_p, nan, 1e-4)
    # log_probabilities then takes log(probs) instead of the log-softmax of the scores
    assert torch.equal(calibration.log_probabilities(log_p, far), torch.log(far))
