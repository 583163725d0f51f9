"""Wall-clock timing with warm-up and medians, and the machine peak used for "% of peak"."""
from __future__ import annotations

import math
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

#: Measured FMA throughput of one Zen 5 core here, 12 independent zmm chains
#: (../shared/notes/kernel-design.md §0): 266-272 GFLOP/s.
PEAK_GFLOPS_PER_CORE = 270.0


def peak_gflops(threads: int | None = None) -> float:
    return PEAK_GFLOPS_PER_CORE * (threads or torch.get_num_threads())


@dataclass
class Timing:
    median: float      # seconds per call
    q1: float
    q3: float
    calls: int
    samples: tuple = ()  # seconds per call of each sample

    def gflops(self, flops: float) -> float:
        return flops / self.median / 1e9


def measure(fn: Callable[[], object], *, min_time: float = 0.3, min_reps: int = 5,
            max_reps: int = 200, warmup: int = 2, inner: int = 1) -> Timing:
    """Median of at least ``min_reps`` samples and ``min_time`` seconds; each sample times
    ``inner`` back-to-back calls (use inner > 1 for microsecond-scale calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or
                                       time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q[0], q[2], len(samples) * inner, tuple(samples))


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def progress(i: int, n: int, text: str) -> None:
    """A report script's progress on stderr: step i of n (i == n ends the line)."""
    bar = "#" * (20 * i // max(n, 1))
    print(f"\r[{bar:20s}] {i}/{n} {text[:50]:50s}", end="" if i < n else "\n", file=sys.stderr,
          flush=True)
