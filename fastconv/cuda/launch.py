"""Launches of the CUDA kernels on validated problems (fastconv.problem.Conv2dProblem) and
torch tensors: geometry, grids, shared memory and the partial-statistics buffers. The
public functions (fastconv.cuda) and the registry's kernels (fastconv.cuda.kernels) call
these."""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import _runtime as rt
from .geometry import (GEMM_TILE, REGISTER_WEIGHTS, THREADS, conv_geometry,
                       depthwise_grad_rows, depthwise_rows, depthwise_tile,
                       grad_input_as_forward, kernel_arg)

#: Grid dimensions y and z are limited to 65535 blocks.
_MAX_GRID_YZ = 65535
#: Enough blocks to fill an H100 twice over (132 SMs): the implicit GEMM's split of its
#: grad-weight reduction aims here (its blocks are heavy).
_TARGET_BLOCKS = 264
#: The light split reductions (depthwise grad-weight, batchnorm sums) aim at 16 blocks of 128
#: threads per SM: with 264, the 32-channel 112x112 grad-weight ran 2 blocks per SM, latency-
#: bound (H100: 0.82 ms for 51 MB read, 2026-11-26).
_REDUCTION_BLOCKS = 132 * 16
#: Taps whose per-thread sums the depthwise grad-weight keeps in shared memory at once (float32;
#: half as many in float64): 64 x 128 threads x 4 bytes = 32 KiB, under the 48 KiB a block
#: gets without opting in.
_GRAD_WEIGHT_TAPS = 64


def _dtype(t: Tensor) -> str:
    return "float64" if t.dtype == torch.float64 else "float32"


def _scalar(t: Tensor, v: float):
    return np.dtype(_dtype(t)).type(v)


def _placeholder(like: Tensor, dims: int) -> Tensor:
    """A one-element stand-in for an absent optional array (the kernels take a flag and
    neither read nor write it), one per device, dtype and rank: a fresh one would cost a fill
    kernel per launch."""
    key = (like.device, like.dtype, dims)
    t = _PLACEHOLDERS.get(key)
    if t is None:
        t = _PLACEHOLDERS[key] = like.new_zeros((1,) * dims)
    return t


_PLACEHOLDERS: dict = {}


def _taps(channels: int, g, device: torch.device) -> Tensor:
    """The implicit GEMM's taps table: row c R S + r S + s holds (c, r dh, s dw), int32, for c
    below ``channels`` (the reduction's: Cg forward and grad-weight, Kg grad-input), so its
    loaders look a reduction index up instead of dividing it; one per device and geometry,
    kept."""
    key = (device, channels, g.R, g.S, g.dh, g.dw)
    table = _TAPS.get(key)
    if table is None:
        c, r, s = torch.meshgrid(torch.arange(channels), torch.arange(g.R) * g.dh,
                                 torch.arange(g.S) * g.dw, indexing="ij")
        table = torch.stack((c, r, s), dim=-1).reshape(-1, 3).to(torch.int32)
        if len(_TAPS) > 256:
            _TAPS.clear()
        table = _TAPS[key] = table.to(device)
    return table


_TAPS: dict = {}


def is_depthwise(problem) -> bool:
    return problem.Cg == 1 and problem.groups > 1


def _depthwise_kernels(problem, algorithm: Optional[str]) -> bool:
    """Whether a launch runs the depthwise kernels: ``algorithm`` 'depthwise' or
    'implicit_gemm' as the registry asked, or None to pick by the problem."""
    if algorithm is None:
        return is_depthwise(problem)
    if algorithm == "depthwise" and problem.Cg != 1:
        raise ValueError("fastconv.cuda: the depthwise kernels need one input channel per group")
    return algorithm == "depthwise"


class Generated(NamedTuple):
    """A launch of a generated kernel (fastconv.cuda.depthwise), all but its tensors: worked
    out once per problem (the launches of a network repeat; this took ~10 us per call)."""
    kernel: object
    grid: object
    geometry: tuple          # kernel_arg of the ConvGeometry the kernel reads
    shared_bytes: int = 0
    extra: tuple = ()        # the arguments after the geometry
    as_forward: bool = False  # a grad-input run by the forward's kernel


def _blocks(threads: int) -> int:
    return -(-threads // THREADS)


def _split(items: int, channels: int, per_thread: int) -> tuple:
    """(items per block, slices per channel) of a reduction run by blocks of (channel, slice
    of ``items``): slices of at least ``per_thread`` items per thread, as many as make
    _REDUCTION_BLOCKS blocks in all, at most _MAX_GRID_YZ per channel."""
    splits = max(1, min(_MAX_GRID_YZ, -(-items // (THREADS * per_thread)),
                        -(-_REDUCTION_BLOCKS // channels)))
    per_block = -(-items // splits)
    return per_block, -(-items // per_block)


@functools.lru_cache(maxsize=1024)
def _rows_forward(problem, act: int, dtype: str) -> Optional[Generated]:
    from .depthwise import forward_rows
    g = conv_geometry(problem, act)
    spec = depthwise_rows(g)
    if spec is None:
        return None
    return Generated(forward_rows(dtype, spec),
                     _blocks(g.N * g.K * -(-g.OH // spec.rows) * g.OW), kernel_arg(g))


@functools.lru_cache(maxsize=1024)
def _rows_grad_input(problem, dtype: str) -> Optional[Generated]:
    from .depthwise import forward_rows, grad_input_rows
    g = conv_geometry(problem)
    turned = grad_input_as_forward(g)
    spec = depthwise_rows(turned, turned=True) if turned is not None else None
    if spec is not None:   # stride 1, multiplier 1: the forward's kernel, no bias
        return Generated(forward_rows(dtype, spec),
                         _blocks(g.N * g.C * -(-g.H // spec.rows) * g.W), kernel_arg(turned),
                         as_forward=True)
    spec = depthwise_grad_rows(g)
    if spec is not None:   # other strides and multipliers: whole stride phases
        return Generated(grad_input_rows(dtype, spec),
                         _blocks(g.N * g.C * -(-g.H // spec.rows) * -(-g.W // spec.sw)),
                         kernel_arg(g))
    return None


@functools.lru_cache(maxsize=1024)
def _rows_grad_weight(problem, dtype: str) -> Optional[Generated]:
    from .depthwise import grad_weight_rows
    g = conv_geometry(problem)
    spec = depthwise_rows(g)
    if spec is None or spec.R * spec.S > REGISTER_WEIGHTS:
        return None
    per_block, slices = _split(g.N * -(-g.OH // spec.rows) * g.OW, g.K, 4)
    return Generated(grad_weight_rows(dtype, spec), (g.K, slices), kernel_arg(g), spec.R * spec.S * THREADS * np.dtype(dtype).itemsize,
                     extra=(per_block,))


def forward(problem, x: Tensor, w: Tensor, bias: Optional[Tensor], y: Tensor, act: int = 0,
            partials: bool = False, algorithm: Optional[str] = None) -> Optional[Tensor]:
    """y = act(conv(x, w) + bias). With ``partials``, also returns each block's per-channel
    (count, mean, M2) of y for batchnorm.finalize (shape slots x K x 3)."""
    depthwise = _depthwise_kernels(problem, algorithm)
    b = bias if bias is not None else _placeholder(x, 1)
    rows = _rows_forward(problem, act, _dtype(x)) if depthwise else None
    if rows is not None:   # the generated kernel; statistics in a pass over y of their own
        rt.launch(rows.kernel, rows.grid, THREADS, 0, x.view(-1), w.view(-1), b, y.view(-1),
                  rows.geometry, bias is not None)
        return channel_stats(y) if partials else None
    g = conv_geometry(problem, act)
    tile = None
    if depthwise:
        tile = depthwise_tile(g, partials, x.element_size())
        if tile is not None and tile.tiles_w * tile.tiles_h > _MAX_GRID_YZ:
            tile = None   # a map too large for grid.y: the implicit GEMM runs it
    if tile is not None:  # (None: the halo does not fit in shared memory either)
        from .depthwise import kernels
        tiles = tile.tiles_w * tile.tiles_h
        part = (x.new_empty((g.N * tiles, g.K, 3)) if partials else _placeholder(x, 3))
        grid = (-(-(g.N * g.K) // tile.planes), tiles)
        rt.launch(kernels(_dtype(x)).forward, grid, THREADS,
                  tile.shared_values(g, partials) * x.element_size(), x, w, b, y, part,
                  kernel_arg(g), kernel_arg(tile), bias is not None, partials)
        return part if partials else None
    from .gemm import FORWARD, kernel
    columns = g.N * g.OH * g.OW
    blocks_x = -(-columns // GEMM_TILE.BN)
    part = x.new_empty((blocks_x, g.K, 3)) if partials else _placeholder(x, 3)
    grid = (blocks_x, -(-g.Kg // GEMM_TILE.BM), g.groups)
    _check_grid(grid)
    depth = g.Cg * g.R * g.S
    rt.launch(kernel(_dtype(x), FORWARD), grid, THREADS, 0, w.contiguous().view(g.K, depth), x,
              y, b, part, _taps(g.Cg, g, x.device), kernel_arg(g), g.Kg, columns, depth, depth,
              bias is not None, partials)
    return part if partials else None


def grad_input(problem, gy: Tensor, w: Tensor, gx: Tensor,
               algorithm: Optional[str] = None) -> None:
    depthwise = _depthwise_kernels(problem, algorithm)
    rows = _rows_grad_input(problem, _dtype(gy)) if depthwise else None
    if rows is not None and rows.as_forward:   # forward_rows, the filter turned, no bias
        rt.launch(rows.kernel, rows.grid, THREADS, 0, gy.view(-1), w.view(-1),
                  _placeholder(gy, 1), gx.view(-1), rows.geometry, False)
        return
    if rows is not None:   # grad_input_rows
        rt.launch(rows.kernel, rows.grid, THREADS, 0, gy.view(-1), w.view(-1), gx.view(-1),
                  rows.geometry)
        return
    g = conv_geometry(problem)
    if depthwise:
        from .depthwise import kernels
        total = g.N * g.C * g.H * g.W
        k = kernels(_dtype(gy))
        rt.launch(k.grad_input if g.dh == g.dw == 1 else k.grad_input_dilated,
                  -(-total // THREADS), THREADS, 0, gy, w, gx, kernel_arg(g))
        return
    from .gemm import GRAD_INPUT, kernel
    columns = g.N * g.H * g.W
    grid = (-(-columns // GEMM_TILE.BN), -(-g.Cg // GEMM_TILE.BM), g.groups)
    _check_grid(grid)
    depth = g.Kg * g.R * g.S
    rt.launch(kernel(_dtype(gy), GRAD_INPUT), grid, THREADS, 0,
              w.contiguous().view(g.K, g.Cg, g.R * g.S), gy, gx,
              _placeholder(gy, 1), _placeholder(gy, 3), _taps(g.Kg, g, gy.device),
              kernel_arg(g), g.Cg, columns, depth, depth, False, False)


def grad_weight(problem, gy: Tensor, x: Tensor, gw: Tensor,
                algorithm: Optional[str] = None) -> None:
    """gw (zeroed here) = the weight gradient; the reduction over the batch's pixels is split
    across blocks whose sums are added atomically."""
    g = conv_geometry(problem)
    gw.zero_()
    pixels = g.N * g.OH * g.OW
    if pixels == 0:
        return
    rows = 0
    depthwise = _depthwise_kernels(problem, algorithm)
    generated = _rows_grad_weight(problem, _dtype(gy)) if depthwise else None
    if generated is not None:
        rt.launch(generated.kernel, generated.grid, THREADS, generated.shared_bytes,
                  gy.view(-1), x.view(-1), gw.view(-1), generated.geometry, *generated.extra)
        return
    if depthwise:
        taps = _GRAD_WEIGHT_TAPS * 4 // gy.element_size()
        rows = min(g.R, taps // g.S)
    if rows > 0:   # depthwise (0: a filter row longer than the shared slots; implicit GEMM)
        from .depthwise import kernels
        per_block, slices = _split(pixels, g.K, 16)
        rt.launch(kernels(_dtype(gy)).grad_weight, (g.K, slices), THREADS,
                  rows * g.S * THREADS * gy.element_size(), gy, x,
                  gw, kernel_arg(g), per_block, rows)
        return
    from .gemm import GRAD_WEIGHT, kernel
    columns = g.Cg * g.R * g.S
    base = -(-columns // GEMM_TILE.BN) * -(-g.Kg // GEMM_TILE.BM) * g.groups
    # Slices of at least 32 stages of the reduction each.
    most = max(1, pixels // (32 * GEMM_TILE.BK))
    splits = max(1, min(most, -(-_TARGET_BLOCKS // base), _MAX_GRID_YZ // g.groups))
    per_split = -(-pixels // splits)
    per_split = -(-per_split // GEMM_TILE.BK) * GEMM_TILE.BK
    splits = -(-pixels // per_split)
    grid = (-(-columns // GEMM_TILE.BN), -(-g.Kg // GEMM_TILE.BM), g.groups * splits)
    _check_grid(grid)
    rt.launch(kernel(_dtype(gy), GRAD_WEIGHT), grid, THREADS, 0, gy, x,
              gw, _placeholder(gy, 1), _placeholder(gy, 3), _taps(g.Cg, g, gy.device),
              kernel_arg(g), g.Kg, columns, pixels, per_split, False, False)


def _check_grid(grid) -> None:
    if grid[1] > _MAX_GRID_YZ or grid[2] > _MAX_GRID_YZ:
        raise ValueError(f"fastconv.cuda: grid {grid} exceeds {_MAX_GRID_YZ} blocks in y or z")


# --------------------------------------------------------------------------------------------
# Batch norm (training)
# --------------------------------------------------------------------------------------------

def channel_stats(z: Tensor) -> Tensor:
    """Per-block (count, mean, M2) of each channel of z (slices x K x 3), as the forwards
    that gather statistics in their epilogue leave them. A pass of its own reads z once
    more (H200: ~4 TB/s copy bandwidth), less than what the tiled kernel, the depthwise
    forward that gathers them, loses against the generated one (~3x at 3x3)."""
    from .batchnorm import kernels
    N, K, OH, OW = z.shape
    per_block, slices = _split(N * OH * OW, K, 16)
    partials = z.new_empty((slices, K, 3))
    rt.launch(kernels(_dtype(z)).channel_stats, (K, slices), THREADS, 0, z, partials,
              per_block)
    return partials


def bn_statistics(partials: Tensor, eps: float, like: Tensor):
    """(mean, invstd) per channel from the forward's partials."""
    from .batchnorm import kernels
    slots, K, _ = partials.shape
    mean, invstd = like.new_empty((K,)), like.new_empty((K,))
    if K:
        rt.launch(kernels(_dtype(like)).finalize, K, THREADS, 0, partials, slots,
                  _scalar(like, eps), mean, invstd)
    return mean, invstd


def conv_bn_train(problem, x: Tensor, w: Tensor, b: Optional[Tensor],
                  gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, act: int,
                  algorithm: Optional[str] = None):
    """Training Conv -> BN (batch statistics) -> activation: (y, z, mean, invstd), the
    statistics reduced in the convolution's epilogue, then merged, then one normalise pass."""
    z = x.new_empty(problem.output_shape)
    if z.numel() == 0:
        mean = x.new_zeros((problem.K,))   # as the CPU's: no values, mean 0, var 0
        return torch.empty_like(z), z, mean, torch.full_like(mean, eps).rsqrt_()
    partials = forward(problem, x.contiguous(), w.contiguous(), b, z, 0, partials=True,
                       algorithm=algorithm)
    mean, invstd = bn_statistics(partials, eps, z)
    return bn_normalize(z, mean, invstd, gamma, beta, act), z, mean, invstd


def bn_normalize(z: Tensor, mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                 beta: Optional[Tensor], act: int) -> Tensor:
    from .batchnorm import kernels
    y = torch.empty_like(z)
    if z.numel():
        rt.launch(kernels(_dtype(z)).normalize, -(-z.numel() // THREADS), THREADS, 0,
                  z, mean, invstd, gamma if gamma is not None else _placeholder(z, 1),
                  beta if beta is not None else _placeholder(z, 1), y,
                  gamma is not None, beta is not None, act)
    return y


def bn_backward(grad_y: Tensor, y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                gamma: Optional[Tensor], act: int):
    """(grad_z, grad_gamma, grad_beta) of y = act(BN(z)) with batch statistics."""
    from .batchnorm import kernels
    N, K, OH, OW = z.shape
    k = kernels(_dtype(z))
    sums = z.new_zeros((2, K))
    grad_z = torch.empty_like(z)
    pixels = N * OH * OW
    if z.numel():
        per_block, slices = _split(pixels, K, 16)
        rt.launch(k.grad_sums, (K, slices), THREADS, 0, grad_y, y, z, mean,
                  invstd, act, sums, per_block)
        rt.launch(k.grad_z, -(-z.numel() // THREADS), THREADS, 0, grad_y, y, z, mean, invstd,
                  gamma if gamma is not None else _placeholder(z, 1),
                  gamma is not None, act, sums, _scalar(z, pixels), grad_z)
    return grad_z, sums[1].clone(), sums[0].clone()
