"""Timing strategies on convolution layers: the engine under ``fastconv-bench``.

A *strategy* is anything that can run a convolution: torch's own (``torch``), each registered
algorithm (``direct``, ``im2col``, ``winograd_f4``, ``depthwise``, ``naive``, ...), a family
(``winograd``: the tile is chosen), ``auto`` (the heuristic) and ``autotune`` (auto under
fastconv.autotune; its one-off timing runs in the warm-up, outside the measurement).

Every layer's strategies are timed interleaved, ``rounds`` times over, so that a machine whose
speed drifts slows them all alike; a strategy's time is the median of all its samples and its
speedup the median of its per-round ratios to torch. Each strategy's result is checked once
against the float64 reference (fastconv.reference), outside the timing.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from .. import autotune, dispatch, reference, registry
from ..backend import Pass, _C
from ..errors import AlgorithmUnavailable
from ..functional import conv2d as fastconv_conv2d
from ..shapes import ConvLayer
from .timing import measure

PASSES = {"fwd": (Pass.FORWARD,), "bwd": (Pass.GRAD_INPUT, Pass.GRAD_WEIGHT),
          "fwdbwd": tuple(Pass)}
PHASES = ("filter_transform", "input_transform", "gemm", "output_transform")


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str


def strategies() -> dict:
    """Every strategy by name, in the order tables list them."""
    out = {"torch": Strategy("torch", "torch.nn.functional.conv2d (oneDNN on the CPU)")}
    for a in registry.ALGORITHMS:
        out[a.name] = Strategy(a.name, a.summary)
    for family, members in registry.FAMILIES.items():
        out[family] = Strategy(family, f"the {family} family: auto's choice among "
                                       f"{', '.join(m.name for m in members)}")
    out["auto"] = Strategy("auto", "fastconv's heuristic (fastconv.dispatch.choose)")
    out["autotune"] = Strategy("autotune", "auto under fastconv.autotune: every candidate "
                                           "timed once per layer, the fastest kept")
    return out


def default_strategies() -> list:
    """What runs when --algos is not given: torch, every registered algorithm, auto and
    autotune (families are covered by their members)."""
    return ["torch"] + [a.name for a in registry.ALGORITHMS] + ["auto", "autotune"]


@dataclass(frozen=True)
class Config:
    """What every layer of one run shares."""
    batch: int = 1
    dtype: torch.dtype = torch.float32
    layout: str = "nchw"            # or "nhwc" (channels_last)
    pass_: str = "fwd"              # "fwd", "bwd" (both gradients), "fwdbwd"
    rounds: int = 3
    min_time: float = 0.05          # seconds of samples per strategy and round
    phases: bool = False
    #: Forward only: fastconv runs on fastconv.prepack(weight), packed once outside the
    #: timing, as fastconv.nn.Conv2d does under no_grad (the inference weight cache).
    weight_cache: bool = False


@dataclass
class Result:
    """One strategy on one layer."""
    layer: str
    strategy: str
    batch: int
    pass_: str
    dtype: str
    layout: str
    flops: int
    ms: float                       # median of every sample
    ms_q1: float
    ms_q3: float
    gflops: float
    speedup: Optional[float]        # vs torch: median of the per-round ratios
    max_rel_err: float              # max |result - float64 reference| / max |reference|
    runs: str                       # the algorithm that ran ("auto" and families resolve)
    phases: dict = field(default_factory=dict)   # share of time per phase (Winograd)

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median."""
        return (self.ms_q3 - self.ms_q1) / 2 / self.ms if self.ms else 0.0


@dataclass
class LayerRun:
    layer: ConvLayer
    results: list                   # Result per strategy that ran
    skipped: dict                   # strategy -> why it cannot run this layer


@dataclass(frozen=True)
class CustomShape:
    layer: ConvLayer
    batch: int


def parse_shape(text: str) -> CustomShape:
    """'N,C,H,W,K,R,S[,stride,pad,groups]' -> a custom layer and its batch (H == W and
    R == S; stride, pad and groups default to 1, R // 2 and 1)."""
    usage = "expected integers N,C,H,W,K,R,S[,stride,pad,groups]"
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--shape {text!r}: {usage}") from None
    if not 7 <= len(values) <= 10:
        raise ValueError(f"--shape {text!r}: {usage}, got {len(values)} values")
    N, C, H, W, K, R, S, *rest = values
    if H != W or R != S:
        raise ValueError(f"--shape {text!r}: square inputs and kernels only (H == W, R == S)")
    stride, pad, groups = (rest + [1, R // 2, 1][len(rest):])[:3]
    if min(N, C, H, K, R, stride, groups) <= 0 or pad < 0:
        raise ValueError(f"--shape {text!r}: sizes, stride and groups must be positive and "
                         f"padding non-negative")
    if C % groups or K % groups:
        raise ValueError(f"--shape {text!r}: groups={groups} must divide C={C} and K={K}")
    if H + 2 * pad < R:
        raise ValueError(f"--shape {text!r}: kernel {R} is larger than the padded input "
                         f"{H + 2 * pad}")
    name = (f"{R}x{R}{f'/{stride}' if stride > 1 else ''} {C}>{K} @{H}"
            + (f" g{groups}" if groups > 1 else ""))
    return CustomShape(ConvLayer("custom", name, C, H, K, R, stride, pad, groups), N)


def why_not(name: str, layer: ConvLayer, cfg: Config) -> Optional[str]:
    """Why strategy ``name`` cannot run this layer's passes, or None."""
    if name in ("torch", "auto", "autotune"):
        return None
    problem = layer.problem(cfg.batch)
    for p in PASSES[cfg.pass_] if cfg.pass_ != "bwd" else (Pass.FORWARD,) + PASSES["bwd"]:
        try:
            dispatch.resolve(name, problem, "cpu", cfg.dtype, p)
        except AlgorithmUnavailable as e:
            return str(e).split(": ", 2)[-1]
    return None


def _runs(name: str, layer: ConvLayer, cfg: Config) -> str:
    """The algorithm a strategy runs for the layer's passes ('fwd:x gi:y gw:z' when they
    differ)."""
    if name == "torch":
        return "torch"
    problem = layer.problem(cfg.batch)
    picks = {}
    for p in PASSES[cfg.pass_]:
        if p == Pass.GRAD_INPUT and not Operands.needs_input_grad(layer):
            continue
        entry = None
        if name == "autotune":
            entry = autotune.lookup(autotune.make_key(problem, p, cfg.dtype, cfg.layout,
                                                      prepacked=cfg.weight_cache))
        picks[p] = entry.algo if entry else dispatch.resolve(
            "auto" if name == "autotune" else name, problem, "cpu", cfg.dtype, p,
            prepacked=cfg.weight_cache)[0].name
    if len(set(picks.values())) == 1:
        return next(iter(picks.values()))
    short = {Pass.FORWARD: "fwd", Pass.GRAD_INPUT: "gi", Pass.GRAD_WEIGHT: "gw"}
    return " ".join(f"{short[p]}:{a}" for p, a in picks.items())


class Operands:
    """The layer's tensors (seeded), their float64 reference results, and callables that run
    the configured pass with a given convolution."""

    def __init__(self, layer: ConvLayer, cfg: Config):
        g = torch.Generator().manual_seed(0)
        fan_in = layer.C // layer.groups * layer.R * layer.S
        self.kw = layer.conv_args()
        self.problem = layer.problem(cfg.batch)
        self.x = torch.randn(layer.input_shape(cfg.batch), generator=g, dtype=cfg.dtype)
        if cfg.layout == "nhwc":
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.w = torch.randn(layer.weight_shape(), generator=g, dtype=cfg.dtype) / fan_in ** 0.5
        self.b = torch.randn(layer.K, generator=g, dtype=cfg.dtype)
        self.pass_ = cfg.pass_
        self.input_grad = self.needs_input_grad(layer) and cfg.pass_ != "fwd"
        if cfg.pass_ != "fwd":
            self.x.requires_grad_(self.input_grad)
            self.w.requires_grad_(True)
            self.b.requires_grad_(True)
        out = F.conv2d(self.x.detach()[:0], self.w.detach(), None, **self.kw).shape
        self.gy = torch.randn((cfg.batch,) + tuple(out[1:]), generator=g, dtype=cfg.dtype)
        if cfg.layout == "nhwc":
            self.gy = self.gy.contiguous(memory_format=torch.channels_last)
        self._reference = None

    @staticmethod
    def needs_input_grad(layer: ConvLayer) -> bool:
        """A network's first layer (3 input channels) needs no input gradient."""
        return layer.C > 4

    @property
    def inputs(self) -> tuple:
        return ((self.x,) if self.input_grad else ()) + (self.w, self.b)

    def runner(self, conv: Callable) -> Callable:
        """A no-argument callable running the pass with ``conv(x, w, b, **kw)``."""
        x, w, b, kw, gy = self.x, self.w, self.b, self.kw, self.gy
        if self.pass_ == "fwd":
            def run():
                with torch.no_grad():
                    return (conv(x, w, b, **kw),)
        elif self.pass_ == "fwdbwd":
            def run():
                return torch.autograd.grad(conv(x, w, b, **kw), self.inputs, gy)
        else:
            y = {}

            def run():
                if "y" not in y:  # the forward, once; then only backward calls are timed
                    y["y"] = conv(x, w, b, **kw)
                return torch.autograd.grad(y["y"], self.inputs, gy, retain_graph=True)
        return run

    def reference(self) -> tuple:
        """The float64 results the pass must produce, in runner()'s order."""
        if self._reference is None:
            x, w, b = (t.detach().double() for t in (self.x, self.w, self.b))
            p = self.problem
            conv = (p.stride, p.padding, p.dilation, p.groups)
            if self.pass_ == "fwd":
                self._reference = (reference.conv2d(x, w, b, *conv),)
            else:
                gy = self.gy.double()
                grads = (reference.conv2d_grad_input(gy, w, x.shape, *conv),) \
                    if self.input_grad else ()
                self._reference = grads + (reference.conv2d_grad_weight(gy, x, w.shape, *conv),
                                           reference.conv2d_grad_bias(gy))
        return self._reference

    def max_rel_err(self, results: tuple) -> float:
        err = 0.0
        for got, exp in zip(results, self.reference()):
            scale = exp.abs().max().item() or 1.0
            err = max(err, (got.detach().double() - exp).abs().max().item() / scale)
        return err


def conv_of(name: str, packed=None) -> Callable:
    """The strategy's convolution; ``packed``: a fastconv.prepack of the weight that
    fastconv's strategies use in its place (the inference weight cache)."""
    if name == "torch":
        return F.conv2d
    algo = "auto" if name == "autotune" else name
    if packed is not None:
        return lambda x, w, b, **kw: fastconv_conv2d(x, packed, b, **kw, algo=algo)
    return lambda x, w, b, **kw: fastconv_conv2d(x, w, b, **kw, algo=algo)


def _context(name: str):
    """autotune runs under autotuning(); every other strategy with autotune off (which
    FASTCONV_AUTOTUNE=1 would otherwise turn on for auto too)."""
    if name == "autotune":
        return autotune.autotuning()
    return autotune.suspended() if autotune.is_enabled() else contextlib.nullcontext()


def _phases(name: str, runs: str, run: Callable, cfg: Config) -> dict:
    """The phase split of the strategy's forward, where the algorithm that ran (``runs``)
    reports one (Winograd)."""
    if not cfg.phases or cfg.pass_ != "fwd" or not runs.startswith("winograd"):
        return {}
    with _context(name):
        run()
        t = dict(_C.last_phase_times())
    total = sum(t[p] for p in PHASES)
    return {p: t[p] / total for p in PHASES} if total > 0 else {}


def run_layer(layer: ConvLayer, names: Iterable[str], cfg: Config,
              tick: Callable[[str], None] = lambda _: None) -> LayerRun:
    """Times the strategies ``names`` on one layer (``tick(name)`` after each strategy and
    round, for a progress bar)."""
    names = list(names)
    skipped = {n: r for n in names if (r := why_not(n, layer, cfg)) is not None}
    running = [n for n in names if n not in skipped]
    operands = Operands(layer, cfg)
    packed = None
    if cfg.weight_cache and cfg.pass_ == "fwd":
        from ..weight_cache import prepack
        packed = prepack(operands.w)
    runs = {n: operands.runner(conv_of(n, packed)) for n in running}
    errors, picks, phases = {}, {}, {}
    for n in running:
        with _context(n):
            errors[n] = operands.max_rel_err(runs[n]())   # also autotune's one-off timing
            picks[n] = _runs(n, layer, cfg)
        phases[n] = _phases(n, picks[n], runs[n], cfg)
    samples = {n: [] for n in running}
    medians = {n: [] for n in running}
    for _ in range(cfg.rounds):
        for n in running:
            with _context(n):
                t = measure(runs[n], min_time=cfg.min_time, min_reps=3, warmup=1)
            samples[n] += t.samples
            medians[n].append(t.median)
            tick(n)
    passes = (cfg.pass_ != "bwd") + (cfg.pass_ != "fwd") * (1 + operands.input_grad)
    flops = layer.flops(cfg.batch) * passes
    results = []
    for n in running:
        q = statistics.quantiles(samples[n], n=4) if len(samples[n]) > 1 else samples[n] * 3
        med = statistics.median(samples[n])
        speedup = (statistics.median(t / m for t, m in zip(medians["torch"], medians[n]))
                   if "torch" in medians else None)
        results.append(Result(layer=layer.id, strategy=n, batch=cfg.batch, pass_=cfg.pass_,
                              dtype=str(cfg.dtype).replace("torch.", ""), layout=cfg.layout,
                              flops=flops, ms=med * 1e3, ms_q1=q[0] * 1e3, ms_q3=q[2] * 1e3,
                              gflops=flops / med / 1e9, speedup=speedup,
                              max_rel_err=errors[n], runs=picks[n], phases=phases[n]))
    return LayerRun(layer, results, skipped)


def measure_peak(dtype: torch.dtype = torch.float32, size: int = 1536) -> float:
    """This machine's attainable GFLOP/s now: fastconv's own packed GEMM on a size^3
    product (its fastest call: a peak, not a typical speed), at torch's thread count."""
    from ..ops import gemm
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    c = torch.empty(size, size, dtype=dtype)
    t = measure(lambda: gemm(a, b, c), min_time=0.3, min_reps=5, warmup=2)
    return 2 * size ** 3 / min(t.samples) / 1e9
