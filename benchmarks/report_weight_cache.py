"""Batch-1 inference with and without the weight cache (fastconv.prepack), against torch.

    python benchmarks/report_weight_cache.py [--net cache|winograd|resnet50|...] [--batch 1]
        [--algos direct,im2col,auto] [--rounds 5] [--json F]

Per layer and algorithm: median ms of torch, of fastconv packing its weights on every call,
and of fastconv reusing them (fastconv.prepack, as fastconv.nn.Conv2d does under no_grad),
the speedups over torch, and the time the cache saves per call. torch, uncached and cached
calls are timed alternately for --rounds rounds; speedups are medians of per-round ratios.
'auto' chooses knowing whether the weights are prepacked, so it may run another algorithm in
each column (shown as uncached -> cached pick).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import fastconv
from fastconv import dispatch
from fastconv.bench import geomean, measure
from fastconv.errors import AlgorithmUnavailable
from fastconv.shapes import NETWORKS, WEIGHT_CACHE_TARGETS, WINOGRAD_TARGETS

LAYER_SETS = dict(NETWORKS, cache=WEIGHT_CACHE_TARGETS, winograd=WINOGRAD_TARGETS)


def _pick(algo, layer, batch, prepacked):
    return dispatch.resolve(algo, layer.problem(batch), "cpu", torch.float32,
                            prepacked=prepacked)[0].name


def rows(layers, batch, algos, rounds):
    out = []
    for layer in layers:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(layer.input_shape(batch), generator=g)
        fan_in = layer.C // layer.groups * layer.R * layer.S
        w = torch.randn(layer.weight_shape(), generator=g) / fan_in ** 0.5
        b = torch.randn(layer.K, generator=g)
        packed = fastconv.prepack(w)
        kw = layer.conv_args()
        fns = {"torch": lambda: F.conv2d(x, w, b, **kw)}
        row = dict(layer=layer.id, batch=batch, flops=layer.flops(batch))
        for a in algos:
            try:
                row[f"{a}_picks"] = (_pick(a, layer, batch, False), _pick(a, layer, batch, True))
            except AlgorithmUnavailable:
                continue
            fns[f"{a}"] = lambda a=a: fastconv.conv2d(x, w, b, **kw, algo=a)
            fns[f"{a}+cache"] = lambda a=a: fastconv.conv2d(x, packed, b, **kw, algo=a)
        times = {k: [] for k in fns}
        with torch.no_grad():
            for fn in fns.values():  # warm up; fills the cache
                fn()
            for _ in range(rounds):
                for k, fn in fns.items():
                    times[k].append(measure(fn, min_time=0.1, min_reps=5).median)
        row["torch_ms"] = statistics.median(times["torch"]) * 1e3
        for k in fns:
            if k == "torch":
                continue
            row[f"{k}_ms"] = statistics.median(times[k]) * 1e3
            row[f"{k}_speedup"] = statistics.median(
                t / u for t, u in zip(times["torch"], times[k]))
        out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=sorted(LAYER_SETS), default="cache")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--algos", default="direct,im2col,auto")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args(argv)
    algos = [a for a in args.algos.split(",") if a]
    print(f"fastconv {fastconv.__version__} isa={fastconv.get_isa()} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} float32 NCHW batch={args.batch}; cache limit "
          f"{fastconv.cache_info()['limit_bytes'] >> 20} MiB")
    result = rows(LAYER_SETS[args.net], args.batch, algos, args.rounds)
    print(f"\n{'layer':34s} {'torch ms':>8s} | {'algo':12s} {'no cache':>9s} {'x':>6s} "
          f"{'cache':>9s} {'x':>6s} {'saved':>7s}  picks")
    for r in result:
        first = True
        for a in algos:
            if f"{a}_ms" not in r:
                continue
            picks = r[f"{a}_picks"]
            torch_ms = f"{r['torch_ms']:8.3f}" if first else ""
            print(f"{r['layer'] if first else '':34s} {torch_ms:>8s} | "
                  f"{a:12s} {r[a + '_ms']:9.3f} {r[a + '_speedup']:5.2f}x "
                  f"{r[a + '+cache_ms']:9.3f} {r[a + '+cache_speedup']:5.2f}x "
                  f"{r[a + '_ms'] - r[a + '+cache_ms']:7.3f}  {picks[0]} -> {picks[1]}")
            first = False
    print("geometric-mean speedup over torch: " + "  ".join(
        f"{a} {geomean(r[a + '_speedup'] for r in result if a + '_ms' in r):.2f}x / "
        f"cached {geomean(r[a + '+cache_speedup'] for r in result if a + '_ms' in r):.2f}x"
        for a in algos))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=result, isa=fastconv.get_isa(), torch=torch.__version__,
                           threads=torch.get_num_threads(), batch=args.batch), f, indent=1)


if __name__ == "__main__":
    main()
