"""Eager autograd for fastconv.conv2d, around the same kernels as the custom ops.

torch's custom-op autograd wrapper costs tens of microseconds per call (argument defaults are
rebuilt from the schema on every call), which dominates small training steps. In eager mode,
fastconv.conv2d (and fastconv.functional.conv2d_bn in training) therefore record these
torch.autograd.Functions instead, whose forward and backward call the op bodies directly. Its backward runs through the custom ops when a graph
is being built (create_graph=True), so double backward keeps working; torch.compile, dispatch
modes and functorch transforms always use the custom ops themselves (fastconv.functional).
"""
from __future__ import annotations

import torch

from . import ops

# torch.autograd.Function.apply is a Python wrapper around the C++ _FunctionBase.apply that
# binds default arguments (only with setup_context) and, outside functorch transforms, maps
# unwrap_dead_wrappers over the arguments: ~3.5 us of a tiny convolution's ~20 us forward.
# The eager path calls these Functions only outside functorch transforms
# (functional._plain_eager), so it records them through the C++ apply directly.
_BASE_APPLY = vars(torch._C._FunctionBase).get("apply")  # a classmethod descriptor


def _record(function: type):
    """function.apply without the Python wrapper (function.apply itself if torch has none)."""
    return function.apply if _BASE_APPLY is None else _BASE_APPLY.__get__(None, function)


class Conv2dFunction(torch.autograd.Function):
    # forward(ctx, ...) rather than forward + setup_context: forward + backward of a 1x8x8x8
    # * 8x8x3x3 convolution took 110-119 us this way and 158-164 us the other (torch: 87-91).
    # functorch transforms, which need setup_context, use the custom ops instead.
    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, algo):
        ops.conv2d_setup(ctx, (input, weight, bias, stride, padding, dilation, groups, algo),
                         None)
        return ops.conv2d_forward(input, weight, bias, stride, padding, dilation, groups, algo)

    @staticmethod
    def backward(ctx, grad):
        # Grad mode is on inside backward only when the caller builds a graph of it.
        return ops.conv2d_backward(ctx, grad, differentiable=torch.is_grad_enabled())


class ConvBNFunction(torch.autograd.Function):
    """fastconv.ops.conv2d_bn (Conv -> BN with batch statistics -> activation) in eager mode:
    its body forward, and the bodies of its backward unless a graph of the backward is being
    built (then the ops, as conv2d_bn's own autograd does)."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
                groups, algo, eps, activation):
        inputs = (input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups,
                  algo, eps, activation)
        outputs = ops.conv2d_bn_forward(*inputs)
        ops.conv2d_bn_setup(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, grad_y, _grad_z, _grad_mean, _grad_invstd):
        return ops.conv2d_bn_backward(ctx, grad_y, differentiable=torch.is_grad_enabled())


#: Conv2dFunction.apply and ConvBNFunction.apply for callers outside functorch transforms.
record_conv2d = _record(Conv2dFunction)
record_conv_bn = _record(ConvBNFunction)
