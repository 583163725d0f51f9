"""Each pass of a convolution against torch's, per layer: forward, grad-input, grad-weight.

    python benchmarks/report_passes.py [--net resnet50|vgg16|mobilenet_v2|targets|winograd|all]
        [--layers "3x3/2 128 @56,conv1 7x7/2 3>64 @224"] [--batch 8] [--algo auto] [--rounds 3]

torch's passes are aten.convolution_backward with one output mask each (what autograd runs
for that gradient). fastconv's are the op bodies (fastconv.ops.*_forward) with the algorithm
that 'auto' picks. torch and fastconv alternate for --rounds rounds; the table gives medians,
the median of the per-round speedups and their range (flagged ~ where it is wide). The first row of each layer, fwd+bwd, is one
training step of the layer through autograd (forward, then input, weight and bias gradients;
its GFLOP/s count 3x the forward's FLOPs). A network's first layer (3 input channels) takes
no input gradient in training, so its step is forward, weight and bias gradients (2x).
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch

import fastconv
from fastconv import ops
from fastconv.bench import measure
from fastconv.bench.runner import Operands
from fastconv.shapes import ALL_LAYERS, NETWORKS, RESNET50_DIRECT_TARGETS, WINOGRAD_TARGETS

LAYER_SETS = dict(NETWORKS, targets=RESNET50_DIRECT_TARGETS, winograd=WINOGRAD_TARGETS,
                  all=ALL_LAYERS)


def passes(layer, batch: int, algo: str) -> dict:
    """name -> (fastconv call, torch call) for the three passes of one layer."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(batch), generator=g)
    w = torch.randn(layer.weight_shape(), generator=g) / (layer.C * layer.R ** 2) ** 0.5
    s, p = layer.stride, layer.padding
    y = torch.nn.functional.conv2d(x, w, **layer.conv_args())
    gy = torch.randn(y.shape, generator=g)
    conv = ([s, s], [p] * 4, [1, 1], layer.groups, algo)

    def torch_backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], layer.groups, mask)

    b = torch.randn(layer.K, generator=g)
    leaves = [x.clone().requires_grad_(Operands.needs_input_grad(layer))] + \
        [t.clone().requires_grad_(True) for t in (w, b)]

    def train_step(conv_fn):
        def step():
            with torch.enable_grad():
                conv_fn(*leaves).backward(gy)
        return step

    return {
        "fwd+bwd": (train_step(lambda x, w, b: fastconv.conv2d(x, w, b, **layer.conv_args(),
                                                               algo=algo)),
                    train_step(lambda x, w, b: torch.nn.functional.conv2d(x, w, b,
                                                                          **layer.conv_args()))),
        "forward": (lambda: ops.conv2d_forward(x, w, None, *conv),
                    lambda: torch.nn.functional.conv2d(x, w, **layer.conv_args())),
        "grad_input": (lambda: ops.grad_input_forward(gy, w, list(x.shape), *conv),
                       torch_backward([True, False, False])),
        "grad_weight": (lambda: ops.grad_weight_forward(gy, x, list(w.shape), *conv),
                        torch_backward([False, True, False])),
    }


#: A layer's per-round speedups spanning more than this factor (max / min) are flagged: the
#: machine's speed (or torch's, which swings up to 5x on some layers) changed between rounds.
NOISY_RANGE = 1.5


def flag(ratios: list) -> str:
    return " ~" if ratios[-1] > NOISY_RANGE * ratios[0] else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--net", default="targets", choices=sorted(LAYER_SETS))
    ap.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--algo", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    wanted = {n.strip() for n in args.layers.split(",") if n.strip()}
    layers = [l for l in LAYER_SETS[args.net] if not wanted or l.name in wanted]
    print(f"fastconv {fastconv.__version__} isa={fastconv.get_isa()} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} batch={args.batch} algo={args.algo}")
    print(f"{'layer':40s} {'pass':12s} {'torch ms':>9s} {'ours ms':>9s} {'GF/s':>6s} {'x':>6s} "
          f"{'rounds x':>11s}")
    speedups = {}  # pass -> [(speedup, layer name)]
    for layer in layers:
        with torch.no_grad():
            for name, (ours, theirs) in passes(layer, args.batch, args.algo).items():
                t_ours, t_torch = [], []
                for _ in range(args.rounds):
                    t_torch.append(measure(theirs, min_time=0.15, min_reps=3).median)
                    t_ours.append(measure(ours, min_time=0.15, min_reps=3).median)
                ratios = sorted(a / b for a, b in zip(t_torch, t_ours))
                speedup = statistics.median(ratios)
                ms = statistics.median(t_ours)
                step = 3 if Operands.needs_input_grad(layer) else 2
                flops = layer.flops(args.batch) * (step if name == "fwd+bwd" else 1)
                print(f"{layer.name:40s} {name:12s} {statistics.median(t_torch) * 1e3:9.2f} "
                      f"{ms * 1e3:9.2f} {flops / ms / 1e9:6.0f} {speedup:5.2f}x "
                      f"{ratios[0]:5.2f}-{ratios[-1]:<5.2f}{flag(ratios)}")
                speedups.setdefault(name, []).append((speedup, layer.name))
    print(f"rounds x: the lowest and highest per-round speedup; ~: they differ by more than "
          f"{NOISY_RANGE}x (a noisy layer: rerun it before reading its median)")
    for name, xs in speedups.items():
        geomean = math.exp(statistics.fmean(math.log(x) for x, _ in xs))
        worst = min(xs)
        print(f"{name:12s} geomean {geomean:.2f}x over {len(xs)} layers, worst {worst[0]:.2f}x "
              f"({worst[1]})")


if __name__ == "__main__":
    main()
