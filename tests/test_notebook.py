"""notebooks/analysis.ipynb executes headless (nbclient), on the built-in pool and on a pool file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import zsadapt

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs zsadapt[notebook] (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs zsadapt[notebook] (nbclient)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analysis.ipynb"


def execute(monkeypatch, pool_path=None):
    """Run the notebook in a fresh kernel; returns the text it printed."""
    if pool_path is None:
        monkeypatch.delenv("ZSADAPT_POOL", raising=False)
    else:
        monkeypatch.setenv("ZSADAPT_POOL", str(pool_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_notebook_runs_every_method_on_the_default_pool(monkeypatch):
    printed = execute(monkeypatch)
    assert "synthetic(n_images=3000" in printed
    assert f"methods: {', '.join(zsadapt.methods())}" in printed
    table = printed[printed.index("accuracy %"):]
    for method in zsadapt.methods():
        assert f"\n{method} " in table
    pool = zsadapt.make_pool()
    zlap = zsadapt.refine(pool.image_features, pool.text_features, "zlap")
    assert f"{zsadapt.accuracy(zlap.labels, pool.labels):.2f}" in table  # the table's numbers are real


def test_notebook_reads_a_pool_file_without_labels(monkeypatch, tmp_path):
    pool = zsadapt.make_pool(n_images=300, n_classes=6, dim=16, seed=1)
    path = tmp_path / "pool.npz"
    np.savez(path, image_features=pool.image_features, text_features=pool.text_features)
    printed = execute(monkeypatch, path)
    assert f"{path}: 300 images, 6 classes, labels: False" in printed
    assert "needs ground-truth labels" in printed


def test_committed_notebook_is_small_and_executed():
    assert NOTEBOOK.stat().st_size < 400_000, "strip or shrink the notebook's outputs before committing"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    assert not any(out.output_type == "error" for cell in code for out in cell.outputs)
