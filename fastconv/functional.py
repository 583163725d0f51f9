"""``fastconv.conv2d``: torch.nn.functional.conv2d's semantics on fastconv's kernels."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, ops

IntPair = Union[int, tuple, list]


def _pair(name: str, value) -> tuple:
    if isinstance(value, int):
        return (value, value)
    if not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
    value = tuple(value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
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
                raise ValueError("fastconv: padding='same' is not supported for strided "
                                 f"convolutions (stride={stride})")
            th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"fastconv: invalid padding string {padding!r}; expected 'same' or 'valid'")
    ph, pw = _pair("padding", padding)
    return (ph, ph, pw, pw)


def _normalize(input_shape, weight_shape, stride, padding, dilation, groups, algo) -> tuple:
    """Arguments as the op takes them: (stride, 4-value padding, dilation, algo). 'auto' is
    passed on: the op resolves it from the full geometry (fastconv.dispatch.choose)."""
    a = dispatch.check_algo(algo)
    if not isinstance(groups, int):
        raise TypeError(f"fastconv: groups must be an int, got {groups!r}")
    if len(weight_shape) != 4:
        raise ValueError(f"fastconv: expected a 4-D weight (K, C/groups, R, S), got shape "
                         f"{tuple(weight_shape)}")
    if len(input_shape) != 4:
        raise ValueError(f"fastconv: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got "
                         f"shape {tuple(input_shape)}")
    stride = _pair("stride", stride)
    dilation = _pair("dilation", dilation)
    kernel = (weight_shape[2], weight_shape[3])
    pad = explicit_padding(padding, kernel, stride, dilation)
    return stride, pad, dilation, a.value


_NORMALIZED: dict = {}


def _eager_without_autograd(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """True when calling the kernel directly is indistinguishable from calling the op: plain
    CPU tensors, no autograd needed, no torch.compile tracing, dispatch mode or functorch
    transform active. Skipping the dispatcher saves ~6-11 us per call."""
    if torch.compiler.is_compiling():
        return False
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if torch.overrides.has_torch_function(tensors):
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    if not (input.is_cpu and weight.is_cpu):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
           padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
           algo: str = "auto") -> Tensor:
    """2-D convolution with exactly :func:`torch.nn.functional.conv2d`'s semantics.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W); float32 or float64; NCHW or channels_last.
        weight: (K, C/groups, R, S), same dtype.
        bias: optional (K,).
        stride, dilation: int or pair of positive ints.
        padding: int or pair of non-negative ints, or 'same' (stride 1 only) or 'valid'.
        groups: divides both C and K.
        algo: 'auto' (pick by shape), 'direct', 'im2col' or 'winograd'.

    Returns:
        (N, K, OH, OW), channels_last if input or weight is, like torch. Differentiable in
        input, weight and bias (twice), traceable by torch.compile (it runs the custom op
        ``torch.ops.fastconv.conv2d``).
    """
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastconv: input and weight must be tensors")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    try:
        key = (input.shape, weight.shape, stride, padding, dilation, groups, algo)
        args = _NORMALIZED.get(key)
    except TypeError:  # unhashable arguments, e.g. lists
        key, args = None, None
    if args is None:
        args = _normalize(input.shape, weight.shape, stride, padding, dilation, groups, algo)
        if key is not None:
            if len(_NORMALIZED) > 4096:
                _NORMALIZED.clear()
            _NORMALIZED[key] = args
    stride, pad, dilation, chosen = args
    if _eager_without_autograd(input, weight, bias):
        out = ops.conv2d_forward(input, weight, bias, stride, pad, dilation, groups, chosen)
    else:
        out = ops.conv2d(input, weight, bias, stride, pad, dilation, groups, chosen)
    return out.squeeze(0) if unbatched else out
