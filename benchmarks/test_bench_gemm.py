"""pytest-benchmark: fastconv's packed GEMM vs numpy (OpenBLAS) and torch.mm, float32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python -m pytest benchmarks/test_bench_gemm.py --benchmark-group-by=group
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastconv import ops

SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096), (64, 3136, 576), (256, 196, 2304)]


@pytest.mark.parametrize("impl", ["numpy", "torch", "fastconv"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sgemm(benchmark, shape, impl):
    M, N, K = shape
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.empty(M, N)
    an, bn = a.numpy(), b.numpy()
    fn = {"numpy": lambda: np.matmul(an, bn), "torch": lambda: torch.mm(a, b),
          "fastconv": lambda: ops.gemm(a, b, c)}[impl]
    benchmark.group = f"sgemm {M}x{N}x{K}"
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gflops"] = 2 * M * N * K / benchmark.stats.stats.median / 1e9
