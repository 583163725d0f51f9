"""Batch-norm kernels of the fused Conv-BN-activation in training, built per float type:

* channel_stats: per-block (count, mean, M2) of each channel of z, for forwards whose kernel
  does not gather them in its epilogue (the depthwise forward_rows);
* finalize: merges the forward's per-block (count, mean, M2) into each channel's mean and
  1 / sqrt(biased variance + eps) (one block per channel);
* normalize: y = act((z - mean) invstd gamma + beta), one thread per value;
* grad_sums: per channel, sum g and sum g xhat, g = grad_y through the activation and
  xhat = (z - mean) invstd (blocks over (channel, slice of pixels), one atomic add per block);
* grad_z: gamma invstd (g - sum g / count - xhat sum(g xhat) / count).
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda

from ._device import advance_pixel, helpers, pixel_step, unravel_nchw, unravel_pixel
from .geometry import THREADS

TRIPLES = 3 * THREADS  # shared values of one block's merges (shapes must be literals)
PAIRS = 2 * THREADS


@functools.lru_cache(maxsize=None)
def kernels(dtype: str) -> SimpleNamespace:
    T = np.dtype(dtype)
    h = helpers(dtype)
    ZERO, ONE = h.ZERO, h.ONE
    chan, merge_lanes, sum_lanes, welford = h.chan, h.merge_lanes, h.sum_lanes, h.welford
    activate, activation_passes = h.activate, h.activation_passes

    @cuda.jit
    def channel_stats(z, partials, pixels_per_block):
        """partials[j, k] = (count, mean, M2) of z[:, k] over slice j of the N x OH x OW
        pixels (grid: channels x slices)."""
        sm = cuda.shared.array(TRIPLES, dtype=T)
        N, K, OH, OW = z.shape
        t = cuda.threadIdx.x
        k = cuda.blockIdx.x
        begin = cuda.blockIdx.y * pixels_per_block
        end = min(begin + pixels_per_block, N * OH * OW)
        cnt = ZERO
        mean = ZERO
        m2 = ZERO
        step_n, step_h, step_w = pixel_step(THREADS, OH, OW)
        p = begin + t
        n, oh, ow = unravel_pixel(p, OH, OW)
        while p < end:
            cnt, mean, m2 = welford(cnt, mean, m2, z[n, k, oh, ow])
            p += THREADS
            n, oh, ow = advance_pixel(n, oh, ow, step_n, step_h, step_w, OH, OW)
        cnt, mean, m2 = merge_lanes(sm, t, THREADS, cnt, mean, m2)
        if t == 0:
            partials[cuda.blockIdx.y, k, 0] = cnt
            partials[cuda.blockIdx.y, k, 1] = mean
            partials[cuda.blockIdx.y, k, 2] = m2

    @cuda.jit
    def finalize(partials, slots, eps, mean_out, invstd_out):
        sm = cuda.shared.array(TRIPLES, dtype=T)
        t = cuda.threadIdx.x
        k = cuda.blockIdx.x
        n = ZERO
        mean = ZERO
        m2 = ZERO
        for s in range(t, slots, THREADS):
            n, mean, m2 = chan(n, mean, m2, partials[s, k, 0], partials[s, k, 1],
                                 partials[s, k, 2])
        n, mean, m2 = merge_lanes(sm, t, THREADS, n, mean, m2)
        if t == 0:
            mean_out[k] = mean
            var = m2 / n if n > ZERO else ZERO
            invstd_out[k] = ONE / math.sqrt(var + eps)

    @cuda.jit
    def normalize(z, mean, invstd, gamma, beta, y, has_gamma, has_beta, act):
        N, K, OH, OW = z.shape
        i = cuda.grid(1)
        if i >= N * K * OH * OW:
            return
        n, k, oh, ow = unravel_nchw(i, K, OH, OW)
        scale = invstd[k] * (gamma[k] if has_gamma else ONE)
        v = (z[n, k, oh, ow] - mean[k]) * scale + (beta[k] if has_beta else ZERO)
        y[n, k, oh, ow] = activate(v, act)

    @cuda.jit
    def grad_sums(grad_y, y, z, mean, invstd, act, sums, pixels_per_block):
        """sums[0, k] += sum of g, sums[1, k] += sum of g xhat over this block's pixels."""
        sm = cuda.shared.array(PAIRS, dtype=T)
        N, K, OH, OW = z.shape
        t = cuda.threadIdx.x
        k = cuda.blockIdx.x
        pixels = N * OH * OW
        begin = cuda.blockIdx.y * pixels_per_block
        end = min(begin + pixels_per_block, pixels)
        sg = ZERO
        sgx = ZERO
        step_n, step_h, step_w = pixel_step(THREADS, OH, OW)
        p = begin + t
        n, oh, ow = unravel_pixel(p, OH, OW)
        while p < end:
            if activation_passes(y[n, k, oh, ow], act):
                g = grad_y[n, k, oh, ow]
                sg += g
                sgx += g * (z[n, k, oh, ow] - mean[k]) * invstd[k]
            p += THREADS
            n, oh, ow = advance_pixel(n, oh, ow, step_n, step_h, step_w, OH, OW)
        sg, sgx = sum_lanes(sm, t, THREADS, sg, sgx)
        if t == 0:
            cuda.atomic.add(sums, (0, k), sg)
            cuda.atomic.add(sums, (1, k), sgx)

    @cuda.jit
    def grad_z(grad_y, y, z, mean, invstd, gamma, has_gamma, act, sums, count, out):
        N, K, OH, OW = z.shape
        i = cuda.grid(1)
        if i >= N * K * OH * OW:
            return
        n, k, oh, ow = unravel_nchw(i, K, OH, OW)
        g = grad_y[n, k, oh, ow] if activation_passes(y[n, k, oh, ow], act) else ZERO
        xhat = (z[n, k, oh, ow] - mean[k]) * invstd[k]
        scale = invstd[k] * (gamma[k] if has_gamma else ONE)
        out[n, k, oh, ow] = scale * (g - sums[0, k] / count - xhat * (sums[1, k] / count))

    return SimpleNamespace(channel_stats=channel_stats, finalize=finalize, normalize=normalize,
                           grad_sums=grad_sums, grad_z=grad_z)
