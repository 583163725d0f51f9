"""The depthwise kernel's own paths (issue #8): channel counts that cross its register tiles
(whole 4-, 2- and 1-vector tiles and a gathered tail), NCHW maps run flat (narrow) and row
by row (wide), multipliers, kernels 1-7, strides 1-3,
dilation and padding, both layouts, both dtypes, every ISA, forward, grad-input and
grad-weight (also across image groups), against torch in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import backend, ops

GEOMETRIES = [
    # (channels, multiplier, kernel, stride, padding, dilation, H, W)
    (72, 1, 3, 1, 1, 1, 9, 10),     # 64 channels in a 4-vector tile, then 8 in the tail
    (40, 1, 3, 2, 1, 1, 11, 9),     # 2-vector tile + tail, stride 2
    (17, 1, 5, 3, 2, 1, 13, 14),    # 1 vector + tail, stride 3
    (6, 2, 3, 1, (0, 2), (2, 1), 10, 13),  # multiplier 2, asymmetric padding and dilation
    (5, 3, 7, 2, 3, 1, 15, 12),     # multiplier 3, 7x7
    (8, 1, 1, 1, 0, 1, 5, 6),       # 1x1
    # Whole blocks of 16 channels (8 in float64): NCHW narrow maps through NHWC tiles,
    # grad-weight in blocks, strided grad-input by scatter.
    (32, 1, 3, 2, 1, 1, 11, 12),
    (16, 1, 5, 3, (2, 0), 2, 13, 9),
    (48, 1, 3, 1, 1, 1, 14, 14),
    (80, 1, 3, 1, 1, 1, 7, 7),      # NCHW blocks of 4 vectors, then a ragged one
    # Multipliers over whole vectors: grad-input slice by slice through the paths above.
    (32, 2, 3, 1, 1, 1, 7, 7),
    (16, 2, 3, 2, 1, 1, 11, 12),
    # NCHW maps 32+ wide run row by row (narrower ones flat).
    (24, 1, 3, 1, 1, 1, 7, 40),     # rows of 40: two whole vectors and a partial one
    (6, 2, 5, 2, (2, 1), (1, 2), 6, 75),  # strided, dilated rows of 35, multiplier 2
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"C{g[0]}m{g[1]}k{g[2]}s{g[3]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_forward_and_grad_weight(geometry, channels_last, dtype, isa):
    C, m, k, stride, padding, dilation, H, W = geometry
    g = torch.Generator().manual_seed(C * k)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C * m, 1, k, k, generator=g, dtype=dtype)
    b = torch.randn(C * m, generator=g, dtype=dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=C)
    y = fastconv.conv2d(x, w, b, **kw, algo="depthwise")
    exact = F.conv2d(x.double(), w.double(), b.double(), **kw)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y.double(), exact, atol=tol, rtol=tol)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    gy = torch.randn(exact.shape, generator=g, dtype=dtype)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    pad = fastconv.explain(x.shape, w.shape, **kw).problem.padding
    for budget in (1 << 30, 1):  # one layout group, and one image per group
        with backend.tuning(layout_budget_bytes=budget):
            gw = ops.conv2d_grad_weight(gy, x, list(w.shape), list(fastconv.functional.pair(
                "stride", stride)), list(pad), list(fastconv.functional.pair("dilation",
                                                                            dilation)), C,
                                        "depthwise")
        gw_exact = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), **kw)
        torch.testing.assert_close(gw.double(), gw_exact, atol=10 * tol, rtol=10 * tol)


GRAD_INPUT_GEOMETRIES = GEOMETRIES + [
    (20, 1, 5, 1, (1, 3), 2, 12, 11),  # stride 1: a forward with rotated filters, dilated
    (8, 1, 3, 1, 3, 1, 6, 7),          # padding beyond the kernel's extent: direct
]


@pytest.mark.parametrize("geometry", GRAD_INPUT_GEOMETRIES,
                         ids=lambda g: f"C{g[0]}m{g[1]}k{g[2]}s{g[3]}p{g[4]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_grad_input(geometry, channels_last, dtype, isa):
    C, m, k, stride, padding, dilation, H, W = geometry
    g = torch.Generator().manual_seed(C + k)
    w = torch.randn(C * m, 1, k, k, generator=g, dtype=dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=C)
    problem = fastconv.explain((2, C, H, W), w.shape, **kw).problem
    gy = torch.randn(problem.output_shape, generator=g, dtype=dtype)
    if channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    gx = ops.conv2d_grad_input(gy, w, [2, C, H, W], list(problem.stride),
                               list(problem.padding), list(problem.dilation), C, "depthwise")
    exact = torch.nn.grad.conv2d_input((2, C, H, W), w.double(), gy.double(), **kw)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(gx.double(), exact, atol=tol * k, rtol=tol)
    assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_auto_routes_depthwise_layers():
    assert fastconv.explain((1, 32, 112, 112), (32, 1, 3, 3), padding=1, groups=32).choice \
        == "depthwise"
    assert fastconv.explain((1, 32, 56, 56), (32, 4, 3, 3), padding=1, groups=8).choice \
        == "grouped"  # 4 channels per group: not depthwise


def test_non_finite_inputs_outside_the_receptive_field_do_not_reach_grad_weight(isa):
    # Partial vectors zero their lanes past the output width in both operands; a partial
    # tile of rows skips its missing rows.
    x = torch.randn(1, 4, 10, 24)
    x[..., -1] = float("inf")  # column 23: read by no output (stride 2, no padding)
    x[..., -1, :] = float("inf")  # row 9 likewise
    w = torch.randn(4, 1, 3, 3)
    y = F.conv2d(x, w, stride=2, groups=4)
    gy = torch.randn_like(y)
    gw = ops.conv2d_grad_weight(gy, x, [4, 1, 3, 3], [2, 2], [0, 0, 0, 0], [1, 1], 4,
                                "depthwise")
    exact = torch.nn.grad.conv2d_weight(x, w.shape, gy, stride=2, groups=4)
    assert torch.isfinite(exact).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(gw, exact, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("W", [128, 130])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_outputs_larger_than_the_caches(W, channels_last, dtype, isa):
    # Outputs over 8 MiB are written with non-temporal stores: channels_last rows, and NCHW
    # rows of whole 64-byte lines (W = 128; W = 130: plain stores).
    g = torch.Generator().manual_seed(W)
    x = torch.randn(2, 64, 130, W, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 1, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(64, generator=g, dtype=dtype)
    y = fastconv.conv2d(x, w, b, padding=1, groups=64, algo="depthwise")
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=64)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y.double(), exact, atol=tol, rtol=tol)


# channels_last rows with S = 3 or 5 taps, stride 1 or 2 and padding up to S // 2 reuse each
# input vector across a register tile of up to 16 pixels (8 on AVX2, 4 in sanitized builds;
# float32): widths below, at and above one tile, rows of several tiles with a narrower last
# one, tiles that touch the padding on the left, the right or both, vertical dilation, and
# padding past S // 2 (the generic rows). NCHW maps narrower than two vectors run the same
# rows on NHWC tiles.
REUSE_ROWS = [
    # (kernel, stride, padding (top, bottom, left, right), dilation, H, W)
    (3, 1, (1, 1, 1, 1), 1, 5, 1),      # one pixel: its tile touches both sides
    (3, 1, (1, 1, 1, 1), 1, 6, 7),      # one 7-pixel tile
    (3, 1, (1, 1, 1, 1), 1, 4, 16),     # exactly one AVX-512 tile
    (3, 1, (0, 1, 0, 1), 1, 5, 17),     # 17 = 9 + 8: two tiles, only the right one padded
    (3, 1, (1, 0, 1, 0), (2, 1), 9, 37),  # 37 = 13 x 3, dilated rows, padded on the left
    (3, 2, (1, 1, 1, 1), 1, 7, 29),     # stride 2, 15 outputs: one tile
    (3, 2, (1, 1, 0, 1), 1, 6, 66),     # stride 2, 33 outputs: 3 tiles of 11
    (5, 1, (2, 2, 2, 2), 1, 6, 23),     # 5x5, 23 = 12 + 11
    (5, 2, (2, 2, 1, 2), 1, 9, 40),     # 5x5 stride 2, asymmetric padding
    (5, 1, (0, 0, 0, 0), 1, 5, 5),      # no padding, one output column
    (3, 1, (2, 2, 2, 2), 1, 5, 9),      # padding past S // 2: generic rows
]


@pytest.mark.parametrize("row", REUSE_ROWS,
                         ids=lambda r: f"k{r[0]}s{r[1]}W{r[5]}p{''.join(map(str, r[2]))}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("activation", [None, "relu6"])
# 48: three 16-lane vectors (six AVX2 ones); 44 and 5: a channel tail (12 and 4 lanes, or 5),
# which channels_last rows run as a masked vector of the same tiles.
@pytest.mark.parametrize("C", [48, 44, 5])
def test_rows_reusing_input_vectors(row, channels_last, activation, C, isa):
    k, stride, (pt, pb, pl, pr), dilation, H, W = row
    g = torch.Generator().manual_seed(H * W + k)
    x = torch.randn(2, C, H, W, generator=g)
    if activation:
        x[0, :, 0, 0] = float("nan")  # NaN stays NaN through the activation's clamp
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, generator=g)
    b = torch.randn(C, generator=g)
    kw = dict(stride=stride, dilation=dilation, groups=C)
    exact = F.conv2d(F.pad(x.double(), (pl, pr, pt, pb)), w.double(), b.double(), **kw)
    act = ops.ACTIVATIONS[activation or "none"]
    stats = None if activation else torch.zeros(2 * C, dtype=torch.float64)
    dil = [dilation] * 2 if isinstance(dilation, int) else list(dilation)
    y = ops.conv2d_forward(x, w, b, [stride] * 2, [pt, pb, pl, pr], dil, C, "depthwise",
                           activation=act, stats=stats)
    if activation == "relu6":
        exact = exact.clamp(0, 6).where(~exact.isnan(), exact)
    torch.testing.assert_close(y.double(), exact, atol=1e-4, rtol=1e-4, equal_nan=True)
    if stats is not None:  # batch-norm statistics gathered by the rows' epilogue
        torch.testing.assert_close(stats[:C], exact.sum((0, 2, 3)), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(stats[C:], (exact ** 2).sum((0, 2, 3)), atol=1e-3,
                                   rtol=1e-4)


# NCHW maps with square 3x3 or 5x5 filters, stride 1 or 2, dilation 1, rows over half a
# vector: register tiles of 7 output rows (4 on AVX2) x one vector, each input row loaded
# once per vector and shared by the tile's rows. Rows: a whole tile, a tile and a remainder,
# fewer than a tile; columns: interior vectors (read straight from x), edge vectors on the
# left, the right or both (masked loads), a partial last vector; padding none, asymmetric,
# past S // 2; stride 2 on odd and even widths; multiplier 2 (planes read channel k / 2).
# Float32 on the vector ISAs; float64 and the scalar build run the same cases on the staged
# paths.
NCHW_TILE_ROWS = [
    # (kernel, stride, padding (top, bottom, left, right), H, W)
    (3, 1, (1, 1, 1, 1), 7, 112),   # one tile of rows, whole vectors, interior columns
    (3, 1, (1, 1, 1, 1), 9, 56),    # a tile and 2 rows; 3.5 vectors
    (3, 1, (0, 0, 0, 0), 3, 40),    # no padding, one output row
    (3, 1, (1, 1, 0, 2), 15, 29),   # asymmetric padding, 29 = 16 + 13
    (3, 1, (2, 2, 2, 2), 6, 33),    # padding past S // 2
    (3, 2, (1, 1, 1, 1), 16, 67),   # stride 2, odd width
    (3, 2, (0, 1, 0, 1), 30, 56),
    (5, 1, (2, 2, 2, 2), 8, 45),
    (5, 2, (2, 2, 2, 2), 11, 70),
    (5, 2, (1, 2, 2, 1), 14, 14),   # 7 outputs: under half a vector only on AVX-512
    (3, 1, (1, 1, 1, 1), 14, 12),   # 12 wide: one partial vector with both edges
]


@pytest.mark.parametrize("row", NCHW_TILE_ROWS,
                         ids=lambda r: f"k{r[0]}s{r[1]}H{r[3]}W{r[4]}p{''.join(map(str, r[2]))}")
@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("activation", [None, "relu6"])  # None: also stats and grad-weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nchw_tiles_of_rows(row, multiplier, activation, dtype, isa):
    k, stride, (pt, pb, pl, pr), H, W = row
    g = torch.Generator().manual_seed(H * W + k)
    C = 5
    K = C * multiplier
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype)
    if activation:
        x[0, :, 0, 0] = float("nan")  # NaN stays NaN through the activation's clamp
    w = torch.randn(K, 1, k, k, generator=g, dtype=dtype)
    b = torch.randn(K, generator=g, dtype=dtype)
    exact = F.conv2d(F.pad(x.double(), (pl, pr, pt, pb)), w.double(), b.double(),
                     stride=stride, groups=C)
    act = ops.ACTIVATIONS[activation or "none"]
    stats = None if activation else torch.zeros(2 * K, dtype=torch.float64)
    y = ops.conv2d_forward(x, w, b, [stride] * 2, [pt, pb, pl, pr], [1, 1], C, "depthwise",
                           activation=act, stats=stats)
    if activation == "relu6":
        exact = exact.clamp(0, 6).where(~exact.isnan(), exact)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(y.double(), exact, atol=tol, rtol=tol, equal_nan=True)
    if stats is not None:  # batch-norm statistics gathered by the tiles' epilogue
        torch.testing.assert_close(stats[:K], exact.sum((0, 2, 3)), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(stats[K:], (exact ** 2).sum((0, 2, 3)), atol=1e-3,
                                   rtol=1e-4)
    if activation:
        return
    # Grad-weight runs the same tiles turned around (gy rows x one vector, S * S sums).
    gy = torch.randn(exact.shape, generator=g, dtype=dtype)
    gw = ops.conv2d_grad_weight(gy, x, list(w.shape), [stride] * 2, [pt, pb, pl, pr], [1, 1],
                                C, "depthwise")
    gw_exact = torch.nn.grad.conv2d_weight(F.pad(x.double(), (pl, pr, pt, pb)), w.shape,
                                           gy.double(), stride=stride, groups=C)
    torch.testing.assert_close(gw.double(), gw_exact, atol=10 * tol, rtol=10 * tol)


# NCHW stride-2 grad-input by stride phases: the four phases of 4 gx row pairs (2 on AVX2) x
# one vector of columns per tile, zipped back at the store. Paddings of either parity (the
# phases' tap sets differ), odd heights and widths (partial tiles, masked stores), gy columns
# outside gy at both edges, 5x5; padding parities that differ take the scatter (as do
# float64 and the scalar build).
PHASE_ROWS = [
    # (kernel, padding (top, bottom, left, right), H, W)
    (3, (1, 1, 1, 1), 16, 67),    # odd width: 34 phase columns
    (3, (1, 1, 1, 1), 9, 112),    # odd height: a partial tile of row pairs
    (3, (0, 1, 0, 1), 30, 56),    # 'same' padding of even parity
    (3, (2, 2, 2, 2), 12, 40),    # padding 2: gy rows and columns shifted by one
    (5, (2, 2, 2, 2), 11, 70),
    (5, (1, 2, 1, 2), 14, 33),
    (3, (1, 1, 1, 1), 14, 14),    # 7 phase columns
    (3, (1, 0, 0, 1), 10, 20),    # top and left padding of different parity: scatter
]


@pytest.mark.parametrize("row", PHASE_ROWS,
                         ids=lambda r: f"k{r[0]}H{r[2]}W{r[3]}p{''.join(map(str, r[1]))}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_strided_grad_input_by_phases(row, dtype, isa):
    k, (pt, pb, pl, pr), H, W = row
    g = torch.Generator().manual_seed(H * W + k)
    C = 3
    x_shape = (2, C, H, W)
    w = torch.randn(C, 1, k, k, generator=g, dtype=dtype)
    OH, OW = (H + pt + pb - k) // 2 + 1, (W + pl + pr - k) // 2 + 1
    gy = torch.randn(2, C, OH, OW, generator=g, dtype=dtype)
    gx = ops.conv2d_grad_input(gy, w, list(x_shape), [2, 2], [pt, pb, pl, pr], [1, 1], C,
                               "depthwise")
    # The gradient through the explicit padding, cropped back to x.
    padded = (2, C, H + pt + pb, W + pl + pr)
    exact = torch.nn.grad.conv2d_input(padded, w.double(), gy.double(), stride=2, groups=C)
    exact = exact[:, :, pt:pt + H, pl:pl + W]
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(gx.double(), exact, atol=tol, rtol=tol)


def _channels_last_backward_case(C, k, stride, padding, dilation, dtype, seed):
    """(x, w, gy, conv kwargs, op args after the shapes) of a channels_last depthwise
    backward case: 3 images of 9 x 13, the tensors channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, 9, 13, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(C, 1, k, k, dtype=dtype, generator=g)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=C)
    gy = torch.randn(F.conv2d(x, w, **kw).shape, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last)
    return x, w, gy, kw, ([stride] * 2, [padding] * 4, [dilation] * 2, C, "depthwise")


@pytest.mark.parametrize("C", [5, 40])  # a lone channel tail; whole vectors and a tail
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (3, 3, 0, 1), (3, 1, 2, 2), (5, 2, 2, 1), (5, 1, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_channels_last_grad_weight_in_place(C, k, stride, padding, dilation, dtype, isa):
    """Channels_last grad-weight on the tensors as they lie (vectors along the channels, a
    [tap][k] sum per thread): ragged maps, edges, strides, padding past S // 2, dilation,
    the channel tail, several images."""
    x, w, gy, kw, conv = _channels_last_backward_case(C, k, stride, padding, dilation, dtype,
                                                      seed=C * k + stride)
    expected = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), **kw)
    got = ops.conv2d_grad_weight(gy, x, list(w.shape), *conv)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), expected, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("C", [5, 44, 48])  # a lone tail; vectors and a tail; vectors (streamed)
@pytest.mark.parametrize("R,S,stride,dilation", [
    (3, 3, (2, 2), (1, 1)), (5, 5, (2, 2), (1, 1)), (1, 3, (2, 2), (1, 1)),
    (4, 5, (3, 2), (1, 1)), (3, 3, (1, 2), (2, 1))], ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 3, 1), (0, 3, 0, 5)],
                         ids=lambda p: "p" + "".join(map(str, p)))
@pytest.mark.parametrize("W", [5, 40, 75])  # pixels only; whole and narrower tiles, ragged
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_channels_last_grad_input_by_column_phases(C, R, S, stride, dilation, padding, W,
                                                   dtype, isa):
    """Channels_last grad-input of layers strided 2 along the width, by column phases: gx
    columns of both parities, the unchecked tiles (16 columns and narrower) and the columns
    at each end that run a pixel at a time, padding (pt, pb, pl, pr) of either parity and past
    the taps' reach, row strides 1-3 with dilation, the channel tail, streamed stores or not."""
    g = torch.Generator().manual_seed(C + R * 7 + S + W + sum(padding))
    pt, pb, pl, pr = padding
    x = torch.randn(2, C, 7, W, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(C, 1, R, S, dtype=dtype, generator=g)
    kw = dict(stride=stride, dilation=dilation, groups=C)
    xd = x.double().requires_grad_()
    yd = F.conv2d(F.pad(xd, (pl, pr, pt, pb)), w.double(), **kw)
    gy = torch.randn(yd.shape, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last)
    expected, = torch.autograd.grad(yd, xd, gy.double())
    conv = (list(stride), [pt, pb, pl, pr], list(dilation), C, "depthwise")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for stream_min in (1 << 40, 1):
        with backend.tuning(depthwise_grad_input_stream_min_bytes=stream_min):
            got = ops.conv2d_grad_input(gy, w, list(x.shape), *conv)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), expected, atol=tol * 10, rtol=tol,
                                   msg=lambda m: f"streamed below {stream_min} bytes: {m}")


@pytest.mark.parametrize("C", [5, 40])  # a lone channel tail; whole vectors and a tail
@pytest.mark.parametrize("k,stride,padding,dilation", [
    (3, 2, 1, 1), (3, 3, 0, 1), (3, 2, 2, 2), (5, 2, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_channels_last_strided_grad_input_with_a_channel_tail(C, k, stride, padding, dilation,
                                                              dtype, isa):
    """Strided channels_last grad-input with a channel tail, masked: by column phases
    (stride 2 along the width) or scatter (stride 3, dilation). It went through the direct
    kernel's phases."""
    x, w, gy, kw, conv = _channels_last_backward_case(C, k, stride, padding, dilation, dtype,
                                                      seed=C * k + stride + 1)
    expected = torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), **kw)
    got = ops.conv2d_grad_input(gy, w, list(x.shape), *conv)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), expected, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("padding,dilation,W", [
    ((1, 1, 4, 0), (1, 2), 1),   # left padding past every output pixel: OW = 1, 4 columns padded
    ((0, 0, 6, 1), (1, 3), 2),   # OW = 3, the first taps reach the input only from ow = 2
    ((1, 1, 0, 5), (1, 2), 1)])  # the same on the right
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_channels_last_grad_weight_wide_padding_on_narrow_maps(padding, dilation, W, dtype,
                                                               isa):
    """Channels_last grad-weight where the padding on one side is wider than the output row:
    the outputs whose taps all lie inside the row are none, and the edge loops stop at the
    row's end (they ran to the padding's width, reading grad_y past the row)."""
    g = torch.Generator().manual_seed(W)
    C = 40
    x = torch.randn(2, C, 3, W, dtype=dtype, generator=g).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(C, 1, 3, 3, dtype=dtype, generator=g)
    pt, pb, pl, pr = padding
    xp = F.pad(x, (pl, pr, pt, pb))
    gy = torch.randn(F.conv2d(xp, w, dilation=dilation, groups=C).shape, dtype=dtype,
                     generator=g).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_weight(xp.double(), w.shape, gy.double(),
                                           dilation=dilation, groups=C)
    got = ops.conv2d_grad_weight(gy, x, list(w.shape), [1, 1], list(padding), list(dilation),
                                 C, "depthwise")
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double(), expected, atol=tol * 10, rtol=tol)
