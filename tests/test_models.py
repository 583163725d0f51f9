"""The whole networks of fastconv.bench.models: parameter counts equal to torchvision's, the
same outputs once converted to fastconv, and fastconv.shapes' layer tables equal to the
convolutions each network runs. build() and its errors."""
from __future__ import annotations

import copy
import sys
import types
from collections import Counter

import pytest
import torch
from torch import nn

import fastconv
from fastconv.bench.models import MODELS, build
from fastconv.shapes import NETWORKS
from conftest import assert_close, conv_calls

#: torchvision's counts (sum of parameter numels, weights=None, 1000 classes).
TORCHVISION_PARAMS = {"resnet50": 25_557_032, "vgg16": 138_357_544,
                      "mobilenet_v2": 3_504_872, "efficientnet_b0": 5_288_548,
                      "resnext50_32x4d": 25_028_904}


def _torchvision():
    """torchvision, or None where it does not import (its wheels need CUDA torch here)."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - a CPU/CUDA mismatch fails with OSError or RuntimeError
        return None
    return torchvision


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_model_has_a_count_and_a_shape_table():
    assert set(MODELS) == set(TORCHVISION_PARAMS)
    assert set(MODELS) <= set(NETWORKS)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_equals_torchvisions(name):
    with torch.device("meta"):  # no memory, no initialisation: VGG-16 alone is 553 MB
        model = build(name)
    assert _parameter_count(model) == TORCHVISION_PARAMS[name]


@pytest.mark.skipif(_torchvision() is None, reason="torchvision does not import")
@pytest.mark.parametrize("name", MODELS)
def test_parameter_shapes_equal_torchvisions(name):
    with torch.device("meta"):
        ours, theirs = build(name), build(f"torchvision:{name}")
    shapes = lambda m: Counter(tuple(p.shape) for p in m.parameters())  # noqa: E731
    assert shapes(ours) == shapes(theirs)


def _realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that keep activations at a steady size through the depth (He-normal convs,
    random biases and BN affines), then BN running statistics set to those of one training
    batch: with default initialisation and fresh statistics, deep layers' outputs shrink to
    their biases and the comparison would check little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.momentum = 1.0  # running statistics := this batch's
        model.train()
        torch.manual_seed(seed)  # EfficientNet's stochastic depth in training
        model(torch.randn(4, 3, 64, 64, generator=g))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_gives_torchs_output(name):
    torch.manual_seed(0)
    model = _realistic(build(name))
    converted = fastconv.convert(copy.deepcopy(model))
    assert not any(type(m) is nn.Conv2d for m in converted.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(x), converted(x)
    scale = expected.abs().max().item()
    assert scale > 1e-2  # the weights above keep a signal to compare
    # Rounding differences grow through the depth: measured over 4 seeds, ResNet-50's largest
    # is 0.7-0.9e-4 of the output's scale (2.3-3.4e-5 with algo="direct"; torch's own float32
    # error against float64 is ~3e-5), the other networks' under 1e-5. 3e-4 leaves 3x; a
    # wrong layer would be off by the order of the scale itself.
    assert_close(got, expected, atol=3e-4 * scale, rtol=1e-4, what=name)


def _conv_signatures(model: nn.Module, x: torch.Tensor) -> Counter:
    """(C, H, K, R, stride, padding, groups) of every Conv2d call of model(x), as in
    fastconv.shapes.ConvLayer; square maps, kernels, strides and paddings only."""
    calls = Counter()
    for (_, C, H, W), (K, _, R, S), kw, _ in conv_calls(model, x):
        stride, padding = kw["stride"], kw["padding"]
        assert (H, R, stride[0], padding[0]) == (W, S, stride[1], padding[1]), kw
        assert kw["dilation"] == (1, 1), kw
        calls[(C, H, K, R, stride[0], padding[0], kw["groups"])] += 1
    return calls


@pytest.mark.parametrize("name", MODELS)
def test_shape_table_lists_the_convolutions_the_model_runs(name):
    # On the meta device: shapes only, no compute and no memory. Converted, so fastconv's
    # fake kernels run every layer's shapes too.
    with torch.device("meta"):
        model = fastconv.convert(build(name)).eval()
        ran = _conv_signatures(model, torch.empty(1, 3, 224, 224))
    table = Counter()
    for layer in NETWORKS[name]:
        table[(layer.C, layer.H, layer.K, layer.R, layer.stride, layer.padding,
               layer.groups)] += layer.count
    missing, extra = ran - table, table - ran
    assert not missing and not extra, (
        f"{name}: run but not in the table (C, H, K, R, stride, padding, groups): "
        f"{dict(missing)}; in the table but not run: {dict(extra)}")


def test_shape_table_keys_are_unique():
    for name, layers in NETWORKS.items():
        keys = [(l.C, l.H, l.K, l.R, l.stride, l.padding, l.groups) for l in layers]
        assert len(keys) == len(set(keys)), name


@pytest.mark.parametrize("name", MODELS)
def test_build_returns_our_definition_and_passes_kwargs(name):
    with torch.device("meta"):
        model = build(name, num_classes=10)
    assert type(model) is MODELS[name]
    assert model(torch.empty(1, 3, 64, 64, device="meta")).shape == (1, 10)


def test_build_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet18'") as info:
        build("resnet18")
    for name in MODELS:
        assert name in str(info.value)
    assert "torchvision:" in str(info.value)


def test_build_torchvision_name_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ImportError
    with pytest.raises(ValueError, match="torchvision is not importable") as info:
        build("torchvision:resnet18")
    for name in MODELS:
        assert name in str(info.value)


def test_build_torchvision_name_calls_torchvision_without_weights(monkeypatch):
    calls = []

    def resnet18(**kwargs):
        calls.append(kwargs)
        return nn.Identity()

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(resnet18=resnet18)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    assert isinstance(build("torchvision:resnet18", num_classes=10), nn.Identity)
    assert calls == [dict(weights=None, num_classes=10)]
    with pytest.raises(ValueError, match="no model 'resnet1000'"):
        build("torchvision:resnet1000")


@pytest.mark.skipif(_torchvision() is None, reason="torchvision does not import")
def test_build_real_torchvision_model():
    with torch.device("meta"):
        assert _parameter_count(build("torchvision:resnet18")) == 11_689_512
