"""One convolution problem, validated, as a small immutable named structure.

:func:`conv2d_problem` checks a problem in the order torch.nn.functional.conv2d does and
raises the same kind of error (every error here is also a ``RuntimeError``, as torch's are);
:class:`Conv2dProblem` is the result, read by name everywhere (the auto heuristic, the
registry's eligibility checks, the kernels' geometry).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from .errors import InvalidConvolution


@dataclass(frozen=True)
class Conv2dProblem:
    """Input N x C x H x W, weight K x C/groups x R x S, output N x K x OH x OW.

    Padding is explicit per side (top, bottom, left, right) so that 'same' with even kernels
    needs no special case. Build one with :func:`conv2d_problem`, which validates it."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    OH: int
    OW: int
    sh: int = 1   # stride
    sw: int = 1
    dh: int = 1   # dilation
    dw: int = 1
    pt: int = 0   # zero padding: top, bottom, left, right
    pb: int = 0
    pl: int = 0
    pr: int = 0
    groups: int = 1

    @property
    def Cg(self) -> int:
        """Input channels per group."""
        return self.C // self.groups

    @property
    def Kg(self) -> int:
        """Output channels per group."""
        return self.K // self.groups

    @property
    def stride(self) -> tuple:
        return (self.sh, self.sw)

    @property
    def dilation(self) -> tuple:
        return (self.dh, self.dw)

    @property
    def padding(self) -> tuple:
        return (self.pt, self.pb, self.pl, self.pr)

    @property
    def input_shape(self) -> tuple:
        return (self.N, self.C, self.H, self.W)

    @property
    def weight_shape(self) -> tuple:
        return (self.K, self.Cg, self.R, self.S)

    @property
    def output_shape(self) -> tuple:
        # torch quirk, kept for drop-in behaviour: with no input channels the output has no
        # channels either, whatever the weight's K.
        return (self.N, self.K if self.C else 0, self.OH, self.OW)

    @property
    def flops(self) -> int:
        """2 x multiply-adds of the direct definition (padded taps included)."""
        return 2 * self.N * self.K * self.Cg * self.R * self.S * self.OH * self.OW

    @property
    def is_pointwise(self) -> bool:
        """1x1, stride 1, no padding: the input itself is the GEMM operand."""
        return (self.R == self.S == 1 and self.sh == self.sw == 1
                and not any(self.padding))

    @functools.cached_property
    def kernel_geometry(self):
        """The same problem as the C++ kernels take it (fastconv._C.ConvGeom), made once."""
        from .backend import _C
        return _C.ConvGeom(**{f.name: getattr(self, f.name) for f in fields(self)})


def output_size(in_size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    return (in_size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_problem(input_shape, weight_shape, stride, padding, dilation,
                   groups: int) -> Conv2dProblem:
    """Validates a convolution: ``stride`` and ``dilation`` are pairs, ``padding`` is
    (top, bottom, left, right). Raises :class:`fastconv.errors.InvalidConvolution` (a
    ValueError and a RuntimeError) naming the problem, in torch's order of checks."""
    if len(input_shape) != 4:
        raise InvalidConvolution(
            f"fastconv: expected a 4-D input (N, C, H, W), got shape {tuple(input_shape)}")
    if len(weight_shape) != 4:
        raise InvalidConvolution(
            f"fastconv: expected a 4-D weight (K, C/groups, R, S), got shape "
            f"{tuple(weight_shape)}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise InvalidConvolution("fastconv: stride and dilation take 2 values, padding 4 "
                                 "(top, bottom, left, right)")
    N, C, H, W = input_shape   # ints, or SymInts while torch.compile traces dynamic shapes
    K, Cg, R, S = weight_shape
    sh, sw = stride
    dh, dw = dilation
    pt, pb, pl, pr = padding
    if min(sh, sw) <= 0:
        raise InvalidConvolution(f"fastconv: stride must be positive, got {tuple(stride)}")
    if min(padding) < 0:
        raise InvalidConvolution(f"fastconv: padding must be non-negative, got {tuple(padding)}")
    if min(dh, dw) <= 0:
        raise InvalidConvolution(f"fastconv: dilation must be positive, got {tuple(dilation)}")
    if groups <= 0:
        raise InvalidConvolution(f"fastconv: groups must be positive, got {groups}")
    if K < groups:
        raise InvalidConvolution(
            f"fastconv: weight {tuple(weight_shape)} has {K} output channels; groups={groups} "
            f"needs at least {groups}")
    if K % groups != 0:
        raise InvalidConvolution(
            f"fastconv: out_channels ({K}) must be divisible by groups ({groups})")
    if Cg * groups != C:
        raise InvalidConvolution(
            f"fastconv: input has {C} channels but weight {tuple(weight_shape)} with "
            f"groups={groups} expects {Cg * groups}")
    if min(R, S) <= 0:
        raise InvalidConvolution(f"fastconv: kernel size must be positive, got {R}x{S}")
    eff_h, eff_w = dh * (R - 1) + 1, dw * (S - 1) + 1
    if H + pt + pb < eff_h or W + pl + pr < eff_w:
        raise InvalidConvolution(
            f"fastconv: kernel size {eff_h}x{eff_w} (dilated) is larger than the padded input "
            f"{H + pt + pb}x{W + pl + pr}")
    if (H == 0 or W == 0) and N > 0 and C > 0:
        raise InvalidConvolution(
            f"fastconv: an input with no rows or columns is supported only with zero batch or "
            f"zero channels (as in torch), got shape {tuple(input_shape)}")
    OH = output_size(H, R, sh, pt + pb, dh)
    OW = output_size(W, S, sw, pl + pr, dw)
    return Conv2dProblem(N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pb, pl, pr, groups)
