"""fastconv's CUDA kernels (Numba CUDA): depthwise convolution and fused Conv-BN-activation,
forward and backward, float32 and float64.

The custom ops (fastconv.ops) run them for CUDA tensors through the registry, so
``fastconv.conv2d``, ``fastconv.nn.Conv2d``, ``ConvBNReLU2d`` and ``fuse`` work on a model
moved to the GPU; the functions here call them directly. On a GPU they take CUDA tensors (no
host copies) and launch on torch's current stream; under numba's simulator
(``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported) they take and return CPU tensors, so
that the kernels themselves run in the tests of a machine without a GPU.

numba-cuda is an optional extra (``pip install 'fastconv[cuda]'``); nothing here imports it
until a kernel is launched, and :func:`unavailable` says why it cannot be.

Kernels and launch geometry (fastconv.cuda.geometry):

* depthwise forward: blocks of 128 threads stage their tiles' input halos and weights in
  shared memory; a tile is as wide as the output row (8-32) and up to 4 rows per thread tall,
  and small maps put 2-16 planes in one block;
* depthwise grad-input: a gather per input pixel over the taps of its stride phase;
  grad-weight: a block per (channel, slice of pixels), one atomic add per weight and block;
* everything else (any groups): an implicit GEMM, 64 x 64 outputs per block, 8 x 4 per
  thread, the reduction staged 8 deep in shared memory (grad-weight split across blocks);
* training batch norm: the forward's epilogue leaves per-block (count, mean, M2) per channel,
  merged per channel with Chan's formula (float32 throughout), then a normalise +
  activation pass; the backward sums g and g xhat per channel, then forms grad_z.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _runtime
from ._runtime import simulated

IntPair = Union[int, Sequence[int]]

__all__ = ["available", "unavailable", "simulated", "depthwise_conv2d_forward",
           "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_weight",
           "conv_bn_relu_forward", "conv_bn_relu_train_forward", "conv_bn_relu_backward"]


def unavailable() -> Optional[str]:
    """Why the kernels cannot run in this process (numba-cuda missing, or neither a GPU nor
    the simulator), or None when they can."""
    reason = _runtime.import_error()
    if reason is not None:
        return reason
    if simulated():
        return None
    return _no_device()


@functools.lru_cache(maxsize=1)
def _no_device() -> Optional[str]:
    # Asked once per process: every launcher checks, and the drivers' answers cost ~0.1 ms.
    if not torch.cuda.is_available():
        return "no CUDA device is available to torch"
    from numba import cuda
    if not cuda.is_available():
        return "numba finds no CUDA driver or device"
    return None


def available() -> bool:
    return unavailable() is None


def _pair(v: IntPair, name: str) -> tuple:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2:
        raise ValueError(f"fastconv.cuda: {name} takes an int or a pair, got {v!r}")
    return t


def _padding4(padding) -> tuple:
    """(top, bottom, left, right) from an int, a (height, width) pair or four values."""
    if isinstance(padding, int):
        return (padding,) * 4
    p = tuple(padding)
    if len(p) == 2:
        return (p[0], p[0], p[1], p[1])
    if len(p) == 4:
        return p
    raise ValueError(f"fastconv.cuda: padding takes an int, a pair or four values, got "
                     f"{padding!r}")


def _problem(input_shape, weight_shape, stride, padding, dilation, groups):
    from ..problem import conv2d_problem
    return conv2d_problem(tuple(input_shape), tuple(weight_shape), _pair(stride, "stride"),
                          _padding4(padding), _pair(dilation, "dilation"), groups)


def _check(**tensors: Optional[Tensor]) -> None:
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"fastconv.cuda: the kernels cannot run: {reason}")
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        _runtime.check_tensor(name, t)
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype:
            raise TypeError(f"fastconv.cuda: {name} has dtype {t.dtype}, {first[0]} "
                            f"{first[1].dtype}")


def _activation(name: str) -> int:
    from ..backend import ACTIVATIONS
    if name not in ACTIVATIONS:
        raise ValueError(f"fastconv.cuda: unknown activation {name!r}; expected one of "
                         f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _depthwise_problem(x_shape, w_shape, stride, padding, dilation):
    # groups = channels: conv2d_problem rejects a weight with more than one input channel
    return _problem(x_shape, w_shape, stride, padding, dilation, x_shape[1])


def depthwise_conv2d_forward(x: Tensor, w: Tensor, bias: Optional[Tensor] = None,
                             stride: IntPair = 1, padding=0, dilation: IntPair = 1,
                             activation: str = "none") -> Tensor:
    """Depthwise ``F.conv2d(x, w, bias, stride, padding, dilation, groups=C)`` (w: K x 1 x R x
    S, K a multiple of C), then ``activation`` ('none', 'relu', 'relu6') in its epilogue."""
    from . import launch
    _check(x=x, w=w, bias=bias)
    problem = _depthwise_problem(x.shape, w.shape, stride, padding, dilation)
    y = x.new_empty(problem.output_shape)
    if y.numel():
        launch.forward(problem, x.contiguous(), w.contiguous(), bias, y, _activation(activation))
    return y


def depthwise_conv2d_grad_input(grad_output: Tensor, w: Tensor, input_shape: Sequence[int],
                                stride: IntPair = 1, padding=0,
                                dilation: IntPair = 1) -> Tensor:
    """The gradient of :func:`depthwise_conv2d_forward` with respect to x."""
    from . import launch
    _check(grad_output=grad_output, w=w)
    problem = _depthwise_problem(input_shape, w.shape, stride, padding, dilation)
    _check_shape("grad_output", grad_output, problem.output_shape)
    gx = grad_output.new_empty(problem.input_shape)
    if gx.numel():
        launch.grad_input(problem, grad_output.contiguous(), w.contiguous(), gx)
    return gx


def depthwise_conv2d_grad_weight(grad_output: Tensor, x: Tensor, weight_shape: Sequence[int],
                                 stride: IntPair = 1, padding=0,
                                 dilation: IntPair = 1) -> Tensor:
    """The gradient of :func:`depthwise_conv2d_forward` with respect to w."""
    from . import launch
    _check(grad_output=grad_output, x=x)
    problem = _depthwise_problem(x.shape, weight_shape, stride, padding, dilation)
    _check_shape("grad_output", grad_output, problem.output_shape)
    gw = x.new_zeros(problem.weight_shape)
    if gw.numel() and grad_output.numel():
        launch.grad_weight(problem, grad_output.contiguous(), x.contiguous(), gw)
    return gw


def _check_shape(name: str, t: Tensor, shape) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fastconv.cuda: {name} has shape {tuple(t.shape)}, expected "
                         f"{tuple(shape)}")


def conv_bn_relu_forward(x: Tensor, w: Tensor, b: Optional[Tensor], running_mean: Tensor,
                         running_var: Tensor, gamma: Optional[Tensor], beta: Optional[Tensor],
                         eps: float = 1e-5, stride: IntPair = 1, padding=0,
                         dilation: IntPair = 1, groups: int = 1,
                         activation: str = "relu") -> Tensor:
    """Eval-mode ``act(batch_norm(conv2d(x, w, b), running_mean, running_var, gamma, beta))``
    in one kernel: the running statistics folded into w and b, the activation in the
    epilogue (depthwise kernel for depthwise layers, implicit GEMM otherwise)."""
    from . import launch
    from ..functional import fold_batch_norm
    _check(x=x, w=w, b=b, running_mean=running_mean, running_var=running_var, gamma=gamma,
           beta=beta)
    problem = _problem(x.shape, w.shape, stride, padding, dilation, groups)
    act = _activation(activation)
    with torch.no_grad():
        folded_w, folded_b = fold_batch_norm(w, b, running_mean, running_var, gamma, beta, eps)
    y = x.new_empty(problem.output_shape)
    if y.numel():
        launch.forward(problem, x.contiguous(), folded_w.contiguous(), folded_b.contiguous(), y, act)
    return y


def conv_bn_relu_train_forward(x: Tensor, w: Tensor, b: Optional[Tensor],
                               gamma: Optional[Tensor], beta: Optional[Tensor],
                               eps: float = 1e-5, stride: IntPair = 1, padding=0,
                               dilation: IntPair = 1, groups: int = 1,
                               activation: str = "relu",
                               running_mean: Optional[Tensor] = None,
                               running_var: Optional[Tensor] = None, momentum: float = 0.1):
    """Training-mode Conv -> BatchNorm2d (batch statistics) -> activation. Returns (y, z,
    mean, invstd): the output, the convolution's output, the batch mean and 1 / sqrt(biased
    variance + eps), which :func:`conv_bn_relu_backward` takes. The statistics are reduced
    by the convolution's own epilogue while it writes z; the running statistics, when given,
    are updated in place as torch.nn.BatchNorm2d does (momentum, unbiased variance)."""
    from . import launch
    _check(x=x, w=w, b=b, gamma=gamma, beta=beta, running_mean=running_mean,
           running_var=running_var)
    problem = _problem(x.shape, w.shape, stride, padding, dilation, groups)
    act = _activation(activation)
    count = problem.N * problem.OH * problem.OW
    if count <= 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {torch.Size(problem.output_shape)}")
    y, z, mean, invstd = launch.conv_bn_train(problem, x, w, b, gamma, beta, eps, act)
    if running_mean is not None and running_var is not None:
        from ..functional import update_running_stats
        update_running_stats(running_mean, running_var, mean, invstd, eps, count, momentum)
    return y, z, mean, invstd


def conv_bn_relu_backward(grad_y: Tensor, x: Tensor, w: Tensor, y: Tensor, z: Tensor,
                          mean: Tensor, invstd: Tensor, gamma: Optional[Tensor],
                          stride: IntPair = 1, padding=0, dilation: IntPair = 1,
                          groups: int = 1, activation: str = "relu", has_bias: bool = True):
    """Gradients of :func:`conv_bn_relu_train_forward` (from its y, z, mean and invstd):
    (grad_x, grad_w, grad_b or None, grad_gamma, grad_beta)."""
    from . import launch
    _check(grad_y=grad_y, x=x, w=w, y=y, z=z, mean=mean, invstd=invstd, gamma=gamma)
    problem = _problem(x.shape, w.shape, stride, padding, dilation, groups)
    _check_shape("grad_y", grad_y, problem.output_shape)
    grad_z, grad_gamma, grad_beta = launch.bn_backward(
        grad_y.contiguous(), y.contiguous(), z.contiguous(), mean, invstd, gamma,
        _activation(activation))
    gx = x.new_empty(problem.input_shape)
    if gx.numel() and grad_z.numel():
        launch.grad_input(problem, grad_z, w.contiguous(), gx)
    else:
        gx.zero_()
    gw = w.new_zeros(problem.weight_shape)
    if gw.numel() and grad_z.numel():
        launch.grad_weight(problem, grad_z, x.contiguous(), gw)
    gb = grad_z.sum((0, 2, 3)) if has_bias else None
    return gx, gw, gb, grad_gamma, grad_beta
