"""Benchmark helpers shared by benchmarks/ and (later) the benchmark CLI."""
from .timing import PEAK_GFLOPS_PER_CORE, Timing, geomean, measure, peak_gflops

__all__ = ["PEAK_GFLOPS_PER_CORE", "Timing", "geomean", "measure", "peak_gflops"]
