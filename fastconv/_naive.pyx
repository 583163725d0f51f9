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
                        double* stats, int64_t[:] g, int nt) noexcept nogil:
    cdef int64_t N = g[0], C = g[1], H = g[2], W = g[3], K = g[4], R = g[5], S = g[6]
    cdef int64_t OH = g[7], OW = g[8], sh = g[9], sw = g[10], dh = g[11], dw = g[12]
    cdef int64_t pt = g[13], pl = g[15], groups = g[17]
    cdef int64_t Cg = C // groups, Kg = K // groups
    cdef Strides xs = strides_of(xl, C, H, W), ys = strides_of(yl, K, OH, OW)
    cdef int64_t k, n, oh, ow, c, r, s, ih, iw, c0
    cdef double acc
    cdef real v
    for k in prange(K, nogil=True, num_threads=nt, schedule="dynamic"):
        c0 = (k // Kg) * Cg
        for n in range(N):
            for oh in range(OH):
                for ow in range(OW):
                    acc = 0
                    for c in range(Cg):
                        for r in range(R):
                            ih = oh * sh - pt + r * dh
                            for s in range(S):
                                iw = ow * sw - pl + s * dw
                                if ih < 0 or ih >= H or iw < 0 or iw >= W:
                                    v = 0  # padding: a zero times the tap (NaN * 0 is NaN)
                                else:
                                    v = x[n * xs.n + (c0 + c) * xs.c + ih * xs.h + iw * xs.w]
                                acc = acc + <double>v * w[((k * Cg + c) * R + r) * S + s]
                    if b != NULL:
                        acc = acc + b[k]
                    v = <real>acc
                    if stats != NULL:  # one thread owns channel k: no race
                        stats[k] += v
                        stats[K + k] += <double>v * v
                    y[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w] = activate(v, act)


cdef void grad_input_loops(real* gy, int gyl, real* w, real* gx, int gxl, int64_t[:] g,
                           int nt) noexcept nogil:
    # gx[n, c, ih, iw] = sum over (k, r, s) of the outputs (oh, ow) that read it.
    cdef int64_t N = g[0], C = g[1], H = g[2], W = g[3], K = g[4], R = g[5], S = g[6]
    cdef int64_t OH = g[7], OW = g[8], sh = g[9], sw = g[10], dh = g[11], dw = g[12]
    cdef int64_t pt = g[13], pl = g[15], groups = g[17]
    cdef int64_t Cg = C // groups, Kg = K // groups
    cdef Strides xs = strides_of(gxl, C, H, W), ys = strides_of(gyl, K, OH, OW)
    cdef int64_t nc, n, c, k, k0, ih, iw, r, s, th, tw, oh, ow
    cdef double acc
    for nc in prange(N * C, nogil=True, num_threads=nt, schedule="dynamic"):
        n = nc // C
        c = nc % C
        k0 = (c // Cg) * Kg
        for ih in range(H):
            for iw in range(W):
                acc = 0
                for k in range(k0, k0 + Kg):
                    for r in range(R):
                        th = ih + pt - r * dh
                        if th < 0 or th % sh != 0 or th // sh >= OH:
                            continue
                        oh = th // sh
                        for s in range(S):
                            tw = iw + pl - s * dw
                            if tw < 0 or tw % sw != 0 or tw // sw >= OW:
                                continue
                            ow = tw // sw
                            acc = acc + (<double>gy[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w]
                                         * w[((k * Cg + c % Cg) * R + r) * S + s])
                gx[n * xs.n + c * xs.c + ih * xs.h + iw * xs.w] = <real>acc


cdef void grad_weight_loops(real* gy, int gyl, real* x, int xl, real* gw, int64_t[:] g,
                            int nt) noexcept nogil:
    cdef int64_t N = g[0], C = g[1], H = g[2], W = g[3], K = g[4], R = g[5], S = g[6]
    cdef int64_t OH = g[7], OW = g[8], sh = g[9], sw = g[10], dh = g[11], dw = g[12]
    cdef int64_t pt = g[13], pl = g[15], groups = g[17]
    cdef int64_t Cg = C // groups, Kg = K // groups
    cdef Strides xs = strides_of(xl, C, H, W), ys = strides_of(gyl, K, OH, OW)
    cdef int64_t k, c, c0, r, s, n, oh, ow, ih, iw
    cdef double acc
    for k in prange(K, nogil=True, num_threads=nt, schedule="dynamic"):
        c0 = (k // Kg) * Cg
        for c in range(Cg):
            for r in range(R):
                for s in range(S):
                    acc = 0
                    for n in range(N):
                        for oh in range(OH):
                            ih = oh * sh - pt + r * dh
                            if ih < 0 or ih >= H:
                                continue
                            for ow in range(OW):
                                iw = ow * sw - pl + s * dw
                                if iw < 0 or iw >= W:
                                    continue
                                acc = acc + (<double>gy[n * ys.n + k * ys.c + oh * ys.h + ow * ys.w]
                                             * x[n * xs.n + (c0 + c) * xs.c + ih * xs.h
                                                 + iw * xs.w])
                    gw[((k * Cg + c) * R + r) * S + s] = <real>acc


# Python entry points. `problem`: a fastconv.Conv2dProblem, read by field name; `f64` picks
# float64 over float32.

def forward(problem, bint f64, uintptr_t x, int xl, uintptr_t w, uintptr_t b, uintptr_t y,
            int yl, int act, uintptr_t stats, int nt):
    cdef int64_t[:] g = _geometry(problem)
    if stats:
        _zero_stats(<double*>stats, g[4])
    with nogil:
        if f64:
            forward_loops[double](<double*>x, xl, <double*>w, <double*>b, <double*>y, yl, act,
                                  <double*>stats, g, nt)
        else:
            forward_loops[float](<float*>x, xl, <float*>w, <float*>b, <float*>y, yl, act,
                                 <double*>stats, g, nt)


def grad_input(problem, bint f64, uintptr_t gy, int gyl, uintptr_t w, uintptr_t gx, int gxl,
               int nt):
    cdef int64_t[:] g = _geometry(problem)
    with nogil:
        if f64:
            grad_input_loops[double](<double*>gy, gyl, <double*>w, <double*>gx, gxl, g, nt)
        else:
            grad_input_loops[float](<float*>gy, gyl, <float*>w, <float*>gx, gxl, g, nt)


def grad_weight(problem, bint f64, uintptr_t gy, int gyl, uintptr_t x, int xl, uintptr_t gw,
                int nt):
    cdef int64_t[:] g = _geometry(problem)
    with nogil:
        if f64:
            grad_weight_loops[double](<double*>gy, gyl, <double*>x, xl, <double*>gw, g, nt)
        else:
            grad_weight_loops[float](<float*>gy, gyl, <float*>x, xl, <float*>gw, g, nt)


#: The problem's fields in the order the loops index them (g[0] = N, ..., g[17] = groups).
GEOMETRY = ("N", "C", "H", "W", "K", "R", "S", "OH", "OW", "sh", "sw", "dh", "dw", "pt", "pb",
            "pl", "pr", "groups")


cdef int64_t[:] _geometry(problem):
    from array import array
    cdef int64_t[:] g = array("q", [int(getattr(problem, name)) for name in GEOMETRY])
    return g


cdef void _zero_stats(double* stats, int64_t K) noexcept:
    cdef int64_t i
    for i in range(2 * K):
        stats[i] = 0
