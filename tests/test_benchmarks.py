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
