"""pytest-benchmark: every strategy of fastconv-bench (torch, each registered algorithm, auto)
on every layer of the shared shape table (fastconv.shapes: ResNet-50, VGG-16, MobileNetV2,
...), one group per layer, so that saved runs compare with ``pytest-benchmark compare``.

    python -m pytest benchmarks/test_bench_layers.py --benchmark-group-by=group \\
        --benchmark-autosave                       # then: pytest-benchmark compare
    FASTCONV_BENCH_NETS=resnet50,vgg16 FASTCONV_BENCH_BATCH=8 python -m pytest benchmarks/ ...

Which strategies can run a layer comes from the registry (a strategy that cannot is skipped
with the reason). Timing is pytest-benchmark's; the results are checked against the float64
reference once, outside it, by the same code as the CLI (fastconv.bench.runner).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastconv.bench import runner
from fastconv.bench.runner import Config
from fastconv.shapes import NETWORKS, RESNET50_DIRECT_TARGETS

BATCH = int(os.environ.get("FASTCONV_BENCH_BATCH", "8"))
NETS = os.environ.get("FASTCONV_BENCH_NETS", "resnet50").split(",")
LAYERS = [layer for net in NETS for layer in NETWORKS[net]]
#: naive is left out here (seconds per layer at batch 8); the CLI runs it.
STRATEGIES = [s for s in runner.default_strategies() if s not in ("naive", "autotune")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.id)
def test_layer_forward(benchmark, layer, strategy):
    cfg = Config(batch=BATCH)
    why = runner.why_not(strategy, layer, cfg)
    if why is not None:
        pytest.skip(f"{strategy} cannot run {layer.id}: {why}")
    operands = runner.Operands(layer, cfg)
    run = operands.runner(runner.conv_of(strategy))
    assert operands.max_rel_err(run()) < 1e-4
    benchmark.group = f"{layer.id} N={BATCH}"
    benchmark.extra_info["flops"] = layer.flops(BATCH)
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=2)
    if benchmark.stats:   # None under --benchmark-disable
        benchmark.extra_info["gflops"] = layer.flops(BATCH) / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("strategy", ["torch", "auto"])
def test_tiny_conv_overhead(benchmark, strategy):
    x, w, b = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    conv = runner.conv_of(strategy)
    benchmark.group = "per-call overhead 1x8x8x8 * 8x8x3x3"
    benchmark(lambda: conv(x, w, b, padding=1))


@pytest.mark.parametrize("strategy", ["torch", "auto"])
def test_interleaved_with_torch_ops(benchmark, strategy):
    """Conv (ours or torch's) then torch's batch_norm and relu, as a model runs them: shows
    any fight between OpenMP thread pools."""
    layers = [l for l in RESNET50_DIRECT_TARGETS if l.C == l.K and l.stride == 1]
    operands = [runner.Operands(l, Config(batch=4)) for l in layers]
    conv = runner.conv_of(strategy)

    def run():
        for layer, o in zip(layers, operands):
            y = conv(o.x, o.w, o.b, **layer.conv_args())
            torch.relu_(torch.nn.functional.batch_norm(y, None, None, training=True))

    benchmark.group = "interleaved conv + batch_norm + relu, N=4"
    with torch.no_grad():
        benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
