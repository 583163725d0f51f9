"""The direct kernel's register tile, micro-kernel-tester style: channel counts below, at and
above every width the tile's channel block can take (1 to 4 vectors of 8 or 16 lanes, one
block or several), and pixel counts that leave every remainder of a row of pixel tiles;
forward, grad-input (whose output channels are the convolution's inputs) and grad-weight with
grad-bias, every ISA, float32 and float64, against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from fastconv import ops, reference
from conftest import assert_close, tolerances

# 1..4 vectors of 16 lanes (float32) and of 8 (float64), each width partial, full and past
# the block; 100 and 129 span several blocks of any width in use.
CHANNELS = (1, 7, 8, 9, 15, 16, 17, 24, 31, 33, 47, 48, 49, 63, 64, 65, 100, 129)
# (N, H, W) of the output: 1, 2, 3, 5, 6, 7, 11, 13, 16 and 30 pixels (two images), every
# remainder of 6- and 4-pixel tiles and most of 12.
MAPS = ((1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 1, 5), (1, 2, 3), (1, 1, 7), (1, 1, 11),
        (1, 1, 13), (1, 4, 4), (2, 3, 5))
DTYPES = [torch.float32, torch.float64]


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _check_all_passes(n, c, h, w, k, stride, dtype):
    x = _rand(n, c, h, w, dtype=dtype, seed=0)
    wt = _rand(k, c, 3, 3, dtype=dtype, seed=1)
    b = _rand(k, dtype=dtype, seed=2)
    args = ((stride, stride), (1, 1, 1, 1), (1, 1), 1)  # 3x3, padding 1, one group
    conv = (*args, "direct")
    shape = f"x {tuple(x.shape)} w {tuple(wt.shape)} stride {stride} {dtype}"
    y = ops.conv2d_forward(x, wt, b, *conv)
    ref = reference.conv2d(x.double(), wt.double(), b.double(), *args)
    assert_close(y, ref, **tolerances(dtype, c * 9, (c * 9) ** 0.5), what=f"forward {shape}")
    gy = _rand(*ref.shape, dtype=dtype, seed=3)
    gx = ops.grad_input_forward(gy, wt, list(x.shape), *conv)
    ref = reference.conv2d_grad_input(gy.double(), wt.double(), list(x.shape), *args)
    assert_close(gx, ref, **tolerances(dtype, k * 9, (k * 9) ** 0.5), what=f"grad_input {shape}")
    pixels = gy.shape[0] * gy.shape[2] * gy.shape[3]
    gw, gb = ops.grad_weight_bias_forward(gy, x, list(wt.shape), *conv)  # one sweep
    ref = reference.conv2d_grad_weight(gy.double(), x.double(), list(wt.shape), *args)
    tol = tolerances(dtype, pixels, pixels ** 0.5)
    assert_close(gw, ref, **tol, what=f"grad_weight {shape}")
    assert_close(gb, reference.conv2d_grad_bias(gy.double()), **tol, what=f"grad_bias {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_output_channels_around_the_block(dtype, isa):
    for k in CHANNELS:
        for n, h, w in ((1, 1, 7), (2, 3, 5)):
            _check_all_passes(n, 5, h, w, k, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_input_channels_around_the_block(dtype, isa):
    # grad-input's output channels, and grad-weight's tile rows
    for c in CHANNELS:
        _check_all_passes(1, c, 3, 4, 6, 1, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("stride", [1, 2])
def test_pixel_remainders(dtype, stride, isa):
    for n, h, w in MAPS:
        for k in (16, 49):
            _check_all_passes(n, 3, h * stride, w * stride, k, stride, dtype)
