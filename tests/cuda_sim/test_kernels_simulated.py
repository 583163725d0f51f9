"""Every CUDA kernel and pass against the float64 reference, under numba's simulator (each
simulated thread is a Python thread: shapes stay small, blocks keep their 128 threads).

Cases cover odd sizes, partial tiles, every stride phase, dilation, asymmetric padding,
channel multipliers, groups, the small-map packing of several planes per block, and
training statistics over several steps."""
from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import fastconv.cuda as fc
from fastconv import reference
from fastconv.problem import conv2d_problem

from conftest import assert_close, tolerances

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0"):
    raise RuntimeError("tests/cuda_sim runs under numba's simulator, in a process of its own "
                       "(the variable must be set before numba is imported): "
                       "NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim")


class Case(NamedTuple):
    name: str
    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    S: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)   # top, bottom, left, right
    dilation: tuple = (1, 1)
    groups: int = 1

    def tensors(self, dtype=torch.float32, offset: float = 0.0):
        g = torch.Generator().manual_seed(hash(self.name) % 2 ** 31)
        x = torch.randn(self.N, self.C, self.H, self.W, generator=g, dtype=dtype) + offset
        w = torch.randn(self.K, self.C // self.groups, self.R, self.S, generator=g,
                        dtype=dtype)
        b = torch.randn(self.K, generator=g, dtype=dtype)
        return x, w, b

    @property
    def args(self):
        return self.stride, self.padding, self.dilation

    @property
    def problem(self):
        return conv2d_problem((self.N, self.C, self.H, self.W),
                              (self.K, self.C // self.groups, self.R, self.S), self.stride,
                              self.padding, self.dilation, self.groups)


DEPTHWISE = [
    Case("3x3 odd map", 2, 3, 3, 9, 11, 3, 3, padding=(1, 1, 1, 1)),
    Case("3x3 stride 2", 1, 4, 4, 10, 9, 3, 3, (2, 2), (1, 1, 1, 1)),
    Case("5x5 stride 2 multiplier 2", 1, 2, 4, 11, 12, 5, 5, (2, 2), (2, 2, 2, 2)),
    Case("3x3 dilation 2", 1, 2, 2, 9, 10, 3, 3, padding=(2, 2, 2, 2), dilation=(2, 2)),
    Case("stride 3x1 asymmetric padding", 1, 3, 3, 8, 7, 3, 2, (3, 1), (0, 2, 1, 0)),
    Case("7x7 map, planes packed", 2, 6, 6, 7, 7, 3, 3, padding=(1, 1, 1, 1)),
    Case("wide row, two tiles", 1, 1, 1, 3, 37, 3, 3, padding=(1, 1, 1, 1)),
    Case("tall, rows per thread", 1, 1, 2, 40, 8, 3, 3, padding=(1, 1, 1, 1)),
    Case("stride 5, halo row past THREADS", 1, 1, 1, 6, 100, 3, 3, (5, 5), (1, 1, 1, 1)),
    Case("5x5 stride 3, 2 rows per thread", 1, 2, 2, 13, 12, 5, 5, (3, 3), (2, 2, 2, 2)),
    Case("7x7 filter, tiled forward", 1, 2, 2, 9, 10, 7, 7, padding=(3, 3, 3, 3)),
    Case("7x7 dilated stride 2, gathered grad-input", 1, 2, 2, 16, 15, 7, 7, (2, 2),
         (3, 3, 3, 3), (2, 2)),
    Case("padding past the filter's reach", 1, 2, 2, 6, 7, 3, 3, padding=(3, 2, 0, 4)),
]
DEPTHWISE = [c._replace(groups=c.C) for c in DEPTHWISE]

DENSE = [
    Case("3x3 groups 1", 2, 3, 5, 7, 6, 3, 3, padding=(1, 1, 1, 1)),
    Case("3x3 stride 2 groups 2", 1, 4, 6, 9, 8, 3, 3, (2, 2), (1, 1, 1, 1), groups=2),
    Case("1x1 stride 2", 2, 5, 3, 6, 7, 1, 1, (2, 2)),
    Case("dilated, asymmetric", 1, 3, 4, 9, 8, 3, 2, (1, 2), (2, 0, 1, 1), (2, 1)),
    Case("partial tiles: 66 channels, 72 pixels", 2, 2, 66, 6, 6, 1, 1),
    Case("reduction over 3 stages", 1, 3, 2, 5, 5, 3, 3, padding=(1, 1, 1, 1)),
]

ACTS = {"none": lambda y: y, "relu": F.relu, "relu6": F.relu6}


def _tol(dtype, reduction, magnitude=1.0):
    t = tolerances(dtype, reduction, magnitude * 4)
    return dict(atol=t["atol"] * 4, rtol=t["rtol"] * 4)


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: c.name)
@pytest.mark.parametrize("activation", ["none", "relu6"])
def test_depthwise_forward(case, activation):
    x, w, b = case.tensors()
    y = fc.depthwise_conv2d_forward(x, w, b, case.stride, case.padding, case.dilation,
                                    activation)
    expected = ACTS[activation](reference.conv2d(x, w, b, *case.args, case.groups))
    assert_close(y, expected, **_tol(torch.float32, case.R * case.S), what=case.name)


def test_depthwise_forward_float64():
    case = DEPTHWISE[2]
    x, w, b = case.tensors(torch.float64)
    y = fc.depthwise_conv2d_forward(x, w, b, case.stride, case.padding, case.dilation)
    assert y.dtype == torch.float64
    assert_close(y, reference.conv2d(x, w, b, *case.args, case.groups),
                 **_tol(torch.float64, case.R * case.S), what=case.name)


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: c.name)
def test_depthwise_grad_input(case):
    x, w, _ = case.tensors()
    gy = torch.randn(case.problem.output_shape)
    gx = fc.depthwise_conv2d_grad_input(gy, w, x.shape, *case.args)
    expected = reference.conv2d_grad_input(gy, w, x.shape, *case.args, case.groups)
    assert_close(gx, expected, **_tol(torch.float32, case.R * case.S * case.K // case.C),
                 what=case.name)


@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: c.name)
def test_depthwise_grad_weight(case):
    x, w, _ = case.tensors()
    gy = torch.randn(case.problem.output_shape)
    gw = fc.depthwise_conv2d_grad_weight(gy, x, w.shape, *case.args)
    expected = reference.conv2d_grad_weight(gy, x, w.shape, *case.args, case.groups)
    pixels = case.N * case.problem.OH * case.problem.OW
    assert_close(gw, expected, **_tol(torch.float32, pixels, pixels ** 0.5), what=case.name)


@pytest.mark.parametrize("case", DENSE, ids=lambda c: c.name)
def test_implicit_gemm_passes(case):
    """Forward (bias + activation), grad-input and grad-weight of the implicit GEMM."""
    from fastconv.cuda import launch
    x, w, b = case.tensors()
    p = case.problem
    y = torch.empty(p.output_shape)
    launch.forward(p, x, w, b, y, 1, algorithm="implicit_gemm")
    depth = p.Cg * p.R * p.S
    assert_close(y, F.relu(reference.conv2d(x, w, b, *case.args, case.groups)),
                 **_tol(torch.float32, depth, depth ** 0.5), what=f"{case.name} forward")
    gy = torch.randn(p.output_shape)
    gx = torch.empty(p.input_shape)
    launch.grad_input(p, gy, w, gx, algorithm="implicit_gemm")
    depth = p.K // p.groups * p.R * p.S
    assert_close(gx, reference.conv2d_grad_input(gy, w, x.shape, *case.args, case.groups),
                 **_tol(torch.float32, depth, depth ** 0.5), what=f"{case.name} grad-input")
    gw = torch.empty(p.weight_shape)
    launch.grad_weight(p, gy, x, gw, algorithm="implicit_gemm")
    pixels = p.N * p.OH * p.OW
    assert_close(gw, reference.conv2d_grad_weight(gy, x, w.shape, *case.args, case.groups),
                 **_tol(torch.float32, pixels, pixels ** 0.5), what=f"{case.name} grad-weight")


def test_grad_weight_split_across_blocks():
    """Enough pixels that the implicit GEMM's grad-weight splits its reduction over blocks
    whose partial sums meet atomically (and the depthwise one over pixel slices)."""
    from fastconv.cuda import launch
    case = Case("split", 2, 2, 2, 16, 16, 1, 1)
    x, w, _ = case.tensors()
    gy = torch.randn(case.problem.output_shape)
    gw = torch.empty(w.shape)
    launch.grad_weight(case.problem, gy, x, gw, algorithm="implicit_gemm")
    assert_close(gw, reference.conv2d_grad_weight(gy, x, w.shape, *case.args, 1),
                 **_tol(torch.float32, 512, 23), what="implicit GEMM grad-weight, split")
    dw = Case("split dw", 1, 2, 2, 48, 48, 3, 3, padding=(1, 1, 1, 1), groups=2)
    x, w, _ = dw.tensors()
    gy = torch.randn(dw.problem.output_shape)
    gw = fc.depthwise_conv2d_grad_weight(gy, x, w.shape, *dw.args)
    assert_close(gw, reference.conv2d_grad_weight(gy, x, w.shape, *dw.args, 2),
                 **_tol(torch.float32, 2304, 48), what="depthwise grad-weight, split")


# a generated depthwise forward (statistics in a pass of their own), the tiled one (in its
# epilogue: filters over 25 taps), an implicit GEMM
BN_CASES = [DEPTHWISE[1], next(c for c in DEPTHWISE if c.R == 7), DENSE[1]]


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("activation", ["relu", "relu6", "none"])
def test_conv_bn_eval(case, activation):
    x, w, b = case.tensors()
    K = case.K
    gamma, beta = torch.randn(K), torch.randn(K)
    mean, var = torch.randn(K), torch.rand(K) + 0.5
    y = fc.conv_bn_relu_forward(x, w, b, mean, var, gamma, beta, 1e-3, case.stride,
                                case.padding, case.dilation, case.groups, activation)
    z = reference.conv2d(x, w, b, *case.args, case.groups)
    expected = ACTS[activation](F.batch_norm(z, mean.double(), var.double(), gamma.double(),
                                             beta.double(), False, 0.1, 1e-3))
    depth = case.C // case.groups * case.R * case.S
    assert_close(y, expected, **_tol(torch.float32, depth, 4 * depth ** 0.5), what=case.name)


@pytest.mark.parametrize("case", BN_CASES, ids=lambda c: c.name)
def test_conv_bn_train_steps_and_backward(case):
    """Three training steps against torch (float64): outputs, running statistics (momentum,
    unbiased variance), then every gradient. Inputs sit at +50, where sums of z and z^2 in
    float32 would lose the variance; the (count, mean, M2) merges keep it."""
    K = case.K
    rm, rv = torch.zeros(K), torch.ones(K)
    rm64, rv64 = rm.double(), rv.double()
    gamma, beta = torch.randn(K), torch.randn(K)
    for step in range(3):
        x, w, b = case.tensors(offset=50.0 + step)
        y, z, mean, invstd = fc.conv_bn_relu_train_forward(
            x, w, b, gamma, beta, 1e-5, case.stride, case.padding, case.dilation, case.groups,
            "relu6", rm, rv, 0.1)
        xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
        gr, ber = gamma.double().requires_grad_(), beta.double().requires_grad_()
        zr = reference.conv2d(xr, wr, br, *case.args, case.groups)
        yr = F.relu6(F.batch_norm(zr, rm64, rv64, gr, ber, True, 0.1, 1e-5))
        depth = case.C // case.groups * case.R * case.S
        tol = _tol(torch.float32, depth, 60 * depth ** 0.5)
        assert_close(z, zr, **tol, what=f"step {step} z")
        assert_close(y, yr, atol=2e-4, rtol=1e-4, what=f"step {step} y")
        assert_close(rm, rm64, atol=1e-4, rtol=1e-5, what=f"step {step} running_mean")
        assert_close(rv, rv64, atol=1e-4, rtol=1e-4, what=f"step {step} running_var")
    gy = torch.randn(y.shape)
    yr.backward(gy.double())
    gx, gw, gb, gg, gbe = fc.conv_bn_relu_backward(gy, x, w, y, z, mean, invstd, gamma,
                                                   case.stride, case.padding, case.dilation,
                                                   case.groups, "relu6")
    for name, got, want in (("x", gx, xr.grad), ("w", gw, wr.grad), ("b", gb, br.grad),
                            ("gamma", gg, gr.grad), ("beta", gbe, ber.grad)):
        scale = want.abs().max().item() + 1
        assert_close(got, want, atol=1e-4 * scale, rtol=1e-4, what=f"grad {name}")


@pytest.mark.parametrize("case", [
    Case("depthwise, 2 slices per channel", 2, 2, 2, 33, 40, 3, 3, padding=(1, 1, 1, 1),
         groups=2),
    Case("depthwise 7x7 (tiled), 6 tiles per plane", 1, 2, 2, 33, 40, 7, 7,
         padding=(3, 3, 3, 3), groups=2),
    Case("implicit GEMM, 2 pixel blocks", 1, 2, 3, 9, 9, 1, 1),
], ids=lambda c: c.name)
def test_statistics_merge_many_blocks(case):
    """Per-block (count, mean, M2) from several blocks per channel merge to the batch's
    statistics, at a mean of ~100 against a spread of ~1."""
    x, w, b = case.tensors(offset=100.0)
    w = w.abs()
    y, z, mean, invstd = fc.conv_bn_relu_train_forward(x, w, b, None, None, 1e-5,
                                                       case.stride, case.padding, 1,
                                                       case.groups, "none")
    zr = reference.conv2d(x, w, b, *case.args, case.groups)
    assert_close(mean, zr.mean((0, 2, 3)), atol=1e-3, rtol=1e-6, what="mean")
    var = zr.var((0, 2, 3), unbiased=False)
    assert_close(invstd, (var + 1e-5).rsqrt(), atol=0, rtol=1e-3, what="invstd")


def test_errors_are_clear():
    x = torch.randn(1, 2, 5, 5)
    w = torch.randn(2, 1, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        fc.depthwise_conv2d_forward(x.half(), w.half())
    with pytest.raises(TypeError, match="w has dtype torch.float64"):
        fc.depthwise_conv2d_forward(x, w.double())
    with pytest.raises(ValueError, match="groups=2 expects 4"):
        fc.depthwise_conv2d_forward(x, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="grad_output has shape"):
        fc.depthwise_conv2d_grad_input(torch.randn(1, 2, 4, 4), w, x.shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fc.conv_bn_relu_train_forward(torch.randn(1, 2, 3, 3), w, None, None, None, groups=2)
    with pytest.raises(ValueError, match="unknown activation"):
        fc.depthwise_conv2d_forward(x, w, activation="gelu")
    with pytest.raises(RuntimeError, match="padding"):
        fc.depthwise_conv2d_forward(x, w, padding=-1)


def test_depthwise_beyond_shared_memory_runs_the_implicit_gemm():
    """A dilation whose halo would not fit in 48 KiB of shared memory (the tiled forward,
    which training's statistics take; the eval forward's generated kernel reads no halo),
    and a filter row longer than grad-weight's shared slots: both run the implicit GEMM,
    same results."""
    case = Case("dilation 60", 2, 2, 2, 125, 125, 3, 3, dilation=(60, 60), groups=2)
    x, w, b = case.tensors()
    z_ref = reference.conv2d(x, w, b, *case.args, 2)
    y = fc.depthwise_conv2d_forward(x, w, b, case.stride, case.padding, case.dilation)
    assert_close(y, z_ref, atol=1e-5, rtol=1e-5, what="forward, dilation 60")
    y, z, mean, invstd = fc.conv_bn_relu_train_forward(x, w, b, None, None, 1e-5, case.stride,
                                                       case.padding, case.dilation, 2)
    assert_close(z, z_ref, atol=1e-5, rtol=1e-5, what="training forward, dilation 60")
    assert_close(mean, z_ref.mean((0, 2, 3)), atol=1e-5, rtol=1e-5, what="batch mean")
    row = Case("1x65 filter", 1, 2, 2, 2, 70, 1, 65, groups=2)
    x, w, _ = row.tensors()
    gy = torch.randn(row.problem.output_shape)
    gw = fc.depthwise_conv2d_grad_weight(gy, x, w.shape, *row.args)
    assert_close(gw, reference.conv2d_grad_weight(gy, x, w.shape, *row.args, 2), atol=1e-5,
                 rtol=1e-5, what="grad-weight, 65 taps per row")


@pytest.mark.parametrize("name", ["depthwise", "implicit_gemm"])
def test_registry_adapter(name):
    """fastconv.cuda.kernels.CudaKernels, the registry's CUDA kernels, as the custom ops call
    them (here on the simulator's CPU tensors): channels_last operands and outputs, the fused
    activation, the training forward, grad-weight with the bias gradient."""
    from fastconv.backend import NCHW, NHWC
    from fastconv.cuda.kernels import CudaKernels
    case = DEPTHWISE[1] if name == "depthwise" else DENSE[1]
    k = CudaKernels(name)
    p = case.problem
    x, w, b = case.tensors()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(p.output_shape).contiguous(memory_format=torch.channels_last)
    k.forward(p, x_cl, NHWC, w, b, y, NHWC, None, 2)
    expected = F.relu6(reference.conv2d(x, w, b, *case.args, case.groups))
    assert_close(y, expected, atol=1e-4, rtol=1e-4, what="forward, channels_last")
    y, z, mean, invstd = k.conv_bn_train(p, x, w, b, None, None, 1e-5, 1)
    zr = reference.conv2d(x, w, b, *case.args, case.groups)
    assert_close(mean, zr.mean((0, 2, 3)), atol=1e-4, rtol=1e-4, what="batch mean")
    gy = torch.randn(p.output_shape)
    gw, gb = torch.empty(p.weight_shape), torch.empty(p.K)
    k.grad_weight(p, gy, NCHW, x_cl, NHWC, gw, gb)
    assert_close(gw, reference.conv2d_grad_weight(gy, x, w.shape, *case.args, case.groups),
                 atol=1e-4, rtol=1e-4, what="grad-weight")
    assert_close(gb, gy.double().sum((0, 2, 3)), atol=1e-4, rtol=1e-4, what="grad-bias")
    gx = torch.empty(p.input_shape).contiguous(memory_format=torch.channels_last)
    k.grad_input(p, gy, NCHW, w, gx, NHWC)
    assert_close(gx, reference.conv2d_grad_input(gy, w, x.shape, *case.args, case.groups),
                 atol=1e-4, rtol=1e-4, what="grad-input, channels_last")
    with pytest.raises(ValueError, match="stats buffer"):
        k.forward(p, x, NCHW, w, b, torch.empty(p.output_shape), NCHW, None, 0,
                  torch.empty(2 * p.K, dtype=torch.float64))


@pytest.mark.parametrize("name", ["depthwise", "implicit_gemm"])
def test_empty_batch_gradients(name):
    """An empty batch: grad-weight is zeros (no launch over zero pixels), as on the CPU."""
    from fastconv.backend import NCHW
    from fastconv.cuda.kernels import CudaKernels
    p = conv2d_problem((0, 4, 5, 5), (4, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4)
    gw = torch.full(p.weight_shape, 7.0)
    CudaKernels(name).grad_weight(p, torch.empty(p.output_shape), NCHW,
                                  torch.empty(p.input_shape), NCHW, gw)
    assert torch.equal(gw, torch.zeros(p.weight_shape))
