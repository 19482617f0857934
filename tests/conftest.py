"""Shared fixtures: small synthetic pools, and the real CLIP features when ZSADAPT_DATA is set."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

import zsadapt


@pytest.fixture(autouse=True)
def _quiet_notes():
    """Tests assert on stderr only where they mean to; silence notes elsewhere."""
    zsadapt.set_quiet(True)
    zsadapt.messages._shown_once.clear()  # a note_once of an earlier test does not hide this test's
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


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (``ray.init(num_cpus=2)``; starting one costs
    10-30 s), shut down at the end. Skips when the ``ray`` extra is not installed."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'zsadapt[ray]'")
    pytest.importorskip("ray.data", reason="ray[data] is not installed: pip install 'zsadapt[ray]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _java_problem() -> Optional[str]:
    """Why Spark cannot start here (no ``java`` on PATH, or one that does not run), else None."""
    import shutil
    import subprocess

    java = shutil.which("java", path=os.environ.get("JAVA_HOME", "") + "/bin:" + os.environ.get("PATH", ""))
    if java is None:
        return ("no Java on this machine: Spark needs one (Debian/Ubuntu: apt-get install "
                "openjdk-17-jre-headless; see README, Label a collection)")
    try:
        subprocess.run([java, "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{java} -version fails ({err}): Spark needs a working Java 17"
    return None


@pytest.fixture(scope="session")
def spark_local():
    """One ``local[2]`` SparkSession for the whole test session, whose Python workers run this
    interpreter; skipped with the reason when Java or pyspark is missing."""
    sql = pytest.importorskip("pyspark.sql", reason="the spark extra is not installed: pip install 'zsadapt[spark]'")
    problem = _java_problem()
    if problem:
        pytest.skip(problem)
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (sql.SparkSession.builder.master("local[2]").appName("zsadapt tests")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    yield spark
    spark.stop()
    if previous is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = previous
