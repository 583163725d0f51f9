"""Launch geometry of the CUDA kernels: the convolution's sizes as the kernels read them, and
the tile shapes chosen per problem (no numba here, so choices can be tested anywhere)."""
from __future__ import annotations

import functools

from typing import NamedTuple, Optional

import numpy as np

#: Threads per block of every kernel: 4 warps keep enough blocks resident per SM for the
#: loads to overlap, and the simulator (which runs each thread as a Python thread) needs
#: blocks of at least 128 to exercise the tree reductions.
THREADS = 128


class ConvGeometry(NamedTuple):
    """A convolution as every kernel reads it (numba passes it as a tuple of int64)."""
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    OH: int
    OW: int
    sh: int
    sw: int
    pt: int
    pl: int
    dh: int
    dw: int
    groups: int
    Cg: int      # input channels per group (1: depthwise)
    Kg: int      # output channels per group (the depthwise multiplier)
    act: int     # fused activation (fastconv.backend.ACTIVATIONS)


@functools.lru_cache(maxsize=512)   # a model's layers repeat: ~6 us of numpy casts each call
def kernel_arg(fields: NamedTuple) -> NamedTuple:
    """A geometry as the kernels take it: int32 fields (half the registers of int64 ones;
    numba widens their products to int64, so indices do not overflow)."""
    if max(fields, default=0) >= 2 ** 31:
        raise ValueError(f"fastconv.cuda: a size of {fields} does not fit 32 bits")
    return type(fields)(*map(np.int32, fields))


def conv_geometry(problem, act: int = 0) -> ConvGeometry:
    """The ConvGeometry of a fastconv.problem.Conv2dProblem."""
    p = problem
    return ConvGeometry(p.N, p.C, p.H, p.W, p.K, p.R, p.S, p.OH, p.OW, p.sh, p.sw, p.pt, p.pl,
                        p.dh, p.dw, p.groups, p.Cg, p.K // p.groups, act)


def grad_input_as_forward(g: ConvGeometry) -> Optional[ConvGeometry]:
    """The depthwise grad-input of a stride-1, multiplier-1 problem as the geometry of a
    forward: gx = gy convolved with the filter turned 180 degrees, gy padded by the filter's
    reach less the forward's padding (negative where the forward padded past the reach: the
    kernels' bounds tests read no such rows). None for other problems."""
    if g.sh != 1 or g.sw != 1 or g.Kg != 1 or g.Cg != 1:
        return None
    return g._replace(H=g.OH, W=g.OW, OH=g.H, OW=g.W, pt=(g.R - 1) * g.dh - g.pt,
                      pl=(g.S - 1) * g.dw - g.pl, act=0)


class DepthwiseGradRows(NamedTuple):
    """The shape of a depthwise grad-input kernel generated for one filter and stride
    (fastconv.cuda.depthwise.grad_input_rows): each thread computes ``rows`` x sw input
    pixels (whole stride phases: ``rows`` a multiple of sh), so which taps reach each of them,
    and from which grad_output offset, is known when the kernel is built; ``ph``, ``pw`` are
    the padding modulo the stride, which decides that too. Each grad_output value a thread
    needs is loaded once per channel of the multiplier."""
    R: int
    S: int
    sh: int
    sw: int
    dh: int
    dw: int
    ph: int
    pw: int
    rows: int

    def row_taps(self, a: int) -> list:
        """(filter row, grad_output row offset) pairs reaching input row a of a block."""
        return [(r, (a + self.ph - r * self.dh) // self.sh) for r in range(self.R)
                if (a + self.ph - r * self.dh) % self.sh == 0]

    def col_taps(self, b: int) -> list:
        return [(c, (b + self.pw - c * self.dw) // self.sw) for c in range(self.S)
                if (b + self.pw - c * self.dw) % self.sw == 0]

    @property
    def loads(self) -> list:
        """The (row, column) grad_output offsets a thread reads (from its block's base)."""
        rows = sorted({i for a in range(self.rows) for _, i in self.row_taps(a)})
        cols = sorted({j for b in range(self.sw) for _, j in self.col_taps(b)})
        return [(i, j) for i in rows for j in cols]


#: Values a generated grad-input thread may hold (grad_output loads + sums + weights): at 31
#: (3x3, stride 1, 4 rows) it spilled at 64 registers, at 23 (3x3 stride 2, 4 rows; stride 1,
#: 2 rows) it did not (sm_90, ptxas 13.0).
GRAD_ROWS_MAX_VALUES = 28


def depthwise_grad_rows(g: ConvGeometry) -> Optional[DepthwiseGradRows]:
    """The generated grad-input kernel of one depthwise problem: up to 4 input rows per
    thread (a multiple of sh), sw columns, as many as GRAD_ROWS_MAX_VALUES allows; None for
    filters over REGISTER_WEIGHTS taps (5x5 spilled 28-148 bytes at any rows: the gather
    kernel runs those)."""
    return _depthwise_grad_rows(g.R, g.S, g.sh, g.sw, g.dh, g.dw, g.pt % g.sh, g.pl % g.sw)


@functools.lru_cache(maxsize=512)
def _depthwise_grad_rows(R, S, sh, sw, dh, dw, ph, pw) -> Optional[DepthwiseGradRows]:
    if R * S > REGISTER_WEIGHTS:
        return None
    for rows in (4, 2, 1):
        spec = DepthwiseGradRows(R, S, sh, sw, dh, dw, ph, pw, sh * max(1, rows // sh))
        if len(spec.loads) + spec.rows * sw + R * S <= GRAD_ROWS_MAX_VALUES:
            return spec
    return None


class DepthwiseTile(NamedTuple):
    """How the depthwise forward splits its output among blocks of THREADS threads.

    A block computes ``planes`` (n, k) planes, each a tile of tile_w x (thread_rows * rows)
    outputs: thread (x, y) of a plane writes column x of rows y, y + thread_rows, ... (so a
    warp writes whole row segments). The tile's input halo, in_h x in_w values per plane, and
    the planes' weights are staged in shared memory once and read R*S times each."""
    tile_w: int
    thread_rows: int
    rows: int
    planes: int
    in_h: int
    in_w: int
    tiles_w: int
    tiles_h: int

    @property
    def tile_h(self) -> int:
        return self.thread_rows * self.rows

    def shared_values(self, g: ConvGeometry, with_stats: bool) -> int:
        staged = self.planes * (self.in_h * self.in_w + g.R * g.S)
        return max(staged, 3 * THREADS) if with_stats else staged


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    v = lo
    while v < n and v < hi:
        v *= 2
    return v


#: Shared memory a block may take without opting in to more (every CUDA GPU since sm_20).
SHARED_BYTES = 48 * 1024


def depthwise_tile(g: ConvGeometry, with_stats: bool = False,
                   itemsize: int = 4) -> Optional[DepthwiseTile]:
    """The tile for one problem: as wide as the output row (8 to 32, a power of two), and up
    to 4 rows per thread so that each staged input row serves several output rows. Small
    maps put several planes in one block rather than leave threads idle (MobileNetV2's 7x7
    and 14x14 layers); statistics need one plane per block (one channel to reduce). Fewer
    rows where the staged halo would pass SHARED_BYTES; None where even one row would (huge
    kernels or dilations: the caller runs the implicit GEMM instead)."""
    tile_w = _pow2_at_least(g.OW, 8, 32)
    while tile_w > 8 and (tile_w - 1) * g.sw + (g.S - 1) * g.dw + 1 > THREADS:
        tile_w //= 2                        # the forward stages one halo row per thread
    per_plane = THREADS // tile_w           # thread rows if the block held one plane
    planes = 1
    if not with_stats:
        while planes < 16 and per_plane // 2 >= 1 and per_plane // 2 >= g.OH:
            planes *= 2
            per_plane //= 2
    thread_rows = per_plane
    in_w = (tile_w - 1) * g.sw + (g.S - 1) * g.dw + 1
    if in_w > THREADS:
        return None
    for rows in range(max(1, min(4, -(-g.OH // thread_rows))), 0, -1):
        tile_h = thread_rows * rows
        in_h = (tile_h - 1) * g.sh + (g.R - 1) * g.dh + 1
        tile = DepthwiseTile(tile_w, thread_rows, rows, planes, in_h, in_w,
                             -(-g.OW // tile_w), -(-g.OH // tile_h))
        if tile.shared_values(g, with_stats) * itemsize <= SHARED_BYTES:
            return tile
    return None


class DepthwiseRows(NamedTuple):
    """The shape of a depthwise forward kernel generated for one filter (fastconv.cuda.
    depthwise.forward_rows): each thread computes ``rows`` vertically adjacent outputs of one
    column, its R x S weights and accumulators held in registers, each input value it reads
    loaded once for every output row it serves. Warps run along output rows (coalesced)."""
    R: int
    S: int
    sh: int
    sw: int
    dh: int
    dw: int
    rows: int
    turned: bool = False   # weight (r, s) read at (R-1-r, S-1-s)

    @property
    def in_rows(self) -> int:
        """Input rows a thread reads: those under its ``rows`` outputs' filters."""
        return (self.rows - 1) * self.sh + (self.R - 1) * self.dh + 1

    def taps(self, j: int) -> list:
        """(output row, filter row) pairs that read input row j (none between the taps of a
        dilated filter)."""
        return [(v, (j - v * self.sh) // self.dh) for v in range(self.rows)
                if j >= v * self.sh and (j - v * self.sh) % self.dh == 0
                and (j - v * self.sh) // self.dh < self.R]

    @property
    def loads(self) -> int:
        """Input values a thread loads: S for each row some tap reads."""
        return sum(self.S for j in range(self.in_rows) if self.taps(j))


#: The generated kernels unroll every load and multiply-add: these bound their code and
#: registers (5x5 at stride 2 is MobileNet's and EfficientNet's largest: 11 rows x 5 = 55
#: loads at 4 rows per thread). Larger filters take the tiled kernel (DepthwiseTile).
ROWS_MAX_TAPS = 25
ROWS_MAX_LOADS = 64

#: forward_rows keeps a filter of up to this many taps in registers (3x3: 40-48 registers in
#: all, sm_90); larger ones are read from memory where used: 5x5 in registers took 80-84, and
#: at the 64 cap spilled 4-48 bytes depending on rows and stride. grad_weight_rows, whose
#: per-tap sums must stay in registers, exists up to this size only (5x5 spilled 200-280
#: bytes at 64): larger filters take the shared-memory grad_weight.
REGISTER_WEIGHTS = 9


def depthwise_rows(g: ConvGeometry, turned: bool = False) -> Optional[DepthwiseRows]:
    """The generated kernel for one depthwise problem: 4 output rows per thread (3x3 at
    stride 1: 6 input rows, 18 loads for 4 outputs, not 36), fewer where the loads would pass
    ROWS_MAX_LOADS or the map is shorter; None for filters above ROWS_MAX_TAPS taps.
    ``turned``: the kernel reads the filter turned 180 degrees (grad_input_as_forward)."""
    return _depthwise_rows(g.R, g.S, g.sh, g.sw, g.dh, g.dw, g.OH, turned)


@functools.lru_cache(maxsize=512)   # every launch asks; the load count costs ~20 us
def _depthwise_rows(R, S, sh, sw, dh, dw, OH, turned) -> Optional[DepthwiseRows]:
    if R * S > ROWS_MAX_TAPS:
        return None
    for rows in (4, 2, 1):
        spec = DepthwiseRows(R, S, sh, sw, dh, dw, min(rows, max(OH, 1)), turned)
        if spec.loads <= ROWS_MAX_LOADS:
            return spec
    return None


class GemmTile(NamedTuple):
    """The implicit-GEMM kernels' block tile: BM rows (channels) x BN columns (pixels) of the
    output, the reduction staged BK at a time; each of the THREADS threads holds TM x TN
    accumulators (rows t // (BN / TN) + i * (BM / TM), columns t % (BN / TN) + j * (BN / TN):
    consecutive threads own consecutive columns, so loads and stores coalesce)."""
    BM: int = 64
    BN: int = 64
    BK: int = 8
    TM: int = 8
    TN: int = 4


GEMM_TILE = GemmTile()
