"""benchmarks/bench_label.py still runs on a tiny collection, writes its page, and the model sizes it
reports agree with what each model must store (the speed figures themselves live in the README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_bench_label_tiny_collection(tmp_path):
    env = dict(os.environ, ZSADAPT_RESULTS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("ZSADAPT_DATA", None)  # the synthetic Cars-shaped pool: no data needed, and quicker
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_label.py", "--rows", "3001", "--shards", "3", "--batch-size", "1000",
         "--engines", "local", "--methods", "zeroshot", "--size-methods", "zeroshot,zlap", "--threads", "1",
         "--tmp", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    page = (tmp_path / "bench_label.md").read_text()
    assert "python benchmarks/bench_label.py --rows 3001" in page
    row = re.search(r"^\| zeroshot \| local \| .*$", page, flags=re.M).group(0).split(" | ")
    assert float(row[3].replace(",", "")) > 0, row  # rows/s
    sizes = {m: int(b.replace(",", "")) for m, b in re.findall(r"^\| (\w+) \| [\d,]+ \| [\d,]+ \| ([\d,-]+) \|",
                                                                page, flags=re.M)}
    # zeroshot stores only its (C, d) classifier: nothing per pool image; ZLaP's dual solution
    # stores at least the pool's features (d = 512 values of 2 bytes or more per image).
    assert sizes["zeroshot"] == 0 and sizes["zlap"] >= 2 * 512, sizes
    assert not [p for p in tmp_path.glob("bench_label.*") if p.is_dir()], "the temporary shards were not removed"
