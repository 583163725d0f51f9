"""The convolution configuration matrix shared by every algorithm's tests: torch's own Conv2d
test cases plus tails of fastconv's vector blocking. Parametrize tests by algo and ISA rather
than copying them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastconv import conv2d_problem
from fastconv.functional import explicit_padding, pair as _pair


@dataclass(frozen=True)
class Case:
    name: str
    input: tuple               # (N, C, H, W)
    weight: tuple              # (K, C/groups, R, S)
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    channels_last: bool = False          # input in channels_last
    weight_channels_last: bool = False
    noncontiguous: bool = False          # input is a strided view

    def kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def explicit(self) -> tuple:
        """(stride, 4-value padding, dilation) as the ops and the reference take them."""
        stride, dilation = _pair("s", self.stride), _pair("d", self.dilation)
        pad = explicit_padding(self.padding, self.weight[2:], stride, dilation)
        return stride, pad, dilation

    def problem(self):
        """The validated fastconv.Conv2dProblem."""
        stride, pad, dilation = self.explicit()
        return conv2d_problem(self.input, self.weight, stride, pad, dilation, self.groups)

    def reduction(self) -> int:
        return self.weight[1] * self.weight[2] * self.weight[3]

    def make(self, dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
        """(input, weight, bias) with weights scaled by 1/sqrt(fan-in)."""
        g = torch.Generator().manual_seed(seed)
        if self.noncontiguous:
            N, C, H, W = self.input
            x = torch.randn(N, C, H, 2 * W, generator=g, dtype=dtype)[..., ::2]
        else:
            x = torch.randn(self.input, generator=g, dtype=dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(self.weight, generator=g, dtype=dtype) / max(1, self.reduction()) ** 0.5
        if self.weight_channels_last:
            w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(self.weight[0], generator=g, dtype=dtype) if self.bias else None
        if requires_grad:
            x.requires_grad_(True)
            w.requires_grad_(True)
            if b is not None:
                b.requires_grad_(True)
        return x, w, b


CASES = [
    Case("basic", (2, 4, 10, 10), (6, 4, 3, 3)),
    Case("strided", (2, 4, 11, 10), (6, 4, 3, 3), stride=2),
    Case("strided_asym", (2, 3, 12, 13), (5, 3, 3, 2), stride=(2, 3)),
    Case("padded", (2, 4, 9, 8), (6, 4, 3, 3), padding=(1, 2)),
    Case("padding_larger_than_kernel", (1, 3, 6, 7), (4, 3, 3, 3), padding=4),
    Case("dilated", (2, 4, 12, 12), (6, 4, 3, 3), dilation=2),
    Case("dilated_asym_padded", (2, 3, 13, 14), (4, 3, 3, 2), dilation=(2, 3), padding=(2, 1)),
    Case("no_bias", (2, 4, 8, 8), (6, 4, 3, 3), padding=1, bias=False),
    Case("zero_batch", (0, 4, 8, 8), (6, 4, 3, 3), padding=1),
    Case("groups", (2, 4, 8, 8), (6, 2, 3, 3), groups=2, padding=1),
    Case("groups_strided", (2, 6, 9, 9), (9, 2, 3, 3), groups=3, stride=2, padding=1),
    Case("depthwise", (2, 8, 9, 9), (8, 1, 3, 3), groups=8, padding=1),
    Case("depthwise_multiplier", (2, 4, 9, 9), (8, 1, 3, 3), groups=4, padding=1, stride=2),
    # Depthwise beyond 3x3: multiplier 3 with a dilated 5x5, 7x7 at stride 3, an even kernel
    # 'same'-padded, 1x1 strided; then whole vectors of channels on a narrow map (NCHW
    # channel blocks) and channels_last strided.
    Case("depthwise_multiplier3_k5_dilated", (2, 3, 11, 12), (9, 1, 5, 5), groups=3,
         dilation=2, padding=(3, 2)),
    Case("depthwise_k7_stride3", (2, 5, 15, 14), (5, 1, 7, 7), groups=5, stride=3, padding=3),
    Case("depthwise_even_same", (2, 6, 9, 10), (6, 1, 4, 4), groups=6, padding="same"),
    Case("depthwise_1x1_strided", (2, 8, 7, 8), (8, 1, 1, 1), groups=8, stride=2),
    Case("depthwise_channel_blocks", (2, 32, 7, 7), (32, 1, 3, 3), groups=32, padding=1),
    Case("depthwise_channels_last_strided", (2, 16, 9, 9), (16, 1, 3, 3), groups=16, stride=2,
         padding=1, channels_last=True),
    Case("same_even_kernel", (2, 3, 9, 8), (4, 3, 4, 4), padding="same"),
    Case("same_even_rect", (1, 3, 7, 9), (4, 3, 2, 3), padding="same"),
    Case("same_dilated", (2, 3, 9, 10), (4, 3, 3, 3), padding="same", dilation=2),
    Case("same_even_dilated", (1, 3, 11, 12), (4, 3, 4, 2), padding="same", dilation=(2, 3)),
    Case("valid", (2, 3, 8, 9), (4, 3, 3, 3), padding="valid"),
    Case("nonsquare_kernel", (2, 3, 9, 11), (4, 3, 3, 5), padding=(1, 2)),
    Case("kernel_equals_input", (2, 3, 5, 7), (4, 3, 5, 7)),
    Case("pointwise", (2, 16, 7, 7), (24, 16, 1, 1)),
    Case("pointwise_groups", (2, 8, 5, 6), (12, 4, 1, 1), groups=2),
    # ResNet's downsample: 1x1, strided, unpadded (ragged: 11 rows over stride 2).
    Case("pointwise_strided", (3, 6, 11, 10), (10, 6, 1, 1), stride=(2, 3)),
    Case("pointwise_strided_groups", (2, 6, 9, 9), (9, 2, 1, 1), stride=2, groups=3),
    # Padded 1x1 (im2col's grad-input packs its weights as a plain matrix, col2im crops).
    Case("pointwise_padded_strided_groups", (2, 6, 9, 8), (8, 3, 1, 1), stride=2,
         padding=(1, 0), groups=2),
    Case("stride_larger_than_kernel", (2, 3, 10, 11), (4, 3, 2, 2), stride=3),
    Case("single_channel", (3, 1, 8, 8), (2, 1, 3, 3), padding=1),
    Case("channel_tails", (2, 40, 7, 6), (40, 40, 3, 3), padding=1),
    Case("many_channels", (1, 64, 6, 6), (80, 64, 3, 3), padding=1, stride=(1, 2)),
    Case("stem_like", (1, 3, 23, 23), (16, 3, 7, 7), stride=2, padding=3),
    # >= 1024 output pixels per image: im2col's native NCHW path (one GEMM per image).
    Case("large_map_dilated_strided", (1, 4, 48, 70), (6, 4, 3, 3), stride=(1, 2),
         dilation=2, padding=(2, 1)),
    Case("large_map_groups", (2, 4, 34, 34), (4, 2, 3, 3), groups=2, padding=1),
    # Grouped geometries for the grouped kernel's stride phases and channel tiles.
    Case("groups_stride_larger_than_kernel", (2, 6, 10, 11), (6, 3, 2, 2), stride=3, groups=2),
    Case("groups_dilated_strided_asym", (2, 8, 13, 14), (8, 4, 3, 2), stride=2,
         dilation=(2, 3), padding=(2, 1), groups=2),
    Case("groups_padding_larger_than_kernel", (1, 6, 6, 7), (6, 2, 3, 3), padding=4, groups=3),
    Case("groups_same_even_kernel", (2, 4, 9, 8), (6, 2, 4, 4), padding="same", groups=2),
    Case("groups_multiplier_strided", (2, 8, 9, 9), (12, 2, 3, 3), stride=(2, 1), padding=1,
         groups=4),
    Case("groups_channel_tiles", (1, 32, 15, 15), (44, 16, 3, 3), padding=1, groups=2),
    # 32 channels per group: whole GEMM panels, so im2col's grad-weight reads channel-blocked
    # images (the panel width: 32 f32 on AVX-512, 16 f64 or AVX2, 8 scalar).
    Case("groups_channel_blocks", (2, 64, 11, 9), (40, 32, 3, 3), stride=2, padding=(1, 2),
         dilation=(1, 2), groups=2),
    Case("noncontiguous", (2, 4, 8, 8), (6, 4, 3, 3), padding=1, noncontiguous=True),
    Case("channels_last", (2, 8, 9, 9), (12, 8, 3, 3), padding=1, channels_last=True),
    Case("channels_last_strided_groups", (2, 8, 9, 9), (12, 4, 3, 3), stride=2, groups=2,
         channels_last=True),
    Case("channels_last_weight", (2, 8, 7, 7), (12, 8, 3, 3), padding=1,
         weight_channels_last=True),
]
CASE_IDS = [c.name for c in CASES]
