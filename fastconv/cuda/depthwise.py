"""Depthwise convolution kernels (groups == in_channels, any multiplier, stride, padding and
dilation), NCHW, built per float type.

Most launches run kernels generated per filter shape, stride and dilation (their Python
source written here, every tap unrolled, then compiled by numba): weights, sums and loaded
values are named scalars, so they live in registers, and every load is independent of the
others, so many are in flight per thread. The launch geometry is in fastconv.cuda.geometry.

* forward (forward_rows, DepthwiseRows): a thread computes up to 4 outputs of one column,
  loading each input value once for all of them (3x3: 18 loads for 4 outputs). Training
  gathers the batch statistics in a pass of its own (batchnorm.channel_stats).
* grad-input: at stride 1 without a multiplier, forward_rows on grad_output with the filter
  turned; otherwise grad_input_rows (DepthwiseGradRows): a thread computes whole stride
  phases (rows x sw input pixels), so each pixel's taps are fixed when the kernel is built.
* grad-weight (3x3 and smaller: grad_weight_rows): a block per (channel, slice of the
  batch), each thread summing every tap in registers, one tree reduction, one atomic add per
  weight and block.

Filters the generated kernels do not take (over 25 taps forward, over 9 backward) run the
shared-memory kernels of ``kernels``: a tiled forward that stages halos in shared memory
(DepthwiseTile) and gathers statistics in its epilogue, a gather per input pixel for
grad-input, and a grad-weight summing taps in shared-memory slots.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
from numba import cuda, uint64

from ._device import (advance_pixel, divmod_nonnegative, helpers, pixel_step,
                      unravel_nchw, unravel_pixel)
from ._runtime import simulated
from .geometry import REGISTER_WEIGHTS, THREADS, DepthwiseGradRows, DepthwiseRows

U1 = np.uint64(1)
U_THREADS = np.uint64(THREADS)

#: Register budget of the float32 depthwise kernels: 64 lets 8 blocks of 128 threads share
#: an SM's 64K registers (tests/test_cuda_ptx.py holds them to it; sm_90, ptxas 13.0:
#: forward 64, grad-input 46, grad-weight 63). grad-weight unravels each pixel: stepping them
#: (advance_pixel, as batchnorm's grad-sums does) took 69 registers, and spilled at 64.
MAX_REGISTERS = 64


@functools.lru_cache(maxsize=None)
def kernels(dtype: str) -> SimpleNamespace:
    T = np.dtype(dtype)
    h = helpers(dtype)
    activate, welford, merge_lanes = h.activate, h.welford, h.merge_lanes
    ZERO = h.ZERO

    @cuda.jit
    def forward(x, w, bias, y, partials, g, tile, has_bias, with_stats):
        """y = act(depthwise(x, w) + bias); with_stats: partials[slot, k] = (count, mean,
        M2) of this block's outputs (one plane per block then)."""
        sm = cuda.shared.array(0, dtype=T)
        t = cuda.threadIdx.x
        per_plane = THREADS // tile.planes
        pz = t // per_plane
        tx = t % tile.tile_w
        ty = (t % per_plane) // tile.tile_w
        tile_h = tile.thread_rows * tile.rows
        tw_index = cuda.blockIdx.y % tile.tiles_w   # x: groups of planes, y: tiles
        th_index = cuda.blockIdx.y // tile.tiles_w
        oh0 = th_index * tile_h
        ow0 = tw_index * tile.tile_w
        ih0 = oh0 * g.sh - g.pt
        iw0 = ow0 * g.sw - g.pl
        planes_total = g.N * g.K
        first_plane = cuda.blockIdx.x * tile.planes
        in_hw = tile.in_h * tile.in_w
        taps = g.R * g.S
        w_base = tile.planes * in_hw

        # Stage the halos (zeros outside the image: the padding) and the weights. Threads map
        # to (row, column) once: no element pays an integer division (a ~20-instruction
        # subroutine on the GPU; a flat index cost four per element).
        halo_rows = THREADS // tile.in_w               # rows staged side by side (in_w <=
        first_row = t // tile.in_w                      # THREADS: depthwise_tile)
        hc = t % tile.in_w
        iw = iw0 + hc
        col_inside = 0 <= iw < g.W
        if first_row >= halo_rows:                      # threads past the last whole row
            first_row = tile.in_h
        for q in range(tile.planes):
            p = first_plane + q
            if p < planes_total:
                src_n = p // g.K
                src_c = (p % g.K) // g.Kg
                for hr in range(first_row, tile.in_h, halo_rows):
                    ih = ih0 + hr
                    v = ZERO
                    if col_inside and 0 <= ih < g.H:
                        v = x[src_n, src_c, ih, iw]
                    sm[q * in_hw + hr * tile.in_w + hc] = v
        for i in range(t, tile.planes * taps, THREADS):
            p = first_plane + i // taps
            v = ZERO
            if p < planes_total:
                tap = i % taps
                v = w[p % g.K, 0, tap // g.S, tap % g.S]
            sm[w_base + i] = v
        cuda.syncthreads()

        plane = first_plane + pz
        n_img = plane // g.K
        k = plane % g.K
        cnt = ZERO
        mean = ZERO
        m2 = ZERO
        if plane < planes_total and ow0 + tx < g.OW:
            b = bias[k] if has_bias else ZERO
            wk = w_base + pz * taps
            # The tap loop was integer-bound (H100, ncu: SM 80 % busy, DRAM 6 %) on 64-bit
            # index products and numba's negative-index wraparound: offsets here advance by
            # addition, unsigned (uint64 throughout: numba types uint64 + int as float64).
            filter_row_step = uint64(g.dh * tile.in_w)
            out_row_step = uint64(tile.thread_rows * g.sh * tile.in_w)
            tap_step = uint64(g.dw)
            src_row = uint64(pz * in_hw + ty * g.sh * tile.in_w + tx * g.sw)
            for i in range(tile.rows):
                oh = oh0 + ty + i * tile.thread_rows
                if oh < g.OH:
                    acc = b
                    src = src_row
                    wq = uint64(wk)
                    for r in range(g.R):
                        q = src
                        for s in range(g.S):
                            acc += sm[q] * sm[wq]
                            q += tap_step
                            wq += U1
                        src += filter_row_step
                    acc = activate(acc, g.act)
                    y[n_img, k, oh, ow0 + tx] = acc
                    if with_stats:
                        cnt, mean, m2 = welford(cnt, mean, m2, acc)
                src_row += out_row_step
        if with_stats:  # one plane per block: the whole block is one channel
            cnt, mean, m2 = merge_lanes(sm, t, THREADS, cnt, mean, m2)
            if t == 0 and plane < planes_total:
                slot = n_img * (tile.tiles_w * tile.tiles_h) + cuda.blockIdx.y
                partials[slot, k, 0] = cnt
                partials[slot, k, 1] = mean
                partials[slot, k, 2] = m2

    @cuda.jit
    def grad_input(gy, w, gx, g):
        """gx[n, c, ih, iw] = sum over the multiplier m and the taps (r, s) whose output
        (ih + pt - r) / sh, (iw + pl - s) / sw is whole and inside the map of
        gy[n, c M + m, oh, ow] w[c M + m, 0, r, s]. Undilated filters (grad_input_dilated
        takes the others)."""
        i = cuda.grid(1)
        if i >= g.N * g.C * g.H * g.W:
            return
        n_img, c, ih, iw = unravel_nchw(i, g.C, g.H, g.W)
        # The taps of this pixel's stride phase only: r = r0, r0 + sh, ... reach outputs oh0,
        # oh0 - 1, ... (likewise s, ow). Two divisions per pixel, none at stride 1; testing
        # each tap's phase cost two per tap (integer division is a ~20-instruction subroutine
        # here, and this kernel is all index arithmetic).
        oh0, r0 = divmod_nonnegative(ih + g.pt, g.sh)
        ow0, s0 = divmod_nonnegative(iw + g.pl, g.sw)
        acc = ZERO
        for m in range(g.Kg):
            k = c * g.Kg + m
            oh = oh0
            r = r0
            while r < g.R:   # not range(r0, R, sh): numba divides for a stepped range's length
                if 0 <= oh < g.OH:
                    ow = ow0
                    s = s0
                    while s < g.S:
                        if 0 <= ow < g.OW:
                            acc += gy[n_img, k, oh, ow] * w[k, 0, r, s]
                        ow -= 1
                        s += g.sw
                oh -= 1
                r += g.sh
        gx[n_img, c, ih, iw] = acc

    @cuda.jit
    def grad_input_dilated(gy, w, gx, g):
        """grad_input for any dilation: a tap's stride phase depends on r dh mod sh, so each
        tap is tested (one division each, none at stride 1)."""
        i = cuda.grid(1)
        if i >= g.N * g.C * g.H * g.W:
            return
        n_img, c, ih, iw = unravel_nchw(i, g.C, g.H, g.W)
        acc = ZERO
        for m in range(g.Kg):
            k = c * g.Kg + m
            for r in range(g.R):
                th = ih + g.pt - r * g.dh
                oh = th if g.sh == 1 else th // g.sh
                if th >= 0 and oh * g.sh == th and oh < g.OH:
                    for s in range(g.S):
                        tw = iw + g.pl - s * g.dw
                        ow = tw if g.sw == 1 else tw // g.sw
                        if tw >= 0 and ow * g.sw == tw and ow < g.OW:
                            acc += gy[n_img, k, oh, ow] * w[k, 0, r, s]
        gx[n_img, c, ih, iw] = acc

    @cuda.jit
    def grad_weight(gy, x, gw, g, pixels_per_block, rows_per_pass):
        """gw[k, 0, r, s] += the sum over this block's slice of the (n, oh, ow) pixels of
        gy[n, k, oh, ow] x[n, k / M, oh sh - pt + r dh, ow sw - pl + s dw] (gw zeroed).
        Each thread sums the taps of ``rows_per_pass`` filter rows in its own shared-memory
        slots (one gy load per pixel serves them all), then one tree reduction serves every
        tap: log2(THREADS) barriers per pass, not per tap."""
        sm = cuda.shared.array(0, dtype=T)
        t = cuda.threadIdx.x
        k = cuda.blockIdx.x
        c = k // g.Kg
        pixels = g.N * g.OH * g.OW
        begin = cuda.blockIdx.y * pixels_per_block
        end = min(begin + pixels_per_block, pixels)
        for r0 in range(0, g.R, rows_per_pass):
            r1 = min(g.R, r0 + rows_per_pass)
            count = (r1 - r0) * g.S
            for q in range(count):
                sm[q * THREADS + t] = ZERO
            for p in range(begin + t, end, THREADS):
                n_img, oh, ow = unravel_pixel(p, g.OH, g.OW)
                grad = gy[n_img, k, oh, ow]
                ih = oh * g.sh - g.pt + r0 * g.dh
                iw0 = ow * g.sw - g.pl
                q = uint64(t)   # unsigned indices: no negative-index wraparound code
                for r in range(r0, r1):
                    if 0 <= ih < g.H:
                        iw = iw0
                        for s in range(g.S):
                            if 0 <= iw < g.W:
                                sm[q] += grad * x[n_img, c, uint64(ih), uint64(iw)]
                            iw += g.dw
                            q += U_THREADS
                    else:
                        q += uint64(g.S * THREADS)
                    ih += g.dh
            half = THREADS // 2
            while half > 0:
                cuda.syncthreads()
                if t < half:
                    for q in range(count):
                        sm[q * THREADS + t] += sm[q * THREADS + t + half]
                half //= 2
            cuda.syncthreads()
            if t < count:
                tap = r0 * g.S + t
                cuda.atomic.add(gw, (k, 0, tap // g.S, tap % g.S), sm[t * THREADS])
            cuda.syncthreads()

    return SimpleNamespace(forward=forward, grad_input=grad_input,
                           grad_input_dilated=grad_input_dilated, grad_weight=grad_weight)


def _input_row(spec, j: int, indent: str) -> list:
    """Source lines loading input row ih0 + j of a thread's columns into v0, v1, ...: zero
    where the row or a column (c0, c1, ... computed before) lies in the padding."""
    return [f"{indent}ih = ih0 + {j}",
            f"{indent}inside = 0 <= ih < g.H",
            f"{indent}p = x0 + ih * g.W"] + [
        f"{indent}v{c} = x[uint64(p + {c * spec.dw})] if inside and c{c} else ZERO"
        for c in range(spec.S)]


def _weights(R: int, S: int, at, indent: str) -> list:
    """Source lines loading the filter of channel k (from w[wk]) into w{r}_{c}: tap (r, c)
    at w[wk + at(r, c)]."""
    return [f"{indent}w{r}_{c} = w[wk + {at(r, c)}]" for r in range(R) for c in range(S)]


def _jit_generated(dtype: str, source: str, spec, namespace: dict):
    """The numba kernel of a generated ``source`` (its one function, names resolved in
    ``namespace``), float32 ones capped at MAX_REGISTERS (uncapped, 5x5 forwards took 80-84
    registers on sm_90; at 64 none spills; the simulator has no such option)."""
    name = source[len("def "):source.index("(")]
    exec(compile(source, f"<depthwise {name} {tuple(spec)}>", "exec"), namespace)
    capped = dtype == "float32" and not simulated()
    return cuda.jit(**({"max_registers": MAX_REGISTERS} if capped else {}))(namespace[name])


def forward_rows_source(spec: DepthwiseRows) -> str:
    """The Python source of the forward kernel for ``spec`` (a DepthwiseRows), every tap and
    output row unrolled, so that weights, accumulators and loaded values are named scalars
    (registers); numba compiles it per spec. For 3x3, stride 1, 2 rows it reads::

        ...
        w0_0 = w[wk + 0]  ... w2_2 = w[wk + 8]
        a0 = a1 = bias
        c0 = 0 <= iw0 + 0 < g.W  ... c2          # columns inside the map
        ih = ih0 + 0; inside = 0 <= ih < g.H; p = x0 + ih * g.W
        v0 = x[uint64(p + 0)] if inside and c0 else ZERO  ... v2
        a0 += v0 * w0_0  ... a0 += v2 * w0_2     # input row 0: filter row 0 of output row 0
        ih = ih0 + 1; ...
        a0 += v0 * w1_0 ... a1 += v0 * w0_0 ...   # input row 1 serves both output rows
        ...

    The arrays are flat (x: N C H W, w: K R S, y: N K OH OW); indices are computed signed
    and cast to uint64 at the load, which numba then does not wrap."""
    R, S, V = spec.R, spec.S, spec.rows
    lines = [
        "def forward_rows(x, w, bias, y, g, has_bias):",
        "    i = cuda.grid(1)",
        f"    row_blocks = (g.OH + {V - 1}) // {V}",
        "    if i >= g.N * g.K * row_blocks * g.OW:",
        "        return",
        "    ow = i % g.OW",
        "    rest = i // g.OW",
        f"    oh0 = (rest % row_blocks) * {V}",
        "    plane = rest // row_blocks",
        "    k = plane % g.K",
        f"    ih0 = oh0 * {spec.sh} - g.pt",
        f"    iw0 = ow * {spec.sw} - g.pl",
        "    x0 = ((plane // g.K) * g.C + k // g.Kg) * g.H * g.W + iw0",
        f"    wk = k * {R * S}",
    ]
    def at(r, c):   # the filter's tap (r, c) in w
        return (R * S - 1 - r * S - c) if spec.turned else r * S + c

    if R * S <= REGISTER_WEIGHTS:
        lines += _weights(R, S, at, "    ")
        weight = "w{r}_{c}".format
    else:   # read where used (the same address across a warp: one cached load each)
        weight = "w[wk + {i}]".format
    lines.append("    b = bias[k] if has_bias else ZERO")
    lines += [f"    a{v} = b" for v in range(V)]
    lines += [f"    c{c} = 0 <= iw0 + {c * spec.dw} < g.W" for c in range(S)]
    for j in range(spec.in_rows):
        taps = spec.taps(j)
        if not taps:   # a row between dilated taps: no output reads it
            continue
        lines += _input_row(spec, j, "    ")
        lines += [f"    a{v} += v{c} * {weight(r=r, c=c, i=at(r, c))}" for v, r in taps
                  for c in range(S)]
    lines.append("    out = (plane * g.OH + oh0) * g.OW + ow")
    for v in range(V):
        lines += [f"    if oh0 + {v} < g.OH:",
                  f"        y[uint64(out + {v} * g.OW)] = activate(a{v}, g.act)"]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def forward_rows(dtype: str, spec: DepthwiseRows):
    """The forward kernel for one DepthwiseRows spec (compiled at its first launch):
    ``forward_rows(x, w, bias, y, g, has_bias)``, x, w and y flat, one thread per ``rows``
    outputs of a column (THREADS per block, as many blocks as that takes)."""
    h = helpers(dtype)
    namespace = {"cuda": cuda, "uint64": uint64, "ZERO": h.ZERO, "activate": h.activate}
    return _jit_generated(dtype, forward_rows_source(spec), spec, namespace)


def grad_weight_rows_source(spec: DepthwiseRows) -> str:
    """The Python source of the grad-weight kernel for ``spec``, unrolled as
    forward_rows_source's: a block per (channel k, slice of the items n, row block, column),
    each thread summing all R x S taps in registers (s{r}_{c} += e{v} * v{c}: e the
    ``rows`` grad_output values of its item, v each input value loaded once), then one tree
    reduction in shared memory for every tap and one atomic add per weight and block. Items
    advance by THREADS with carries (advance_pixel), not divisions."""
    R, S, V = spec.R, spec.S, spec.rows
    taps = [(r, c) for r in range(R) for c in range(S)]
    lines = [
        "def grad_weight_rows(gy, x, gw, g, items_per_block):",
        "    sm = cuda.shared.array(0, dtype=T)",
        "    t = cuda.threadIdx.x",
        "    k = cuda.blockIdx.x",
        "    ck = k // g.Kg",
        f"    row_blocks = (g.OH + {V - 1}) // {V}",
        "    begin = cuda.blockIdx.y * items_per_block + t",
        "    end = min(cuda.blockIdx.y * items_per_block + items_per_block,"
        " g.N * row_blocks * g.OW)",
        "    n, rb, ow = unravel_pixel(begin, row_blocks, g.OW)",
        "    dn, drb, dow = pixel_step(THREADS, row_blocks, g.OW)",
    ]
    lines += [f"    s{r}_{c} = ZERO" for r, c in taps]
    lines += [
        "    for i in range(begin, end, THREADS):",
        f"        oh0 = rb * {V}",
        f"        ih0 = oh0 * {spec.sh} - g.pt",
        f"        iw0 = ow * {spec.sw} - g.pl",
        "        x0 = (n * g.C + ck) * g.H * g.W + iw0",
        "        y0 = ((n * g.K + k) * g.OH + oh0) * g.OW + ow",
    ]
    lines += [f"        e{v} = gy[uint64(y0 + {v} * g.OW)] if oh0 + {v} < g.OH else ZERO"
              for v in range(V)]
    lines += [f"        c{c} = 0 <= iw0 + {c * spec.dw} < g.W" for c in range(S)]
    for j in range(spec.in_rows):
        row_taps = spec.taps(j)
        if not row_taps:
            continue
        lines += _input_row(spec, j, "        ")
        lines += [f"        s{r}_{c} += e{v} * v{c}" for v, r in row_taps for c in range(S)]
    lines.append("        n, rb, ow = advance_pixel(n, rb, ow, dn, drb, dow, row_blocks, g.OW)")
    lines += [f"    sm[{i} * THREADS + t] = s{r}_{c}" for i, (r, c) in enumerate(taps)]
    lines += [
        "    half = THREADS // 2",
        "    while half > 0:",
        "        cuda.syncthreads()",
        "        if t < half:",
        f"            for q in range({R * S}):",
        "                sm[q * THREADS + t] += sm[q * THREADS + t + half]",
        "        half //= 2",
        "    cuda.syncthreads()",
        f"    if t < {R * S}:",
        f"        cuda.atomic.add(gw, k * {R * S} + t, sm[t * THREADS])",
    ]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def grad_weight_rows(dtype: str, spec: DepthwiseRows):
    """The grad-weight kernel for one DepthwiseRows spec: ``grad_weight_rows(gy, x, gw, g,
    items_per_block)``, all flat, gw zeroed; grid (K, slices), THREADS per block, R S THREADS
    values of shared memory."""
    h = helpers(dtype)
    namespace = {"cuda": cuda, "uint64": uint64, "ZERO": h.ZERO, "T": np.dtype(dtype),
                 "THREADS": THREADS, "unravel_pixel": unravel_pixel,
                 "pixel_step": pixel_step, "advance_pixel": advance_pixel}
    return _jit_generated(dtype, grad_weight_rows_source(spec), spec, namespace)


def grad_input_rows_source(spec: DepthwiseGradRows) -> str:
    """The Python source of the grad-input kernel for ``spec`` (a DepthwiseGradRows): thread
    i computes input pixels (rb rows + a, cb sw + b), a < rows, b < sw, of one (n, c) plane:
    for each channel k = c Kg + m of the multiplier, it loads the grad_output values its taps
    reach (at compile-time offsets from (rb rows / sh + pt // sh, cb + pl // sw)) once, then
    adds each to the pixels it reaches through the taps of their stride phase. No divisions
    but the thread's unravelling."""
    R, S, V, sw = spec.R, spec.S, spec.rows, spec.sw
    loads = spec.loads
    name = {ij: f"e{n}" for n, ij in enumerate(loads)}
    rows = sorted({i for i, _ in loads})
    cols = sorted({j for _, j in loads})
    lines = [
        "def grad_input_rows(gy, w, gx, g):",
        "    i = cuda.grid(1)",
        f"    row_blocks = (g.H + {V - 1}) // {V}",
        f"    col_blocks = (g.W + {sw - 1}) // {sw}",
        "    if i >= g.N * g.C * row_blocks * col_blocks:",
        "        return",
        "    cb = i % col_blocks",
        "    rest = i // col_blocks",
        "    rb = rest % row_blocks",
        "    plane = rest // row_blocks",
        "    n = plane // g.C",
        "    c = plane % g.C",
        f"    oh0 = rb * {V // spec.sh} + g.pt // {spec.sh}",
        f"    ow0 = cb + g.pl // {sw}",
    ]
    lines += [f"    r{i - rows[0]} = 0 <= oh0 + {i} < g.OH" for i in rows]
    lines += [f"    q{j - cols[0]} = 0 <= ow0 + {j} < g.OW" for j in cols]
    lines += [f"    a{a}_{b} = ZERO" for a in range(V) for b in range(sw)]
    lines += [
        "    for m in range(g.Kg):",
        "        k = c * g.Kg + m",
        "        y0 = (n * g.K + k) * g.OH * g.OW + oh0 * g.OW + ow0",
        f"        wk = k * {R * S}",
    ]
    lines += _weights(R, S, lambda r, c: r * S + c, "        ")   # (R S <= REGISTER_WEIGHTS)
    lines += [f"        {name[i, j]} = gy[uint64(y0 + {i} * g.OW + {j})]"
              f" if r{i - rows[0]} and q{j - cols[0]} else ZERO" for i, j in loads]
    for a in range(V):
        for b in range(sw):
            for r, i in spec.row_taps(a):
                for c, j in spec.col_taps(b):
                    lines.append(f"        a{a}_{b} += {name[i, j]} * w{r}_{c}")
    lines += [f"    ih0 = rb * {V}", f"    iw0 = cb * {sw}",
              "    x0 = plane * g.H * g.W + ih0 * g.W + iw0"]
    for a in range(V):
        for b in range(sw):
            lines += [f"    if ih0 + {a} < g.H and iw0 + {b} < g.W:",
                      f"        gx[uint64(x0 + {a} * g.W + {b})] = a{a}_{b}"]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=None)
def grad_input_rows(dtype: str, spec: DepthwiseGradRows):
    """The grad-input kernel for one DepthwiseGradRows spec: ``grad_input_rows(gy, w, gx,
    g)``, all flat, one thread per rows x sw input pixels."""
    h = helpers(dtype)
    namespace = {"cuda": cuda, "uint64": uint64, "ZERO": h.ZERO}
    return _jit_generated(dtype, grad_input_rows_source(spec), spec, namespace)
