"""The speed benchmarks still run: each on a tiny pool, where zsadapt and the float64 version of
the same updates must give the same labels (the figures themselves live in the README)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, script, *args], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_mixture_agrees_with_float64():
    out = run_benchmark("bench_mixture.py", "--sizes", "300x10", "--iters", "2", "--rounds", "1", "--threads", "1")
    same = {name: float(value) for name, value in
            re.findall(r"^\s+(gmm float64|transclip float64)\D.*?([\d.]+)\s*$", out, flags=re.M)}
    assert same == {"gmm float64": 100.0, "transclip float64": 100.0}, out
    path_diff = float(re.search(r"relative difference to float64: ([\d.e+-]+)", out).group(1))
    assert path_diff < 1e-5
    assert "class support (robust=True's extra step)" in out


def test_bench_em_agrees_with_float64():
    out = run_benchmark("bench_em.py", "--sizes", "300x10", "--iters", "2", "--threads", "1")
    row = out.strip().splitlines()[-1].split()
    assert row[:2] == ["300", "10"] and row[5] == "100.00%", out


def test_silent_stretch_times_the_gaps_on_stderr():
    """benchmarks/silent_stretch.py on a command whose silences are known from below: three
    stderr lines 0.3 s apart, then 1 s before the exit; stdout is counted, not timed."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from silent_stretch import silences
    finally:
        sys.path.remove(str(BENCHMARKS))
    script = ("import sys, time\n"
              "print('result')\n"
              "for i in range(3):\n"
              "    time.sleep(0.3); sys.stderr.write(f'line {i}\\n'); sys.stderr.flush()\n"
              "time.sleep(1.0)\n")
    found = silences([sys.executable, "-c", script], env={})
    assert found["updates"] == 3 and found["rc"] == 0 and found["stdout_bytes"] == len("result\n")
    assert found["longest"] >= 0.3 and found["exit"] >= 1.0
    assert found["seconds"] >= 1.9


def test_bench_threads_reads_the_chosen_threads_and_refuses_unknown_workloads():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_threads import chosen_threads
    finally:
        sys.path.remove(str(BENCHMARKS))
    note = "zsadapt: 1 of 2 CPU threads: other processes keep about 11.5 CPUs busy (--threads ...)"
    assert chosen_threads(note, 2) == 1 and chosen_threads("", 8) == 8
    done = subprocess.run([sys.executable, "bench_threads.py", "--workloads", "demo,nope", "--no-page"],
                          cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown workload(s) nope" in done.stderr


def test_label_adapt_writes_the_labels_it_measures(shared_data, monkeypatch):
    """benchmarks/label_adapt.py on Cars in 2 shards: its zero-shot column is the pool's zero-shot
    accuracy (58.96%, float16 rows), and with the images of a class arriving together the labels
    ``label --adapt`` wrote beat zero-shot (the stream carries what it learned across batches)."""
    monkeypatch.setenv("ZSADAPT_DATA", str(shared_data.resolve()))  # the script runs in benchmarks/
    out = run_benchmark("label_adapt.py", "--pools", "stanford_cars_val", "--shards", "2", "--no-page")
    rows = dict(re.findall(r"\| stanford_cars_val, ([a-z ]+) \| (.+) \|", out))
    assert set(rows) == {"random", "by class"}
    zeroshot, alone, adapted, _ = (float(v.replace(",", "")) for v in rows["by class"].split(" | "))
    assert abs(zeroshot - 58.96) < 0.2
    assert adapted > zeroshot + 2


def test_auto_branches_agrees_with_the_realistic_benchmark(shared_data, monkeypatch):
    """benchmarks/auto_branches.py reads auto's branch from Result.info and fits the other branch
    itself; its gmm, stata and default-threshold auto columns must be the figures
    benchmarks/realistic.py gets by fitting each method on the same batches, and a batch it puts
    below m = 2 must have gone to stata."""
    monkeypatch.setenv("ZSADAPT_DATA", str(shared_data.resolve()))
    common = ("--pools", "stanford_cars_val", "--settings", "64:1-4,online:0.1", "--tasks", "1", "--no-page")
    ours = run_benchmark("auto_branches.py", *common)
    theirs = run_benchmark("realistic.py", *common, "--methods", "zeroshot,gmm,stata,auto")
    reference = {m: [float(v) for v in re.search(rf"^\| {m} \| ([\d.]+) \| ([\d.]+) \|", theirs, re.M).groups()]
                 for m in ("zeroshot", "gmm", "stata", "auto")}
    for column, setting in enumerate(("64:1-4", "online:0.1")):
        cells = re.search(rf"^\| {setting} \| (.+) \|$", ours, re.M).group(1).split(" | ")
        gmm, stata, zeroshot, auto = (float(c) for c in cells[:4])
        assert (gmm, stata, zeroshot, auto) == pytest.approx(
            (reference["gmm"][column], reference["stata"][column], reference["zeroshot"][column],
             reference["auto"][column]), abs=0.006), ours
    below_two = re.search(r"^\| \[0, 2\) \| (\d+) \| (\d+)% \|", ours, re.M)
    assert below_two and int(below_two.group(1)) > 0 and below_two.group(2) == "0", ours


def test_zeroshot_bias_takes_out_a_known_per_class_lean():
    """benchmarks/zeroshot_bias.py: a classifier made of the true class directions plus a random
    lean of each class towards the images' common direction u (hubs) is wrong on many images;
    taking the lean out must give back the unbiased classifier's accuracy, and leave a classifier
    without such a lean as it was."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from zeroshot_bias import without_class_bias, zeroshot_figures
    finally:
        sys.path.remove(str(BENCHMARKS))
    import numpy as np

    rng = np.random.default_rng(0)
    n_classes, dim, per_class = 50, 64, 20
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    u = unit(rng.standard_normal(dim))
    means = unit(rng.standard_normal((n_classes, dim)))
    means = unit(means - np.outer(means @ u, u))  # class directions orthogonal to u
    labels = np.repeat(np.arange(n_classes), per_class)
    images = unit(means[labels] + 0.5 * rng.standard_normal((len(labels), dim)) / np.sqrt(dim) + 2.0 * u)
    leaning = unit(means + rng.uniform(0, 2.0, n_classes)[:, None] * u)
    unbiased = zeroshot_figures(images, means, labels)
    biased = zeroshot_figures(images, leaning, labels)
    centred = zeroshot_figures(images, without_class_bias(images, leaning), labels)
    assert unbiased["accuracy"] == 100.0 and biased["accuracy"] < 75.0 and biased["max votes"] > 3
    assert centred["accuracy"] == 100.0 and centred["max votes"] == 1.0
    centre = unit(images.mean(axis=0))  # the direction the function measures the lean along
    alike = unit(unit(means - np.outer(means @ centre, centre)) + 0.7 * centre)  # every class leans alike
    assert np.allclose(without_class_bias(images, alike), alike, atol=1e-12)


def test_many_classes_stacks_the_prototype_pools_and_samples_every_class(shared_data):
    """benchmarks/many_classes.py: the stacked pool (zsadapt.shared_pools) holds the six prototype pools' test images
    with their labels offset pool after pool and each class's own prototype, so its first and last
    pools, classified among their own classes, keep their zero-shot accuracy (79.07, 47.21; README);
    the per-class sample holds min(m, n_c) images of every class, seeded."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from many_classes import load, per_class_sample
    finally:
        sys.path.remove(str(BENCHMARKS))
    import numpy as np

    X, T, y = load("multi-487", shared_data)
    assert X.shape == (17405, 512) and T.shape == (487, 512) and np.array_equal(np.unique(y), np.arange(487))
    for rows, classes, expected in ((y < 100, slice(0, 100), 79.07), (y >= 386, slice(386, 487), 47.21)):
        own = (X[rows] @ T[classes].T).argmax(axis=1) + classes.start
        assert 100 * np.mean(own == y[rows]) == pytest.approx(expected, abs=0.005)
    sample = per_class_sample(y, 3, seed=0)
    counts = np.bincount(y[sample], minlength=487)
    assert np.array_equal(counts, np.minimum(3, np.bincount(y, minlength=487)))
    assert np.all(np.diff(sample) > 0) and np.array_equal(sample, per_class_sample(y, 3, seed=0))
    assert not np.array_equal(sample, per_class_sample(y, 3, seed=1))


def test_shots_build_the_prototypes_and_name_their_own_pages(shared_data, monkeypatch, tmp_path):
    """``--shots N`` of benchmarks/real_pools.py and realistic.py: the prototype pools' classifier is
    the mean of N train features per class (the whole-pool zero-shot accuracy is that of
    ``load_shared_pool(..., shots=N)`` computed here, not the 1-shot one), and a page other than
    1-shot is written beside the committed one, never over it."""
    import numpy as np

    from zsadapt.shared_pools import load_shared_pool

    monkeypatch.setenv("ZSADAPT_DATA", str(shared_data.resolve()))
    monkeypatch.setenv("ZSADAPT_RESULTS_DIR", str(tmp_path))
    expected = {}
    for shots in (1, 4):
        pool = load_shared_pool(shared_data, "caltech101", shots=shots)
        own = (pool.image_features @ pool.text_features.T).argmax(axis=1)
        expected[shots] = 100 * np.mean(own == pool.labels)
    assert abs(expected[4] - expected[1]) > 1  # the two classifiers differ
    out = run_benchmark("real_pools.py", "--shots", "4", "--pools", "caltech101", "--methods", "zeroshot")
    assert float(re.search(r"^\| caltech101 \(4-shot\) \| ([\d.]+) \|", out, re.M).group(1)) == pytest.approx(
        expected[4], abs=0.005)
    out = run_benchmark("realistic.py", "--shots", "4", "--pools", "caltech101", "--settings", "whole",
                        "--tasks", "1", "--methods", "zeroshot")
    assert float(re.search(r"^\| zeroshot \| ([\d.]+) \|", out, re.M).group(1)) == pytest.approx(expected[4], abs=0.005)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real_pools_4shot.md", "realistic_4shot.md"]
