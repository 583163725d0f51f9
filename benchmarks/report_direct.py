"""Direct convolution vs torch (oneDNN) in one process: the figures for the closing note.

    python benchmarks/report_direct.py [--batch 8] [--threads 2] [--layers targets|resnet50|all]
                                       [--json out.json]

For each layer: median ms, GFLOP/s, % of machine peak, speedup over torch and the max error
against torch's float64 result; then the per-call overhead on a tiny convolution and a
conv + batch_norm + relu sequence interleaving torch ops with ours.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import fastconv
from fastconv.bench import geomean, measure, peak_gflops
from fastconv.shapes import ALL_LAYERS, NETWORKS, RESNET50_DIRECT_TARGETS


def _problem(layer, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(batch), generator=g)
    w = torch.randn(layer.weight_shape(), generator=g) / (layer.C // layer.groups * layer.R ** 2) ** 0.5
    return x, w, torch.randn(layer.K, generator=g)


def layer_rows(layers, batch, channels_last):
    rows = []
    for i, layer in enumerate(layers):
        print(f"[{i + 1}/{len(layers)}] {layer.id}", file=sys.stderr, flush=True)
        x, w, b = _problem(layer, batch)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        kw = layer.conv_args()
        with torch.no_grad():
            ours = fastconv.conv2d(x, w, b, **kw, algo="direct")
            exact = F.conv2d(x.double(), w.double(), b.double(), **kw)
            err = ((ours.double() - exact).abs().max() / exact.abs().max()).item()
            # Alternate the two so that drift in the machine's speed hits both alike.
            t_torch = measure(lambda: F.conv2d(x, w, b, **kw))
            t_ours = measure(lambda: fastconv.conv2d(x, w, b, **kw, algo="direct"))
            t_torch2 = measure(lambda: F.conv2d(x, w, b, **kw))
        tt = min(t_torch.median, t_torch2.median)
        flops = layer.flops(batch)
        rows.append(dict(layer=layer.id, batch=batch, flops=flops, torch_ms=tt * 1e3,
                         direct_ms=t_ours.median * 1e3, torch_gflops=flops / tt / 1e9,
                         direct_gflops=t_ours.gflops(flops),
                         direct_pct_peak=100 * t_ours.gflops(flops) / peak_gflops(),
                         speedup=tt / t_ours.median, max_rel_err=err))
    return rows


def overhead_row():
    x, w, b = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    t_torch = measure(lambda: F.conv2d(x, w, b, padding=1), inner=1000, min_reps=9)
    t_ours = measure(lambda: fastconv.conv2d(x, w, b, padding=1), inner=1000, min_reps=9)
    wg = w.clone().requires_grad_(True)
    t_grad = measure(lambda: fastconv.conv2d(x, wg, b, padding=1), inner=1000, min_reps=9)
    return dict(torch_us=t_torch.median * 1e6, direct_us=t_ours.median * 1e6,
                direct_autograd_us=t_grad.median * 1e6, ratio=t_ours.median / t_torch.median)


def interleaved_row(batch):
    layers = [l for l in RESNET50_DIRECT_TARGETS if l.C == l.K and l.stride == 1]
    problems = [_problem(l, batch) for l in layers]

    def run(conv):
        for layer, (x, w, b) in zip(layers, problems):
            y = conv(x, w, b, **layer.conv_args())
            torch.relu_(F.batch_norm(y, None, None, training=True))

    with torch.no_grad():
        t_torch = measure(lambda: run(F.conv2d))
        t_ours = measure(lambda: run(lambda *a, **k: fastconv.conv2d(*a, **k, algo="direct")))
    return dict(layers=[l.id for l in layers], batch=batch, torch_ms=t_torch.median * 1e3,
                direct_ms=t_ours.median * 1e3, speedup=t_torch.median / t_ours.median)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--layers", choices=["targets", "resnet50", "all"], default="targets")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = {"targets": RESNET50_DIRECT_TARGETS, "resnet50": NETWORKS["resnet50"],
              "all": ALL_LAYERS}[args.layers]

    print(f"fastconv {fastconv.__version__} isa={fastconv.get_isa()} torch {torch.__version__} "
          f"threads={args.threads} peak={peak_gflops(args.threads):.0f} GFLOP/s float32 "
          f"{'channels_last' if args.channels_last else 'NCHW'}")
    rows = layer_rows(layers, args.batch, args.channels_last)
    print(f"\n{'layer':34s} {'torch ms':>9s} {'GF/s':>6s} {'direct ms':>9s} {'GF/s':>6s} "
          f"{'%peak':>6s} {'speedup':>7s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['layer']:34s} {r['torch_ms']:9.3f} {r['torch_gflops']:6.0f} "
              f"{r['direct_ms']:9.3f} {r['direct_gflops']:6.0f} {r['direct_pct_peak']:5.1f}% "
              f"{r['speedup']:6.2f}x {r['max_rel_err']:8.1e}")
    gm = geomean(r["speedup"] for r in rows)
    print(f"{'geometric-mean speedup':34s} {gm:.2f}x")
    ov = overhead_row()
    print(f"\nper-call, 1x8x8x8 * 8x8x3x3: torch {ov['torch_us']:.2f} us, fastconv "
          f"{ov['direct_us']:.2f} us ({ov['ratio']:.2f}x torch), with autograd "
          f"{ov['direct_autograd_us']:.2f} us")
    il = interleaved_row(4)
    print(f"conv+batch_norm+relu over {len(il['layers'])} layers, N=4: torch "
          f"{il['torch_ms']:.2f} ms, fastconv {il['direct_ms']:.2f} ms ({il['speedup']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(layers=rows, geomean_speedup=gm, overhead=ov, interleaved=il,
                           isa=fastconv.get_isa(), threads=args.threads,
                           torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()
