"""A pool whose (N, C) result cannot fit in memory is refused up front with one line (the OS
would otherwise kill the process minutes later, silently); an allocation that fails anyway is a
one-line CLI error, not a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import zsadapt
from zsadapt import memory
from zsadapt.cli.main import main


@pytest.fixture
def pool():
    return zsadapt.make_pool(n_images=60, n_classes=5, dim=8, seed=0)


def test_free_memory_is_read_on_this_machine():
    free = memory.available_bytes(torch.device("cpu"))
    if free is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < free < 1 << 50


def test_a_result_that_cannot_fit_is_refused_with_its_size(pool, monkeypatch):
    # 60 x 5 pairs of float32 scores and probabilities: 2,400 bytes; say only 2,000 are free.
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2000)
    with pytest.raises(ValueError, match=r"60 images x 5 classes: .* need 0\.0 GB .* zsadapt label"):
        zsadapt.refine(pool.image_features, pool.text_features)
    with pytest.raises(ValueError, match="60 images x 5 classes"):
        zsadapt.Auto(text_features=pool.text_features).fit(pool.image_features)


def test_a_result_that_fits_runs(pool, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2400)  # exactly the floor
    assert zsadapt.refine(pool.image_features, pool.text_features).labels.shape == (60,)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: never refused
    assert zsadapt.refine(pool.image_features, pool.text_features).labels.shape == (60,)


def test_the_cgroup_limit_caps_the_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 1000)
    free = memory._host_available()
    if free is None:
        pytest.skip("no /proc/meminfo here")
    swap = int(next(line for line in open("/proc/meminfo") if line.startswith("SwapFree")).split()[1]) * 1024
    assert free == 1000 + swap  # the cgroup's room, plus free swap


def _cli(tmp_path, pool):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features)
    return CliRunner().invoke(main, ["refine", str(path), "--out", str(tmp_path / "out.npz")])


def test_cli_refuses_a_result_that_cannot_fit(tmp_path, pool, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2000)
    result = _cli(tmp_path, pool)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "need 0.0 GB" in errors[0]
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("failure", [
    MemoryError("Unable to allocate 44.7 GiB for an array with shape (12000000000,) and data type float32"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 48000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_cli_reports_a_failed_allocation_in_one_line(tmp_path, pool, monkeypatch, failure):
    from zsadapt import api

    def out_of_memory(*args, **kwargs):
        raise failure

    monkeypatch.setattr(api, "refine", out_of_memory)  # the command imports it when it runs
    result = _cli(tmp_path, pool)
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: out of memory (")
    assert "enforce fail" not in errors[0] and "zsadapt label" in errors[0]


def test_other_runtime_errors_still_raise(tmp_path, pool, monkeypatch):
    from zsadapt import api

    def bug(*args, **kwargs):
        raise RuntimeError("a bug, not the user's input")

    monkeypatch.setattr(api, "refine", bug)
    result = _cli(tmp_path, pool)
    assert isinstance(result.exception, RuntimeError)


def test_compare_holds_one_result_at_a_time(pool, monkeypatch):
    import gc
    import weakref

    from zsadapt import evaluate

    alive = []
    real_refine = evaluate.refine

    def tracked(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in alive), "an earlier method's result is still held"
        result = real_refine(*args, **kwargs)
        alive.append(weakref.ref(result))
        return result

    monkeypatch.setattr(evaluate, "refine", tracked)
    rows = evaluate.compare(pool, ["zeroshot", "gmm", "stata"])
    assert [row["method"] for row in rows] == ["zeroshot", "gmm", "stata"] and len(alive) == 3
    direct = [real_refine(pool.image_features, pool.text_features, m) for m in ("zeroshot", "gmm", "stata")]
    expected = evaluate.rows_from_results(direct, pool)
    assert [(r["accuracy"], r["delta"], r["ece"]) for r in rows] == [(r["accuracy"], r["delta"], r["ece"]) for r in expected]


def test_cli_stream_refuses_probabilities_that_cannot_fit_before_it_runs(tmp_path, pool, monkeypatch):
    # --out keeps 60 x 5 float32 probabilities (1,200 bytes); say 1,000 are free. Without --out
    # nothing (N, C) is kept, so the same stream runs.
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features, labels=pool.labels)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    refined = []
    monkeypatch.setattr(zsadapt.Stream, "refine", lambda self, batch: refined.append(batch))
    result = CliRunner().invoke(main, ["stream", str(path), "--batch-size", "20", "--out", str(tmp_path / "o.npz")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "60 images x 5 classes" in errors[0] and "--resume" in errors[0]
    assert refined == [] and not (tmp_path / "o.npz").exists()


def test_cli_stream_without_out_keeps_no_probabilities(tmp_path, pool, monkeypatch):
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features, labels=pool.labels)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1000)
    result = CliRunner().invoke(main, ["stream", str(path), "--batch-size", "20", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    text = pool.text_features / np.linalg.norm(pool.text_features, axis=1, keepdims=True)
    zeroshot = (pool.image_features @ text.T).argmax(axis=1)  # cosine argmax: the image norms do not matter
    assert summary["batches"] == 3
    assert summary["zeroshot_accuracy"] == pytest.approx(100 * float(np.mean(zeroshot == pool.labels)))
