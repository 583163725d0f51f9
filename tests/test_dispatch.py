"""The algorithm enum and the 'auto' heuristic."""
from __future__ import annotations

import pytest
import torch

import fastconv
from fastconv import dispatch, ops
from fastconv.shapes import ALL_LAYERS, NETWORKS


def _choice(layer, batch=1):
    g = ops.geometry(layer.input_shape(batch), layer.weight_shape(), (layer.stride,) * 2,
                     (layer.padding,) * 4, (1, 1), layer.groups)
    return dispatch.choose(dispatch.Algo.AUTO, g)


def test_auto_picks_gemm_for_1x1_layers_and_direct_otherwise():
    by_name = {l.name: l for l in NETWORKS["resnet50"]}
    assert _choice(by_name["1x1 256>64 @56"]) == "im2col"
    assert _choice(by_name["1x1 1024>256 @14"]) == "im2col"
    assert _choice(by_name["1x1/2 downsample 256>512 @56"]) == "im2col"
    assert _choice(by_name["1x1 2048>512 @7"]) == "im2col"
    assert _choice(by_name["3x3 64 @56"]) == "direct"
    assert _choice(by_name["conv1 7x7/2 3>64 @224"]) == "direct"


def test_auto_never_picks_gemm_for_grouped_layers():
    grouped = [l for l in ALL_LAYERS if l.groups > 1]
    assert grouped and all(_choice(l) == "direct" for l in grouped)


def test_explicit_algo_is_kept():
    layer = NETWORKS["resnet50"][1]
    g = ops.geometry(layer.input_shape(1), layer.weight_shape(), (1, 1), (0,) * 4, (1, 1), 1)
    for a in ("direct", "im2col"):
        assert dispatch.choose(dispatch.Algo(a), g) == a


@pytest.mark.parametrize("shape,weight,kw", [
    ((2, 16, 20, 20), (32, 16, 1, 1), {}),                  # -> im2col
    ((2, 16, 6, 6), (8, 2, 1, 1), dict(groups=8)),           # -> direct (grouped)
    ((2, 8, 12, 12), (16, 8, 3, 3), dict(padding=1)),       # -> direct
])
def test_auto_gives_exactly_the_chosen_algorithms_result(shape, weight, kw):
    x, w = torch.randn(shape), torch.randn(weight)
    g = ops.geometry(x.shape, w.shape, (1, 1), (kw.get("padding", 0),) * 4, (1, 1),
                     kw.get("groups", 1))
    chosen = dispatch.choose(dispatch.Algo.AUTO, g)
    assert torch.equal(fastconv.conv2d(x, w, **kw), fastconv.conv2d(x, w, **kw, algo=chosen))
    xr = x.clone().requires_grad_(True)
    y = fastconv.conv2d(xr, w, **kw)                        # the op path resolves 'auto' too
    assert torch.equal(y.detach(), fastconv.conv2d(x, w, **kw, algo=chosen))
