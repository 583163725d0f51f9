"""fastconv's packed GEMM against numpy (OpenBLAS) and torch.mm, float32, same process.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/report_gemm.py

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, set on these machines, make numpy's OpenBLAS use its
AVX2 kernels; unset them so that the baseline is OpenBLAS at its best.) Square sizes, then the
GEMM shapes of ResNet-50 layers (M x N x K as the convolution drivers call it).
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from fastconv import ops
from fastconv.bench import measure, peak_gflops

SHAPES = [(2048, 2048, 2048), (4096, 4096, 4096),
          (64, 3136, 576), (128, 784, 1152), (256, 196, 2304), (512, 49, 4608),
          (3136, 64, 576), (64, 3136, 256), (2048, 49, 512)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    try:
        from threadpoolctl import threadpool_info
        blas = [f"{i['internal_api']} {i.get('architecture', '')}" for i in threadpool_info()
                if i["user_api"] == "blas"]
    except ImportError:
        blas = ["(threadpoolctl not installed)"]
    print(f"threads={torch.get_num_threads()} peak={peak_gflops():.0f} GFLOP/s; numpy BLAS: "
          f"{', '.join(blas)}")
    print(f"{'M x N x K':>20s} {'numpy':>7s} {'torch.mm':>8s} {'fastconv':>8s} "
          f"{'vs numpy':>8s}   (GFLOP/s, medians)")
    for M, N, K in SHAPES:
        a, b = torch.randn(M, K), torch.randn(K, N)
        c = torch.empty(M, N)
        an, bn = a.numpy(), b.numpy()
        flops = 2 * M * N * K
        t = {"numpy": [], "torch": [], "fastconv": []}
        for _ in range(args.rounds):
            t["numpy"].append(measure(lambda: np.matmul(an, bn), min_time=0.3).median)
            t["torch"].append(measure(lambda: torch.mm(a, b), min_time=0.3).median)
            t["fastconv"].append(measure(lambda: ops.gemm(a, b, c), min_time=0.3).median)
        g = {k: flops / statistics.median(v) / 1e9 for k, v in t.items()}
        ratio = statistics.median(n / f for n, f in zip(t["numpy"], t["fastconv"]))
        print(f"{f'{M} x {N} x {K}':>20s} {g['numpy']:7.0f} {g['torch']:8.0f} "
              f"{g['fastconv']:8.0f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
