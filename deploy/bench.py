"""Latency and throughput of a Runner (wall clock, after warm-up)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Timing:
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(runner, batch: int = 1, repeats: int = 50, warmup: int = 5, seed: int = 0) -> Timing:
    """Time `repeats` calls of runner on a batch×C×H×W uniform batch; percentiles of per-call wall time."""
    x = np.random.default_rng(seed).random((batch, *runner.input_shape), dtype=np.float32)
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return Timing(batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                  float(batch / np.median(times)))
