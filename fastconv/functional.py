"""``fastconv.conv2d``: torch.nn.functional.conv2d's semantics on fastconv's kernels."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend, dispatch, ops, registry
from .autograd import record_conv2d, record_conv_bn
from .errors import InvalidConvolution
from .weight_cache import PackedWeight

IntPair = Union[int, tuple, list]


def pair(name: str, value) -> tuple:
    """An int or a one- or two-element sequence of ints as a pair; TypeError for anything
    else (floats and bools included, as torch)."""
    if type(value) is int:
        return (value, value)
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
    value = tuple(value)
    if not all(type(v) is int for v in value):
        raise TypeError(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
    if len(value) == 1:
        value = value * 2
    if len(value) != 2:
        raise InvalidConvolution(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
    return value


def explicit_padding(padding, kernel: tuple, stride: tuple, dilation: tuple) -> tuple:
    """torch's padding argument (int, pair, 'same' or 'valid') as (top, bottom, left, right).

    'same' pads dilation*(k-1) in total per dimension, the odd extra on the bottom/right, as
    torch does."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise InvalidConvolution("fastconv: padding='same' is not supported for strided "
                                 f"convolutions (stride={stride})")
            th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise InvalidConvolution(f"fastconv: invalid padding string {padding!r}; expected 'same' or 'valid'")
    ph, pw = pair("padding", padding)
    return (ph, ph, pw, pw)


def _normalize(weight_shape, stride, padding, dilation, groups, algo) -> tuple:
    """Arguments as the op takes them: (stride, 4-value padding, dilation, algo name).
    'auto' is passed on: the op resolves it from the full problem (fastconv.dispatch)."""
    name = dispatch.check_algo(algo)
    if type(groups) is not int:
        raise TypeError(f"fastconv: groups must be an int, got {groups!r}")
    stride = pair("stride", stride)
    dilation = pair("dilation", dilation)
    if len(weight_shape) != 4:
        raise InvalidConvolution(f"fastconv: expected a 4-D weight (K, C/groups, R, S), got shape "
                         f"{tuple(weight_shape)}")
    pad = explicit_padding(padding, tuple(weight_shape[2:]), stride, dilation)
    return stride, pad, dilation, name


def _memo_key(value):
    """value if it can be a memo key without hiding a type error (1.0 == 1 and True == 1 as
    dict keys), else None: only ints, strings and tuples of ints are memoised."""
    kind = type(value)
    if kind is int or kind is str:
        return value
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # modules pass pairs: checked without a generator
    if kind is tuple and all(type(v) is int for v in value):
        return value
    return None


_NORMALIZED: dict = {}


def _normalized(weight_shape, stride, padding, dilation, groups, algo) -> tuple:
    parts = (_memo_key(stride), _memo_key(padding), _memo_key(dilation), _memo_key(groups),
             _memo_key(algo))
    if any(p is None for p in parts):
        return _normalize(weight_shape, stride, padding, dilation, groups, algo)
    key = (weight_shape, *parts)
    args = _NORMALIZED.get(key)
    if args is None:
        args = _normalize(weight_shape, stride, padding, dilation, groups, algo)
        if len(_NORMALIZED) > 4096:
            _NORMALIZED.clear()
        _NORMALIZED[key] = args
    return args


def _plain_eager(input: Tensor, weight: Tensor, *others: Optional[Tensor]) -> bool:
    """True when the kernels may be called without the dispatcher: CPU or CUDA tensors, no
    torch.compile tracing, no __torch_function__ override, dispatch mode or functorch
    transform. Then a call that needs no gradient runs the kernel directly (saves 6-11 us on
    the CPU, ~160 us on an H100), and one that does records an autograd.Function of
    fastconv.autograd (saves the custom-op autograd wrapper's tens of microseconds). Tensors
    on different devices take this path too: the op bodies raise the ops' error."""
    if torch.compiler.is_compiling():
        return False
    tensors = (input, weight, *(t for t in others if t is not None))
    if torch.overrides.has_torch_function(tensors):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    return (input.is_cpu and weight.is_cpu) or (input.is_cuda and weight.is_cuda)


def _has_fastconv_kernels(input: Tensor) -> bool:
    """Whether some algorithm has kernels for input's device and dtype, outside autocast
    (under autocast torch casts a convolution's operands: only torch's own conv does that)."""
    device = ops.device_type(input)
    return registry.runnable(device, input.dtype) and not torch.is_autocast_enabled(device)


def conv2d(input: Tensor, weight: Union[Tensor, PackedWeight], bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
           algo: str = "auto") -> Tensor:
    """2-D convolution with exactly :func:`torch.nn.functional.conv2d`'s semantics.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32 or float64; NCHW or channels_last.
        weight: (K, C/groups, R, S), same dtype; or a :func:`fastconv.prepack` of it, whose
            packed weights calls that need no gradient reuse (fastconv.weight_cache).
        bias: optional (K,).
        stride, dilation: int or pair of positive ints.
        padding: int or pair of non-negative ints, or 'same' (stride 1 only) or 'valid'.
        groups: divides both C and K.
        algo: 'auto' (pick per problem, see fastconv.dispatch.choose) or a registered
            algorithm ('direct', 'im2col'; ``fastconv.Algo`` lists them). With 'auto', a call
            that no fastconv kernel can run (another dtype such as float16 or bfloat16,
            another device, or autocast enabled) runs torch.nn.functional.conv2d instead. A
            named algorithm that cannot run the call raises
            :class:`fastconv.errors.AlgorithmUnavailable` saying why.

    Returns:
        (N, K, OH, OW), channels_last if input or weight is, like torch. Differentiable in
        input, weight and bias (twice), traceable by torch.compile (it runs the custom op
        ``torch.ops.fastconv.conv2d``; eager calls record fastconv.autograd.Conv2dFunction
        around the same kernels, which costs less per call).
    """
    return conv2d_activation(input, weight, bias, stride, padding, dilation, groups, algo=algo,
                             activation="none")


def _torch_activation(y: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    return y


def conv2d_activation(input: Tensor, weight: Union[Tensor, PackedWeight],
                      bias: Optional[Tensor] = None, stride: IntPair = 1,
                      padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1,
                      *, algo: str = "auto", activation: str = "none") -> Tensor:
    """:func:`conv2d` followed by ``activation`` ('none', 'relu' or 'relu6'), which the
    kernels apply in their output epilogue: the same result as ``F.relu(F.conv2d(...))``
    without a pass of its own over the output."""
    ops._activation_code(activation)
    cache = None
    if isinstance(weight, PackedWeight):
        cache, weight = weight, weight.weight
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastconv: input and weight must be tensors (or a weight from "
                        "fastconv.prepack)")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError("fastconv: bias must be a tensor or None")
    if algo == "auto" and (not _has_fastconv_kernels(input) or dispatch.leaves_to_torch(
            ops.device_type(input), weight.shape, groups)):
        return _torch_activation(F.conv2d(input, weight, bias, stride, padding, dilation, groups),
                                 activation)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    elif input.dim() != 4:
        raise InvalidConvolution(f"fastconv: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got "
                         f"shape {tuple(input.shape)}")
    stride, pad, dilation, name = _normalized(weight.shape, stride, padding, dilation, groups,
                                              algo)
    needs_grad = torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or
                                              (bias is not None and bias.requires_grad))
    if activation != "none" and (needs_grad or not _plain_eager(input, weight, bias)):
        out = ops.conv2d_activation(input, weight, bias, stride, pad, dilation, groups, name,
                                    activation)
    elif not _plain_eager(input, weight, bias):
        out = ops.conv2d(input, weight, bias, stride, pad, dilation, groups, name)
    elif needs_grad:
        out = record_conv2d(input, weight, bias, stride, pad, dilation, groups, name)
    else:  # no gradient: the only calls that may use the weight cache
        out = ops.conv2d_forward(input, weight, bias, stride, pad, dilation, groups, name,
                                 cache, activation=backend.ACTIVATIONS[activation])
    return out.squeeze(0) if unbatched else out


def fold_batch_norm(weight: Tensor, bias: Optional[Tensor], running_mean: Tensor,
                    running_var: Tensor, bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """The weight and bias of one convolution equal to conv2d -> batch_norm with these
    running statistics (eval mode): w * s and (b - mean) * s + beta per output channel,
    s = gamma / sqrt(var + eps). Differentiable in every tensor."""
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    folded_w = weight * scale.reshape(-1, 1, 1, 1).to(weight.dtype)
    shift = -running_mean if bias is None else bias - running_mean
    folded_b = shift * scale
    if bn_bias is not None:
        folded_b = folded_b + bn_bias
    return folded_w, folded_b.to(weight.dtype)


def conv2d_bn(input: Tensor, weight: Tensor, bias: Optional[Tensor],
              running_mean: Optional[Tensor], running_var: Optional[Tensor],
              bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
              training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
              activation: str = "relu", stride: IntPair = 1, padding: Union[IntPair, str] = 0,
              dilation: IntPair = 1, groups: int = 1, *, algo: str = "auto") -> Tensor:
    """``activation(F.batch_norm(F.conv2d(input, weight, bias, stride, padding, dilation,
    groups), running_mean, running_var, bn_weight, bn_bias, training, momentum, eps))`` with
    torch's semantics, fused:

    * training (or no running statistics): one convolution pass that also gathers each
      channel's batch sum and sum of squares, then one normalise + activation pass; the
      running statistics, when given, are updated in place as F.batch_norm does (unbiased
      variance). Backward: input, weight, bias, bn_weight, bn_bias.
    * eval: the running statistics folded into the weights and bias
      (:func:`fold_batch_norm`), the activation applied in the convolution's epilogue.

    ``activation``: 'relu', 'relu6' or 'none'. Calls without fastconv kernels (other dtypes
    or devices, autocast) run torch's three functions.
    """
    ops._activation_code(activation)
    if input.dim() != 4:
        raise InvalidConvolution(f"fastconv: conv2d_bn expects a 4-D (N, C, H, W) input, got "
                                 f"shape {tuple(input.shape)}")
    batch_stats = training or running_mean is None or running_var is None
    if algo == "auto" and (not _has_fastconv_kernels(input) or dispatch.leaves_to_torch(
            ops.device_type(input), weight.shape, groups)):
        z = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
        return _torch_activation(F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias,
                                              batch_stats, momentum, eps), activation)
    if not batch_stats:
        folded_w, folded_b = fold_batch_norm(weight, bias, running_mean, running_var,
                                             bn_weight, bn_bias, eps)
        return conv2d_activation(input, folded_w, folded_b, stride, padding, dilation, groups,
                                 algo=algo, activation=activation)
    stride, pad, dilation, name = _normalized(weight.shape, stride, padding, dilation, groups,
                                              algo)
    op = (record_conv_bn if _plain_eager(input, weight, bias, bn_weight, bn_bias)
          else ops.conv2d_bn)
    y, _, mean, invstd = op(input, weight, bias, bn_weight, bn_bias, stride, pad, dilation,
                            groups, name, float(eps), activation)
    # Counted from the output (no plan lookup in code torch.compile traces); one value per
    # channel is refused as F.batch_norm does, its statistics unused.
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {y.shape}")
    if training and running_mean is not None and running_var is not None and count > 0:
        update_running_stats(running_mean, running_var, mean, invstd, eps, count, momentum)
    return y


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                         invstd: Tensor, eps: float, count: int, momentum: float) -> None:
    """running = (1 - momentum) running + momentum batch, in place; the variance unbiased
    (count / (count - 1)), as F.batch_norm keeps it in its running estimate."""
    with torch.no_grad():
        # (a constant channel's invstd, rounded to float32, could give -1e-12 here)
        var = (invstd.double().pow(-2) - eps).clamp_(min=0) * (count / (count - 1))
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
