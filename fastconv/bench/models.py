"""Whole networks for benchmarks, written here (torchvision's wheels do not import on this
machine). Same layers, shapes and parameter counts as torchvision's models; ``build(name)``
makes one by its MODELS name (or a torchvision model, where torchvision imports)."""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu6(c_in: int, c_out: int, kernel: int = 3, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers = [] if expansion == 1 else [_conv_bn_relu6(c_in, hidden, kernel=1)]
        layers += [_conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, 224x224 input): 3.5 M parameters, 0.30 GMACs per image."""

    # (expansion t, output channels c, repeats n, first stride s), from the paper.
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [_conv_bn_relu6(3, 32, stride=2)]
        c_in = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(_conv_bn_relu6(c_in, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), each with BN; the stride sits on the 3x3 conv
    (torchvision's "v1.5": more accurate than striding the first 1x1, which skips 3/4 of the
    input). ResNeXt: the 3x3 conv in `groups` groups of `width_per_group` channels (times
    planes / 64)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        width, c_out = planes * width_per_group // 64 * groups, planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        # A projection shortcut wherever the shape changes (ResNet paper's option B).
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 (224x224 input): 25.6 M parameters, 4.1 GMACs per image. With `groups` and
    `width_per_group`, ResNeXt-50 (ResNeXt50_32x4d: 25.0 M parameters, 4.3 GMACs)."""

    # (bottleneck planes, blocks) per stage; the first block of stages 2-4 halves the map.
    STAGES = [(64, 3), (128, 4), (256, 6), (512, 3)]

    def __init__(self, num_classes: int = 1000, groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = 64
        for i, (planes, blocks) in enumerate(self.STAGES):
            stride = 1 if i == 0 else 2  # stage 1 follows the max pool, already at 56x56
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(c_in, planes, stride if b == 0 else 1, groups,
                                        width_per_group))
                c_in = planes * Bottleneck.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ResNeXt50_32x4d(ResNet50):
    """ResNeXt-50 32x4d: ResNet-50 with 32 groups of 4 (x planes / 64) channels per 3x3."""

    def __init__(self, num_classes: int = 1000):
        super().__init__(num_classes, groups=32, width_per_group=4)


class VGG16(nn.Module):
    """VGG-16 (configuration D, no batch norm; 224x224 input): 138.4 M parameters, 15.5 GMACs
    per image, 90% of the parameters in the first classifier layer."""

    # Output channels of each 3x3 conv (padding 1, with bias, then ReLU); "M" = 2x2 max pool.
    CONFIG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"]

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, c_in = [], 3
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        # Pooled to 7x7 whatever the input size, so the classifier's shapes never change.
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def _conv_bn_silu(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                  activation: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.SiLU(inplace=True)) if activation else nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Per-channel gates from the globally pooled map: two 1x1 convs (with bias) on a 1x1 map,
    SiLU between them, a sigmoid after."""

    def __init__(self, channels: int, squeezed: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = self.fc2(nn.functional.silu(self.fc1(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """Inverted residual with squeeze-excitation: 1x1 expand (skipped at expansion 1) ->
    depthwise kxk -> SE -> 1x1 project, BN after every conv, SiLU after all but the projection.

    Stochastic depth on the residual branch as torchvision's ("row" mode): in training each
    image's branch is dropped with probability ``drop`` and the kept ones scaled by
    1 / (1 - drop); in eval it is the identity. It has no parameters and runs no convolution."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int,
                 drop: float = 0.0):
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        self.drop = drop
        layers = [] if expansion == 1 else [_conv_bn_silu(c_in, hidden)]
        layers += [_conv_bn_silu(hidden, hidden, kernel, stride, groups=hidden),
                   # Squeezed to a quarter of the block's *input* channels, not the expanded.
                   SqueezeExcitation(hidden, max(1, c_in // 4)),
                   _conv_bn_silu(hidden, c_out, activation=False)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.use_residual:
            return out
        if self.training and self.drop > 0:
            keep = torch.empty(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device)
            out = out * keep.bernoulli_(1 - self.drop).div_(1 - self.drop)
        return x + out


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 (224x224 input): 5.3 M parameters, 0.39 GMACs per image."""

    # (expansion, kernel, first stride, output channels, repeats), from the paper's Table 1.
    SETTINGS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, num_classes: int = 1000, stochastic_depth: float = 0.2,
                 dropout: float = 0.2):
        super().__init__()
        layers = [_conv_bn_silu(3, 32, 3, stride=2)]
        c_in, total = 32, sum(n for *_, n in self.SETTINGS)
        block = 0
        for t, k, s, c, n in self.SETTINGS:
            stage = []
            for i in range(n):
                # The drop probability grows linearly with depth, 0 for the first block.
                stage.append(MBConv(c_in, c, k, s if i == 0 else 1, t,
                                    stochastic_depth * block / total))
                c_in = c
                block += 1
            layers.append(nn.Sequential(*stage))
        layers.append(_conv_bn_silu(c_in, 4 * c_in))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * c_in, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


MODELS = {"resnet50": ResNet50, "vgg16": VGG16, "mobilenet_v2": MobileNetV2,
          "efficientnet_b0": EfficientNetB0, "resnext50_32x4d": ResNeXt50_32x4d}

_TORCHVISION = "torchvision:"


def build(name: str, **kwargs) -> nn.Module:
    """The model ``name`` from MODELS, built with ``kwargs``; or, for "torchvision:<name>",
    ``torchvision.models.<name>(weights=None, **kwargs)`` where torchvision imports (to check
    these definitions against it, or to run models not written here)."""
    if name.startswith(_TORCHVISION):
        tv_name = name[len(_TORCHVISION):]
        try:
            import torchvision
        except Exception as e:  # noqa: BLE001 - a CUDA-only wheel fails with OSError etc.
            raise ValueError(
                f"cannot build {name!r}: torchvision is not importable here "
                f"({type(e).__name__}: {e}); fastconv's own models: {', '.join(MODELS)}") from e
        factory = getattr(torchvision.models, tv_name, None)
        if not callable(factory) or tv_name.startswith("_"):
            raise ValueError(f"torchvision.models has no model {tv_name!r}")
        return factory(weights=None, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}, or "
                         f"'{_TORCHVISION}<name>' for a torchvision model")
    return init_like_torchvision(MODELS[name](**kwargs))


def init_like_torchvision(model: nn.Module) -> nn.Module:
    """The initialisation torchvision gives these networks (He-normal convolutions by fan-out,
    BatchNorm scale 1 and shift 0, small normal Linear weights, zero biases). With PyTorch's
    default initialisation instead, the deep features of ResNet-50 or EfficientNet-B0 shrink
    to nearly nothing and their outputs to the classifier's bias, so a comparison of two
    implementations' outputs would check little."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return model
