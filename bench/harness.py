"""Timing for fms-dyt's benchmarks: interleaved repeats, medians, and the machine they ran on.

These machines are shared and noisy, so every comparison runs its candidates in the same process,
alternating A, B, B, A, ... after warm-up, and reports the ratio of their median times.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each case, ``repeats`` times, alternating the order every round."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    order = list(cases)
    for r in range(repeats):
        for name in order if r % 2 == 0 else reversed(order):
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """median(a) / median(b)."""
    return median(times[a]) / median(times[b])


def medians_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: round(median(v) * 1e3, 3) for name, v in times.items()}


def machine() -> dict:
    """Where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": [round(v, 2) for v in load] if load else None,
    }
