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

from ._device import helpers, unravel_pixel
from .geometry import GEMM_TILE, THREADS

BM, BN, BK, TM, TN = GEMM_TILE
COL_THREADS = BN // TN   # threads along a row of the tile (consecutive thread indices)
assert THREADS % BN == 0   # each thread stages one B column (gemm's column_of)
ROW_THREADS = BM // TM
#: Padding of A's shared rows: consecutive threads store A along the reduction (column mm,
#: rows kq), a stride of BM values, 8 of them on one bank without it.
PAD = 4
A_COLS = BM + PAD  # (shared shapes must be module constants)
STATS_VALUES = 3 * TM * THREADS  # (count, mean, M2) per accumulator row and thread
FORWARD, GRAD_INPUT, GRAD_WEIGHT = 0, 1, 2


def _loaders(dtype: str):
    """Per pass: (load_a, column_of, load_b). column_of(g, p) runs once per thread before the
    main loop (each thread stages the same B column at every stage: THREADS % BN == 0), so
    the forward's B loader pays no division per element: the pixel comes decomposed from
    column_of and the tap (c, r dh, s dw) from the taps table (fastconv.cuda.launch builds it
    per geometry). Integer division is a ~20-instruction subroutine on the GPU; the flat
    decompositions cost ~48 per 8-deep stage against 256 FMAs."""
    ZERO = helpers(dtype).ZERO

    @cuda.jit(device=True, inline="always")
    def weight_row(w2, g, grp, m, kk):         # forward A: w viewed as K x (Cg R S)
        return w2[grp * g.Kg + m, kk]

    @cuda.jit(device=True, inline="always")
    def output_pixel(g, p):                    # forward B's column: (n, ih0, iw0) of pixel p
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
    def flat_index(g, p):                      # the other passes decompose per element
        return p

    @cuda.jit(device=True, inline="always")
    def weight_column(w, g, grp, c, kk):       # grad-input A: w[grp Kg + k, c, r, s], kk=(k,r,s)
        rs = g.R * g.S
        return w[grp * g.Kg + kk // rs, c, (kk % rs) // g.S, kk % g.S]

    @cuda.jit(device=True, inline="always")
    def gathered_grad(gy, g, grp, kk, p, taps):  # grad-input B: gy at the tap's output, if any
        rs = g.R * g.S
        n, ih, iw = unravel_pixel(p, g.H, g.W)
        th = ih + g.pt - ((kk % rs) // g.S) * g.dh
        tw = iw + g.pl - (kk % g.S) * g.dw
        if th >= 0 and tw >= 0 and th % g.sh == 0 and tw % g.sw == 0:
            oh = th // g.sh
            ow = tw // g.sw
            if oh < g.OH and ow < g.OW:
                return gy[n, grp * g.Kg + kk // rs, oh, ow]
        return ZERO

    @cuda.jit(device=True, inline="always")
    def grad_row(gy, g, grp, m, kk):           # grad-weight A: gy[n, grp Kg + m, oh, ow], kk=pixel
        n, oh, ow = unravel_pixel(kk, g.OH, g.OW)
        return gy[n, grp * g.Kg + m, oh, ow]

    @cuda.jit(device=True, inline="always")
    def image_row(x, g, grp, kk, col, taps):   # grad-weight B: im2col(x)^T[pixel kk, col]
        n, ih0, iw0 = output_pixel(g, kk)
        return image_column(x, g, grp, col, (n, ih0, iw0), taps)

    return {FORWARD: (weight_row, output_pixel, image_column),
            GRAD_INPUT: (weight_column, flat_index, gathered_grad),
            GRAD_WEIGHT: (grad_row, flat_index, image_row)}


@functools.lru_cache(maxsize=None)
def kernel(dtype: str, kind: int):
    """The implicit-GEMM kernel of one pass (FORWARD, GRAD_INPUT, GRAD_WEIGHT) and type."""
    T = np.dtype(dtype)
    h = helpers(dtype)
    activate, welford, chan, ZERO = h.activate, h.welford, h.chan, h.ZERO
    load_a, column_of, load_b = _loaders(dtype)[kind]

    @cuda.jit
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
        column = column_of(g, n0 + nn)
        column_inside = n0 + nn < columns

        # Loop over the reduction: stage BK x BM of A and BK x BN of B, then rank-1 updates.
        for k0 in range(k_begin, k_end, BK):
            for e in range(t, BM * BK, THREADS):   # A: consecutive threads along the reduction
                mm = e // BK
                kq = e % BK
                v = ZERO
                if m0 + mm < M and k0 + kq < k_end:
                    v = load_a(a_src, g, grp, m0 + mm, k0 + kq)
                sa[kq, mm] = v
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

        if kind == FORWARD:
            # The TN output pixels of this thread, decomposed once (not once per row).
            out_n = cuda.local.array(TN, dtype=np.int64)
            out_h = cuda.local.array(TN, dtype=np.int64)
            out_w = cuda.local.array(TN, dtype=np.int64)
            for j in range(TN):
                out_n[j], out_h[j], out_w[j] = unravel_pixel(n0 + tc + j * COL_THREADS,
                                                             g.OH, g.OW)
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
                            n, ih, iw = unravel_pixel(p, g.H, g.W)
                            out[n, grp * g.Cg + c, ih, iw] = acc[i, j]
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
