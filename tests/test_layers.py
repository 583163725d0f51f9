"""One test per real network layer (ResNet-50, VGG-16, MobileNetV2, EfficientNet-B0), batch 1, float32,
against torch's float64 convolution: the NNPACK-style layer tester."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.shapes import ALL_LAYERS
from conftest import ALL_PASSES, ERROR_GROWTH, FORWARD, assert_close, outside_domain


@pytest.mark.parametrize("layer", ALL_LAYERS, ids=lambda l: l.id)
def test_network_layer_forward(layer, algo):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(1), generator=g)
    fan_in = layer.C // layer.groups * layer.R * layer.S
    w = torch.randn(layer.weight_shape(), generator=g) / fan_in ** 0.5
    b = torch.randn(layer.K, generator=g)
    if outside_domain(algo, x.shape, w.shape, x.dtype, FORWARD,
                      lambda: fastconv.conv2d(x, w, b, **layer.conv_args(), algo=algo),
                      **layer.conv_args()):
        return
    y = fastconv.conv2d(x, w, b, **layer.conv_args(), algo=algo)
    expected = F.conv2d(x.double(), w.double(), b.double(), **layer.conv_args())
    growth = ERROR_GROWTH.get(algo, 1.0)
    assert_close(y, expected, atol=1e-5 * max(1.0, fan_in ** 0.5 / 8) * growth, rtol=1e-5 * growth,
                 what=layer.id)


@pytest.mark.parametrize("layer", [l for l in ALL_LAYERS if l.H <= 56 and l.C * l.K <= 2 ** 17][::4],
                         ids=lambda l: l.id)
def test_network_layer_backward(layer, algo):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(2), generator=g, requires_grad=True)
    fan_in = layer.C // layer.groups * layer.R * layer.S
    w = (torch.randn(layer.weight_shape(), generator=g) / fan_in ** 0.5).requires_grad_(True)
    if outside_domain(algo, x.shape, w.shape, x.dtype, ALL_PASSES,
                      lambda: fastconv.conv2d(x, w, None, **layer.conv_args(),
                                              algo=algo).sum().backward(),
                      **layer.conv_args()):
        return
    y = fastconv.conv2d(x, w, None, **layer.conv_args(), algo=algo)
    gy = torch.randn(y.shape, generator=g)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    xd, wd = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ex, ew = torch.autograd.grad(F.conv2d(xd, wd, None, **layer.conv_args()), (xd, wd), gy.double())
    growth = ERROR_GROWTH.get(algo, 1.0)
    assert_close(gx, ex, atol=1e-4 * growth, rtol=1e-4 * growth, what=f"{layer.id} grad_input")
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    assert_close(gw, ew, atol=2e-6 * pixels ** 0.5 * growth, rtol=1e-4 * growth,
                 what=f"{layer.id} grad_weight")
