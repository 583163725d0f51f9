"""Convolution as an implicit GEMM, for any groups, stride, padding and dilation: one tiled
kernel body (GemmTile: 64 x 64 outputs per block of 128 threads, 8 x 4 accumulators each,
the reduction staged 8 deep in shared memory), specialised per pass by the loaders it reads
its operands with and by its epilogue, as a C++ template would be.

========  =================  ====================  ===================  ==================
pass      rows (M)           columns               reduction            A / B
========  =================  ====================  ===================  ==================
forward   Kg out channels    N OH OW pixels        Cg R S               w / im2col(x)
grad-in   Cg in channels     N H W pixels          Kg R S               w^T / gathered gy
grad-w    Kg out channels    Cg R S taps           N OH OW (split)      gy / im2col(x)^T
========  =================  ====================  ===================  ==================

The grid's z runs over groups (and, for grad-weight, slices of the reduction whose partial
sums are added atomically into the zeroed output). The forward's epilogue adds the bias,
applies the fused activation, and for training reduces each channel's (count, mean, M2)
over the block's pixels into ``partials[pixel block, channel]``.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda

from ._device import divmod_nonnegative, helpers, unravel_pixel
from ._runtime import simulated
from .geometry import GEMM_TILE, THREADS

BM, BN, BK, TM, TN = GEMM_TILE
COL_THREADS = BN // TN   # threads along a row of the tile (consecutive thread indices)
assert THREADS % BN == 0 and THREADS % BK == 0   # one B column, one A reduction index each
ROW_THREADS = BM // TM
#: Padding of A's shared rows: consecutive threads store A along the reduction (column mm,
#: rows kq), a stride of BM values, 8 of them on one bank without it.
PAD = 4
A_COLS = BM + PAD  # (shared shapes must be module constants)
STATS_VALUES = 3 * TM * THREADS  # (count, mean, M2) per accumulator row and thread
FORWARD, GRAD_INPUT, GRAD_WEIGHT = 0, 1, 2
#: 168 registers (whole 256-register warp allocations) lets 3 blocks of 128 threads share an
#: SM's 64K; 170 allows 2. The float32 forward and grad-weight are capped there (ptxas 13.0:
#: 168 and 170 uncapped, no spills at 168); the grad-input (176) spills at 168 and runs
#: uncapped. tests/test_cuda_ptx.py compiles them with these caps.
MAX_REGISTERS_F32 = 168


def _loaders(dtype: str):
    """Per pass: (row_of, load_a, column_of, load_b). Each thread stages the same B column
    at every stage (THREADS % BN == 0) and the same A reduction offset (THREADS % BK == 0):
    column_of decomposes its column once before the main loop, row_of its A reduction index
    once per stage, and the taps (channel, r dh, s dw) of a reduction index come from the
    taps table (fastconv.cuda.launch._taps). So no loader divides per element but the
    grad-weight's B (a pixel per element).
    Integer division is a ~20-instruction subroutine on the GPU: the flat decompositions
    cost ~48 per 8-deep stage against 256 FMAs."""
    ZERO = helpers(dtype).ZERO

    @cuda.jit(device=True, inline="always")
    def weight_row(w2, g, grp, m, kk):         # forward A: w viewed as K x (Cg R S)
        return w2[grp * g.Kg + m, kk]

    @cuda.jit(device=True, inline="always")
    def output_pixel(g, p, taps):              # forward B's column: (n, ih0, iw0) of pixel p
        n, oh, ow = unravel_pixel(p, g.OH, g.OW)
        return n, oh * g.sh - g.pt, ow * g.sw - g.pl

    @cuda.jit(device=True, inline="always")
    def image_column(x, g, grp, kk, column, taps):   # forward B: im2col(x)[kk, column]
        n, ih0, iw0 = column
        ih = ih0 + taps[kk, 1]
        iw = iw0 + taps[kk, 2]
        if 0 <= ih < g.H and 0 <= iw < g.W:
            return x[n, grp * g.Cg + taps[kk, 0], ih, iw]
        return ZERO

    @cuda.jit(device=True, inline="always")
    def as_is(g, index, taps):                 # a row or column index taken as it is
        return index

    @cuda.jit(device=True, inline="always")
    def output_channel_tap(g, kk, taps):       # grad-input A's reduction index: (k, r S + s)
        k = taps[min(kk, taps.shape[0] - 1), 0]   # (past the end: a stage's padding)
        return k, kk - k * (g.R * g.S)

    @cuda.jit(device=True, inline="always")
    def weight_column(w3, g, grp, c, k_tap):   # grad-input A: w viewed as K x Cg x (R S)
        k, tap = k_tap
        return w3[grp * g.Kg + k, c, tap]

    @cuda.jit(device=True, inline="always")
    def input_pixel(g, p, taps):               # grad-input B's column: (n, ih + pt, iw + pl)
        n, ih, iw = unravel_pixel(p, g.H, g.W)
        return n, ih + g.pt, iw + g.pl

    @cuda.jit(device=True, inline="always")
    def gathered_grad(gy, g, grp, kk, column, taps):  # grad-input B: gy at the tap's output
        n, th0, tw0 = column                   # taps[kk] = (k, r dh, s dw) here
        th = th0 - taps[kk, 1]
        tw = tw0 - taps[kk, 2]
        if th >= 0 and tw >= 0:
            oh, rh = divmod_nonnegative(th, g.sh)
            ow, rw = divmod_nonnegative(tw, g.sw)
            if rh == 0 and rw == 0 and oh < g.OH and ow < g.OW:
                return gy[n, grp * g.Kg + taps[kk, 0], oh, ow]
        return ZERO

    @cuda.jit(device=True, inline="always")
    def grad_row(gy, g, grp, m, pixel):        # grad-weight A: gy[n, grp Kg + m, oh, ow]
        n, oh, ow = pixel
        return gy[n, grp * g.Kg + m, oh, ow]

    @cuda.jit(device=True, inline="always")
    def output_pixel_of(g, kk, taps):          # grad-weight A's reduction index: a pixel
        return unravel_pixel(kk, g.OH, g.OW)

    @cuda.jit(device=True, inline="always")
    def image_row(x, g, grp, kk, col, taps):   # grad-weight B: im2col(x)^T[pixel kk, col]
        n, ih0, iw0 = output_pixel(g, kk, taps)
        return image_column(x, g, grp, col, (n, ih0, iw0), taps)

    # (row_of, load_a, column_of, load_b)
    return {FORWARD: (as_is, weight_row, output_pixel, image_column),
            GRAD_INPUT: (output_channel_tap, weight_column, input_pixel, gathered_grad),
            GRAD_WEIGHT: (output_pixel_of, grad_row, as_is, image_row)}


@functools.lru_cache(maxsize=None)
def kernel(dtype: str, kind: int):
    """The implicit-GEMM kernel of one pass (FORWARD, GRAD_INPUT, GRAD_WEIGHT) and type."""
    T = np.dtype(dtype)
    h = helpers(dtype)
    activate, welford, chan, ZERO = h.activate, h.welford, h.chan, h.ZERO
    row_of, load_a, column_of, load_b = _loaders(dtype)[kind]

    capped = dtype == "float32" and kind != GRAD_INPUT and not simulated()  # (no such option)

    @cuda.jit(**({"max_registers": MAX_REGISTERS_F32} if capped else {}))
    def gemm(a_src, b_src, out, bias, partials, taps, g, M, columns, depth, depth_per_split,
             has_bias, with_stats):
        sa = cuda.shared.array((BK, A_COLS), dtype=T)
        sb = cuda.shared.array((BK, BN), dtype=T)
        ss = cuda.shared.array(STATS_VALUES, dtype=T)  # the statistics' merges
        t = cuda.threadIdx.x
        tc = t % COL_THREADS
        tr = t // COL_THREADS
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        grp = cuda.blockIdx.z % g.groups
        k_begin = (cuda.blockIdx.z // g.groups) * depth_per_split
        k_end = min(depth, k_begin + depth_per_split)

        acc = cuda.local.array((TM, TN), dtype=T)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = ZERO

        # This thread's B column: the same at every stage (THREADS is a multiple of BN).
        nn = t % BN
        a_kq = t % BK
        column = column_of(g, n0 + nn, taps)
        column_inside = n0 + nn < columns

        # Loop over the reduction: stage BK x BM of A and BK x BN of B, then rank-1 updates.
        for k0 in range(k_begin, k_end, BK):
            # A: consecutive threads along the reduction; a thread's reduction index is the
            # same for all its rows (THREADS % BK == 0), decomposed once (row_of) per stage.
            a_index = row_of(g, k0 + a_kq, taps)
            a_inside = k0 + a_kq < k_end
            for mm in range(t // BK, BM, THREADS // BK):
                v = ZERO
                if m0 + mm < M and a_inside:
                    v = load_a(a_src, g, grp, m0 + mm, a_index)
                sa[a_kq, mm] = v
            for kq in range(t // BN, BK, THREADS // BN):   # B: threads along the columns
                v = ZERO
                if column_inside and k0 + kq < k_end:
                    v = load_b(b_src, g, grp, k0 + kq, column, taps)
                sb[kq, nn] = v
            cuda.syncthreads()
            for kq in range(BK):
                for i in range(TM):
                    av = sa[kq, tr + i * ROW_THREADS]
                    for j in range(TN):
                        acc[i, j] += av * sb[kq, tc + j * COL_THREADS]
            cuda.syncthreads()

        # The TN output pixels of this thread, decomposed once (not once per row).
        out_n = cuda.local.array(TN, dtype=np.int64)
        out_h = cuda.local.array(TN, dtype=np.int64)
        out_w = cuda.local.array(TN, dtype=np.int64)
        if kind != GRAD_WEIGHT:
            map_h = g.OH if kind == FORWARD else g.H
            map_w = g.OW if kind == FORWARD else g.W
            for j in range(TN):
                out_n[j], out_h[j], out_w[j] = unravel_pixel(n0 + tc + j * COL_THREADS,
                                                             map_h, map_w)
        if kind == FORWARD:
            for i in range(TM):
                m = m0 + tr + i * ROW_THREADS
                k = grp * g.Kg + m
                cnt = ZERO
                mean = ZERO
                m2 = ZERO
                if m < M:
                    bk = bias[k] if has_bias else ZERO
                    for j in range(TN):
                        p = n0 + tc + j * COL_THREADS
                        if p < columns:
                            v = activate(acc[i, j] + bk, g.act)
                            out[out_n[j], k, out_h[j], out_w[j]] = v
                            if with_stats:
                                cnt, mean, m2 = welford(cnt, mean, m2, v)
                if with_stats:
                    o = 3 * (i * THREADS + t)
                    ss[o] = cnt
                    ss[o + 1] = mean
                    ss[o + 2] = m2
            if with_stats:
                # Merge each row's triples over its COL_THREADS consecutive threads, all TM
                # rows per step: log2(COL_THREADS) barriers in all.
                half = COL_THREADS // 2
                while half > 0:
                    cuda.syncthreads()
                    if tc < half:
                        for i in range(TM):
                            o = 3 * (i * THREADS + t)
                            q = o + 3 * half
                            n2, mean2, m22 = chan(ss[o], ss[o + 1], ss[o + 2],
                                                  ss[q], ss[q + 1], ss[q + 2])
                            ss[o] = n2
                            ss[o + 1] = mean2
                            ss[o + 2] = m22
                    half //= 2
                cuda.syncthreads()
                if tc == 0:
                    for i in range(TM):
                        m = m0 + tr + i * ROW_THREADS
                        if m < M:
                            o = 3 * (i * THREADS + t)
                            k = grp * g.Kg + m
                            partials[cuda.blockIdx.x, k, 0] = ss[o]
                            partials[cuda.blockIdx.x, k, 1] = ss[o + 1]
                            partials[cuda.blockIdx.x, k, 2] = ss[o + 2]
        elif kind == GRAD_INPUT:
            for i in range(TM):
                c = m0 + tr + i * ROW_THREADS
                if c < M:
                    for j in range(TN):
                        p = n0 + tc + j * COL_THREADS
                        if p < columns:
                            out[out_n[j], grp * g.Cg + c, out_h[j], out_w[j]] = acc[i, j]
        else:
            rs = g.R * g.S
            for i in range(TM):
                m = m0 + tr + i * ROW_THREADS
                if m < M:
                    for j in range(TN):
                        col = n0 + tc + j * COL_THREADS
                        if col < columns:
                            cuda.atomic.add(out, (grp * g.Kg + m, col // rs,
                                                  (col % rs) // g.S, col % g.S), acc[i, j])

    return gemm
