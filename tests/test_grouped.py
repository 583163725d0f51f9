"""The grouped kernel's own paths (issue #8): group sizes that cross its register tiles (8-,
4-, 2- and 1-channel tiles of output channels, 4- and 3-tap grad-weight tiles), flat runs
that end in partial vectors, stride phases without taps, images staged in chunks, both
layouts, both dtypes, every ISA; all three passes against torch in float64."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import ops
from conftest import assert_close

GEOMETRIES = [
    # (groups, Cg, Kg, kernel, stride, padding, dilation, H, W)
    (4, 4, 4, 3, 1, 1, 1, 9, 10),           # 4 x 6 tiles, a partial last vector
    (2, 8, 8, 3, 2, 1, 1, 11, 9),           # 8 x 3 tiles, four stride phases
    (3, 2, 15, 3, 1, 1, 1, 7, 7),           # channel tiles 8 + 4 + 2 + 1
    (2, 5, 3, 5, (1, 2), 2, 1, 12, 13),     # odd groups, 5x5 (7 + 6 + 6 + 6 grad-weight taps)
    (2, 3, 6, 3, 3, 0, 1, 10, 11),          # stride 3 > reach: phases with one tap
    (2, 4, 4, 2, 3, 0, 1, 10, 10),          # stride 3, kernel 2: phases with no tap
    (4, 2, 2, 3, 1, (2, 0), (2, 3), 9, 14),  # dilated, asymmetric padding
    (2, 16, 16, 3, 1, 4, 1, 6, 6),          # padding past the kernel's reach: cropped phases
    (2, 6, 4, 1, 2, 0, 1, 9, 8),            # 1x1, strided
    (2, 4, 4, 3, 1, 1, 1, 5, 70),           # long rows: several flat tiles
]


def _ids(g):
    return f"g{g[0]}c{g[1]}k{g[2]}r{g[3]}s{g[4]}"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_all_passes(geometry, channels_last, dtype, isa):
    G, Cg, Kg, k, stride, padding, dilation, H, W = geometry
    g = torch.Generator().manual_seed(G * Cg * Kg * k)
    x = torch.randn(3, G * Cg, H, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(G * Kg, Cg, k, k, generator=g, dtype=dtype) / math.sqrt(Cg * k * k)
    b = torch.randn(G * Kg, generator=g, dtype=dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=G)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fastconv.conv2d(xg, wg, b, **kw, algo="grouped")
    xd, wd = x.double().requires_grad_(True), w.double().requires_grad_(True)
    exact = F.conv2d(xd, wd, b.double(), **kw)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    assert_close(y, exact, atol=tol, rtol=tol, what="forward")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    gy = torch.randn(exact.shape, generator=g, dtype=dtype)
    gx, gw = torch.autograd.grad(y, (xg, wg), gy)
    ex, ew = torch.autograd.grad(exact, (xd, wd), gy.double())
    assert_close(gx, ex, atol=tol, rtol=tol, what="grad_input")
    assert_close(gw, ew, atol=10 * tol, rtol=10 * tol, what="grad_weight")


def test_grad_weight_over_image_chunks():
    # 64 channels per group at 40 x 40: a few images fill a chunk, so 9 images take several.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 128, 40, 40, generator=g)
    gy = torch.randn(9, 16, 40, 40, generator=g)
    gw = ops.conv2d_grad_weight(gy, x, [16, 64, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 2,
                                "grouped")
    exact = torch.nn.grad.conv2d_weight(x.double(), (16, 64, 3, 3), gy.double(), padding=1,
                                        groups=2)
    assert_close(gw, exact, atol=1e-3, rtol=1e-4, what="grad_weight")


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_non_finite_input_past_the_last_output_column(value):
    # Whole vectors of a row read x past its last output; grad_y is zero there, but 0 * inf is
    # NaN: a non-finite x must reach exactly the weights it reaches in torch.
    x = torch.randn(2, 8, 6, 21)
    x[1, 3, 2, 20] = value  # the last column, read by the last output with tap s = 2 only
    w = torch.randn(8, 4, 3, 3)
    kw = dict(padding=(1, 0), groups=2)
    gy = torch.randn(F.conv2d(x, w, **kw).shape)
    gw = ops.conv2d_grad_weight(gy, x, [8, 4, 3, 3], [1, 1], [1, 1, 0, 0], [1, 1], 2, "grouped")
    exact = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), **kw)
    assert torch.isfinite(exact).sum() > 0 and not torch.isfinite(exact).all()
    assert_close(gw, exact, atol=1e-4, rtol=1e-4, what="grad_weight")
