"""StatA's realistic protocol (zsadapt.protocol): the batches hold what the paper says they hold
(K_eff drawn classes, at most batch_size images, without replacement), the online stream is a
permutation of the pool whose correlation follows xi, and everything is reproducible from the seed."""

from __future__ import annotations

import numpy as np
import pytest

from zsadapt.protocol import (SEPARATE, SETTINGS, Setting, batch_indices, online_batches, online_stream,
                              parse_settings, setting_batches)


def labels_of(sizes, seed=0):
    """Shuffled labels with ``sizes[c]`` images of class c."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))


def test_batch_holds_k_eff_classes_and_batch_size_images():
    y = labels_of([30] * 50)
    rng = np.random.default_rng(1)
    seen_k = set()
    for _ in range(200):
        rows = batch_indices(y, 64, (2, 10), rng)
        k = np.unique(y[rows]).size
        assert 2 <= k <= 10
        assert rows.size == min(64, 30 * k)  # every image of the drawn classes is a candidate
        assert np.unique(rows).size == rows.size  # without replacement
        seen_k.add(k)
    assert seen_k == set(range(2, 11))  # K_eff uniform over the whole inclusive range


def test_batch_with_fewer_images_than_batch_size_takes_every_image_of_its_classes():
    y = labels_of([3, 5, 2, 40])
    rows = batch_indices(y, 64, (1, 1), np.random.default_rng(0))
    c = y[rows][0]
    assert np.array_equal(np.sort(rows), np.flatnonzero(y == c))


def test_batch_draws_only_classes_the_pool_holds():
    y = np.array([7] * 10 + [3] * 10)  # labels 0..6 absent
    for seed in range(20):
        rows = batch_indices(y, 64, (5, 25), np.random.default_rng(seed))
        assert np.array_equal(np.sort(rows), np.arange(20))  # K_eff >= present classes: all of them


def test_batch_draw_is_seeded_and_images_are_uniform_among_candidates():
    y = labels_of([100, 100])
    a = batch_indices(y, 64, (2, 2), np.random.default_rng(5))
    b = batch_indices(y, 64, (2, 2), np.random.default_rng(5))
    assert np.array_equal(a, b)
    counts = np.zeros(y.size)
    rng = np.random.default_rng(0)
    for _ in range(500):
        counts[batch_indices(y, 64, (2, 2), rng)] += 1
    assert abs(counts.mean() - 500 * 64 / 200) < 1e-9
    assert counts.std() < 0.15 * counts.mean()  # no row favoured (binomial sd ~ 8.3 of 160)


def test_whole_pool_setting_is_every_image_once():
    y = labels_of([4, 9, 1])
    tasks = setting_batches(y, Setting("whole", "whole"), tasks=3, seed=0)
    assert len(tasks) == 1 and len(tasks[0]) == 1
    assert np.array_equal(tasks[0][0], np.arange(y.size))


@pytest.mark.parametrize("xi", [0.1, 0.001, SEPARATE])
def test_online_stream_is_a_permutation_of_the_pool(xi):
    y = labels_of([37, 12, 50, 1, 20])
    stream = online_stream(y, xi, 16, np.random.default_rng(0))
    assert np.array_equal(np.sort(stream), np.arange(y.size))


def test_separate_stream_gives_each_class_one_contiguous_run():
    y = labels_of([20, 7, 33, 5])
    stream = online_stream(y, SEPARATE, 8, np.random.default_rng(3))
    runs = np.flatnonzero(np.diff(y[stream]) != 0).size + 1
    assert runs == 4


def classes_per_batch(y, xi, seed=0):
    return np.mean([np.unique(y[b]).size for b in online_batches(y, xi, 32, np.random.default_rng(seed))])


def test_online_correlation_follows_xi():
    y = labels_of([64] * 20)
    # Large xi: each class spread evenly over the slots (an i.i.d.-like stream, ~all 20 classes per
    # batch of 32); tiny xi: each class in about one random slot (a batch holds a few classes).
    assert classes_per_batch(y, 1e4) > 15
    assert classes_per_batch(y, 1e-3) < 4
    assert classes_per_batch(y, 1e-3) < classes_per_batch(y, 0.1) < classes_per_batch(y, 1e4)


def test_online_slot_shares_follow_the_dirichlet_proportions():
    # Huge xi: proportions ~ 1/S, so each class is split (nearly) evenly over the
    # S = min(N // batch_size, classes) = 2 slots, which come one after the other.
    y = labels_of([50, 50])
    stream = online_stream(y, 1e6, 10, np.random.default_rng(0))
    for part in (stream[:50], stream[50:]):
        counts = np.bincount(y[part], minlength=2)
        assert np.all(np.abs(counts - 25) <= 1)  # the cut is floor(share x size)


def test_online_batches_drop_the_incomplete_tail():
    y = labels_of([10, 11])
    batches = online_batches(y, 0.1, 8, np.random.default_rng(0))
    assert [b.size for b in batches] == [8, 8]
    assert online_batches(y, 0.1, 100, np.random.default_rng(0)) == []


def test_setting_batches_are_reproducible_and_extend_with_more_tasks():
    y = labels_of([40] * 30)
    setting = SETTINGS[0]
    a = setting_batches(y, setting, tasks=3, seed=1)
    b = setting_batches(y, setting, tasks=5, seed=1)
    for ta, tb in zip(a, b):
        assert all(np.array_equal(x, z) for x, z in zip(ta, tb))
    c = setting_batches(y, setting, tasks=3, seed=2)
    assert not all(np.array_equal(x[0], z[0]) for x, z in zip(a, c))
    online = setting_batches(y, parse_settings("online:0.01")[0], tasks=2, seed=0)
    assert len(online) == 2 and all(len(t) == (30 * 40) // 128 for t in online)


def test_settings_are_the_papers():
    names = [s.name for s in SETTINGS]
    assert names == ["64:1-4", "64:2-10", "64:5-25", "1000:5-25", "1000:25-50", "1000:50-100", "whole",
                     "online:0.1", "online:0.01", "online:0.001", "online:separate"]
    assert parse_settings("all") == SETTINGS


@pytest.mark.parametrize("call, message", [
    (lambda: batch_indices([], 64, (1, 4), np.random.default_rng(0)), "empty"),
    (lambda: batch_indices(np.zeros((2, 2), dtype=int), 64, None, np.random.default_rng(0)), "1-d"),
    (lambda: batch_indices([0.5, 1.0], 64, None, np.random.default_rng(0)), "integer"),
    (lambda: batch_indices([0, 1], 64, (4, 2), np.random.default_rng(0)), "low <= high"),
    (lambda: batch_indices([0, 1], 0, None, np.random.default_rng(0)), "batch_size"),
    (lambda: online_stream([0, 1], 0.0, 1, np.random.default_rng(0)), "xi"),
    (lambda: online_batches([0, 1], 0.1, 0, np.random.default_rng(0)), "batch_size"),
    (lambda: setting_batches([0, 1], SETTINGS[0], tasks=0), "tasks"),
    (lambda: parse_settings("64:1-5"), "unknown setting"),
])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_realistic_benchmark_records_errors_and_never_crashes(monkeypatch):
    """benchmarks/realistic.py on a tiny pool: a batch a method cannot take (here a stand-in for
    refine that refuses single images) is an error in the table; the other settings give
    accuracies that zero-shot's own computation confirms; with the real refine, single-image
    batches are no errors."""
    import sys
    from pathlib import Path

    import zsadapt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import realistic
    finally:
        sys.path.pop(0)
    pool = zsadapt.make_pool(n_images=60, n_classes=12, dim=16, seed=0)
    y = np.asarray(pool.labels)
    settings = (Setting("whole", "whole"), Setting("one class", "batch", 64, (1, 1)))
    cells, _ = realistic.evaluate_pool(pool, settings, ["zeroshot", "stata", "moon"], {}, tasks=3, seed=0,
                                       device=None)
    expected = 100 * np.mean(np.argmax(pool.image_features @ pool.text_features.T, 1) == y)
    assert abs(cells["whole", "zeroshot"]["acc"] - expected) < 1e-9
    pool.labels = np.zeros_like(y)
    pool.labels[0] = 11  # class 11 has one image: a one-class batch of it is a single image
    cells, _ = realistic.evaluate_pool(pool, settings, ["zeroshot", "stata", "moon"], {}, tasks=30, seed=0,
                                       device=None)
    for method in ("zeroshot", "stata", "moon"):  # single images included (they keep their zero-shot label)
        assert not cells["one class", method]["errors"] and cells["one class", method]["acc"] is not None
    real_refine = zsadapt.refine

    def refuses_one_image(X, *args, **kwargs):
        if len(X) == 1:
            raise ValueError("image_features: needs at least 2 images, got 1")
        return real_refine(X, *args, **kwargs)

    monkeypatch.setattr(realistic.zsadapt, "refine", refuses_one_image)
    cells, _ = realistic.evaluate_pool(pool, settings, ["zeroshot", "stata", "moon"], {}, tasks=30, seed=0,
                                       device=None)
    for method in ("zeroshot", "stata", "moon"):
        errors = cells["one class", method]["errors"]
        assert cells["one class", method]["acc"] is None and 0 < len(errors) < 30
        assert "at least 2 images" in errors[0]
    table = realistic.pool_table(cells, settings, ["zeroshot", "stata", "moon"])
    assert table.count("\n") == 4 and "| stata |" in table and "error (" in table
