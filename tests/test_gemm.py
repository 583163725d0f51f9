"""The packed GEMM, micro-kernel-tester style: k below, at and above the KC block; partial
tiles in m and n and across the MC / NC blocks; strided and transposed operands with odd
leading dimensions; accumulate vs overwrite; the epilogue; every ISA; against a float64
product."""
from __future__ import annotations

import pytest
import torch

from fastconv import ops
from fastconv.backend import tuning
from conftest import assert_close

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(autouse=True, params=["own_panels", "shared_b_blocks"])
def b_packing(request):
    """Every test under both ways of packing B (gemm.cpp): products of one A block pack their
    B micro-panels per thread, one at a time (the default); with gemm_own_panels_max_rows=1
    only single-row products do, and the rest pack whole B blocks shared by the threads."""
    if request.param == "own_panels":
        yield request.param
    else:
        with tuning(gemm_own_panels_max_rows=1):
            yield request.param


def _check(a, b, c0=None, *, accumulate=False, scale=None, shift=None, per_row=True,
           relu=False, what="", slack=1.0):
    c = c0.clone() if c0 is not None else None
    out = ops.gemm(a, b, c, accumulate=accumulate, scale=scale, shift=shift, per_row=per_row,
                   relu=relu)
    ref = a.double() @ b.double()
    if accumulate:
        ref += c0.double()
    shape = (-1, 1) if per_row else (1, -1)
    if scale is not None:
        ref *= scale.double().reshape(shape)
    if shift is not None:
        ref += shift.double().reshape(shape)
    if relu:
        ref = torch.where(ref < 0, torch.zeros_like(ref), ref)  # NaN stays NaN
    eps = torch.finfo(a.dtype).eps
    k = a.shape[1]
    assert_close(out, ref, atol=slack * 4 * eps * max(1, k) ** 0.5 * 4, rtol=slack * 4 * eps * 8,
                 what=f"gemm {what} M,N,K={a.shape[0]},{b.shape[1]},{k} {a.dtype}")
    return out


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_k_below_at_and_above_the_block(dtype, isa):
    blk = ops.gemm_blocking(dtype)
    m, n, kc = blk["mr"], blk["nr"], blk["kc"]
    # K is cut into equal blocks near KC: up to 1.5 KC is one block, 1.5 KC + 1 is two.
    for k in (1, 2, kc - 1, kc, kc + 1, 3 * kc // 2 + 1, 2 * kc + 3):
        _check(_rand(m, k, dtype=dtype), _rand(k, n, dtype=dtype, seed=1), what=f"k={k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_partial_tiles_in_m_and_n(dtype, isa):
    blk = ops.gemm_blocking(dtype)
    mr, nr = blk["mr"], blk["nr"]
    for m in (1, mr - 1, mr, mr + 1, 2 * mr + 5):
        for n in (1, nr - 1, nr, nr + 1, 3 * nr - 2):
            _check(_rand(m, 19, dtype=dtype), _rand(19, n, dtype=dtype, seed=1), what="tiles")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_across_cache_blocks(dtype, isa):
    blk = ops.gemm_blocking(dtype)
    # One past MC rows and NC columns, with a K that spans two KC blocks.
    _check(_rand(blk["mc"] + 1, 37, dtype=dtype), _rand(37, 9, dtype=dtype, seed=1), what="mc+1")
    _check(_rand(5, 13, dtype=dtype), _rand(13, blk["nc"] + 1, dtype=dtype, seed=1), what="nc+1")
    _check(_rand(blk["mr"] * 3 + 1, blk["kc"] + 7, dtype=dtype),
           _rand(blk["kc"] + 7, blk["nr"] * 2 + 3, dtype=dtype, seed=1), what="kc+7")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_narrow_products_split_rows_between_threads(dtype, threads, isa):
    """A few hundred columns at most: each thread packs and runs its own rows (gemm.cpp,
    splits_rows), over several MC blocks of its rows and several K blocks."""
    blk = ops.gemm_blocking(dtype)
    m, n, k = 2 * blk["mc"] + 5 * blk["mr"] + 3, 3 * blk["nr"] - 2, 2 * blk["kc"] + 3
    a, b = _rand(m, k, dtype=dtype), _rand(k, n, dtype=dtype, seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(a, b, what="split rows")
        _check(a, b, _rand(m, n, dtype=dtype, seed=2), accumulate=True,
               shift=_rand(m, dtype=dtype, seed=3), relu=True, what="split rows, accumulate")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_strided_and_transposed_operands(dtype, isa):
    M, N, K = 29, 45, 67
    a_big = _rand(M + 3, K + 7, dtype=dtype)
    b_big = _rand(K + 5, N + 11, dtype=dtype, seed=1)
    c_big = _rand(M + 1, N + 13, dtype=dtype, seed=2)
    a = a_big[2:2 + M, 3:3 + K]                    # odd leading dimension K + 7
    b = b_big[1:1 + K, 5:5 + N]                    # odd leading dimension N + 11
    at = _rand(K + 3, M, dtype=dtype, seed=3)[1:1 + K].t()   # column-major A
    bt = _rand(N, K + 9, dtype=dtype, seed=4)[:, 2:2 + K].t()  # column-major B
    c = c_big[1:, 7:7 + N]                         # odd ldc
    for x, y in ((a, b), (at, b), (a, bt), (at, bt)):
        out = c                                    # a strided view into c_big
        before = c_big.clone()
        _check(x, y, what="strided")
        ops.gemm(x, y, out)
        assert_close(out, x.double() @ y.double(), atol=1e-4, rtol=1e-5, what="into view")
        # Nothing outside the view was touched.
        mask = torch.ones_like(c_big, dtype=torch.bool)
        mask[1:, 7:7 + N] = False
        assert torch.equal(c_big[mask], before[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_accumulate_vs_overwrite(dtype, isa):
    blk = ops.gemm_blocking(dtype)
    for k in (3, 3 * blk["kc"] // 2 + 1):     # one and two K blocks
        a, b = _rand(17, k, dtype=dtype), _rand(k, 41, dtype=dtype, seed=1)
        c0 = _rand(17, 41, dtype=dtype, seed=2)
        _check(a, b, c0, accumulate=True, what="accumulate")
        _check(a, b, c0, accumulate=False, what="overwrite")


@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "per_col"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_epilogue(dtype, per_row, isa):
    blk = ops.gemm_blocking(dtype)
    M, N = 2 * blk["mr"] + 1, blk["nr"] + 3   # full and edge tiles
    for k in (7, 3 * blk["kc"] // 2 + 2):     # two K blocks: epilogue only after the last
        a, b = _rand(M, k, dtype=dtype), _rand(k, N, dtype=dtype, seed=1)
        ch = M if per_row else N
        scale, shift = _rand(ch, dtype=dtype, seed=3), _rand(ch, dtype=dtype, seed=4)
        c0 = _rand(M, N, dtype=dtype, seed=5)
        _check(a, b, scale=scale, shift=shift, per_row=per_row, relu=True, what="scale+shift+relu")
        _check(a, b, shift=shift, per_row=per_row, what="bias")
        _check(a, b, c0, accumulate=True, scale=scale, per_row=per_row, relu=True,
               what="accumulate+scale+relu")


def test_relu_keeps_nan_and_empty_k(isa):
    a = torch.randn(13, 5)
    b = torch.randn(5, 33)
    a[3, 2] = float("nan")
    out = ops.gemm(a, b, relu=True)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[:3]).any()
    assert (out[~torch.isnan(out)] >= 0).all()
    # K = 0: C = epilogue(0) or epilogue(C).
    c0 = torch.randn(4, 6)
    shift = torch.randn(6)
    out = ops.gemm(torch.empty(4, 0), torch.empty(0, 6), c0.clone(), accumulate=True, shift=shift,
                   per_row=False)
    assert torch.allclose(out, c0 + shift)
    assert torch.equal(ops.gemm(torch.empty(4, 0), torch.empty(0, 6)), torch.zeros(4, 6))


def test_gemm_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiply"):
        ops.gemm(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="unit column stride"):
        ops.gemm(torch.randn(3, 4), torch.randn(4, 6), torch.randn(6, 3).t())
    with pytest.raises(TypeError, match="dtype"):
        ops.gemm(torch.randn(3, 4), torch.randn(4, 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_segments(dtype, isa):
    # One GEMM summing over several segments of K (a batch's images: pixels of image s are
    # K indices s * L + l), starting part-way into the first segment; segment lengths below,
    # at and above the K block and ranges whose blocks straddle segment boundaries.
    kc = ops.gemm_blocking(dtype)["kc"]
    for S, L, first, count, transposed in [(3, 5, 0, None, False), (4, 49, 17, 150, True),
                                           (3, kc, 0, None, False), (2, kc + 7, 3, None, True),
                                           (5, 2 * kc // 3, kc // 2, 2 * kc, False)]:
        M, N = 29, 45
        a = _rand(S, M, L, dtype=dtype, seed=S)
        b = _rand(S, N, L, dtype=dtype, seed=L).transpose(1, 2) if transposed else \
            _rand(S, L, N, dtype=dtype, seed=L)
        count_ = S * L - first if count is None else count
        flat_a = a.permute(1, 0, 2).reshape(M, S * L)[:, first:first + count_]
        flat_b = b.reshape(S * L, N)[first:first + count_]
        c0 = _rand(M, N, dtype=dtype, seed=1)
        for accumulate in (False, True):
            out = ops.gemm_segmented(a, b, first, count, c0.clone(), accumulate=accumulate)
            ref = flat_a.double() @ flat_b.double() + (c0.double() if accumulate else 0)
            eps = torch.finfo(dtype).eps
            assert_close(out, ref, atol=64 * eps * count_ ** 0.5, rtol=32 * eps,
                         what=f"segments S={S} L={L} first={first} count={count_} "
                              f"transposed={transposed} accumulate={accumulate}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_column_segments(dtype, threads, isa):
    """N running over segments (an NCHW batch's images, gemm.h n_seg): segments shorter than,
    equal to and longer than a B micro-panel, so that panels and tiles cross one or several
    segment boundaries; two K blocks (accumulation across them); past NC columns; the narrow
    split-row path (few columns, many rows) and the epilogue per row and per column."""
    blk = ops.gemm_blocking(dtype)
    nr, mr, kc = blk["nr"], blk["mr"], blk["kc"]
    cases = [  # M, K, S, L
        (2 * mr + 1, 7, 5, 3),                     # several boundaries inside one panel
        (5 * mr * 3 + 2, kc + kc // 2 + 1, 8, 49),  # split rows at 2+ threads, two K blocks
        (mr + 5, 19, 3, nr),                       # boundaries on panel edges
        (17, 33, 4, 2 * nr + 5),
        (mr, 11, blk["nc"] // 97 + 2, 97),         # past the NC block
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for M, K, S, L in cases:
            a = _rand(M, K, dtype=dtype)
            # B with padded strides: rows K + 2 apart per segment, columns L + 3 apart per row.
            b = _rand(S, K + 2, L + 3, dtype=dtype, seed=1)[:, 1:1 + K, 2:2 + L]
            c0 = _rand(S, M + 1, L + 4, dtype=dtype, seed=2)[:, :M, 1:1 + L]
            ref = torch.einsum("mk,skl->sml", a.double(), b.double())
            eps = torch.finfo(dtype).eps
            tol = dict(atol=16 * eps * max(1, K) ** 0.5 * 4, rtol=32 * eps)
            what = f"column segments M={M} K={K} S={S} L={L} threads={threads} {dtype}"
            for accumulate in (False, True):
                c = c0.clone()
                out = ops.gemm_column_segments(a, b, c, accumulate=accumulate)
                assert out is c
                assert_close(out, ref + (c0.double() if accumulate else 0), **tol,
                             what=f"{what} accumulate={accumulate}")
            scale, shift = _rand(M, dtype=dtype, seed=3), _rand(M, dtype=dtype, seed=4)
            out = ops.gemm_column_segments(a, b, c0.clone(), accumulate=True, scale=scale,
                                           shift=shift, relu=True)
            exp = ((ref + c0.double()) * scale.double()[:, None] + shift.double()[:, None])
            assert_close(out, exp.clamp_min(0), **tol, what=f"{what} per-row epilogue")
            col_shift = _rand(S * L, dtype=dtype, seed=5)
            out = ops.gemm_column_segments(a, b, shift=col_shift, per_row=False)
            exp = ref + col_shift.double().reshape(S, 1, L)
            assert_close(out, exp, **tol, what=f"{what} per-column epilogue")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_one_a_block_over_many_panels(dtype, threads, isa):
    """Products of one A block (M <= MC, or more over a short K) over B wider than NC and K
    over two KC blocks: the threads' panel ranges end inside a tile row, the last panel is
    partial, and the second K block accumulates onto the first, with a per-row and a
    per-column epilogue. (A million outputs: the error's tail is wider than the other tests'
    bound, hence the slack.)"""
    blk = ops.gemm_blocking(dtype)
    n, k = blk["nc"] + 2 * blk["nr"] + 5, 3 * blk["kc"] // 2 + 9
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # The last: more rows than MC over a short K, still one A block (its bytes fit).
        for m, k in ((1, k), (blk["mr"] + 1, k), (blk["mc"], k),
                     (2 * blk["mc"] + 5, blk["kc"] // 4 + 3)):
            a, b = _rand(m, k, dtype=dtype), _rand(k, n, dtype=dtype, seed=1)
            _check(a, b, what="one A block", slack=3)
            _check(a, b, _rand(m, n, dtype=dtype, seed=2), accumulate=True,
                   shift=_rand(m, dtype=dtype, seed=3), relu=True, what="one A block, per row",
                   slack=3)
            scale = 1 + _rand(n, dtype=dtype, seed=4).clamp(-2, 2) / 4  # near 1: the tolerance
            _check(a, b, scale=scale, shift=_rand(n, dtype=dtype, seed=5),
                   per_row=False, what="one A block, per column", slack=3)
    finally:
        torch.set_num_threads(before)
