"""Shared fixtures: small synthetic pools, and the real CLIP features when ZSADAPT_DATA is set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import zsadapt


@pytest.fixture(autouse=True)
def _quiet_notes():
    """Tests assert on stderr only where they mean to; silence notes elsewhere."""
    zsadapt.set_quiet(True)
    yield
    zsadapt.set_quiet(False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module on one torch thread (restored afterwards): for small full-batch loops, torch's
    thread pool costs more than it saves on a shared 2-core CI machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_pool():
    """A 400-image, 8-class synthetic pool in 32-d with labels (zero-shot clearly imperfect)."""
    return zsadapt.make_pool(n_images=400, n_classes=8, dim=32, seed=3)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real CLIP ViT-B/32 features (``../shared/data``), from ``ZSADAPT_DATA``."""
    root = os.environ.get("ZSADAPT_DATA")
    if not root:
        pytest.skip("ZSADAPT_DATA is not set: the real-data tests need ../shared/data (see README)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"ZSADAPT_DATA={root} is not a folder")
    return path


@pytest.fixture(scope="session")
def cars_pool(shared_data):
    """Stanford Cars validation pool: 1635 images, 196 classes, real ViT-B/32 text embeddings."""
    folder = shared_data / "stanford_cars_val"
    return zsadapt.Pool(
        np.load(folder / "image_features.npy", allow_pickle=False).astype(np.float32),
        np.load(folder / "text_features.npy", allow_pickle=False).astype(np.float32),
        np.load(folder / "labels.npy", allow_pickle=False),
        source=str(folder),
    ).validated()
