"""PyTorch custom ops around the C++ kernels: schema, fake (meta) kernel and autograd.

Four ops, all bilinear in their two tensor arguments, so their derivatives are each other:

=====================  =====================================  ==============================
op                     computes                               tensor arguments
=====================  =====================================  ==============================
conv2d                 y  = F(x, w) + b                       input, weight, bias
conv2d_grad_input      gx = Gx(gy, w)   (adjoint of F in x)   grad_output, weight
conv2d_grad_weight     gw = Gw(gy, x)   (adjoint of F in w)   grad_output, input
conv2d_grad_bias       gb = sum of gy over n, h, w            grad_output
=====================  =====================================  ==============================

Padding is always four explicit values (top, bottom, left, right); ``fastconv.functional``
turns torch's ints, pairs, 'same' and 'valid' into that form.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import dispatch
from .backend import _C

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
_ALGO_CODE = {"direct": 0, "im2col": 1}  # csrc/common/geometry.h: Algorithm
_NCHW, _NHWC = 0, 1


# --------------------------------------------------------------------------------------------
# Checks and geometry (shared by the real and the fake kernels, so both raise the same errors)
# --------------------------------------------------------------------------------------------

def _check_dtype(name: str, t: Tensor, like: Optional[Tensor] = None) -> None:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"fastconv: {name} has unsupported dtype {t.dtype}; "
                        "supported: torch.float32, torch.float64")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"fastconv: {name} dtype {t.dtype} does not match input dtype {like.dtype}")
    if t.device.type != "cpu" and t.device.type != "meta":
        raise ValueError(f"fastconv: {name} is on {t.device}; these kernels run on the CPU")


def output_size(in_size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (in_size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def geometry(input_shape, weight_shape, stride, padding, dilation, groups) -> tuple:
    """Validates a convolution problem and returns it as the flat tuple the C++ side takes:
    (N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pb, pl, pr, groups)."""
    if len(input_shape) != 4:
        raise ValueError(f"fastconv: expected a 4-D input (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise ValueError(f"fastconv: expected a 4-D weight (K, C/groups, R, S), got shape {tuple(weight_shape)}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError("fastconv: stride and dilation take 2 values, padding 4 (top, bottom, left, right)")
    N, C, H, W = input_shape
    K, Cg, R, S = weight_shape
    sh, sw = stride
    dh, dw = dilation
    pt, pb, pl, pr = padding
    if groups <= 0:
        raise ValueError(f"fastconv: groups must be positive, got {groups}")
    if min(sh, sw) <= 0:
        raise ValueError(f"fastconv: stride must be positive, got {tuple(stride)}")
    if min(dh, dw) <= 0:
        raise ValueError(f"fastconv: dilation must be positive, got {tuple(dilation)}")
    if min(padding) < 0:
        raise ValueError(f"fastconv: padding must be non-negative, got {tuple(padding)}")
    if K % groups != 0:
        raise ValueError(f"fastconv: out_channels ({K}) must be divisible by groups ({groups})")
    if Cg * groups != C:
        raise ValueError(
            f"fastconv: input has {C} channels but weight {tuple(weight_shape)} with groups={groups} "
            f"expects {Cg * groups}")
    if min(R, S) <= 0:
        raise ValueError(f"fastconv: kernel size must be positive, got {R}x{S}")
    eff_h, eff_w = dh * (R - 1) + 1, dw * (S - 1) + 1
    if H + pt + pb < eff_h or W + pl + pr < eff_w:
        raise ValueError(
            f"fastconv: kernel size {eff_h}x{eff_w} (dilated) is larger than the padded input "
            f"{H + pt + pb}x{W + pl + pr}")
    OH = output_size(H, R, sh, pt + pb, dh)
    OW = output_size(W, S, sw, pl + pr, dw)
    return (N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pb, pl, pr, groups)


_GEOMETRY_CACHE: dict = {}


def cached_geometry(input_shape, weight_shape, stride, padding, dilation, groups) -> tuple:
    """:func:`geometry`, memoised: networks call the same few shapes over and over, and the
    checks cost ~1 us of Python per call."""
    key = (tuple(input_shape), tuple(weight_shape), tuple(stride), tuple(padding),
           tuple(dilation), groups)
    g = _GEOMETRY_CACHE.get(key)
    if g is None:
        g = geometry(input_shape, weight_shape, stride, padding, dilation, groups)
        if len(_GEOMETRY_CACHE) > 4096:
            _GEOMETRY_CACHE.clear()
        _GEOMETRY_CACHE[key] = g
    return g


def _channels_last(t: Tensor) -> bool:
    """True when t is laid out channels_last and not also plainly contiguous (torch's
    suggest_memory_format for 4-D tensors)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _dense(t: Tensor) -> tuple[Tensor, int]:
    """t as a dense NCHW or NHWC tensor (a copy only if it is neither) and its layout code."""
    if _channels_last(t):
        return t, _NHWC
    return t.contiguous(), _NCHW


def _empty(shape, like: Tensor, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


_AUTO_CHOICE: dict = {}


def _kernel_algo(algo: str, g: tuple) -> int:
    """The C++ algorithm code for an algorithm name; 'auto' is resolved from the geometry
    (memoised: it runs on every call)."""
    code = _ALGO_CODE.get(algo)
    if code is not None:
        return code
    if algo == "auto":
        code = _AUTO_CHOICE.get(g)
        if code is None:
            if len(_AUTO_CHOICE) > 4096:
                _AUTO_CHOICE.clear()
            code = _AUTO_CHOICE[g] = _ALGO_CODE[dispatch.choose(dispatch.Algo.AUTO, g)]
        return code
    return _ALGO_CODE[dispatch.choose(dispatch.check_algo(algo), g)]  # raises for bad names


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

def conv2d_forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                   dilation, groups: int, algo: str) -> Tensor:
    """The body of the conv2d op: checks, allocates the output and runs the kernel. Called by
    the op, and directly by fastconv.conv2d in eager calls that need no autograd."""
    _check_dtype("input", input)
    _check_dtype("weight", weight, input)
    g = cached_geometry(input.shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None:
        _check_dtype("bias", bias, input)
        if tuple(bias.shape) != (g[4],):
            raise ValueError(f"fastconv: bias must have shape ({g[4]},), got {tuple(bias.shape)}")
    code = _kernel_algo(algo, g)
    out_cl = _channels_last(input) or _channels_last(weight)
    y = _empty((g[0], g[4], g[7], g[8]), input, out_cl)
    if y.numel() == 0:
        return y
    x, x_layout = _dense(input)
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    _C.forward(code, _DTYPE_CODE[x.dtype], g, x.data_ptr(), x_layout, w.data_ptr(),
               b.data_ptr() if b is not None else 0, y.data_ptr(), int(out_cl),
               torch.get_num_threads())
    return y


@torch.library.custom_op("fastconv::conv2d", mutates_args=(), device_types="cpu")
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, algo: str) -> Tensor:
    """y = conv(input, weight) + bias with explicit (top, bottom, left, right) padding."""
    return conv2d_forward(input, weight, bias, stride, padding, dilation, groups, algo)


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, algo):
    _check_dtype("input", input)
    _check_dtype("weight", weight, input)
    g = geometry(input.shape, weight.shape, stride, padding, dilation, groups)
    return _empty((g[0], g[4], g[7], g[8]), input, _channels_last(input) or _channels_last(weight))


def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), groups, algo)
    ctx.has_bias = bias is not None


def _conv2d_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    conv = ctx.conv
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = conv2d_grad_input(grad, weight, list(input.shape), *conv)
    if ctx.needs_input_grad[1]:
        gw = conv2d_grad_weight(grad, input, list(weight.shape), *conv)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gb = conv2d_grad_bias(grad)
    return gx, gw, gb, None, None, None, None, None


conv2d.register_autograd(_conv2d_backward, setup_context=_conv2d_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_input
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastconv::conv2d_grad_input", mutates_args=(), device_types="cpu")
def conv2d_grad_input(grad_output: Tensor, weight: Tensor, input_size: Sequence[int],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      groups: int, algo: str) -> Tensor:
    """Gradient of conv2d with respect to its input (a transposed convolution of grad_output)."""
    _check_dtype("grad_output", grad_output)
    _check_dtype("weight", weight, grad_output)
    g = _grad_geometry(input_size, weight.shape, grad_output.shape, stride, padding, dilation, groups)
    code = _kernel_algo(algo, g)
    out_cl = _channels_last(grad_output) or _channels_last(weight)
    gx = _empty(tuple(input_size), grad_output, out_cl)
    if gx.numel() == 0:
        return gx
    if grad_output.numel() == 0:
        return gx.zero_()
    gy, gy_layout = _dense(grad_output)
    w = weight.contiguous()
    _C.grad_input(code, _DTYPE_CODE[gy.dtype], g, gy.data_ptr(), gy_layout, w.data_ptr(),
                  gx.data_ptr(), int(out_cl), torch.get_num_threads())
    return gx


@conv2d_grad_input.register_fake
def _(grad_output, weight, input_size, stride, padding, dilation, groups, algo):
    _grad_geometry(input_size, weight.shape, grad_output.shape, stride, padding, dilation, groups)
    return _empty(tuple(input_size), grad_output,
                  _channels_last(grad_output) or _channels_last(weight))


def _grad_geometry(input_size, weight_size, grad_output_shape, stride, padding, dilation, groups):
    g = geometry(input_size, weight_size, stride, padding, dilation, groups)
    expected = (g[0], g[4], g[7], g[8])
    if tuple(grad_output_shape) != expected:
        raise ValueError(f"fastconv: grad_output has shape {tuple(grad_output_shape)}, "
                         f"expected {expected}")
    return g


def _grad_input_setup(ctx, inputs, output):
    grad_output, weight, input_size, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(grad_output, weight)
    ctx.conv = (list(stride), list(padding), list(dilation), groups, algo)


def _grad_input_backward(ctx, ggx):
    # gx = Gx(gy, w): d/dgy = F(ggx, w), d/dw = Gw(gy, ggx).
    grad_output, weight = ctx.saved_tensors
    d_gy = d_w = None
    if ctx.needs_input_grad[0]:
        d_gy = conv2d(ggx, weight, None, *ctx.conv)
    if ctx.needs_input_grad[1]:
        d_w = conv2d_grad_weight(grad_output, ggx, list(weight.shape), *ctx.conv)
    return d_gy, d_w, None, None, None, None, None, None


conv2d_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_weight
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastconv::conv2d_grad_weight", mutates_args=(), device_types="cpu")
def conv2d_grad_weight(grad_output: Tensor, input: Tensor, weight_size: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                       groups: int, algo: str) -> Tensor:
    """Gradient of conv2d with respect to its weight; returned OIHW-contiguous."""
    _check_dtype("grad_output", grad_output)
    _check_dtype("input", input, grad_output)
    g = _grad_geometry(input.shape, weight_size, grad_output.shape, stride, padding, dilation, groups)
    code = _kernel_algo(algo, g)
    gw = torch.empty(tuple(weight_size), dtype=input.dtype, device=input.device)
    if gw.numel() == 0:
        return gw
    if grad_output.numel() == 0:
        return gw.zero_()
    gy, gy_layout = _dense(grad_output)
    x, x_layout = _dense(input)
    _C.grad_weight(code, _DTYPE_CODE[x.dtype], g, gy.data_ptr(), gy_layout, x.data_ptr(), x_layout,
                   gw.data_ptr(), torch.get_num_threads())
    return gw


@conv2d_grad_weight.register_fake
def _(grad_output, input, weight_size, stride, padding, dilation, groups, algo):
    _grad_geometry(input.shape, weight_size, grad_output.shape, stride, padding, dilation, groups)
    return input.new_empty(tuple(weight_size))


def _grad_weight_setup(ctx, inputs, output):
    grad_output, input, weight_size, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(grad_output, input)
    ctx.conv = (list(stride), list(padding), list(dilation), groups, algo)


def _grad_weight_backward(ctx, ggw):
    # gw = Gw(gy, x): d/dgy = F(x, ggw), d/dx = Gx(gy, ggw).
    grad_output, input = ctx.saved_tensors
    d_gy = d_x = None
    if ctx.needs_input_grad[0]:
        d_gy = conv2d(input, ggw, None, *ctx.conv)
    if ctx.needs_input_grad[1]:
        d_x = conv2d_grad_input(grad_output, ggw, list(input.shape), *ctx.conv)
    return d_gy, d_x, None, None, None, None, None, None


conv2d_grad_weight.register_autograd(_grad_weight_backward, setup_context=_grad_weight_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_bias
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("fastconv::conv2d_grad_bias", mutates_args=(), device_types="cpu")
def conv2d_grad_bias(grad_output: Tensor) -> Tensor:
    """Per-channel sum of grad_output over batch and space (accumulated in float64)."""
    _check_dtype("grad_output", grad_output)
    if grad_output.dim() != 4:
        raise ValueError(f"fastconv: grad_output must be 4-D, got shape {tuple(grad_output.shape)}")
    N, K, OH, OW = grad_output.shape
    gb = grad_output.new_empty((K,))
    if gb.numel() == 0:
        return gb
    if grad_output.numel() == 0:
        return gb.zero_()
    gy, gy_layout = _dense(grad_output)
    g = (N, K, 1, 1, K, 1, 1, OH, OW, 1, 1, 1, 1, 0, 0, 0, 0, 1)
    _C.grad_bias(_DTYPE_CODE[gy.dtype], g, gy.data_ptr(), gy_layout, gb.data_ptr(),
                 torch.get_num_threads())
    return gb


@conv2d_grad_bias.register_fake
def _(grad_output):
    return grad_output.new_empty((grad_output.shape[1],))


def _grad_bias_setup(ctx, inputs, output):
    ctx.shape = tuple(inputs[0].shape)


def _grad_bias_backward(ctx, ggb):
    N, K, OH, OW = ctx.shape
    return ggb.reshape(1, K, 1, 1).expand(N, K, OH, OW).contiguous()


conv2d_grad_bias.register_autograd(_grad_bias_backward, setup_context=_grad_bias_setup)


# --------------------------------------------------------------------------------------------
# GEMM (tests and benchmarks only)
# --------------------------------------------------------------------------------------------

def gemm(a: Tensor, b: Tensor, c: Optional[Tensor] = None, *, accumulate: bool = False,
         scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, per_row: bool = True,
         relu: bool = False) -> Tensor:
    """C = A @ B (+ C if accumulate), then C = relu(C * scale + shift) per row or column, with
    fastconv's packed GEMM. A and B may be any strided 2-D views; C must have unit column
    stride. Not differentiable; for testing and benchmarking the kernel."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    for name, t in (("a", a), ("b", b)):
        _check_dtype(name, t, a)
    M, K = a.shape
    N = b.shape[1]
    if c is None:
        if accumulate:
            raise ValueError("gemm: accumulate needs c")
        c = a.new_empty((M, N))
    if tuple(c.shape) != (M, N) or (N > 1 and c.stride(1) != 1) or c.dtype != a.dtype:
        raise ValueError("gemm: c must be a (M, N) tensor of a's dtype with unit column stride")
    channels = M if per_row else N
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None and (v.dtype != a.dtype or v.dim() != 1 or v.numel() != channels
                              or v.stride(0) != 1):
            raise ValueError(f"gemm: {name} must be a contiguous vector of {channels} values")
    _C.gemm(_DTYPE_CODE[a.dtype], (M, N, K), a.data_ptr(), a.stride(0), a.stride(1),
            b.data_ptr(), b.stride(0), b.stride(1), c.data_ptr(), c.stride(0), accumulate,
            scale.data_ptr() if scale is not None else 0,
            shift.data_ptr() if shift is not None else 0, per_row, relu,
            torch.get_num_threads())
    return c


def gemm_blocking(dtype: torch.dtype = torch.float32) -> dict:
    """The active ISA's GEMM register tile (mr x nr) and cache blocks (kc, mc, nc)."""
    return dict(_C.gemm_blocking(_DTYPE_CODE[dtype]))
