"""The pool analysis (``solvers/pool_analysis.py``): the floor under the solvers that says which
classes a pool holds and how many images of each, computed once per (pool, classifier) pair."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import zsadapt
from zsadapt.evaluate import subset_pool
from zsadapt.solvers import Problem, get_solver
from zsadapt.solvers import pool_analysis
from zsadapt.solvers.pool_analysis import analyse_pool, supported_classes


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tensors(pool):
    return torch.tensor(pool.image_features), torch.tensor(pool.text_features)


@pytest.fixture(scope="module")
def subset():
    """A clustered 20-class pool cut down to the images of 4 classes (the classifier keeps 20)."""
    pool = zsadapt.make_pool(n_images=1200, n_classes=20, dim=32, image_noise=0.5, text_noise=1.0, seed=2)
    return subset_pool(pool, 4, seed=0)


def count_support_calls(monkeypatch):
    calls = []
    original = pool_analysis.supported_classes

    def counted(X, log_probs, **kwargs):
        calls.append(log_probs.shape)
        return original(X, log_probs, **kwargs)

    monkeypatch.setattr(pool_analysis, "supported_classes", counted)
    return calls


def test_the_floor_imports_no_solver():
    """Below every solver: the module imports only the maths modules, never a Solver."""
    source = Path(pool_analysis.__file__).read_text()
    siblings = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.level == 1}  # from .x import ...
    assert siblings == {"base", "mixture", "presence", "proportions", "timing"}
    assert "(Solver)" not in source


def test_absent_classes_are_dropped_on_a_clustered_subset_pool(subset):
    X, T = tensors(subset)
    analysis = analyse_pool(Problem(X, T))
    present = np.unique(subset.labels)
    kept = analysis.support.kept.numpy()
    assert set(present) <= set(np.flatnonzero(kept))
    assert kept.sum() < 20 and analysis.support.heldout_gain > 0
    assert (analysis.support.log_weight <= 0).all()
    # The kept classes' proportions follow the pool's class sizes (computed from its labels).
    truth = np.bincount(subset.labels, minlength=20) / subset.labels.size
    assert np.abs(analysis.proportions().numpy() - truth).sum() < 0.25
    info = analysis.info()
    assert info["classes_kept"] == kept.sum() and info["heldout_gain"] == analysis.support.heldout_gain
    assert set(info["seconds"]) == {"support", "proportions"}


def test_classes_that_only_catch_stray_votes_are_not_kept():
    """Four tight clusters of 60 images, a classifier that knows all 30 classes, and two images of
    each cluster misread (barely) as one of four absent classes: those win 2 argmax votes each but
    under half an expected image. The held-out check chooses between the evident support (the
    four) and the voted one (the eight): the four absent components explain no held-out image
    better, so the smaller support stands (the rule before kept all eight)."""
    g = torch.Generator().manual_seed(0)
    n_classes, dim, per_class = 30, 16, 60
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=1)
    labels = torch.arange(4).repeat_interleave(per_class)
    X = torch.nn.functional.normalize(centres[labels] + 0.15 * torch.randn(labels.numel(), dim, generator=g), dim=1)
    logits = 8.0 * X @ centres.T
    for n, row in enumerate(i * per_class + j for i in range(4) for j in range(2)):
        logits[row, 10 + n // 2] = logits[row].max() + 0.5
    log_probs = torch.log_softmax(logits, dim=1)
    votes = torch.bincount(log_probs.argmax(dim=1), minlength=n_classes)
    assert votes[10:14].tolist() == [2, 2, 2, 2]
    support = supported_classes(X, log_probs)
    assert support.kept.nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert support.heldout_gain > 0


def test_a_support_that_declares_more_errors_than_zero_shot_expects_is_not_a_candidate():
    """A balanced 500-class pool (512-d, CLIP-like) subsampled to 3 images per class: the class
    evidence reads the classifier's hub classes as imbalance, and the support of the evident
    classes (174) would call 471 images zero-shot errors where the classifier expects 419. It is
    not a candidate, so the voted support (336 classes) stands, and ``gmm`` beats zero-shot; with
    the evident support it would fall to half of it (36.8% against 71.1%, measured)."""
    pool = zsadapt.make_pool(n_images=3500, n_classes=500, dim=512, imbalance=0.0, text_noise=3.25, seed=0)
    rows = np.random.default_rng(0).permutation(3500)[:1500]
    X, T = torch.tensor(pool.image_features[rows]), torch.tensor(pool.text_features)
    log_probs = torch.log_softmax(100 * X @ T.T, dim=1)
    votes = torch.bincount(log_probs.argmax(dim=1), minlength=500)
    support = supported_classes(X, log_probs)
    presence = support.presence
    evident = (presence.counts >= 0.5) | (presence.counts == presence.counts.max())
    voted = evident | (votes >= 2)
    assert int(votes[voted & ~evident].sum()) > pool_analysis._expected_errors(log_probs)
    assert torch.equal(support.kept, voted) and int(evident.sum()) < int(voted.sum())
    labels = zsadapt.refine(pool.image_features[rows], pool.text_features, "gmm", calibrate=False).labels
    zeroshot = (pool.image_features[rows] @ pool.text_features.T).argmax(axis=1)
    truth = pool.labels[rows]
    assert np.mean(labels == truth) > np.mean(zeroshot == truth)


def test_the_analysis_is_the_direct_computation_and_is_cached(subset):
    X, T = tensors(subset)
    problem = Problem(X, T, seed=3)
    analysis = analyse_pool(problem)
    direct = supported_classes(X, torch.log_softmax(100 * X @ T.T, dim=1), seed=3)
    assert torch.equal(analysis.support.kept, direct.kept)
    assert torch.equal(analysis.support.log_weight, direct.log_weight)
    assert analysis.support.heldout_gain == direct.heldout_gain
    assert analyse_pool(problem) is analysis
    other = analyse_pool(problem, covariance="spherical")
    assert other is not analysis and other.covariance == "spherical"
    assert analyse_pool(Problem(X, T, seed=3)) is not analysis  # a new problem, a new analysis


def test_log_probabilities_a_caller_has_are_read_not_recomputed(subset, monkeypatch):
    """gmm hands the analysis the zero-shot log-probabilities it computed: the same analysis,
    without a second product of the pool with the classifier."""
    X, T = tensors(subset)
    log_probs = torch.log_softmax(100 * X @ T.T, dim=1)
    monkeypatch.setattr(pool_analysis, "zeroshot_logits", lambda *args: pytest.fail("recomputed"))
    given = analyse_pool(Problem(X, T, seed=3), log_probs=log_probs)
    monkeypatch.undo()
    direct = analyse_pool(Problem(X, T, seed=3))
    assert torch.equal(given.support.kept, direct.support.kept)
    assert given.support.heldout_gain == direct.support.heldout_gain


def test_one_analysis_per_problem_whatever_asks(subset, monkeypatch):
    """zlap, transclip, gmm and inmap fitted on one problem share one class-support step."""
    calls = count_support_calls(monkeypatch)
    X, T = tensors(subset)
    problem = Problem(X, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("zlap", "transclip", "gmm", "inmap"):
            get_solver(name)().fit(problem)
    assert len(calls) == 1


def test_inmap_initial_problem_gets_its_own_analysis(subset, monkeypatch):
    """``initial="inmap"``: the proportions on the text classifier, the support of zlap's graph on
    the proxies: one analysis for each (pool, classifier) pair, no more."""
    calls = count_support_calls(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = zsadapt.refine(subset.image_features, subset.text_features, "zlap", initial="inmap",
                                initial_params={"max_iter": 20})
    assert len(calls) == 2
    assert "presence" in result.info


def test_results_report_the_analysis(subset):
    for name in ("zlap", "transclip", "gmm"):
        info = zsadapt.refine(subset.image_features, subset.text_features, name).info["presence"]
        assert {"alpha", "classes_present", "classes_kept", "heldout_gain", "seconds"} <= set(info), name


def test_edge_cases():
    pool = zsadapt.make_pool(n_images=200, n_classes=10, dim=32, seed=0)
    X, T = tensors(pool)
    one_image = analyse_pool(Problem(X[:1], T))
    assert one_image.support.kept.all() and one_image.support.heldout_gain is None
    assert torch.allclose(one_image.proportions(), torch.full((10,), 0.1))
    one_class = analyse_pool(Problem(X, T[:1]))
    assert one_class.support.kept.tolist() == [True] and one_class.proportions().tolist() == [1.0]
    few = analyse_pool(Problem(X[:5], T))  # fewer images than classes
    assert few.support.kept.any() and torch.isfinite(few.proportions()).all()
    assert few.proportions().sum().item() == pytest.approx(1.0)
    line = torch.tensor([[1.0], [-1.0]])  # d = 1
    one_dim = analyse_pool(Problem(line.repeat(10, 1), line))
    assert one_dim.support.kept.all()


def test_copies_of_one_image_hold_one_class():
    """Duplicate rows: a pool of 50 copies of one image holds the zero-shot class of that image
    only (before the held-out halves were drawn over distinct images, copies on both sides made
    the check a tie decided by round-off, and every class stayed)."""
    pool = zsadapt.make_pool(n_images=200, n_classes=10, dim=32, seed=0)
    X, T = tensors(pool)
    copies = X[:1].repeat(50, 1)
    predicted = int((X[0] @ T.T).argmax())
    analysis = analyse_pool(Problem(copies, T))
    assert analysis.support.kept.nonzero().flatten().tolist() == [predicted]
    for name in ("gmm", "transclip", "zlap"):
        labels = zsadapt.refine(copies.numpy(), pool.text_features, name).labels
        assert (labels == predicted).all(), name


def test_duplicates_fall_in_one_half_of_the_heldout_check(monkeypatch):
    """Every copy of an image is on the same side of the 2-fold split."""
    pool = zsadapt.make_pool(n_images=300, n_classes=10, dim=32, seed=1)
    X, T = tensors(subset_pool(pool, 3, seed=0))
    X = torch.cat([X, X[:20], X[:20]])  # 40 duplicate rows
    splits = []
    original = pool_analysis.m_step

    def recording(train_rows, resp, covariance, reg):
        splits.append(train_rows)
        return original(train_rows, resp, covariance, reg)

    monkeypatch.setattr(pool_analysis, "m_step", recording)
    supported_classes(X, torch.log_softmax(100 * X @ T.T, dim=1))
    assert splits, "the held-out check ran"
    for train in splits:
        train_set = {tuple(row.tolist()) for row in train}
        rest = [tuple(row.tolist()) for row in X if tuple(row.tolist()) not in train_set]
        assert len(train_set) + len(set(rest)) == len({tuple(row.tolist()) for row in X})
