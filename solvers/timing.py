"""Wall-clock timing of solver stages (synchronising CUDA so GPU work is counted where it runs)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StageTimer:
    """Collects seconds per named stage: ``with timer("knn"): ...``; ``timer.seconds`` is a dict."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
