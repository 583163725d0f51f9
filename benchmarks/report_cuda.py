"""GPU benchmarks of fastconv's CUDA kernels against torch (fp32, NCHW, eager), in one process,
interleaved, medians of CUDA-event timings:

* depthwise: the MobileNetV2 and EfficientNet-B0 depthwise layers (fastconv.shapes), forward
  and forward + backward, with achieved GB/s (input + output + weights, once each) against
  the device's copy bandwidth measured in the same run (target: depthwise >= 1.5x torch,
  within 2x of the copy bandwidth);
* conv-bn-relu: the ResNet-50 Conv-BN-ReLU layers, eval (BN folded, one kernel) and train
  (forward + backward), against torch eager's three ops (target >= 1.3x); eval also against
  torch with cuDNN's TF32 off (torch.backends.cudnn.allow_tf32 is on by default: its
  convolutions then multiply on the tensor cores in TF32, which the float32 kernels here
  do not);
* depthwise-graphs: the same forwards replayed from CUDA graphs, the GPU's time alone;
* mobilenet: whole MobileNetV2 after fastconv.convert + fastconv.fuse, eval and a training
  step.

    python benchmarks/report_cuda.py [--section depthwise,depthwise-graphs,conv-bn-relu,mobilenet]
        [--batch 32] [--rounds 5] [--json out.json]

Needs a GPU and numba-cuda (pip install 'fastconv[cuda]'); says so and exits 2 otherwise.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import fastconv
import fastconv.cuda as fc
from fastconv import shapes
from fastconv.functional import conv2d_bn

try:
    from tqdm import tqdm
except ImportError:  # progress bar only
    def tqdm(it, **_):
        return it


def gpu_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median per-call milliseconds of fn() over ``iters`` CUDA-event timed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 512 MiB copy."""
    src = torch.empty(128 << 20, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def interleaved(candidates: dict, rounds: int) -> dict:
    """name -> median ms over ``rounds`` rounds that each time every candidate once."""
    samples = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(gpu_ms(fn))
    return {name: statistics.median(v) for name, v in samples.items()}


def depthwise_section(batch: int, rounds: int, copy_gbs: float) -> list:
    rows = []
    layers = [l for net in ("mobilenet_v2", "efficientnet_b0") for l in shapes.NETWORKS[net]
              if l.groups == l.C and l.groups > 1]
    for layer in tqdm(layers, desc="depthwise", file=sys.stderr):
        x = torch.randn(layer.input_shape(batch), device="cuda", requires_grad=True)
        w = torch.randn(layer.weight_shape(), device="cuda", requires_grad=True)
        args = (None, layer.stride, layer.padding, 1, layer.groups)
        y = F.conv2d(x, w, *args)
        gy = torch.randn_like(y)

        def fwd(f):
            def run():
                with torch.no_grad():
                    f(x, w, *args)
            return run

        def train(f):
            return lambda: torch.autograd.grad(f(x, w, *args), (x, w), gy)

        t = interleaved({"fastconv fwd": fwd(fastconv.conv2d), "torch fwd": fwd(F.conv2d),
                         "fastconv fwd+bwd": train(fastconv.conv2d),
                         "torch fwd+bwd": train(F.conv2d)}, rounds)
        moved = (x.numel() + y.numel() + w.numel()) * 4
        gbs = moved / t["fastconv fwd"] / 1e6
        rows.append(dict(layer=layer.id, batch=batch, **{f"{k} ms": v for k, v in t.items()},
                         fwd_speedup=t["torch fwd"] / t["fastconv fwd"],
                         train_speedup=t["torch fwd+bwd"] / t["fastconv fwd+bwd"],
                         fwd_gbs=gbs, copy_fraction=gbs / copy_gbs))
    return rows


def graph_ms(fn, iters: int = 20) -> float:
    """Median milliseconds of one replay of a CUDA graph of fn(): the GPU's time alone (no
    launch overhead: the host replays the whole graph in one call)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up (compiles, plans) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return gpu_ms(graph.replay, iters=iters)


def depthwise_graphs_section(batch: int, rounds: int, copy_gbs: float) -> list:
    """The depthwise forwards' GPU time alone, each replayed from a CUDA graph: what the
    kernels take without the Python in front of them (which the eager timings include
    wherever the host is slower than the kernel)."""
    rows = []
    layers = [l for net in ("mobilenet_v2", "efficientnet_b0") for l in shapes.NETWORKS[net]
              if l.groups == l.C and l.groups > 1]
    for layer in tqdm(layers, desc="depthwise graphs", file=sys.stderr):
        x = torch.randn(layer.input_shape(batch), device="cuda")
        w = torch.randn(layer.weight_shape(), device="cuda")
        args = (None, layer.stride, layer.padding, 1, layer.groups)

        def fwd(f):
            def run():
                with torch.no_grad():
                    f(x, w, *args)
            return run

        try:
            t = {name: statistics.median(graph_ms(fn) for _ in range(rounds)) for name, fn in
                 (("fastconv fwd", fwd(fastconv.conv2d)), ("torch fwd", fwd(F.conv2d)))}
        except Exception as e:   # a capture that fails is reported, not fatal
            rows.append(dict(layer=layer.id, batch=batch, error=f"{type(e).__name__}: {e}"))
            continue
        moved = (x.numel() + w.numel() + F.conv2d(x, w, *args).numel()) * 4
        rows.append(dict(layer=layer.id, batch=batch, **{f"{k} ms": v for k, v in t.items()},
                         fwd_speedup=t["torch fwd"] / t["fastconv fwd"],
                         fwd_gbs=moved / t["fastconv fwd"] / 1e6,
                         copy_fraction=moved / t["fastconv fwd"] / 1e6 / copy_gbs))
    return rows


def conv_bn_relu_section(batch: int, rounds: int, algo: str) -> list:
    rows = []
    for layer in tqdm(shapes.NETWORKS["resnet50"], desc="conv-bn-relu", file=sys.stderr):
        K = layer.K
        x = torch.randn(layer.input_shape(batch), device="cuda", requires_grad=True)
        w = torch.randn(layer.weight_shape(), device="cuda", requires_grad=True)
        gamma = torch.rand(K, device="cuda", requires_grad=True)
        beta = torch.randn(K, device="cuda", requires_grad=True)
        mean, var = torch.randn(K, device="cuda"), torch.rand(K, device="cuda") + 0.5
        conv = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)

        def ours(training):
            return lambda: conv2d_bn(x, w, None, mean.clone(), var.clone(), gamma, beta,
                                     training, 0.1, 1e-5, "relu", algo=algo, **conv)

        def torch3(training):
            return lambda: F.relu(F.batch_norm(F.conv2d(x, w, None, **conv), mean.clone(),
                                               var.clone(), gamma, beta, training, 0.1, 1e-5))

        def no_grad(f):
            def run():
                with torch.no_grad():
                    f()
            return run

        def step(f):
            return lambda: f().sum().backward()

        def strict_fp32(f):   # cuDNN's convolutions run TF32 by default (allow_tf32)
            def run():
                torch.backends.cudnn.allow_tf32 = False
                try:
                    f()
                finally:
                    torch.backends.cudnn.allow_tf32 = True
            return run

        t = interleaved({"fastconv eval": no_grad(ours(False)),
                         "torch eval": no_grad(torch3(False)),
                         "torch eval fp32": strict_fp32(no_grad(torch3(False))),
                         "fastconv train": step(ours(True)), "torch train": step(torch3(True))},
                        rounds)
        rows.append(dict(layer=layer.id, batch=batch, **{f"{k} ms": v for k, v in t.items()},
                         eval_speedup=t["torch eval"] / t["fastconv eval"],
                         eval_speedup_fp32=t["torch eval fp32"] / t["fastconv eval"],
                         train_speedup=t["torch train"] / t["fastconv train"]))
    return rows


def mobilenet_section(batch: int, rounds: int) -> list:
    from fastconv.bench.models import build, init_like_torchvision
    model = init_like_torchvision(build("mobilenet_v2")).cuda()
    fast = fastconv.fuse(fastconv.convert(init_like_torchvision(build("mobilenet_v2")).cuda()))
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    rows = []
    for mode in ("eval", "train"):
        for m in (model, fast):
            m.train(mode == "train")

        def run(m):
            if mode == "eval":
                def f():
                    with torch.no_grad():
                        m(x)
                return f
            return lambda: m(x).sum().backward()

        t = interleaved({"fastconv": run(fast), "torch": run(model)}, rounds)
        rows.append(dict(layer=f"mobilenet_v2 {mode}", batch=batch, **{f"{k} ms": v for k, v in
                                                                      t.items()},
                         speedup=t["torch"] / t["fastconv"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", default="depthwise,conv-bn-relu,mobilenet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gemm-algo", default="im2col",
                   help="algorithm of the dense fused layers (auto leaves them to cuDNN)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    reason = fc.unavailable() if torch.cuda.is_available() else "no CUDA device"
    if reason is not None:
        print(f"report_cuda: needs a GPU: {reason}", file=sys.stderr)
        return 2
    copy_gbs = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy "
          f"bandwidth {copy_gbs:.0f} GB/s, batch {args.batch}, {args.rounds} rounds (medians)")
    out = {"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "sections": {}}
    runs = {"depthwise": lambda: depthwise_section(args.batch, args.rounds, copy_gbs),
            "depthwise-graphs": lambda: depthwise_graphs_section(args.batch, args.rounds,
                                                                 copy_gbs),
            "conv-bn-relu": lambda: conv_bn_relu_section(args.batch, args.rounds,
                                                         args.gemm_algo),
            "mobilenet": lambda: mobilenet_section(args.batch, args.rounds)}
    for name in args.section.split(","):
        if name not in runs:
            p.error(f"unknown section {name!r}; expected some of {', '.join(runs)}")
    for name in args.section.split(","):   # each printed (and saved) when done
        rows = out["sections"][name] = runs[name]()
        print(f"\n== {name}")
        for r in rows:
            print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in r.items()))
        speedups = [v for r in rows for k, v in r.items() if k.endswith("speedup")]
        if speedups:
            geo = statistics.geometric_mean(speedups)
            print(f"  geometric mean speedup {geo:.2f}x over {len(speedups)} measurements")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
