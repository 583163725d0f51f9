"""``fastconv.conv2d``: torch.nn.functional.conv2d's semantics on fastconv's kernels."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch, ops

IntPair = Union[int, tuple, list]


def _pair(name: str, value) -> tuple:
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"fastconv: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
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
            (th, tw) = (dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1))
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"fastconv: invalid padding string {padding!r}; expected 'same' or 'valid'")
    ph, pw = _pair("padding", padding)
    return (ph, ph, pw, pw)


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
        input, weight and bias (twice), traceable by torch.compile.
    """
    a = dispatch.check_algo(algo)
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("fastconv: input and weight must be tensors")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"fastconv: groups must be an int, got {groups!r}")
    stride = _pair("stride", stride)
    dilation = _pair("dilation", dilation)
    if weight.dim() != 4:
        raise ValueError(f"fastconv: expected a 4-D weight (K, C/groups, R, S), got shape "
                         f"{tuple(weight.shape)}")
    kernel = (weight.shape[2], weight.shape[3])
    pad = explicit_padding(padding, kernel, stride, dilation)
    chosen = dispatch.choose(a, kernel=kernel, stride=stride, dilation=dilation, groups=groups,
                             in_channels=input.shape[1] if input.dim() > 1 else 0,
                             out_channels=weight.shape[0])
    out = ops.conv2d(input, weight, bias, stride, pad, dilation, groups, chosen)
    return out.squeeze(0) if unbatched else out
