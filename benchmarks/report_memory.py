"""Peak extra memory of one convolution call: torch against each fastconv algorithm.

    python benchmarks/report_memory.py [--layer "vgg16:3x3 64>64 @224"] [--batch 8]
        [--pass forward|grad_input|grad_weight]

Each implementation runs in a fresh process: inputs are made and one warm-up call is done,
the kernel's peak-RSS mark is reset (/proc/self/clear_refs), then one call runs and the peak
RSS above the resident size before it, less the output tensor, is the call's extra memory
(scratch buffers, packed operands, reorders).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch, torch.nn.functional as F, fastconv
from fastconv.shapes import ALL_LAYERS
layer = next(l for l in ALL_LAYERS if l.id == sys.argv[1])
impl, batch, pass_ = sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(2)
x = torch.randn(layer.input_shape(batch)); w = torch.randn(layer.weight_shape()) * 0.05
s, p = layer.stride, layer.padding
gy = torch.randn(F.conv2d(x[:1], w, None, **layer.conv_args()).shape[1:]).expand(
    batch, -1, -1, -1).contiguous() if pass_ != "forward" else None
conv = ([s, s], [p] * 4, [1, 1], layer.groups, impl)
mask = [pass_ == "grad_input", pass_ == "grad_weight", False]
def run():
    with torch.no_grad():
        if pass_ == "forward":
            if impl == "torch":
                return F.conv2d(x, w, None, **layer.conv_args())
            return fastconv.conv2d(x, w, None, **layer.conv_args(), algo=impl)
        if impl == "torch":
            out = torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [p, p], [1, 1],
                                                      False, [0, 0], layer.groups, mask)
            return out[0] if pass_ == "grad_input" else out[1]
        if pass_ == "grad_input":
            return fastconv.ops.grad_input_forward(gy, w, list(x.shape), *conv)
        return fastconv.ops.grad_weight_forward(gy, x, list(w.shape), *conv)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
y = run(); out_bytes = y.numel() * 4; del y
fastconv.release_workspaces()          # measure a cold call: scratch is allocated inside it
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS:")
y = run()
print(json.dumps(dict(extra=status("VmHWM:") - before - out_bytes, output=out_bytes,
                      input=x.numel() * 4)))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layer", default="vgg16:3x3 64>64 @224")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--impls", default="torch,direct,im2col")
    p.add_argument("--pass", dest="pass_", default="forward",
                   choices=["forward", "grad_input", "grad_weight"])
    args = p.parse_args(argv)
    print(f"{args.layer}, batch {args.batch}, float32, {args.pass_}")
    for impl in args.impls.split(","):
        r = subprocess.run([sys.executable, "-c", CHILD, args.layer, impl, str(args.batch),
                            args.pass_], capture_output=True, text=True, check=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  {impl:8s} extra {d['extra'] / 2**20:8.1f} MiB  (input {d['input'] / 2**20:.0f} "
              f"MiB, output {d['output'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
