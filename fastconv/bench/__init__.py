"""Benchmark helpers and the fastconv-bench CLI (python -m fastconv.bench)."""
from .timing import PEAK_GFLOPS_PER_CORE, Timing, geomean, measure, peak_gflops, progress

__all__ = ["PEAK_GFLOPS_PER_CORE", "Timing", "geomean", "measure", "peak_gflops", "progress"]
