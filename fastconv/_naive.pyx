# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The ``naive`` strategy: convolution as its definition's plain loops, compiled with Cython.

It is the baseline the benchmarks measure every optimisation against: no blocking, no
packing, no vector code of its own (only what the C compiler finds), no workspace. The
outer loop over output channels (input channels for grad-input) is spread over threads with
OpenMP, so it is compared with the other strategies at the same thread count. Sums are
accumulated in float64: a float32 running sum over a large layer's 6,000+ pixels (grad-weight)
drifts by ~1e-4, and a baseline must be trusted before it is compared with.

Each entry point takes raw data pointers of dense tensors and a layout code per tensor
(0 NCHW, 1 NHWC), as the C++ kernel table does (fastconv.backend.CppKernels), and releases
the GIL. The forward reads padding as zeros, as the definition does (a NaN or Inf weight
makes every output it touches NaN, as in torch); the gradients sum only the products that
exist.
"""
from cython.parallel cimport prange
from libc.stdint cimport int64_t, uintptr_t

ctypedef fused real:
    float
    double

cdef enum:
    NHWC = 1
    ACT_RELU = 1
    ACT_RELU6 = 2


cdef struct Geom:
    # The problem (fastconv.Conv2dProblem's fields), per group counts added.
    int64_t N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pl, groups, Cg, Kg


cdef struct Strides:
    # Element strides of a dense (N, C, H, W) tensor in its layout.
    int64_t n, c, h, w


cdef Strides strides_of(int layout, int64_t C, int64_t H, int64_t W) noexcept nogil:
    cdef Strides s
    s.n = C * H * W
    if layout == NHWC:
        s.c, s.h, s.w = 1, W * C, C
    else:
        s.c, s.h, s.w = H * W, W, 1
    return s


cdef inline real activate(real v, int act) noexcept nogil:
    # NaN stays NaN: both comparisons are false for it.
    if act == ACT_RELU or act == ACT_RELU6:
        if v < 0:
            return 0
        if act == ACT_RELU6 and v > 6:
            return 6
    return v


cdef void forward_loops(real* x, int xl, real* w, real* b, real* y, int yl, int act,
                        double* stats, Geom g, int nt) noexcept nogil:
    cdef Strides xs = strides_of(xl, g.C, g.H, g.W), ys = strides_of(yl, g.K, g.OH, g.OW)
    cdef int64_t k, n, oh, ow, c, r, s, ih, iw, c0
    cdef double acc
    cdef real v
    for k in prange(g.K, nogil=True, num_threads=nt, schedule="dynamic"):
        c0 = (k // g.Kg) * g.Cg
        for n in range(g.N):
            for oh in range(g.OH):
                for ow in range(g.OW):
                    acc = 0
                    for c in range(g.Cg):
                        for r in range(g.R):
                            ih = oh * g.sh - g.pt + r * g.dh
                            for s in range(g.S):
                                iw = ow * g.sw - g.pl + s * g.dw
                                if ih < 0 or ih >= g.H or iw < 0 or iw >= g.W:
                                    v = 0  # padding: a zero times the tap (NaN * 0 is NaN)
                                else:
                                    v = x[n * xs.n + (c0 + c) * xs.c + ih * xs.h + iw * xs.w]
                                acc = acc + <double>v * w[((k * g.Cg + c) * g.R + r) * g.S + s]
                    if b != NULL:
                        acc = acc + b[k]
                    v = <real>acc
                    if stats != NULL:  # one thread owns channel k: no race
                        stats[k] += v
                        stats[g.K + k] += <double>v * v
                    y[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w] = activate(v, act)


cdef void grad_input_loops(real* gy, int gyl, real* w, real* gx, int gxl, Geom g,
                           int nt) noexcept nogil:
    # gx[n, c, ih, iw] = sum over (k, r, s) of the outputs (oh, ow) that read it.
    cdef Strides xs = strides_of(gxl, g.C, g.H, g.W), ys = strides_of(gyl, g.K, g.OH, g.OW)
    cdef int64_t nc, n, c, k, k0, ih, iw, r, s, th, tw, oh, ow
    cdef double acc
    for nc in prange(g.N * g.C, nogil=True, num_threads=nt, schedule="dynamic"):
        n = nc // g.C
        c = nc % g.C
        k0 = (c // g.Cg) * g.Kg
        for ih in range(g.H):
            for iw in range(g.W):
                acc = 0
                for k in range(k0, k0 + g.Kg):
                    for r in range(g.R):
                        th = ih + g.pt - r * g.dh
                        if th < 0 or th % g.sh != 0 or th // g.sh >= g.OH:
                            continue
                        oh = th // g.sh
                        for s in range(g.S):
                            tw = iw + g.pl - s * g.dw
                            if tw < 0 or tw % g.sw != 0 or tw // g.sw >= g.OW:
                                continue
                            ow = tw // g.sw
                            acc = acc + (<double>gy[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w]
                                         * w[((k * g.Cg + c % g.Cg) * g.R + r) * g.S + s])
                gx[n * xs.n + c * xs.c + ih * xs.h + iw * xs.w] = <real>acc


cdef void grad_weight_loops(real* gy, int gyl, real* x, int xl, real* gw, Geom g,
                            int nt) noexcept nogil:
    cdef Strides xs = strides_of(xl, g.C, g.H, g.W), ys = strides_of(gyl, g.K, g.OH, g.OW)
    cdef int64_t k, c, c0, r, s, n, oh, ow, ih, iw
    cdef double acc
    for k in prange(g.K, nogil=True, num_threads=nt, schedule="dynamic"):
        c0 = (k // g.Kg) * g.Cg
        for c in range(g.Cg):
            for r in range(g.R):
                for s in range(g.S):
                    acc = 0
                    for n in range(g.N):
                        for oh in range(g.OH):
                            ih = oh * g.sh - g.pt + r * g.dh
                            if ih < 0 or ih >= g.H:
                                continue
                            for ow in range(g.OW):
                                iw = ow * g.sw - g.pl + s * g.dw
                                if iw < 0 or iw >= g.W:
                                    continue
                                acc = acc + (<double>gy[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w]
                                             * x[n * xs.n + (c0 + c) * xs.c + ih * xs.h
                                                 + iw * xs.w])
                    gw[((k * g.Cg + c) * g.R + r) * g.S + s] = <real>acc


# Python entry points. `problem`: a fastconv.Conv2dProblem, read by field name; `f64` picks
# float64 over float32.

def forward(problem, bint f64, uintptr_t x, int xl, uintptr_t w, uintptr_t b, uintptr_t y,
            int yl, int act, uintptr_t stats, int nt):
    cdef Geom g = _geometry(problem)
    if stats:
        _zero_stats(<double*>stats, g.K)
    with nogil:
        if f64:
            forward_loops[double](<double*>x, xl, <double*>w, <double*>b, <double*>y, yl, act,
                                  <double*>stats, g, nt)
        else:
            forward_loops[float](<float*>x, xl, <float*>w, <float*>b, <float*>y, yl, act,
                                 <double*>stats, g, nt)


def grad_input(problem, bint f64, uintptr_t gy, int gyl, uintptr_t w, uintptr_t gx, int gxl,
               int nt):
    cdef Geom g = _geometry(problem)
    with nogil:
        if f64:
            grad_input_loops[double](<double*>gy, gyl, <double*>w, <double*>gx, gxl, g, nt)
        else:
            grad_input_loops[float](<float*>gy, gyl, <float*>w, <float*>gx, gxl, g, nt)


def grad_weight(problem, bint f64, uintptr_t gy, int gyl, uintptr_t x, int xl, uintptr_t gw,
                int nt):
    cdef Geom g = _geometry(problem)
    with nogil:
        if f64:
            grad_weight_loops[double](<double*>gy, gyl, <double*>x, xl, <double*>gw, g, nt)
        else:
            grad_weight_loops[float](<float*>gy, gyl, <float*>x, xl, <float*>gw, g, nt)


cdef Geom _geometry(problem) except *:
    cdef Geom g
    g.N, g.C, g.H, g.W = problem.N, problem.C, problem.H, problem.W
    g.K, g.R, g.S, g.OH, g.OW = problem.K, problem.R, problem.S, problem.OH, problem.OW
    g.sh, g.sw, g.dh, g.dw = problem.sh, problem.sw, problem.dh, problem.dw
    g.pt, g.pl, g.groups = problem.pt, problem.pl, problem.groups
    g.Cg, g.Kg = g.C // g.groups, g.K // g.groups
    return g


cdef void _zero_stats(double* stats, int64_t K) noexcept:
    cdef int64_t i
    for i in range(2 * K):
        stats[i] = 0
