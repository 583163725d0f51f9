"""fastconv-bench: every convolution strategy against torch on real network layers.

With no arguments: the ResNet-50 layers at batch 1, forward, float32, every strategy that
applies (torch, each fastconv algorithm, naive, auto, autotune), interleaved in one process.

Per layer and strategy the table gives the median ms and its spread, GFLOP/s, % of this
machine's peak (measured at start with fastconv's own GEMM), the speedup over torch, the max
error against the float64 reference and the algorithm that ran. Then a summary per strategy.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from typing import Optional

import torch

from .. import __version__, backend
from ..shapes import NETWORKS
from . import report, runner
from .models import MODELS
from .runner import Config
from .timing import peak_gflops

SUITES = tuple(NETWORKS) + ("all",)


def _parser() -> argparse.ArgumentParser:
    names = runner.strategies()
    p = argparse.ArgumentParser(
        prog="fastconv-bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="strategies:\n" + "\n".join(f"  {n:12s} {s.summary}" for n, s in names.items())
        + "\n\nexamples:\n"
          "  fastconv-bench                                   # ResNet-50, N=1, all strategies\n"
          "  fastconv-bench --suite vgg16 --batch 8 --algos torch,winograd,auto\n"
          "  fastconv-bench --shape 8,64,56,56,64,3,3,1,1,1 --pass fwdbwd --phases\n"
          "  fastconv-bench --json new.json --compare old.json --plot layers.png\n"
          "  fastconv-bench --model resnet50 --batch 8")
    what = p.add_argument_group("what to run")
    what.add_argument("--suite", choices=SUITES, default=None,
                      help="network whose convolution layers to run (default resnet50; 'all' "
                           "runs every network's)")
    what.add_argument("--shape", action="append", default=[], metavar="N,C,H,W,K,R,S[,stride,"
                      "pad,groups]",
                      help="one custom layer (square input and kernel; repeat for more); "
                           "its N overrides --batch. Replaces --suite unless both are given")
    what.add_argument("--model", metavar="NAME",
                      help="time a whole network instead of layers: eval forward and a "
                           "training step, torch's model vs fastconv.convert + fastconv.fuse "
                           "(" + ", ".join(MODELS) + ", or "
                           "torchvision:NAME when torchvision imports)")
    what.add_argument("--algos", default=None,
                      help="comma-separated strategies (see below; default: "
                           + ",".join(runner.default_strategies()) + "); torch is always "
                           "included as the baseline")
    what.add_argument("--pass", dest="pass_", choices=tuple(runner.PASSES), default="fwd",
                      help="fwd: forward; bwd: both gradients from a saved forward "
                           "(grad-input, grad-weight, grad-bias); fwdbwd: forward + backward. "
                           "A network's 3-channel first layer computes no input gradient")
    how = p.add_argument_group("how")
    how.add_argument("--batch", type=int, default=1, help="batch size N (default 1)")
    how.add_argument("--threads", type=int, default=None,
                     help="threads for torch and fastconv (default: torch.get_num_threads())")
    how.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    how.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                     help="nhwc: channels_last tensors")
    how.add_argument("--rounds", type=int, default=3,
                     help="interleaved rounds per layer (default 3): each strategy is "
                          "timed once per round, the ratio to torch taken per round")
    how.add_argument("--min-time", type=float, default=None,
                     help="seconds of samples per strategy and round (default 0.05, with "
                          "--model 0.5; at least 3 calls after 1 warm-up call, 2 with "
                          "--model)")
    how.add_argument("--weight-cache", action="store_true",
                     help="forward: fastconv runs on fastconv.prepack(weight), packed or "
                          "transformed once outside the timing, as fastconv.nn.Conv2d does "
                          "in inference (no_grad); auto then knows the weights are packed")
    how.add_argument("--isa", choices=backend.ISAS, default=None,
                     help="run fastconv's kernels of this ISA (default: the fastest this "
                          "CPU has)")
    out = p.add_argument_group("output")
    out.add_argument("--phases", action="store_true",
                     help="each algorithm's phase split (filter transform, input transform, "
                          "GEMM, output transform) where it reports one (Winograd), forward")
    out.add_argument("--json", metavar="FILE", help="write every result to FILE (JSON)")
    out.add_argument("--csv", metavar="FILE", help="write every result to FILE (CSV)")
    out.add_argument("--plot", metavar="FILE.png",
                     help="GFLOP/s and speedup charts (needs matplotlib)")
    out.add_argument("--compare", metavar="OLD.json",
                     help="speedup or regression of each result against an earlier --json")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _strategies(text: Optional[str], p: argparse.ArgumentParser) -> list:
    if text is None:
        return runner.default_strategies()
    known = runner.strategies()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"--algos: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(["torch"] + names))


def _layers(args, p) -> list:
    """(layer, batch) pairs to run."""
    try:
        custom = [runner.parse_shape(s) for s in args.shape]
    except ValueError as e:
        p.error(str(e))
    suite = args.suite or ("resnet50" if not custom else None)
    layers = []
    if suite is not None:
        nets = NETWORKS.values() if suite == "all" else [NETWORKS[suite]]
        layers = [(layer, args.batch) for net in nets for layer in net]
    return layers + [(c.layer, c.batch) for c in custom]


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, disable=not enabled, desc=desc, unit="run", file=sys.stderr,
                delay=2.0, dynamic_ncols=True, leave=False)


def _header(args, peak: float) -> dict:
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                fastconv=__version__, torch=torch.__version__, isa=backend.get_isa(),
                threads=torch.get_num_threads(), dtype=args.dtype, layout=args.layout,
                pass_=args.pass_, batch=args.batch, rounds=args.rounds,
                weight_cache=args.weight_cache,
                peak_gflops=round(peak, 1),
                fma_peak_gflops=peak_gflops() * (1 if args.dtype == "float32" else 0.5))
    print(f"fastconv {__version__} · torch {meta['torch']} · isa {meta['isa']} · "
          f"{meta['threads']} threads · {args.dtype} · {args.layout} · pass {args.pass_} · "
          f"{args.rounds} rounds{' · weight cache' if args.weight_cache else ''}\npeak {peak:.0f} GFLOP/s (measured now: fastconv's GEMM, "
          f"1536^3, fastest call; nominal FMA peak {meta['fma_peak_gflops']:.0f})")
    return meta


#: Options of the layer runs that a --model run has no use for (refused, not ignored).
LAYER_ONLY = ("suite", "shape", "algos", "phases", "csv", "plot", "compare", "weight_cache")


def _run_model(args, p) -> int:
    from .models import build
    from .wholemodel import run_model
    given = [o for o in LAYER_ONLY if getattr(args, o) not in (None, False, [])]
    if given or args.pass_ != "fwd":
        p.error("--model times a whole network (eval forward and a training step); it "
                "does not take " + ", ".join("--" + o.replace("_", "-")
                                              for o in given + (["pass"] if args.pass_ != "fwd"
                                                                else [])))
    try:
        model = build(args.model)
    except ValueError as e:
        p.error(str(e))
    rounds = args.rounds
    dtype = getattr(torch, args.dtype)
    print(f"fastconv {__version__} · torch {torch.__version__} · isa {backend.get_isa()} · "
          f"{torch.get_num_threads()} threads · {args.dtype} · {args.layout} · batch "
          f"{args.batch} · {rounds} rounds")
    with _progress(4 * rounds, not args.no_progress, args.model) as bar:
        results = run_model(args.model, model, args.batch, rounds, min_time=args.min_time,
                            channels_last=args.layout == "nhwc", dtype=dtype,
                            tick=lambda _: bar.update())
    print(f"\n{'model':18s} {'mode':13s} {'N':>3s} {'torch ms':>10s} {'fastconv ms':>11s} "
          f"{'speedup':>8s} {'max diff':>9s} {'of':>8s}")
    for r in results:
        print(f"{r.model:18s} {r.mode:13s} {r.batch:3d} {r.torch_ms:10.1f} "
              f"{r.fastconv_ms:11.1f} {r.speedup:7.2f}x {r.max_abs_diff:9.1e} "
              f"{r.reference_scale:8.2g}  ({r.detail})")
    print("(speedup: median of the per-round ratios; 'of': the size of what is compared, "
          "max |torch's output| or torch's first loss)")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(dict(format="fastconv-bench-model", version=1,
                           results=[dataclasses.asdict(r) for r in results]), f, indent=1)
    return 0


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads <= 0:
            p.error("--threads must be positive")
        torch.set_num_threads(args.threads)
    if args.min_time is None:
        args.min_time = 0.5 if args.model else 0.05
    if args.batch <= 0 or args.rounds <= 0 or args.min_time <= 0:
        p.error("--batch, --rounds and --min-time must be positive")
    if args.weight_cache and args.pass_ != "fwd":
        p.error("--weight-cache is for --pass fwd (training packs the weights every step)")
    if args.isa is not None:
        try:
            backend.set_isa(args.isa)
        except ValueError as e:
            p.error(str(e))
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail before the run, not after it
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'fastconv[plot]'")
    if args.model:
        return _run_model(args, p)
    old = None
    if args.compare:
        try:
            old = report.load(args.compare)
        except ValueError as e:
            p.error(str(e))
    names = _strategies(args.algos, p)
    layers = _layers(args, p)
    dtype = getattr(torch, args.dtype)
    peak = runner.measure_peak(dtype)
    meta = _header(args, peak)
    cfg = Config(batch=args.batch, dtype=dtype, layout=args.layout, pass_=args.pass_,
                 rounds=args.rounds, min_time=args.min_time, phases=args.phases,
                 weight_cache=args.weight_cache)
    runs = []
    with _progress(len(layers) * len(names) * args.rounds, not args.no_progress,
                   "layers") as bar:
        for layer, batch in layers:
            bar.set_postfix_str(layer.id, refresh=False)
            runs.append(runner.run_layer(layer, names, dataclasses.replace(cfg, batch=batch),
                                         tick=lambda _: bar.update()))
            bar.update(len(runs[-1].skipped) * args.rounds)
    print()
    report.table(runs, peak, sys.stdout)
    totals = report.summary(runs, sys.stdout)
    if old is not None:
        report.compare(old, runs, sys.stdout)
    if args.json:
        report.to_json(args.json, meta, runs, totals)
    if args.csv:
        report.to_csv(args.csv, runs)
    if args.plot:
        from .plots import plot
        suite = args.suite or ("custom" if args.shape else "resnet50")
        plot(runs, peak, f"fastconv-bench {suite} N={args.batch} {args.dtype} "
                         f"{args.layout} {args.pass_}, {torch.get_num_threads()} threads, "
                         f"{backend.get_isa()}", args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
