"""The registry's view of the CUDA kernels (fastconv.registry: an algorithm's kernels for
"cuda" tensors): the same calls as the CPU's backend.CppKernels, on CUDA tensors.

The kernels read NCHW; a channels_last operand is made NCHW first, and a channels_last
output is written through an NCHW buffer (the benchmarks and targets are NCHW). Importing
this module imports no numba: ``missing()`` says why the kernels cannot run, and the
registry reports it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backend import ACT_NONE, Pass
from . import launch   # numba-free: it imports numba-cuda at the first launch

_FLOATS = (torch.float32, torch.float64)


class CudaKernels:
    """``depthwise`` (the depthwise kernels; the registry's check admits only depthwise
    problems) or ``implicit_gemm`` (any convolution)."""

    def __init__(self, name: str):
        self.name = name

    def missing(self) -> Optional[str]:
        from . import _runtime
        if _runtime.simulated():
            return ("numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM): it runs fastconv.cuda "
                    "on CPU tensors, not CUDA ones")
        return _runtime.import_error()

    def has(self, pass_: Pass, dtype: torch.dtype) -> bool:
        return dtype in _FLOATS and self.missing() is None

    def workspace_bytes(self, problem, pass_: Pass, dtype: torch.dtype) -> int:
        if pass_ == Pass.FORWARD:   # the training forward's partial statistics, at most
            from .geometry import GEMM_TILE
            slots = -(-problem.N * problem.OH * problem.OW // GEMM_TILE.BN)
            return 3 * slots * problem.K * torch.finfo(dtype).bits // 8
        return 0

    def forward(self, problem, x, x_layout, w, b, y, y_layout, packed=None,
                activation: int = ACT_NONE, stats=None) -> None:
        if packed is not None:
            raise ValueError("fastconv: the CUDA kernels take no prepacked weights")
        if stats is not None:
            raise ValueError("fastconv: the CUDA kernels gather batch statistics through "
                             "fastconv.cuda.conv_bn_relu_train_forward, not a stats buffer")
        out = y if y.is_contiguous() else torch.empty(y.shape, dtype=y.dtype, device=y.device)
        launch.forward(problem, x.contiguous(), w.contiguous(), b, out, activation,
                       algorithm=self.name)
        if out is not y:
            y.copy_(out)

    def conv_bn_train(self, problem, x, w, b, gamma, beta, eps: float, activation: int):
        """Training Conv -> BN (batch statistics) -> activation: (y, z, mean, invstd), the
        statistics reduced in the convolution's epilogue (fastconv.ops.conv2d_bn)."""
        return launch.conv_bn_train(problem, x, w, b, gamma, beta, eps, activation, self.name)

    def grad_input(self, problem, gy, gy_layout, w, gx, gx_layout) -> None:
        out = gx if gx.is_contiguous() else torch.empty(gx.shape, dtype=gx.dtype, device=gx.device)
        launch.grad_input(problem, gy.contiguous(), w.contiguous(), out, algorithm=self.name)
        if out is not gx:
            gx.copy_(out)

    def grad_weight(self, problem, gy, gy_layout, x, x_layout, gw, gb=None) -> None:
        gy = gy.contiguous()
        launch.grad_weight(problem, gy, x.contiguous(), gw, algorithm=self.name)
        if gb is not None:
            torch.sum(gy, dim=(0, 2, 3), out=gb)
