"""Float64 reference convolution: forward and both gradients, written as one small matrix
product per kernel tap (no torch convolution inside). Every test and benchmark checks
against these.

All functions take padding as (top, bottom, left, right), like :mod:`fastconv.ops`, and
return float64 tensors.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def _tap_view(xp: Tensor, r: int, s: int, OH: int, OW: int, stride, dilation) -> Tensor:
    """The (N, C, OH, OW) slice of the padded input that kernel tap (r, s) multiplies."""
    sh, sw = stride
    dh, dw = dilation
    h0, w0 = r * dh, s * dw
    return xp[:, :, h0:h0 + sh * (OH - 1) + 1:sh, w0:w0 + sw * (OW - 1) + 1:sw]


def _out_size(H, W, R, S, stride, padding, dilation):
    pt, pb, pl, pr = padding
    OH = (H + pt + pb - dilation[0] * (R - 1) - 1) // stride[0] + 1
    OW = (W + pl + pr - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return OH, OW


def _pad(x: Tensor, padding) -> Tensor:
    pt, pb, pl, pr = padding
    N, C, H, W = x.shape
    xp = x.new_zeros((N, C, H + pt + pb, W + pl + pr))
    xp[:, :, pt:pt + H, pl:pl + W] = x
    return xp


def conv2d(x: Tensor, w: Tensor, b: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """y[n, k, oh, ow] = b[k] + sum_{c, r, s} w[k, c, r, s] * xpad[n, g*Cg + c, oh*sh + r*dh, ow*sw + s*dw]."""
    x, w = x.double(), w.double()
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    G = groups
    OH, OW = _out_size(H, W, R, S, stride, padding, dilation)
    xp = _pad(x, padding)
    y = x.new_zeros((N, G, K // G, OH, OW))
    wg = w.reshape(G, K // G, Cg, R, S)
    for r in range(R):
        for s in range(S):
            xs = _tap_view(xp, r, s, OH, OW, stride, dilation).reshape(N, G, Cg, OH, OW)
            y += torch.einsum("ngchw,gkc->ngkhw", xs, wg[:, :, :, r, s])
    y = y.reshape(N, K, OH, OW)
    if b is not None:
        y += b.double().reshape(1, K, 1, 1)
    return y


def conv2d_grad_input(gy: Tensor, w: Tensor, input_size: Sequence[int], stride, padding,
                      dilation, groups: int) -> Tensor:
    """Adjoint of :func:`conv2d` in x: each tap scatters gy * w back onto the padded input."""
    gy, w = gy.double(), w.double()
    N, C, H, W = input_size
    K, Cg, R, S = w.shape
    G = groups
    OH, OW = gy.shape[2], gy.shape[3]
    pt, pb, pl, pr = padding
    gxp = gy.new_zeros((N, C, H + pt + pb, W + pl + pr))
    gyg = gy.reshape(N, G, K // G, OH, OW)
    wg = w.reshape(G, K // G, Cg, R, S)
    for r in range(R):
        for s in range(S):
            contrib = torch.einsum("ngkhw,gkc->ngchw", gyg, wg[:, :, :, r, s]).reshape(N, C, OH, OW)
            _tap_view(gxp, r, s, OH, OW, stride, dilation).add_(contrib)
    return gxp[:, :, pt:pt + H, pl:pl + W].contiguous()


def conv2d_grad_weight(gy: Tensor, x: Tensor, weight_size: Sequence[int], stride, padding,
                       dilation, groups: int) -> Tensor:
    """Adjoint of :func:`conv2d` in w: per tap, gy contracted with the tap's input slice."""
    gy, x = gy.double(), x.double()
    N, C, H, W = x.shape
    K, Cg, R, S = weight_size
    G = groups
    OH, OW = gy.shape[2], gy.shape[3]
    xp = _pad(x, padding)
    gyg = gy.reshape(N, G, K // G, OH, OW)
    gw = gy.new_zeros((G, K // G, Cg, R, S))
    for r in range(R):
        for s in range(S):
            xs = _tap_view(xp, r, s, OH, OW, stride, dilation).reshape(N, G, Cg, OH, OW)
            gw[:, :, :, r, s] = torch.einsum("ngkhw,ngchw->gkc", gyg, xs)
    return gw.reshape(K, Cg, R, S)


def conv2d_grad_bias(gy: Tensor) -> Tensor:
    return gy.double().sum(dim=(0, 2, 3))
