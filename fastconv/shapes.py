"""Convolution layers of real networks (224x224 ImageNet input), shared by the tests and the
benchmarks. Each unique layer appears once, with ``count`` = how often the network runs it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvLayer:
    net: str
    name: str
    C: int          # input channels
    H: int          # input height = width
    K: int          # output channels
    R: int          # kernel height = width
    stride: int = 1
    padding: int = 0
    groups: int = 1
    count: int = 1

    @property
    def W(self) -> int:
        return self.H

    @property
    def S(self) -> int:
        return self.R

    @property
    def out_size(self) -> int:
        return (self.H + 2 * self.padding - self.R) // self.stride + 1

    def flops(self, batch: int = 1) -> int:
        """Multiply-adds x 2, counting only taps that land inside the padded input."""
        return 2 * batch * self.K * (self.C // self.groups) * self.R * self.R * self.out_size ** 2

    def input_shape(self, batch: int = 1) -> tuple:
        return (batch, self.C, self.H, self.H)

    def weight_shape(self) -> tuple:
        return (self.K, self.C // self.groups, self.R, self.R)

    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    def problem(self, batch: int = 1):
        """The layer as a validated fastconv.Conv2dProblem for this batch."""
        from .problem import conv2d_problem
        return conv2d_problem(self.input_shape(batch), self.weight_shape(), (self.stride,) * 2,
                              (self.padding,) * 4, (1, 1), self.groups)

    @property
    def id(self) -> str:
        return f"{self.net}:{self.name}"


def _dedupe(net: str, layers: list) -> list:
    """Merges identical (C, H, K, R, stride, padding, groups) layers, summing their counts."""
    seen: dict = {}
    for name, C, H, K, R, stride, padding, groups in layers:
        key = (C, H, K, R, stride, padding, groups)
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [name, 1]
    return [ConvLayer(net, name, *key, count=count) for key, (name, count) in seen.items()]


def _resnet(net: str, groups: int = 1, width_per_group: int = 64) -> list:
    """ResNet-50 (groups=1), or ResNeXt-50 with `groups` groups of `width_per_group`
    channels in each 3x3 layer (torchvision's bottleneck widths)."""
    layers = [("conv1 7x7/2 3>64 @224", 3, 224, 64, 7, 2, 3, 1)]
    H, C = 56, 64
    tag = f" g{groups}" if groups > 1 else ""
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        width, out = planes * width_per_group // 64 * groups, planes * 4
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            Ho = H // stride
            layers += [
                (f"1x1 {C}>{width} @{H}", C, H, width, 1, 1, 0, 1),
                (f"3x3{'/2' if stride == 2 else ''} {width}{tag} @{H}", width, H, width, 3,
                 stride, 1, groups),
                (f"1x1 {width}>{out} @{Ho}", width, Ho, out, 1, 1, 0, 1),
            ]
            if b == 0:
                layers.append((f"1x1{'/2' if stride == 2 else ''} downsample {C}>{out} @{H}",
                               C, H, out, 1, stride, 0, 1))
            C, H = out, Ho
    return _dedupe(net, layers)


def _vgg16() -> list:
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    layers, C, H = [], 3, 224
    for v in cfg:
        if v == "M":
            H //= 2
            continue
        layers.append((f"3x3 {C}>{v} @{H}", C, H, v, 3, 1, 1, 1))
        C = v
    return _dedupe("vgg16", layers)


def _mobilenet_v2() -> list:
    layers = [("conv 3x3/2 3>32 @224", 3, 224, 32, 3, 2, 1, 1)]
    C, H = 32, 112
    # (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = C * t
            if t != 1:
                layers.append((f"expand 1x1 {C}>{hidden} @{H}", C, H, hidden, 1, 1, 0, 1))
            layers.append((f"dw 3x3{'/2' if stride == 2 else ''} {hidden} @{H}",
                           hidden, H, hidden, 3, stride, 1, hidden))
            H //= stride
            layers.append((f"project 1x1 {hidden}>{c} @{H}", hidden, H, c, 1, 1, 0, 1))
            C = c
    layers.append((f"conv 1x1 {C}>1280 @{H}", C, H, 1280, 1, 1, 0, 1))
    return _dedupe("mobilenet_v2", layers)


def _efficientnet_b0() -> list:
    layers = [("stem 3x3/2 3>32 @224", 3, 224, 32, 3, 2, 1, 1)]
    C, H = 32, 112
    # (expansion, kernel, first stride, output channels, repeats), from the EfficientNet paper.
    for t, k, s, c, n in [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden, squeezed = C * t, max(1, C // 4)  # SE squeezes to 1/4 of the block's input
            if t != 1:
                layers.append((f"expand 1x1 {C}>{hidden} @{H}", C, H, hidden, 1, 1, 0, 1))
            layers.append((f"dw {k}x{k}{'/2' if stride == 2 else ''} {hidden} @{H}",
                           hidden, H, hidden, k, stride, (k - 1) // 2, hidden))
            H //= stride
            # Squeeze-excitation: two 1x1 convs (with bias) on the globally pooled 1x1 map.
            layers.append((f"se 1x1 {hidden}>{squeezed} @1", hidden, 1, squeezed, 1, 1, 0, 1))
            layers.append((f"se 1x1 {squeezed}>{hidden} @1", squeezed, 1, hidden, 1, 1, 0, 1))
            layers.append((f"project 1x1 {hidden}>{c} @{H}", hidden, H, c, 1, 1, 0, 1))
            C = c
    layers.append((f"head 1x1 {C}>{4 * C} @{H}", C, H, 4 * C, 1, 1, 0, 1))
    return _dedupe("efficientnet_b0", layers)


NETWORKS = {
    "resnet50": _resnet("resnet50"),
    "resnext50_32x4d": _resnet("resnext50_32x4d", groups=32, width_per_group=4),
    "vgg16": _vgg16(),
    "mobilenet_v2": _mobilenet_v2(),
    "efficientnet_b0": _efficientnet_b0(),
}
ALL_LAYERS = [layer for layers in NETWORKS.values() for layer in layers]

#: Depthwise layers with channel multipliers (out = m x in; none of the networks above has
#: them): report_fused.py --section multiplier.
DEPTHWISE_MULTIPLIER_LAYERS = [
    ConvLayer("depthwise_multiplier", name, C, H, C * m, 3, stride, 1, C)
    for name, C, H, m, stride in [("dw 3x3 32x2 @56", 32, 56, 2, 1),
                                  ("dw 3x3/2 32x2 @56", 32, 56, 2, 2),
                                  ("dw 3x3 64x2 @28", 64, 28, 2, 1),
                                  ("dw 3x3/2 48x4 @28", 48, 28, 4, 2)]]

#: The ResNet-50 3x3 layers and stem that the direct-convolution speed target is stated on.
RESNET50_DIRECT_TARGETS = [
    layer for layer in NETWORKS["resnet50"]
    if layer.name.startswith(("3x3 64 @56", "3x3 128 @28", "3x3 256 @14", "3x3 512 @7",
                              "3x3/2 128 @56", "conv1"))
]

#: The 3x3 stride-1 layers of ResNet-50 and VGG-16 (not VGG's 3-channel first layer) that the
#: Winograd speed targets are stated on (issue #7).
WINOGRAD_TARGETS = [
    layer for layer in NETWORKS["resnet50"] + NETWORKS["vgg16"]
    if layer.R == 3 and layer.stride == 1 and layer.groups == 1 and layer.C >= 64
]

#: The batch-1, weight-bound layers the inference weight cache is measured on (issue #7): 9 MiB
#: of 3x3 weights on a 7x7 map, and ResNet-50's widest 1x1 layer.
WEIGHT_CACHE_TARGETS = [
    layer for layer in NETWORKS["resnet50"]
    if layer.name in ("3x3 512 @7", "1x1 512>2048 @7")
]
