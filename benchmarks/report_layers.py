"""Every algorithm against torch (oneDNN) on real network layers, in one process.

    python benchmarks/report_layers.py [--net resnet50|vgg16|mobilenet_v2|targets|winograd|all]
        [--batch 8] [--algos direct,im2col,winograd,auto] [--rounds 3] [--channels-last]
        [--phases] [--weight-cache] [--json F]

For each layer and algorithm: median ms, GFLOP/s, % of machine peak, speedup over torch and
the max error against torch's float64 result ('-' where an algorithm cannot run the layer), and
which algorithm auto (and the winograd family) picked. --phases adds the phase split of the
Winograd kernels (filter transform, input transform, GEMM, output transform).
--weight-cache passes fastconv.prepack(weight) (inference weight cache: weights packed or
transformed once, outside the timing). The machine is noisy (two vCPUs whose speed varies by up
to 2x from run to run), so torch and each algorithm are timed alternately for
--rounds rounds and the speedup is the median of the per-round ratios. Then: per-call
overhead on a tiny convolution, and conv + batch_norm + relu interleaving torch ops with ours.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import fastconv
from fastconv.bench import geomean, measure, peak_gflops, progress
from fastconv.registry import ALGORITHMS
from fastconv.backend import _C
from fastconv.errors import AlgorithmUnavailable
from fastconv.shapes import ALL_LAYERS, NETWORKS, RESNET50_DIRECT_TARGETS, WINOGRAD_TARGETS

LAYER_SETS = dict(NETWORKS, targets=RESNET50_DIRECT_TARGETS, winograd=WINOGRAD_TARGETS,
                  all=ALL_LAYERS)
PHASES = ("filter_transform", "input_transform", "gemm", "output_transform")


def _problem(layer, batch, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layer.input_shape(batch), generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = layer.C // layer.groups * layer.R ** 2
    w = torch.randn(layer.weight_shape(), generator=g) / fan_in ** 0.5
    return x, w, torch.randn(layer.K, generator=g)


def _picks(algo, x, w, kw, prepacked=False):
    """The algorithm 'auto' or a family name runs for this layer."""
    from fastconv import dispatch
    from fastconv.functional import explicit_padding, pair
    stride = pair("stride", kw["stride"])
    pad = explicit_padding(kw["padding"], tuple(w.shape[2:]), stride, (1, 1))
    problem = fastconv.conv2d_problem(tuple(x.shape), tuple(w.shape), stride, pad, (1, 1),
                                      kw["groups"])
    return dispatch.resolve(algo, problem, "cpu", x.dtype, prepacked=prepacked)[0].name


def layer_rows(layers, batch, algos, rounds, channels_last, phases=False, weight_cache=False):
    rows = []
    for i, layer in enumerate(layers):
        progress(i, len(layers), layer.id)
        x, w, b = _problem(layer, batch, channels_last)
        wf = fastconv.prepack(w) if weight_cache else w
        kw = layer.conv_args()
        flops = layer.flops(batch)
        fns = {"torch": lambda: F.conv2d(x, w, b, **kw)}
        row = dict(layer=layer.id, batch=batch, flops=flops)
        runnable = []
        for a in algos:
            try:
                row[f"{a}_picks"] = _picks(a, x, w, kw, weight_cache)
            except AlgorithmUnavailable:
                continue
            runnable.append(a)
            fns[a] = (lambda a=a: fastconv.conv2d(x, wf, b, **kw, algo=a))
        with torch.no_grad():
            exact = F.conv2d(x.double(), w.double(), b.double(), **kw)
            for a in runnable:
                row[f"{a}_rel_err"] = ((fns[a]().double() - exact).abs().max()
                                       / exact.abs().max()).item()
                if phases and row[f"{a}_picks"].startswith("winograd"):
                    fns[a]()
                    t = _C.last_phase_times()
                    total = sum(t[p] for p in PHASES)
                    row[f"{a}_phases"] = {p: t[p] / total for p in PHASES}
            times = {k: [] for k in fns}
            for _ in range(rounds):
                for k, fn in fns.items():
                    times[k].append(measure(fn, min_time=0.15, min_reps=3).median)
        row["torch_ms"] = statistics.median(times["torch"]) * 1e3
        row["torch_gflops"] = flops / statistics.median(times["torch"]) / 1e9
        for a in runnable:
            t = statistics.median(times[a])
            row[f"{a}_ms"] = t * 1e3
            row[f"{a}_gflops"] = flops / t / 1e9
            row[f"{a}_pct_peak"] = 100 * flops / t / 1e9 / peak_gflops()
            row[f"{a}_speedup"] = statistics.median(
                tt / ta for tt, ta in zip(times["torch"], times[a]))
        rows.append(row)
    progress(len(layers), len(layers), "done")
    return rows


def overhead_row():
    x, w, b = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    t_torch = measure(lambda: F.conv2d(x, w, b, padding=1), inner=1000, min_reps=9)
    t_ours = measure(lambda: fastconv.conv2d(x, w, b, padding=1), inner=1000, min_reps=9)
    wg = w.clone().requires_grad_(True)
    t_grad = measure(lambda: fastconv.conv2d(x, wg, b, padding=1), inner=1000, min_reps=9)
    return dict(torch_us=t_torch.median * 1e6, fastconv_us=t_ours.median * 1e6,
                fastconv_autograd_us=t_grad.median * 1e6, ratio=t_ours.median / t_torch.median)


def interleaved_row(batch):
    layers = [l for l in RESNET50_DIRECT_TARGETS if l.C == l.K and l.stride == 1]
    problems = [_problem(l, batch, False) for l in layers]

    def run(conv):
        for layer, (x, w, b) in zip(layers, problems):
            y = conv(x, w, b, **layer.conv_args())
            torch.relu_(F.batch_norm(y, None, None, training=True))

    with torch.no_grad():
        t_torch = measure(lambda: run(F.conv2d))
        t_ours = measure(lambda: run(fastconv.conv2d))
    return dict(layers=[l.id for l in layers], batch=batch, torch_ms=t_torch.median * 1e3,
                fastconv_ms=t_ours.median * 1e3, speedup=t_torch.median / t_ours.median)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=sorted(LAYER_SETS), default="targets")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--algos", default=",".join(a.name for a in ALGORITHMS) + ",winograd,auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-extras", action="store_true", help="skip overhead and interleaved runs")
    p.add_argument("--phases", action="store_true",
                   help="print the phase split of the Winograd kernels")
    p.add_argument("--weight-cache", action="store_true",
                   help="run fastconv on fastconv.prepack(weight): weights packed once")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    algos = [a for a in args.algos.split(",") if a]
    layers = LAYER_SETS[args.net]

    print(f"fastconv {fastconv.__version__} isa={fastconv.get_isa()} torch {torch.__version__} "
          f"threads={args.threads} peak={peak_gflops(args.threads):.0f} GFLOP/s float32 "
          f"{'channels_last' if args.channels_last else 'NCHW'} batch={args.batch}"
          f"{' weight cache' if args.weight_cache else ''}")
    rows = layer_rows(layers, args.batch, algos, args.rounds, args.channels_last, args.phases,
                      args.weight_cache)
    head = f"{'layer':36s} {'torch ms':>8s} {'GF/s':>5s}"
    for a in algos:
        head += f" | {a + ' ms':>10s} {'GF/s':>5s} {'%pk':>4s} {'x':>5s}"
    print("\n" + head)
    for r in rows:
        line = f"{r['layer']:36s} {r['torch_ms']:8.3f} {r['torch_gflops']:5.0f}"
        for a in algos:
            if a + "_ms" not in r:
                line += f" | {'-':>10s} {'':5s} {'':4s} {'':5s}"
                continue
            line += (f" | {r[a + '_ms']:10.3f} {r[a + '_gflops']:5.0f} "
                     f"{r[a + '_pct_peak']:3.0f}% {r[a + '_speedup']:4.2f}x")
        picks = [f"{a}->{r[a + '_picks']}" for a in algos
                 if a + "_picks" in r and r[a + "_picks"] != a]
        print(line + ("  " + " ".join(picks) if picks else ""))
    summary = {a: geomean(r[a + "_speedup"] for r in rows if a + "_speedup" in r) for a in algos}
    print(f"{'geometric-mean speedup over torch':36s} " +
          "  ".join(f"{a} {v:.2f}x" for a, v in summary.items()))
    print("max relative error vs float64: " + "  ".join(
        f"{a} {max((r[a + '_rel_err'] for r in rows if a + '_rel_err' in r), default=0):.1e}"
        for a in algos))
    if args.phases:
        print("\nphase split (share of kernel time: filter transform / input transform / GEMM "
              "/ output transform)")
        for r in rows:
            for a in algos:
                if a + "_phases" in r:
                    ph = r[a + "_phases"]
                    print(f"{r['layer']:36s} {a:12s} ({r[a + '_picks']}) " +
                          " / ".join(f"{100 * ph[p]:4.1f}%" for p in PHASES))
    out = dict(layers=rows, geomean_speedup=summary, isa=fastconv.get_isa(),
               threads=args.threads, torch=torch.__version__, batch=args.batch,
               weight_cache=args.weight_cache)
    if not args.no_extras:
        ov = overhead_row()
        print(f"\nper call, 1x8x8x8 * 8x8x3x3: torch {ov['torch_us']:.2f} us, fastconv "
              f"{ov['fastconv_us']:.2f} us ({ov['ratio']:.2f}x torch), with autograd "
              f"{ov['fastconv_autograd_us']:.2f} us")
        il = interleaved_row(4)
        print(f"conv+batch_norm+relu over {len(il['layers'])} layers, N=4: torch "
              f"{il['torch_ms']:.2f} ms, fastconv {il['fastconv_ms']:.2f} ms ({il['speedup']:.2f}x)")
        out.update(overhead=ov, interleaved=il)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
