"""Winograd F(m x m, 3 x 3): the transforms against Lavin & Gray's matrices, the accuracy bars,
large magnitudes and the phase split. (The shared case matrix runs every Winograd variant on
the configurations it can run, through the ALGOS fixture, like every other algorithm.)"""
from __future__ import annotations

from fractions import Fraction as Fr

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.backend import DTYPE_CODES, _C

TILES = [2, 4, 6]

# The matrices as published (Lavin & Gray 2015; wincnn), F(6, 3) in NNPACK's scaling of the
# points 0, +-1, +-2, +-1/2, inf. Exact fractions, so the test does not share the kernels'
# constants.
PAPER = {
    2: dict(
        BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, -1, 0, 1]],
        G=[[1, 0, 0], [Fr(1, 2)] * 3, [Fr(1, 2), Fr(-1, 2), Fr(1, 2)], [0, 0, 1]],
        AT=[[1, 1, 1, 0], [0, 1, -1, 1]]),
    4: dict(
        BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        G=[[Fr(1, 4), 0, 0], [Fr(-1, 6)] * 3, [Fr(-1, 6), Fr(1, 6), Fr(-1, 6)],
           [Fr(1, 24), Fr(1, 12), Fr(1, 6)], [Fr(1, 24), Fr(-1, 12), Fr(1, 6)], [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
    6: dict(
        BT=[[1, 0, Fr(-21, 4), 0, Fr(21, 4), 0, -1, 0],
            [0, 1, 1, Fr(-17, 4), Fr(-17, 4), 1, 1, 0],
            [0, -1, 1, Fr(17, 4), Fr(-17, 4), -1, 1, 0],
            [0, Fr(1, 2), Fr(1, 4), Fr(-5, 2), Fr(-5, 4), 2, 1, 0],
            [0, Fr(-1, 2), Fr(1, 4), Fr(5, 2), Fr(-5, 4), -2, 1, 0],
            [0, 2, 4, Fr(-5, 2), -5, Fr(1, 2), 1, 0],
            [0, -2, 4, Fr(5, 2), -5, Fr(-1, 2), 1, 0],
            [0, -1, 0, Fr(21, 4), 0, Fr(-21, 4), 0, 1]],
        G=[[1, 0, 0], [Fr(-2, 9)] * 3, [Fr(-2, 9), Fr(2, 9), Fr(-2, 9)],
           [Fr(1, 90), Fr(1, 45), Fr(2, 45)], [Fr(1, 90), Fr(-1, 45), Fr(2, 45)],
           [Fr(1, 45), Fr(1, 90), Fr(1, 180)], [Fr(1, 45), Fr(-1, 90), Fr(1, 180)], [0, 0, 1]],
        AT=[[1, 1, 1, 1, 1, 32, 32, 0], [0, 1, -1, 2, -2, 16, -16, 0], [0, 1, 1, 4, 4, 8, 8, 0],
            [0, 1, -1, 8, -8, 4, -4, 0], [0, 1, 1, 16, 16, 2, 2, 0],
            [0, 1, -1, 32, -32, 1, -1, 1]]),
}


def _np(m):
    return np.array([[float(v) for v in row] for row in m])


@pytest.mark.parametrize("m", TILES)
def test_kernel_matrices_are_the_papers(m):
    got = _C.winograd_matrices(m)
    for name in ("BT", "G", "AT"):
        np.testing.assert_array_equal(np.array(got[name]), _np(PAPER[m][name]), err_msg=name)


@pytest.mark.parametrize("m", TILES)
def test_matrices_compute_a_correlation_exactly(m):
    # 1-D: AT [(G g) * (BT d)] = the valid correlation of d (m + 2) with g (3), in exact
    # rational arithmetic.
    P = {k: [[Fr(v) for v in row] for row in M] for k, M in PAPER[m].items()}
    rng = np.random.default_rng(m)
    d = [Fr(int(v)) for v in rng.integers(-9, 9, m + 2)]
    g = [Fr(int(v)) for v in rng.integers(-9, 9, 3)]
    U = [sum(r[j] * g[j] for j in range(3)) for r in P["G"]]
    V = [sum(r[j] * d[j] for j in range(m + 2)) for r in P["BT"]]
    y = [sum(r[j] * U[j] * V[j] for j in range(m + 2)) for r in P["AT"]]
    assert y == [sum(d[i + j] * g[j] for j in range(3)) for i in range(m)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("which", ["input", "filter", "output"])
@pytest.mark.parametrize("m", TILES)
def test_vectorised_transforms_match_the_matrices(m, which, dtype, isa):
    # The kernels' transforms (one per ISA, vectorised over tiles) on 37 tiles: every lane of
    # full vectors and a partial one.
    a = m + 2
    M = {"input": _np(PAPER[m]["BT"]), "filter": _np(PAPER[m]["G"]),
         "output": _np(PAPER[m]["AT"])}[which]
    n_in = 3 if which == "filter" else a
    tiles = torch.randn(37, n_in, n_in, dtype=torch.float64).to(dtype)
    out = torch.empty(37, M.shape[0], M.shape[0], dtype=dtype)
    _C.winograd_transform(DTYPE_CODES[dtype], m, ["input", "filter", "output"].index(which),
                          tiles.data_ptr(), out.data_ptr(), 37)
    expected = torch.from_numpy(M) @ tiles.double() @ torch.from_numpy(M).T
    tol = 1e-14 if dtype == torch.float64 else 1e-5
    err = (out.double() - expected).abs()
    worst = err.argmax()
    assert err.max() <= tol * (1 + expected.abs().max()), (
        f"F({m},3) {which} transform, {isa}: index {np.unravel_index(int(worst), err.shape)}, "
        f"expected {expected.flatten()[worst]:.9g}, actual {out.flatten()[worst]:.9g}, shape "
        f"{tuple(out.shape)}")


def _rel_l2(got, exact):
    return float((got.double() - exact).norm() / exact.norm())


# Issue #7's accuracy bars: relative L2 error against float64 on N(0,1) inputs with
# fan-in-scaled weights and C up to 512.
BARS = {"winograd_f2": 2e-5, "winograd_f4": 2e-5, "winograd_f6": 1e-4}


@pytest.mark.parametrize("algo", list(BARS))
@pytest.mark.parametrize("C,H", [(64, 20), (512, 9)])
def test_accuracy_bars_float32(algo, C, H):
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, H, H, generator=g)
    w = torch.randn(32, C, 3, 3, generator=g) / (9 * C) ** 0.5
    exact = F.conv2d(x.double(), w.double(), padding=1)
    err = _rel_l2(fastconv.conv2d(x, w, padding=1, algo=algo), exact)
    direct = _rel_l2(fastconv.conv2d(x, w, padding=1, algo="direct"), exact)
    assert err <= BARS[algo], f"{algo} C={C}: relative L2 {err:.2e} (direct: {direct:.2e})"
    # and the backward pass by the same transforms
    gy = torch.randn(exact.shape, generator=g)
    xr = x.clone().requires_grad_(True)
    fastconv.conv2d(xr, w, padding=1, algo=algo).backward(gy)
    gx_exact = torch.nn.grad.conv2d_input(x.shape, w.double(), gy.double(), padding=1)
    assert _rel_l2(xr.grad, gx_exact) <= BARS[algo]
    wr = w.clone().requires_grad_(True)
    fastconv.conv2d(x, wr, padding=1, algo=algo).backward(gy)
    gw_exact = torch.nn.grad.conv2d_weight(x.double(), w.shape, gy.double(), padding=1)
    assert _rel_l2(wr.grad, gw_exact) <= BARS[algo]


@pytest.mark.parametrize("algo", list(BARS))
def test_large_magnitudes_neither_overflow_nor_lose_accuracy(algo):
    # Inputs of size 1e3 (and weights 1e3 apart from fan-in scaling): the F(6,3) transforms
    # multiply values by up to ~32 x 5.25^2 before the GEMM, far below float32's range, and the
    # relative error must not grow with the scale.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 96, 14, 14, generator=g)
    w = torch.randn(48, 96, 3, 3, generator=g) / (9 * 96) ** 0.5
    b = torch.randn(48, generator=g)
    errs = []
    for scale in (1.0, 1e3):
        exact = F.conv2d(x.double() * scale, w.double() * scale, b.double(), padding=1)
        y = fastconv.conv2d(x * scale, w * scale, b, padding=1, algo=algo)
        assert torch.isfinite(y).all()
        errs.append(_rel_l2(y, exact))
    assert errs[1] <= BARS[algo] and errs[1] <= 4 * errs[0] + 1e-7, errs


def test_phase_times_split_the_call():
    x, w = torch.randn(2, 32, 30, 30), torch.randn(32, 32, 3, 3)
    fastconv.conv2d(x, w, padding=1, algo="winograd_f4")
    t = _C.last_phase_times()
    phases = ("filter_transform", "input_transform", "gemm", "output_transform")
    assert all(t[p] > 0 for p in phases) and t["threads"] >= 1
    assert sum(t[p] for p in phases) <= t["wall"] * t["threads"] * 1.5


@pytest.mark.parametrize("algo", list(BARS))
def test_tiny_tile_blocks_and_channel_blocks(algo):
    # Blocks of 1 tile-vector and 1 register row of channels: every block edge is crossed.
    x = torch.randn(3, 20, 11, 13, dtype=torch.float64)
    w = torch.randn(30, 20, 3, 3, dtype=torch.float64)
    with fastconv.backend.tuning(winograd_tile_block=1, winograd_channel_block=1):
        y = fastconv.conv2d(x, w, padding=(1, 2), algo=algo)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=(1, 2)), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("algo", list(BARS))
@pytest.mark.parametrize("tiles,channels,budget", [(1, 1, 1 << 30), (5, 13, 1 << 30),
                                                   (64, 128, 1)])
def test_grad_weight_blocks_shares_and_image_groups(algo, tiles, channels, budget):
    # Grad-weight by the transposed transforms: tile blocks of 1 and 5 tiles, channel blocks
    # of one GEMM tile (many items, partial panels), and one image per layout group (the sums
    # carried across groups); groups and asymmetric padding; float64 to 1e-11.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 11, 13, dtype=torch.float64, generator=g)
    gy = torch.randn(3, 30, 11, 14, dtype=torch.float64, generator=g)
    for groups in (1, 2):
        shape = (30, 20 // groups, 3, 3)
        with fastconv.backend.tuning(winograd_grad_weight_tile_block=tiles,
                                     winograd_grad_weight_channel_block=channels,
                                     layout_budget_bytes=budget):
            got = fastconv.ops.conv2d_grad_weight(gy, x, list(shape), [1, 1], [1, 1, 1, 2],
                                                  [1, 1], groups, algo)
        exact = torch.nn.grad.conv2d_weight(F.pad(x, (1, 2, 1, 1)), shape, gy, groups=groups)
        torch.testing.assert_close(got, exact, atol=1e-11, rtol=1e-11)


def test_training_with_the_family_name_to_double_backward():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    f = lambda x, w, b: fastconv.conv2d(x, w, b, padding=1, algo="winograd")  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # and a module trained for a few SGD steps follows torch's
    torch.manual_seed(0)
    ours = fastconv.nn.Conv2d(8, 16, 3, padding=1, algo="winograd")
    ref = torch.nn.Conv2d(8, 16, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = torch.randn(4, 8, 12, 12)
    for _ in range(3):
        for m, opt in ((ours, opt_a), (ref, opt_b)):
            opt.zero_grad()
            m(data).square().mean().backward()
            opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, atol=1e-5, rtol=1e-4)
