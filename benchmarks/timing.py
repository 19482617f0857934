"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised so it is counted
where it runs). The scripts run as ``python benchmarks/<name>.py``, which puts this folder first
on ``sys.path``."""

from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(fn(), seconds)``."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start
