"""Every CUDA kernel with the argument types of its launches, for ahead-of-time compilation
checks (tests/cuda/test_ptx.py compiles each to PTX and through ptxas) and for listing."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

from .geometry import ConvGeometry, DepthwiseGradRows, DepthwiseRows, DepthwiseTile

#: The generated depthwise forwards checked ahead of time: MobileNetV2's and EfficientNet-B0's
#: filters at 4 rows per thread, and the 2- and 1-row shapes of longer reaches.
ROWS_SPECS = (DepthwiseRows(3, 3, 1, 1, 1, 1, 4), DepthwiseRows(3, 3, 2, 2, 1, 1, 4),
              DepthwiseRows(5, 5, 1, 1, 1, 1, 4), DepthwiseRows(5, 5, 2, 2, 1, 1, 4),
              DepthwiseRows(5, 5, 3, 3, 1, 1, 2), DepthwiseRows(3, 3, 1, 1, 2, 2, 1),
              DepthwiseRows(3, 3, 1, 1, 1, 1, 4, turned=True))   # a stride-1 grad-input
#: The generated depthwise grad-inputs checked ahead of time: 3x3 at stride 2 (MobileNetV2's
#: and EfficientNet-B0's), at stride 3, and at stride 1 with a multiplier.
GRAD_ROWS_SPECS = (DepthwiseGradRows(3, 3, 2, 2, 1, 1, 1, 1, 4),
                   DepthwiseGradRows(3, 3, 3, 3, 1, 1, 0, 0, 3),
                   DepthwiseGradRows(3, 3, 1, 1, 1, 1, 0, 0, 2))


class KernelSignature(NamedTuple):
    name: str        # e.g. "f32_depthwise_forward"
    kernel: object   # the numba dispatcher
    signature: tuple  # numba types of its arguments
    max_registers: Optional[int]  # the float32 kernel's register budget, if any


def kernels(dtype: str = "float32") -> Iterator[KernelSignature]:
    import numba
    import numpy as np
    from numba import types

    from . import batchnorm, depthwise, gemm

    f = numba.from_dtype(np.dtype(dtype))
    a1, a2, a3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    a4 = types.Array(f, 4, "C")
    geometry = numba.typeof(ConvGeometry(*map(np.int32, range(19))))
    tile = numba.typeof(DepthwiseTile(*map(np.int32, range(8))))
    i64, b = types.int64, types.boolean
    prefix = "f32" if dtype == "float32" else "f64"

    dw = depthwise.kernels(dtype)
    budget = depthwise.MAX_REGISTERS
    yield KernelSignature(f"{prefix}_depthwise_forward", dw.forward,
                          (a4, a4, a1, a4, a3, geometry, tile, b, b), budget)
    yield KernelSignature(f"{prefix}_depthwise_grad_input", dw.grad_input,
                          (a4, a4, a4, geometry), budget)
    yield KernelSignature(f"{prefix}_depthwise_grad_input_dilated", dw.grad_input_dilated,
                          (a4, a4, a4, geometry), budget)
    for spec in ROWS_SPECS:
        name = (f"{prefix}_depthwise_forward_{spec.R}x{spec.S}s{spec.sh}d{spec.dh}"
                f"__rows{spec.rows}{'_turned' if spec.turned else ''}")
        yield KernelSignature(name, depthwise.forward_rows(dtype, spec),
                              (a1, a1, a1, a1, geometry, b), budget)
        if spec.R * spec.S <= depthwise.REGISTER_WEIGHTS and not spec.turned:
            yield KernelSignature(name.replace("forward", "grad_weight"),
                                  depthwise.grad_weight_rows(dtype, spec),
                                  (a1, a1, a1, geometry, i64), budget)
    for spec in GRAD_ROWS_SPECS:
        yield KernelSignature(f"{prefix}_depthwise_grad_input_{spec.R}x{spec.S}s{spec.sh}"
                              f"p{spec.ph}__rows{spec.rows}",
                              depthwise.grad_input_rows(dtype, spec), (a1, a1, a1, geometry),
                              budget)
    yield KernelSignature(f"{prefix}_depthwise_grad_weight", dw.grad_weight,
                          (a4, a4, a4, geometry, i64, i64), budget)
    taps = types.Array(types.int32, 2, "C")
    for kind, what in ((gemm.FORWARD, "forward"), (gemm.GRAD_INPUT, "grad_input"),
                       (gemm.GRAD_WEIGHT, "grad_weight")):
        # the forward reads w as K x (Cg R S), the grad-input as K x Cg x (R S)
        a_src = {gemm.FORWARD: a2, gemm.GRAD_INPUT: a3}.get(kind, a4)
        yield KernelSignature(f"{prefix}_implicit_gemm_{what}", gemm.kernel(dtype, kind),
                              (a_src, a4, a4, a1, a3, taps, geometry, i64, i64, i64, i64, b, b),
                              None)
    bn = batchnorm.kernels(dtype)
    yield KernelSignature(f"{prefix}_bn_channel_stats", bn.channel_stats, (a4, a3, i64), None)
    yield KernelSignature(f"{prefix}_bn_finalize", bn.finalize, (a3, i64, f, a1, a1), None)
    yield KernelSignature(f"{prefix}_bn_normalize", bn.normalize,
                          (a4, a1, a1, a1, a1, a4, b, b, i64), None)
    yield KernelSignature(f"{prefix}_bn_grad_sums", bn.grad_sums,
                          (a4, a4, a4, a1, a1, i64, a2, i64), None)
    yield KernelSignature(f"{prefix}_bn_grad_z", bn.grad_z,
                          (a4, a4, a4, a1, a1, a1, b, i64, a2, f, a4), None)
