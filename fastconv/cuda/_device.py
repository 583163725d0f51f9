"""Device helpers shared by the kernels (inlined into each): the fused activation and the
per-channel statistics, merged with Chan's formula so that float32 suffices (no float64
instructions in the float32 kernels).

Statistics travel as (count, mean, M2), M2 being the sum of squared deviations from the mean:
a thread folds its values in one at a time (Welford), threads merge pairwise in shared memory,
and each block leaves one triple per channel in a ``partials`` array that
fastconv.cuda.batchnorm merges per channel. Sums of z and z^2 would cancel catastrophically in
float32 when the mean is large against the spread; these triples do not.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda

# Activation codes, as fastconv.backend.ACTIVATIONS.
ACT_RELU, ACT_RELU6 = 1, 2


@cuda.jit(device=True, inline="always")
def unravel_pixel(p, H, W):
    """(n, h, w) of flat pixel index p over N x H x W."""
    return p // (H * W), (p // W) % H, p % W


@cuda.jit(device=True, inline="always")
def pixel_step(step, OH, OW):
    """The (n, h, w) increments of advance_pixel for a flat pixel index growing by step."""
    return step // (OH * OW), (step // OW) % OH, step % OW


@cuda.jit(device=True, inline="always")
def advance_pixel(n, h, w, dn, dh, dw, OH, OW):
    """(n, h, w) of the flat pixel index step further (increments from pixel_step): a carry
    each way at most, as dw < OW and dh < OH. Loops over pixels strided by THREADS use it
    instead of unravel_pixel's four integer divisions per pixel (~20 instructions each)."""
    w += dw
    h += dh
    if w >= OW:
        w -= OW
        h += 1
    if h >= OH:
        h -= OH
        n += 1
    return n + dn, h, w


@cuda.jit(device=True, inline="always")
def divmod_nonnegative(a, b):
    """(a // b, a % b) for a >= 0, b >= 1, with no division where b == 1 (a stride of 1:
    the branch is uniform across a launch)."""
    if b == 1:
        return a, a - a
    q = a // b
    return q, a - q * b


@cuda.jit(device=True, inline="always")
def unravel_nchw(i, C, H, W):
    """(n, c, h, w) of flat index i over N x C x H x W."""
    return i // (C * H * W), (i // (H * W)) % C, (i // W) % H, i % W


@functools.lru_cache(maxsize=None)
def helpers(dtype: str) -> SimpleNamespace:
    """The helpers for one float type ('float32' or 'float64'). Built per type because numba
    promotes float32 mixed with an integer or Python float to float64: every constant here is
    a numpy scalar of the type."""
    ZERO, ONE, SIX = (np.dtype(dtype).type(v) for v in (0, 1, 6))

    @cuda.jit(device=True, inline="always")
    def activate(v, act):
        if act == ACT_RELU:
            return max(v, ZERO)
        if act == ACT_RELU6:
            return min(max(v, ZERO), SIX)
        return v

    @cuda.jit(device=True, inline="always")
    def activation_passes(y, act):
        """Whether the activation whose output is y passes the gradient (torch's rule)."""
        if act == ACT_RELU:
            return y > ZERO
        if act == ACT_RELU6:
            return y > ZERO and y < SIX
        return True

    @cuda.jit(device=True, inline="always")
    def welford(n, mean, m2, v):
        """(count, mean, M2) with v folded in."""
        n += ONE
        d = v - mean
        mean += d / n
        m2 += d * (v - mean)
        return n, mean, m2

    @cuda.jit(device=True, inline="always")
    def chan(na, ma, qa, nb, mb, qb):
        """The (count, mean, M2) of two disjoint sets from theirs (Chan et al.)."""
        n = na + nb
        if nb == ZERO:
            return na, ma, qa
        if na == ZERO:
            return nb, mb, qb
        d = mb - ma
        f = nb / n
        return n, ma + d * f, qa + qb + d * d * na * f

    @cuda.jit(device=True, inline="always")
    def merge_lanes(sm, t, lanes, n, mean, m2):
        """Merges the triples of each group of ``lanes`` consecutive threads (a power of two
        dividing the block) through shared memory ``sm`` (3 values per thread of the block);
        the group's first thread gets the result. Every thread of the block must call it."""
        cuda.syncthreads()
        sm[3 * t] = n
        sm[3 * t + 1] = mean
        sm[3 * t + 2] = m2
        lane = t % lanes
        half = lanes // 2
        while half > 0:
            cuda.syncthreads()
            if lane < half:
                o = 3 * (t + half)
                n, mean, m2 = chan(n, mean, m2, sm[o], sm[o + 1], sm[o + 2])
                sm[3 * t] = n
                sm[3 * t + 1] = mean
                sm[3 * t + 2] = m2
            half //= 2
        cuda.syncthreads()
        return n, mean, m2

    @cuda.jit(device=True, inline="always")
    def sum_lanes(sm, t, lanes, a, b):
        """Sums (a, b) over each group of ``lanes`` consecutive threads as merge_lanes does."""
        cuda.syncthreads()
        sm[2 * t] = a
        sm[2 * t + 1] = b
        lane = t % lanes
        half = lanes // 2
        while half > 0:
            cuda.syncthreads()
            if lane < half:
                a += sm[2 * (t + half)]
                b += sm[2 * (t + half) + 1]
                sm[2 * t] = a
                sm[2 * t + 1] = b
            half //= 2
        cuda.syncthreads()
        return a, b

    return SimpleNamespace(activate=activate, activation_passes=activation_passes,
                           welford=welford, chan=chan, merge_lanes=merge_lanes,
                           sum_lanes=sum_lanes, ZERO=ZERO, ONE=ONE)
