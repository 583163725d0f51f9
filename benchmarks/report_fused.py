"""Issue #8's speed figures, fastconv against torch in one process, interleaved.

    python benchmarks/report_fused.py [--section conv_bn,depthwise,grouped,mobilenet]
        [--rounds 3] [--algo auto] [--json F]
    python benchmarks/report_fused.py --section placement
    python benchmarks/report_fused.py --section multiplier

conv_bn: fastconv.nn.ConvBNReLU2d against torch's Conv2d -> BatchNorm2d -> ReLU(inplace) on
ResNet-50's layers at batch 8: eval (running statistics folded into the weights, ReLU in the
convolution's epilogue; no gradients) and train (forward + backward, batch statistics
gathered by the convolution's epilogue).
depthwise: the MobileNetV2 depthwise layers, forward at batch 1 and 8 in NCHW and
channels_last (against torch in the same layout) with GFLOP/s and GB/s (input + output +
weights once) beside the copy bandwidth measured in the same run (a 64 MiB copy) and, per
row, a copy of the forward's own bytes timed in the same rounds; training (forward +
backward) at batch 8 in both layouts.
grouped: ResNeXt-50 32x4d's grouped 3x3 layers (4-32 channels per group), forward at batch 1
and 8 in both layouts, forward + backward at batch 8 in both layouts.
mobilenet: a whole MobileNetV2 in eval after fastconv.convert + fastconv.fuse, batch 1 and 8,
with the max |difference| against torch's output.
multiplier (not in the default sections): depthwise layers with channel multipliers 2 and 4
(fastconv.shapes.DEPTHWISE_MULTIPLIER_LAYERS), as the depthwise section times its layers.
placement (not in the default sections): the depthwise NCHW forward at batch 8 with x placed
at several byte offsets past a 4 KiB boundary, fastconv and torch timed alternately at each.
Where x lies against y moves the small maps' times by up to 1.5x; this names the spread that
one run of the depthwise section samples once.

Each row times torch and fastconv alternately for --rounds rounds; the speedup is the median
of the per-round ratios (the machine's speed drifts by up to 2x between runs).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from torch import nn

import fastconv
from fastconv.bench import geomean, measure, progress
from fastconv.bench.models import MobileNetV2
from fastconv.nn import ConvBNReLU2d
from fastconv.shapes import DEPTHWISE_MULTIPLIER_LAYERS, NETWORKS


def _interleaved(fns: dict, rounds: int, min_time: float = 0.2) -> dict:
    """Median seconds of each callable per round, the callables timed alternately."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure(fn, min_time=min_time).median)
    return times


def _ratio(times, base="torch", ours="fastconv") -> float:
    return statistics.median(t / o for t, o in zip(times[base], times[ours]))


def conv_bn_rows(rounds: int) -> list:
    layers = [layer for layer in NETWORKS["resnet50"] if layer.R in (1, 3)]
    rows = []
    for i, layer in enumerate(layers):
        progress(i, len(layers), layer.name)
        torch.manual_seed(0)
        fused = ConvBNReLU2d(layer.C, layer.K, layer.R, stride=layer.stride,
                             padding=layer.padding, bias=False)
        ref = nn.Sequential(nn.Conv2d(layer.C, layer.K, layer.R, layer.stride, layer.padding,
                                      bias=False), nn.BatchNorm2d(layer.K), nn.ReLU(inplace=True))
        ref.load_state_dict(fused.state_dict())
        x = torch.randn(layer.input_shape(8))
        gy = torch.randn(8, layer.K, layer.out_size, layer.out_size)
        row = dict(layer=layer.name, gflop=layer.flops(8) / 1e9)
        # Eval: no gradients (inference).
        fused.eval(), ref.eval()
        with torch.no_grad():
            err = (fused(x) - ref(x)).abs().max().item()
            t = _interleaved({"torch": lambda: ref(x), "fastconv": lambda: fused(x)}, rounds)
        row.update(eval_torch_ms=1e3 * statistics.median(t["torch"]),
                   eval_ms=1e3 * statistics.median(t["fastconv"]), eval_speedup=_ratio(t),
                   eval_err=err)
        # Train: forward + backward with batch statistics.
        fused.train(), ref.train()
        xg = x.clone().requires_grad_(True)

        def step(model):
            def run():
                model(xg).backward(gy)
            return run
        t = _interleaved({"torch": step(ref), "fastconv": step(fused)}, rounds)
        row.update(train_torch_ms=1e3 * statistics.median(t["torch"]),
                   train_ms=1e3 * statistics.median(t["fastconv"]), train_speedup=_ratio(t))
        rows.append(row)
    progress(len(layers), len(layers), "done")
    return rows


def copy_bandwidth() -> float:
    """GB/s of a 64 MiB tensor copy (bytes read + written), the memory-bound ceiling."""
    src = torch.randn(16 << 20)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), min_time=0.3).median
    return 2 * src.numel() * 4 / t / 1e9


def layer_rows(layers, rounds: int, algo: str = "auto") -> list:
    """Forward at batch 1 and 8 in NCHW and channels_last (against torch in the same
    layout), then forward + backward at batch 8 in both layouts, of each layer."""
    cases = [(b, cl) for b in (1, 8) for cl in (False, True)]
    rows, n, i = [], len(layers) * (len(cases) + 2), 0
    for layer in layers:
        g = torch.Generator().manual_seed(0)
        fan_in = layer.C // layer.groups * layer.R * layer.S
        w = torch.randn(layer.weight_shape(), generator=g) / fan_in ** 0.5
        kw = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)
        for batch, cl in cases:
            progress(i, n, f"{layer.name} N={batch}")
            i += 1
            x = torch.randn(layer.input_shape(batch), generator=g)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            wl = w.contiguous(memory_format=torch.channels_last) if cl else w
            y_numel = batch * layer.K * layer.out_size ** 2
            # The floor at this size: a copy that reads and writes as many bytes as the call
            # (x in, y out), timed in the same rounds. At batch 1 and 8 these fit in L2/L3,
            # where a copy runs ~5x faster than the 64 MiB one.
            src = torch.randn((x.numel() + y_numel) // 2, generator=g)
            dst = torch.empty_like(src)
            with torch.no_grad():
                err = (fastconv.conv2d(x, wl, **kw, algo=algo) - torch.nn.functional.conv2d(
                    x.double(), w.double(), **kw)).abs().max().item()
                t = _interleaved({"torch": lambda: torch.nn.functional.conv2d(x, wl, **kw),
                                  "fastconv": lambda: fastconv.conv2d(x, wl, **kw, algo=algo),
                                  "copy": lambda: dst.copy_(src)},
                                 rounds)
            ms = statistics.median(t["fastconv"])
            copy_ms = statistics.median(t["copy"])
            nbytes = 4 * (x.numel() + y_numel + w.numel())
            rows.append(dict(layer=layer.name, pass_="forward", batch=batch,
                             layout="channels_last" if cl else "nchw", ms=1e3 * ms,
                             torch_ms=1e3 * statistics.median(t["torch"]),
                             speedup=_ratio(t), gflops=layer.flops(batch) / ms / 1e9,
                             gbps=nbytes / ms / 1e9, copy_ms=1e3 * copy_ms,
                             copies=ms / copy_ms, err=err))
        for cl in (False, True):
            layout = "channels_last" if cl else "nchw"
            progress(i, n, f"{layer.name} train N=8 {layout}")
            i += 1
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = torch.randn(layer.input_shape(8), generator=g).contiguous(
                memory_format=fmt).requires_grad_(True)
            wg = w.clone().requires_grad_(True)
            gy = torch.randn(8, layer.K, layer.out_size, layer.out_size,
                             generator=g).contiguous(memory_format=fmt)
            t = _interleaved({
                "torch": lambda: torch.nn.functional.conv2d(x, wg, **kw).backward(gy),
                "fastconv": lambda: fastconv.conv2d(x, wg, **kw, algo=algo).backward(gy)},
                rounds)
            ms = statistics.median(t["fastconv"])
            rows.append(dict(layer=layer.name, pass_="forward+backward", batch=8, layout=layout,
                             ms=1e3 * ms, torch_ms=1e3 * statistics.median(t["torch"]),
                             speedup=_ratio(t), gflops=3 * layer.flops(8) / ms / 1e9,
                             gbps=float("nan"), copy_ms=float("nan"), copies=float("nan"),
                             err=float("nan")))
    progress(n, n, "done")
    return rows


def print_layer_rows(rows, title: str) -> None:
    print(f"\n{title}")
    print("(copy ms: a tensor copy of as many bytes as the forward reads and writes, timed in "
          "the same rounds; copies: ours / copy)")
    print(f"{'layer':24s} {'pass':16s} {'N':>2s} {'layout':14s} {'torch ms':>9s} "
          f"{'ours':>7s} {'x':>5s} {'GFLOP/s':>8s} {'GB/s':>6s} {'copy ms':>8s} {'copies':>6s} "
          f"{'err':>8s}")
    for r in rows:
        print(f"{r['layer']:24s} {r['pass_']:16s} {r['batch']:2d} {r['layout']:14s} "
              f"{r['torch_ms']:9.3f} {r['ms']:7.3f} {r['speedup']:5.2f} {r['gflops']:8.1f} "
              f"{r['gbps']:6.1f} {r['copy_ms']:8.3f} {r['copies']:6.1f} {r['err']:8.1e}")
    for batch in (1, 8):
        for layout in ("nchw", "channels_last"):
            sel = [r["speedup"] for r in rows if r["batch"] == batch and
                   r["layout"] == layout and r["pass_"] == "forward"]
            print(f"forward N={batch} {layout}: geomean {geomean(sel):.2f}x, "
                  f"min {min(sel):.2f}x")
    for layout in ("nchw", "channels_last"):
        sel = [r["speedup"] for r in rows if r["pass_"] != "forward" and r["layout"] == layout]
        print(f"forward+backward N=8 {layout}: geomean {geomean(sel):.2f}x, min {min(sel):.2f}x")


PLACEMENT_OFFSETS = (0, 64, 256, 1024, 2048, 3072)  # bytes past a 4 KiB boundary


def placement_rows(rounds: int, algo: str = "auto") -> list:
    layers = [layer for layer in NETWORKS["mobilenet_v2"] if layer.groups > 1]
    rows = []
    for i, layer in enumerate(layers):
        progress(i, len(layers), layer.name)
        g = torch.Generator().manual_seed(0)
        w = torch.randn(layer.weight_shape(), generator=g)
        kw = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)
        shape = layer.input_shape(8)
        numel = torch.Size(shape).numel()
        buf = torch.randn(numel + 2048, generator=g)
        page = (-buf.data_ptr() // 4) % 1024  # floats up to buf's next 4 KiB boundary
        ours, theirs = [], []
        for offset in PLACEMENT_OFFSETS:
            start = page + offset // 4
            x = buf[start:start + numel].view(shape)
            t = _interleaved({"torch": lambda: torch.nn.functional.conv2d(x, w, **kw),
                              "fastconv": lambda: fastconv.conv2d(x, w, **kw, algo=algo)},
                             rounds)
            ours.append(1e3 * statistics.median(t["fastconv"]))
            theirs.append(1e3 * statistics.median(t["torch"]))
        rows.append(dict(layer=layer.name, offsets=list(PLACEMENT_OFFSETS), ms=ours,
                         torch_ms=theirs))
    progress(len(layers), len(layers), "done")
    return rows


def mobilenet_rows(rounds: int) -> list:
    torch.manual_seed(0)
    ref = MobileNetV2().eval()
    for m in ref.modules():  # non-trivial statistics, so folding is exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    fused = fastconv.fuse(fastconv.convert(copy.deepcopy(ref))).eval()
    rows = []
    for batch in (1, 8):
        progress(batch // 8, 2, f"MobileNetV2 N={batch}")
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            err = (fused(x) - ref(x)).abs().max().item()
            t = _interleaved({"torch": lambda: ref(x), "fastconv": lambda: fused(x)},
                             rounds, min_time=1.0)
        rows.append(dict(batch=batch, torch_ms=1e3 * statistics.median(t["torch"]),
                         ms=1e3 * statistics.median(t["fastconv"]), speedup=_ratio(t),
                         err=err, torch_runs_ms=[1e3 * v for v in t["torch"]],
                         runs_ms=[1e3 * v for v in t["fastconv"]]))
    progress(2, 2, "done")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", default="conv_bn,depthwise,grouped,mobilenet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algo", default="auto",
                        help="depthwise and grouped sections: the algorithm timed")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    sections = args.section.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA "
          f"{fastconv.get_isa()}, float32")
    out = {}
    if "conv_bn" in sections:
        rows = out["conv_bn"] = conv_bn_rows(args.rounds)
        print("\nConv-BN-ReLU, ResNet-50 layers, batch 8 (ms median; speedup = torch / ours)")
        print(f"{'layer':28s} {'GFLOP':>6s} {'eval torch':>10s} {'ours':>7s} {'x':>5s} "
              f"{'train torch':>11s} {'ours':>7s} {'x':>5s} {'eval err':>9s}")
        for r in rows:
            print(f"{r['layer']:28s} {r['gflop']:6.2f} {r['eval_torch_ms']:10.2f} "
                  f"{r['eval_ms']:7.2f} {r['eval_speedup']:5.2f} {r['train_torch_ms']:11.2f} "
                  f"{r['train_ms']:7.2f} {r['train_speedup']:5.2f} {r['eval_err']:9.1e}")
        print(f"geomean speedup: eval {geomean(r['eval_speedup'] for r in rows):.2f}x, "
              f"train {geomean(r['train_speedup'] for r in rows):.2f}x; min eval "
              f"{min(r['eval_speedup'] for r in rows):.2f}x, min train "
              f"{min(r['train_speedup'] for r in rows):.2f}x")
    if "depthwise" in sections:
        out["copy_gbps"] = copy_bandwidth()
    for section, net, title in [
            ("depthwise", "mobilenet_v2", "Depthwise, MobileNetV2 layers (copy bandwidth "
                                          f"{out.get('copy_gbps', 0):.1f} GB/s)"),
            ("grouped", "resnext50_32x4d", "Grouped 3x3, ResNeXt-50 32x4d layers")]:
        if section in sections:
            rows = out[section] = layer_rows(
                [layer for layer in NETWORKS[net] if layer.groups > 1], args.rounds, args.algo)
            print_layer_rows(rows, f"{title} (algo={args.algo}; ms median; speedup = torch / "
                                   f"ours)")
    if "multiplier" in sections:
        rows = out["multiplier"] = layer_rows(DEPTHWISE_MULTIPLIER_LAYERS, args.rounds, args.algo)
        print_layer_rows(rows, f"Depthwise with channel multipliers (algo={args.algo}; ms median; "
                               "speedup = torch / ours)")
    if "placement" in sections:
        rows = out["placement"] = placement_rows(args.rounds, args.algo)
        print(f"\nDepthwise NCHW forward, batch 8, x at byte offsets {PLACEMENT_OFFSETS} past a "
              f"4 KiB boundary (algo={args.algo}; ms median of rounds at each)")
        print(f"{'layer':24s} {'ours min':>8s} {'median':>7s} {'max':>7s} {'torch min':>9s} "
              f"{'median':>7s} {'max':>7s} {'x at median':>11s}")
        for r in rows:
            ours, theirs = r["ms"], r["torch_ms"]
            print(f"{r['layer']:24s} {min(ours):8.3f} {statistics.median(ours):7.3f} "
                  f"{max(ours):7.3f} {min(theirs):9.3f} {statistics.median(theirs):7.3f} "
                  f"{max(theirs):7.3f} "
                  f"{statistics.median(theirs) / statistics.median(ours):11.2f}")
        print("per offset, ours (torch): " + "; ".join(
            f"{r['layer']}: " + " ".join(f"{o}:{m:.3f}({t:.3f})" for o, m, t in
                                         zip(r["offsets"], r["ms"], r["torch_ms"]))
            for r in rows))
    if "mobilenet" in sections:
        rows = out["mobilenet"] = mobilenet_rows(args.rounds)
        print("\nMobileNetV2 eval after convert + fuse (ms median of rounds)")
        for r in rows:
            print(f"N={r['batch']}: torch {r['torch_ms']:.2f} ms, fastconv {r['ms']:.2f} ms, "
                  f"speedup {r['speedup']:.2f}x, max |diff| {r['err']:.1e} (rounds: torch "
                  f"{', '.join(f'{v:.1f}' for v in r['torch_runs_ms'])}; fastconv "
                  f"{', '.join(f'{v:.1f}' for v in r['runs_ms'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
