"""fastconv.conv2d on the shared case matrix: forward and gradients against the float64
reference and against torch, for every implemented algorithm, ISA and dtype."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import reference
from cases import CASE_IDS, CASES
from conftest import (ALL_PASSES, FORWARD, assert_close, assert_nonfinite_like_torch, outside_domain,
                      supported, tolerances)

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward(case, dtype, algo, isa):
    if not supported(algo, case, dtype, FORWARD):
        return
    x, w, b = case.make(dtype)
    y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    stride, pad, dilation = case.explicit()
    ref = reference.conv2d(x, w, b, stride, pad, dilation, case.groups)
    tol = tolerances(dtype, case.reduction(), algo=algo)
    assert y.dtype == dtype
    assert_close(y, ref, **tol, what=f"{case.name} forward vs reference")
    expected = F.conv2d(x, w, b, **case.kwargs())
    assert_close(y, expected, **tol, what=f"{case.name} forward vs torch")
    # Memory format follows torch's rule (channels_last if input or weight is).
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_backward(case, dtype, algo, isa):
    if not supported(algo, case, dtype):
        return
    x, w, b = case.make(dtype, requires_grad=True)
    y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    params = [x, w] + ([b] if b is not None else [])
    grads = torch.autograd.grad(y, params, gy)
    stride, pad, dilation = case.explicit()
    expected = [
        reference.conv2d_grad_input(gy, w, x.shape, stride, pad, dilation, case.groups),
        reference.conv2d_grad_weight(gy, x, w.shape, stride, pad, dilation, case.groups),
        reference.conv2d_grad_bias(gy),
    ]
    yt = F.conv2d(x, w, b, **case.kwargs())
    torch_grads = torch.autograd.grad(yt, params, gy)
    # grad-weight and grad-bias sum N*OH*OW unscaled products (size ~sqrt(pixels));
    # grad-input sums K*R*S products with fan-in-scaled weights.
    pixels = max(1, y.shape[0] * y.shape[2] * y.shape[3])
    reductions = [w.shape[0] // case.groups * w.shape[2] * w.shape[3], pixels, pixels]
    magnitudes = [1.0, pixels ** 0.5, pixels ** 0.5]
    for name, got, ref, tg, red, mag in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                            expected, torch_grads, reductions, magnitudes):
        tol = tolerances(dtype, red, mag, algo=algo)
        assert_close(got, ref, **tol, what=f"{case.name} {name} vs reference")
        assert_close(got, tg, **tol, what=f"{case.name} {name} vs torch")


@pytest.mark.parametrize("case", [c for c in CASES if c.input[0] > 0][:6], ids=lambda c: c.name)
def test_unbatched_input(case, algo):
    if not supported(algo, case, torch.float64, FORWARD):
        return
    x, w, b = case.make(torch.float64)
    x3 = x[0].contiguous()
    y = fastconv.conv2d(x3, w, b, **case.kwargs(), algo=algo)
    assert_close(y, F.conv2d(x3, w, b, **case.kwargs()), atol=1e-12, rtol=1e-10,
                 what=f"{case.name} unbatched")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_like_torch(value, algo, isa):
    x = torch.randn(2, 8, 9, 9)
    w = torch.randn(16, 8, 3, 3)
    x[0, 3, 4, 4] = value
    x[1, 0, 0, 8] = value
    w[5, 2, 1, 1] = value
    for pad in (0, 1):
        if outside_domain(algo, x.shape, w.shape, x.dtype, FORWARD,
                          lambda: fastconv.conv2d(x, w, padding=pad, algo=algo), padding=pad):
            continue
        y = fastconv.conv2d(x, w, None, padding=pad, algo=algo)
        expected = F.conv2d(x, w, None, padding=pad)
        assert_nonfinite_like_torch(y, expected, algo)


def test_every_isa_gives_the_same_float64_result(algo):
    case = CASES[CASE_IDS.index("channel_tails")]
    if not supported(algo, case, torch.float64, FORWARD):
        return
    x, w, b = case.make(torch.float64)
    results = {}
    for isa in fastconv.available_isas():
        with fastconv.use_isa(isa):
            results[isa] = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    first = next(iter(results.values()))
    for isa, y in results.items():
        assert_close(y, first, atol=1e-12, rtol=1e-12, what=f"{isa} vs {next(iter(results))}")


def test_thread_count_follows_torch(algo):
    x, w = torch.randn(4, 32, 20, 20), torch.randn(32, 32, 3, 3)
    if outside_domain(algo, x.shape, w.shape, x.dtype, FORWARD,
                      lambda: fastconv.conv2d(x, w, padding=1, algo=algo), padding=1):
        return
    expected = F.conv2d(x, w, padding=1)
    previous = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert_close(fastconv.conv2d(x, w, padding=1, algo=algo), expected,
                         **tolerances(x.dtype, 288, 288 ** 0.5, algo), what=f"{n} threads")
    finally:
        torch.set_num_threads(previous)


def test_batch_larger_than_the_layout_budget(algo):
    # 2 images of 16.8 MB each (float64): NCHW tensors are converted in groups of images
    # under a 16 MiB budget, so this runs two groups, forward and backward.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 256, 256, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(8, 32, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    if outside_domain(algo, x.shape, w.shape, x.dtype, ALL_PASSES,
                      lambda: fastconv.conv2d(x, w, None, padding=1, algo=algo).sum().backward(),
                      padding=1):
        return
    y = fastconv.conv2d(x, w, None, padding=1, algo=algo)
    expected = F.conv2d(x, w, None, padding=1)
    assert_close(y, expected, atol=1e-11, rtol=1e-10, what="forward over image groups")
    gy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    for got, ref, name in zip(torch.autograd.grad(y, (x, w), gy),
                              torch.autograd.grad(expected, (x, w), gy), ("dx", "dw")):
        assert_close(got, ref, atol=1e-9, rtol=1e-10, what=f"{name} over image groups")


@pytest.mark.parametrize("stride", [(2, 2), (3, 2), (2, 3), (3, 3)], ids=lambda s: f"s{s[0]}{s[1]}")
@pytest.mark.parametrize("kernel,dilation,padding", [
    ((3, 3), (1, 1), (1, 1, 1, 1)), ((3, 3), (2, 1), (2, 0, 1, 2)), ((1, 1), (1, 1), (0, 0, 0, 0)),
    ((2, 3), (1, 2), (0, 1, 2, 0)), ((5, 4), (3, 2), (3, 2, 0, 1))],
    ids=["3x3", "3x3_dil_asym", "1x1", "2x3_dil", "5x4_dil3"])
def test_grad_input_every_stride_phase(stride, kernel, dilation, padding, algo, isa):
    # Strided grad-input runs one stride-1 problem per output phase (direct); the input sizes
    # (13, 11) are multiples of no stride, so phases are ragged, and a kernel smaller than the
    # stride leaves phases that no tap reaches.
    x_shape, w_shape = (2, 5, 13, 11), (7, 5, *kernel)
    problem = fastconv.conv2d_problem(x_shape, w_shape, stride, padding, dilation, 1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64)
    for channels_last in (False, True):
        gy = torch.randn(problem.output_shape, generator=g, dtype=torch.float64)
        if channels_last:
            gy = gy.contiguous(memory_format=torch.channels_last)
        args = (list(stride), list(padding), list(dilation), 1, algo)
        if outside_domain(algo, (2, 5, 13 + padding[0] + padding[1], 11 + padding[2] + padding[3]),
                          w_shape, torch.float64, ALL_PASSES,
                          lambda: fastconv.ops.conv2d_grad_input(gy, w, list(x_shape), *args),
                          stride=stride, dilation=dilation):
            return
        gx = fastconv.ops.conv2d_grad_input(gy, w, list(x_shape), *args)
        ref = reference.conv2d_grad_input(gy, w, x_shape, stride, padding, dilation, 1)
        assert_close(gx, ref, **tolerances(torch.float64, 7 * kernel[0] * kernel[1]),
                     what=f"grad_input stride {stride} {'NHWC' if channels_last else 'NCHW'}")
        assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last
