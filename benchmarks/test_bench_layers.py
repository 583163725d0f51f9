"""pytest-benchmark: every algorithm vs torch on ResNet-50 layers, per-call overhead, and a
conv-BN-ReLU stack interleaving torch ops with ours.

    python -m pytest benchmarks/test_bench_layers.py --benchmark-group-by=group
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv.shapes import NETWORKS, RESNET50_DIRECT_TARGETS

BATCH = 8
IMPLS = {
    "torch": lambda x, w, b, kw: F.conv2d(x, w, b, **kw),
    "direct": lambda x, w, b, kw: fastconv.conv2d(x, w, b, **kw, algo="direct"),
    "im2col": lambda x, w, b, kw: fastconv.conv2d(x, w, b, **kw, algo="im2col"),
    "auto": lambda x, w, b, kw: fastconv.conv2d(x, w, b, **kw, algo="auto"),
}


def _problem(layer, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(batch), generator=g)
    w = torch.randn(layer.weight_shape(), generator=g) * 0.05
    b = torch.randn(layer.K, generator=g)
    return x, w, b


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layer", NETWORKS["resnet50"], ids=lambda l: l.name)
def test_resnet50_layer(benchmark, layer, impl):
    x, w, b = _problem(layer, BATCH)
    kw = layer.conv_args()
    fn = IMPLS[impl]
    benchmark.group = f"resnet50 N={BATCH} {layer.name}"
    benchmark.extra_info["flops"] = layer.flops(BATCH)
    with torch.no_grad():
        benchmark.pedantic(fn, args=(x, w, b, kw), rounds=7, iterations=1, warmup_rounds=2)
    benchmark.extra_info["gflops"] = layer.flops(BATCH) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_tiny_conv_overhead(benchmark, impl):
    x, w, b = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    fn = IMPLS[impl]
    benchmark.group = "per-call overhead 1x8x8x8 * 8x8x3x3"
    benchmark(fn, x, w, b, dict(padding=1))


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_interleaved_with_torch_ops(benchmark, impl):
    """Conv (ours or torch's) then torch's batch_norm and relu, as a model runs them: shows
    any fight between OpenMP thread pools."""
    layers = [l for l in RESNET50_DIRECT_TARGETS if l.C == l.K and l.stride == 1]
    problems = [_problem(l, 4) for l in layers]
    fn = IMPLS[impl]

    def run():
        for layer, (x, w, b) in zip(layers, problems):
            y = fn(x, w, b, layer.conv_args())
            y = F.batch_norm(y, None, None, training=True)
            torch.relu_(y)

    benchmark.group = "interleaved conv + batch_norm + relu, N=4"
    with torch.no_grad():
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
