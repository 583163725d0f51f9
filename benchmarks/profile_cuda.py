"""Where the time of fastconv's CUDA path goes, on a GPU: host microseconds per call of each
layer of the launch (numba's array wrapping, a bare kernel launch, the launcher, the custom op),
then the GPU time of each kernel (torch.profiler) for a few layers.

    python benchmarks/profile_cuda.py [--batch 32]

A call whose host time exceeds its GPU time is launch-bound: CUDA-event timings of it measure
the host. Exits 2 without a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fastconv
import fastconv.cuda as fc
from fastconv.cuda import _runtime as rt
from fastconv.functional import conv2d_bn


def host_us(fn, iters: int = 200) -> float:
    """Median host microseconds per call (no synchronisation inside the timed calls; the
    queue is drained every 20 calls so it never fills)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if i % 20 == 19:
            torch.cuda.synchronize()
    return statistics.median(times)


def host_section(batch: int) -> None:
    cuda = rt.cuda()

    @cuda.jit
    def one(a):
        i = cuda.grid(1)
        if i < a.size:
            a[i] += 1

    @cuda.jit
    def many(a, b, c, d, e, geometry, n0, n1, n2, n3, f0, f1):
        i = cuda.grid(1)
        if i < a.size:
            a[i] += b[i] + geometry[0]

    t = torch.randn(1 << 12, device="cuda")
    x = torch.randn(batch, 144, 56, 56, device="cuda")
    w = torch.randn(144, 1, 3, 3, device="cuda")
    geometry = tuple(range(20))
    xs = torch.randn(batch, 960, 7, 7, device="cuda", requires_grad=True)
    ws = torch.randn(960, 1, 3, 3, device="cuda", requires_grad=True)
    s = rt.stream(t.device)
    rows = {
        "torch.cuda.current_stream": lambda: torch.cuda.current_stream(),
        "rt.stream (cached external_stream)": lambda: rt.stream(t.device),
        "cuda.as_cuda_array(sync=False)": lambda: cuda.as_cuda_array(t, sync=False),
        "bare launch, 1 device array": lambda: one[16, 256, s, 0](cuda.as_cuda_array(t, sync=False)),
        "bare launch, 1 tensor via rt.launch": lambda: rt.launch(one, 16, 256, 0, t),
        "bare launch, 5 tensors + 20-int tuple + 6 scalars": lambda: rt.launch(
            many, 16, 256, 0, t, t, t, t, t, geometry, 1, 2, 3, 4, True, False),
        "fc.depthwise_conv2d_forward 144@56": lambda: fc.depthwise_conv2d_forward(x, w, None, 1, 1),
        "fastconv.conv2d 144@56 (eager, no grad)": lambda: fastconv.conv2d(x, w, None, 1, 1, 1, 144),
        "torch.ops.fastconv.conv2d (custom op) 144@56": lambda: torch.ops.fastconv.conv2d(
            x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 144, "auto"),
        "F.conv2d 144@56": lambda: F.conv2d(x, w, None, 1, 1, 1, 144),
        "fastconv fwd+bwd 960@7": lambda: fastconv.conv2d(xs, ws, None, 1, 1, 1, 960).sum(
            ).backward(),
        "torch fwd+bwd 960@7": lambda: F.conv2d(xs, ws, None, 1, 1, 1, 960).sum().backward(),
    }
    print("\n== host microseconds per call (median of 200, no sync)")
    for name, fn in rows.items():
        with torch.set_grad_enabled("fwd+bwd" in name):
            print(f"  {host_us(fn):9.1f} us  {name}")


def kernel_section(batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile
    cases = {}
    for C, H, stride in ((32, 112, 1), (96, 112, 2), (960, 7, 1)):
        x = torch.randn(batch, C, H, H, device="cuda", requires_grad=True)
        w = torch.randn(C, 1, 3, 3, device="cuda", requires_grad=True)
        cases[f"depthwise 3x3/{stride} {C}@{H} fwd+bwd"] = (
            lambda x=x, w=w, s=stride, C=C: fastconv.conv2d(x, w, None, s, 1, 1, C).sum().backward())
    for C, K, H, k in ((64, 64, 56, 3), (256, 64, 56, 1)):
        x = torch.randn(batch, C, H, H, device="cuda", requires_grad=True)
        w = torch.randn(K, C, k, k, device="cuda", requires_grad=True)
        g, b = torch.rand(K, device="cuda", requires_grad=True), torch.randn(K, device="cuda",
                                                                            requires_grad=True)
        rm, rv = torch.zeros(K, device="cuda"), torch.ones(K, device="cuda")
        cases[f"conv-bn-relu {k}x{k} {C}>{K}@{H} train"] = (
            lambda x=x, w=w, g=g, b=b, rm=rm, rv=rv, k=k: conv2d_bn(
                x, w, None, rm, rv, g, b, True, 0.1, 1e-5, "relu", algo="im2col",
                padding=k // 2).sum().backward())
    for name, fn in cases.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"\n== {name}, batch {batch} (5 calls)")
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8,
                                        max_name_column_width=60))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args(argv)
    reason = fc.unavailable() if torch.cuda.is_available() else "no CUDA device"
    if reason is not None:
        print(f"profile_cuda: needs a GPU: {reason}", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    host_section(args.batch)
    kernel_section(args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
