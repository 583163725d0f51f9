"""Choosing an algorithm: the ``Algo`` names, the ``auto`` heuristic and :func:`explain`.
All three read the registry (fastconv.registry); nothing here lists algorithms by hand."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .backend import Pass
from .errors import AlgorithmUnavailable
from .problem import Conv2dProblem, conv2d_problem
from .registry import ALGORITHMS, BY_NAME, FAMILIES, Algorithm

#: 'auto', one member per family ('winograd': the tile size is chosen) and one per registered
#: algorithm (Algo.DIRECT == "direct", Algo.WINOGRAD_F4 == "winograd_f4", ...).
Algo = enum.Enum("Algo", [("AUTO", "auto")] + [(f.upper(), f) for f in FAMILIES] +
                 [(a.name.upper(), a.name) for a in ALGORITHMS], type=str, module=__name__)
VALID = tuple(a.value for a in Algo)


def check_algo(algo) -> str:
    """The algorithm's name, or ValueError listing the valid names."""
    try:
        return Algo(algo).value
    except ValueError:
        raise ValueError(f"unknown convolution algorithm {algo!r}; valid choices: "
                         f"{', '.join(VALID)}") from None


def _runs(name: str, problem: Conv2dProblem, device_type: str, dtype: torch.dtype,
          pass_: Pass = Pass.FORWARD) -> bool:
    a = BY_NAME.get(name)
    return a is not None and a.unsupported(problem, device_type, dtype, pass_) is None


def winograd_tile(problem: Conv2dProblem, device_type: str = "cpu",
                  dtype: torch.dtype = torch.float32, prepacked: bool = False,
                  pass_: Pass = Pass.FORWARD) -> Optional[Algorithm]:
    """``winograd``: the tile size for one convolution (None when no Winograd runs it).

    F(6x6, 3x3) on maps of 56+ with at most 128 channels, F(2x2, 3x3) when the batch has
    fewer than 784 output pixels (196 with ``prepacked`` filters), F(4x4, 3x3) otherwise.
    Grad-weight: F4 from 1024 pixels where its 4x4 tiles cover the map with at most 15 %
    padding, else F2; F6 only if neither can run. Measured, ms F2 / F4: 512 @28 batch 2 (1568 pixels) 24.2 /
    19.0, batch 1 (784) 14.9 / 15.1; 256 @56 batch 1 12.0 / 9.4; 256 @14 batch 8 (1568
    pixels, but 14 = 3.5 tiles of 4: 31 % padding) 8.1 / 9.0, batch 4 2.9 / 3.7; 512 @7
    batch 8 8.3 / 9.3. F6: 64 @56 batch 1 1.16 vs F4 0.94, 256 @14 batch 8 8.7 vs 7.1.

    Prepacked (the weight cache: filters transformed once), speedups over torch of
    F2 / F4 / F6: batch 1: 512 @7 (49 pixels) 1.25 / 0.50 / 0.28, 256 @14 (196) 0.91 / 1.39
    / 0.63, 128 @28 1.21 / 1.31 / 1.28, 64 @56 1.09 / 1.71 / 1.80, VGG-16 2.0-2.5x (F4,
    F6); 512 @7 at batch 2 (98) 1.32 / 0.90 / 0.48, batch 4 (196) 1.21 / 1.61 / 0.89,
    batch 8 (392) 1.26 / 1.68 / 0.98 (benchmarks/report_layers.py --weight-cache).

    Transformed per call, measured at batch 8, speedups over
    torch of F2 / F4 / F6 (benchmarks/report_layers.py --net winograd):
    64 @224 1.45 / 2.14 / 2.39, 128 @112 1.70 / 2.52 / 2.65, 64 @56 1.12 / 1.66 / 1.69,
    128>256 @56 1.56 / 2.43 / 2.31, 256 @56 1.71 / 2.44 / 2.28, 512 @28 1.61 / 2.25 / 2.14,
    128 @28 1.38 / 1.90 / 1.76, 512 @14 1.25 / 1.52 / 0.95, 256 @14 1.26 / 1.51 / 0.83,
    512 @7 (392 pixels) 1.01 / 0.89 / 0.53 (direct 0.78). F6's 64 GEMMs pay only on large
    maps with few channels; on few pixels F2's 16 GEMMs (and 4x smaller transformed
    filters, rebuilt every call) beat F4's 36.
    """
    def runs(name: str) -> bool:
        return _runs(name, problem, device_type, dtype, pass_)

    p = problem
    if pass_ == Pass.GRAD_WEIGHT:
        padded = (-(-p.OH // 4) * 4) * (-(-p.OW // 4) * 4)
        f4 = p.N * p.OH * p.OW >= 1024 and padded <= 1.15 * p.OH * p.OW
        order = ("winograd_f4", "winograd_f2") if f4 else ("winograd_f2", "winograd_f4")
        return next((BY_NAME[n] for n in order + ("winograd_f6",) if runs(n)), None)
    if p.OH * p.OW >= 56 * 56 and max(p.Cg, p.Kg) <= 128 and runs("winograd_f6"):
        return BY_NAME["winograd_f6"]
    f2_below = 196 if prepacked else 784
    order = ("winograd_f2", "winograd_f4") if p.N * p.OH * p.OW < f2_below else \
        ("winograd_f4", "winograd_f2")
    return next((BY_NAME[n] for n in order + ("winograd_f6",) if runs(n)), None)


def leaves_to_torch(device_type: str, weight_shape, groups: int) -> bool:
    """Whether ``auto`` in fastconv.conv2d, conv2d_bn and the modules runs torch's own
    convolution for this layer although fastconv has kernels for the device: on a GPU,
    every layer but depthwise ones. cuDNN's dense convolutions run on tensor cores (TF32 by
    default for float32), which the Numba implicit GEMM does not use; fastconv's CUDA kernels
    serve depthwise layers, fused or not, and dense layers only when asked by name
    (algo="im2col"). Not yet measured on a GPU: revisit with numbers."""
    depthwise = weight_shape[1] == 1 and groups > 1
    return device_type != "cpu" and not depthwise


def _choose_on_gpu(problem: Conv2dProblem, device_type: str, dtype: torch.dtype,
                   pass_: Pass) -> Optional[Algorithm]:
    """``auto`` for the custom ops on a GPU: the depthwise kernels for depthwise layers,
    else the implicit GEMM (registered as im2col's CUDA kernels), the one that runs any."""
    names = ("depthwise", "im2col") if problem.Cg == 1 and problem.groups > 1 else ("im2col",)
    return next((BY_NAME[n] for n in names if _runs(n, problem, device_type, dtype, pass_)),
                None)


def choose(problem: Conv2dProblem, device_type: str = "cpu",
           dtype: torch.dtype = torch.float32, prepacked: bool = False,
           pass_: Pass = Pass.FORWARD, channels_last: bool = False) -> Optional[Algorithm]:
    """``auto``: the algorithm for one pass of one convolution, or None when no registered
    algorithm can run it (callers then use torch's own convolution, or report the reasons).
    ``prepacked``: the call's weights come from the weight cache (fastconv.weight_cache), so
    packing and filter transforms cost nothing. ``channels_last``: the pass reads or writes a
    channels_last tensor (only grad-input's choice depends on it).

    * 1x1 without groups: the packed GEMM (1.0-1.35x torch at batch 1, against 0.44-1.0x for
      direct, whose register tile wastes lanes on 7x7 maps).
    * Stems (4 or fewer input channels, no groups): the packed GEMM too, whose columns hold
      every tap where direct's reduction is 3 deep per tap (MobileNetV2's 3x3/2 3>32 @224,
      batch 1: im2col 0.25 ms, direct 0.51, torch 0.19; ResNet-50's 7x7/2: 1.50 vs 1.85,
      torch 3.4; batch 8: 1.83 vs 3.11 and 12.3 vs 14.3 ms).
    * 3x3, stride 1, no groups, 16+ channels in and out and 392+ output pixels in the batch:
      Winograd (:func:`winograd_tile` picks the tile). The filter transform costs the same
      for any batch, so the batch needs enough pixels to amortise it. Measured, best
      Winograd vs torch (direct): batch 8: 1.5-2.7x on every ResNet-50 / VGG-16 3x3 layer
      but 512 @7 (392 pixels: F2 1.01x, direct 0.78x); batch 1: 784 pixels and up win
      (128 @28 1.06x, 512 @28 1.36x), 196 do not (256 @14 F2 0.73x, direct 0.90x).
      Prepacked, the filters are transformed once and Winograd wins from 49 pixels (batch
      1: 512 @7 F2 1.25x, 256 @14 F4 1.39x; direct 0.96-0.99x), see :func:`winograd_tile`.
    * Depthwise (groups == in_channels > 1): the depthwise kernel, 3-60x the direct kernel
      on MobileNetV2's depthwise layers (NCHW vs torch, batch 1: 0.5-12.7x, geometric mean
      1.67x; channels_last 0.23-1.32x).
    * Grouped layers with 2-16 input channels per group: the grouped kernel, whose vectors
      run along the output pixels where direct's hold one group's few output channels
      (ResNeXt-50 32x4d at batch 8, 2 threads, ms, grouped vs direct: 3x3 128 g32 @56 (4
      per group) forward 2.4 vs 18.1, grad-input 2.4 vs 16.5; 256 g32 @28 (8) 1.8 vs 6.2,
      1.8 vs 5.8; 512 g32 @14 (16) 1.9 vs 2.8, 1.6 vs 2.4). With 32 per group (1024 g32
      @7) direct is as fast or faster (forward 2.0-2.4 both, grad-input 1.6 vs 1.8).
    * Everything else (spatial kernels, strided layers, 17+ channels per group): direct
      (3x3: 0.8-1.4x torch vs 0.55-0.95x for im2col; each group's GEMM is tiny).

    Grad-weight differs (benchmarks: fastconv-bench --pass fwdbwd with autotune, then each
    pass timed alone; ResNet-50, ms):

    * stems: direct, whose register tile sums a tap row's strips of few channels
      (7x7/2 3>64 @224: batch 8 20.8 vs im2col 39.5; batch 1 2.24 vs 7.55);
    * strided spatial kernels: im2col, a GEMM with the pixels as its long reduction
      (3x3/2 128 @56, 256 @28, 512 @14: batch 8 12.9 / 13.3 / 15.4 vs direct 14.4 / 15.0 /
      19.3; batch 1 1.37 / 2.45 / 4.36 vs 1.61 / 3.24 / 6.98);
    * Winograd from 49 pixels: it transforms no filters, only its dW, once per call
      (batch 1: 3x3 256 @14 F2 1.15 vs direct 2.75, 512 @7 2.10 vs 5.23);
    * grouped layers: the grouped kernel up to 16 channels per group, as the other passes
      (batch 8: 128 g32 @56 3.9 vs direct 25.0, 3x3/2 256 g32 @56 4.2 vs 20.4, 256 g32 @28
      4.4 vs 7.5; 2026-12-07, 16 per group: 3x3/2 512 g32 @28 4.1-4.2 vs 4.4-4.6, 512 g32
      @14 2.9 vs 3.9-4.3, batch 1 0.55-0.62 vs 1.35-1.41 and 0.51 vs 0.73), direct from 32
      (1024 g32 @7 3.7-3.9 vs 6.0, 3x3/2 1024 g32 @14 5.5 vs 7.6: its tiles sum 32 channels'
      taps at once).

    Grad-input of strided spatial kernels on maps of 196+ output pixels runs on the packed
    GEMM where its tensors are NCHW: W^T times grad_y into (c, r, s) columns, then col2im, no
    transposes (im2col_conv.cpp). Interleaved, 9 rounds, median of best-of-7, ms, im2col vs
    direct, torch (Zen 4, 2 threads, 2026-12-07): 3x3/2 128 @56 batch 8 10.66 vs 11.50,
    20.3; batch 4 5.44 vs 5.68; batch 1 1.32 vs 1.43, 1.39; 3x3/2 256 @28 batch 8 9.96 vs
    10.28, 10.46; batch 1 1.32 vs 1.50, 1.33; 7x7/2 3>64 @224 (a stem: im2col anyway) batch
    8 22.6 (41.2 through NHWC), 48.7. On 49-pixel maps the GEMM's 32-wide panels are half
    empty (3x3/2 512 @14 batch 1-4: direct 2-17 % faster), and channels_last tensors would
    go through im2col's NHWC path (3x3/2 128 @56 batch 8: 13.2 vs direct 11.6).

    Grad-weight where the filters outnumber the batch's output pixels 8 to 1 (3x3 512 @7 at
    batch 1) runs on the packed GEMM, whose channel-major columns write dW in place
    (im2col_conv.cpp), where Winograd transforms every filter's transform-domain sums back.
    Interleaved, 9 rounds, ms, im2col vs Winograd F2, torch (2026-12-07, host in a slow
    phase): 3x3 512 @7 batch 1 1.99 vs 2.91, 3.38 (im2col faster in 9 of 9 rounds); batch 2
    3.06 vs 3.36 (6 of 9); batch 4 5.82 vs 5.07 (0 of 9); 3x3 256 @14 batch 1 1.52 vs 0.96.

    Since direct's grad-input packs every stride phase in one pass (2026-12-07), it beats
    im2col's NHWC GEMM on the weight-bound layers that the GEMM once won (ms, direct vs
    im2col NHWC, 2026-12-07): 3x3/2 512 @14 batch 1 1.75 vs 1.97, channels_last 1.61 vs
    1.80; batch 2 2.88 vs 3.32, channels_last 2.75 vs 2.98; 3x3/2 256 @28 channels_last
    batch 1 1.36 vs 1.28, batch 2 2.46 vs 2.45.
    """
    if device_type != "cpu":
        return _choose_on_gpu(problem, device_type, dtype, pass_)

    def runs(name: str) -> bool:
        return _runs(name, problem, device_type, dtype, pass_)

    p = problem
    grad_weight = pass_ == Pass.GRAD_WEIGHT
    stem = p.groups == 1 and p.C <= 4 and (p.R, p.S) != (1, 1)
    if grad_weight and stem and runs("direct"):
        return BY_NAME["direct"]
    if p.groups == 1 and (p.R == p.S == 1 or p.C <= 4) and runs("im2col"):
        return BY_NAME["im2col"]
    if grad_weight and p.groups == 1 and p.stride != (1, 1) and runs("im2col"):
        return BY_NAME["im2col"]
    strided_spatial = p.groups == 1 and p.stride != (1, 1) and (p.R, p.S) != (1, 1)
    if (pass_ == Pass.GRAD_INPUT and strided_spatial and not channels_last
            and p.OH * p.OW >= 196 and runs("im2col")):
        return BY_NAME["im2col"]
    if grad_weight and p.groups == 1 and 8 * p.N * p.OH * p.OW <= p.Kg and runs("im2col"):
        return BY_NAME["im2col"]
    min_pixels = 49 if prepacked or grad_weight else 392
    if p.groups == 1 and min(p.Cg, p.Kg) >= 16 and p.N * p.OH * p.OW >= min_pixels:
        tile = winograd_tile(p, device_type, dtype, prepacked, pass_)
        if tile is not None:
            return tile
    if p.Cg == 1 and p.groups > 1 and runs("depthwise"):
        return BY_NAME["depthwise"]
    if p.groups > 1 and 2 <= p.Cg <= 16 and runs("grouped"):
        return BY_NAME["grouped"]
    if runs("direct"):
        return BY_NAME["direct"]
    return next((a for a in ALGORITHMS
                 if a.in_auto and a.unsupported(problem, device_type, dtype, pass_) is None),
                None)


#: Family name -> the function that picks its member for a problem, called as
#: (problem, device_type, dtype, prepacked, pass_) (None: none can run it).
FAMILY_CHOICE = {"winograd": winograd_tile}
assert set(FAMILY_CHOICE) == set(FAMILIES), "every registry family needs a chooser here"


def resolve(algo: str, problem: Conv2dProblem, device_type: str, dtype: torch.dtype,
            pass_: Pass = Pass.FORWARD, prepacked: bool = False, channels_last: bool = False):
    """(algorithm, its kernels for the device) for a call (``prepacked``: its weights come
    from the weight cache; ``channels_last``: as :func:`choose`'s), or AlgorithmUnavailable
    saying why: the named algorithm's reason, or every algorithm's reason when ``auto`` finds
    none."""
    if algo == "auto":
        chosen = choose(problem, device_type, dtype, prepacked, pass_, channels_last)
        if chosen is None:
            reasons = "; ".join(f"{a.name}: {a.unsupported(problem, device_type, dtype, pass_)}"
                                for a in ALGORITHMS if a.in_auto)
            raise AlgorithmUnavailable(f"fastconv: no algorithm can run this convolution "
                                       f"({reasons})")
        return chosen, chosen.require(problem, device_type, dtype, pass_)
    name = check_algo(algo)
    if name in FAMILIES:
        chosen = FAMILY_CHOICE[name](problem, device_type, dtype, prepacked, pass_)
        if chosen is None:  # every member fails for the same reason: report the first's
            reason = FAMILIES[name][0].unsupported(problem, device_type, dtype, pass_)
            raise AlgorithmUnavailable(f"fastconv: algo={name!r} cannot run this convolution: "
                                       f"{reason}")
        return chosen, chosen.require(problem, device_type, dtype, pass_)
    a = BY_NAME[name]
    return a, a.require(problem, device_type, dtype, pass_)


@dataclass(frozen=True)
class Candidate:
    name: str
    reason: Optional[str]       # None: it can run the problem
    workspace_bytes: int        # forward, NCHW (0 when it cannot run)


@dataclass(frozen=True)
class Explanation:
    problem: Conv2dProblem
    choice: Optional[str]       # what auto picks for the forward (None: torch's own)
    why: str
    candidates: tuple
    grad_input_choice: Optional[str] = None    # auto's heuristic for the backward passes
    grad_weight_choice: Optional[str] = None

    def __str__(self) -> str:
        p = self.problem
        lines = [f"conv {p.input_shape} * {p.weight_shape}, stride {p.stride}, padding "
                 f"{p.padding}, dilation {p.dilation}, groups {p.groups} -> {p.output_shape}: "
                 f"{p.flops / 1e9:.3f} GFLOP",
                 f"auto picks {self.choice or 'torch'}: {self.why}"]
        if self.grad_weight_choice is not None:
            lines.append(f"backward: grad-input {self.grad_input_choice}, grad-weight "
                         f"{self.grad_weight_choice}")
        for c in self.candidates:
            state = (f"can run, workspace {c.workspace_bytes / 2**20:.2f} MiB"
                     if c.reason is None else f"cannot run: {c.reason}")
            lines.append(f"  {c.name:12s} {state}")
        return "\n".join(lines)


def explain(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups: int = 1, *,
            dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
            prepacked: bool = False, channels_last: Optional[bool] = None) -> Explanation:
    """Which algorithm ``auto`` picks for this convolution's forward and why, with its FLOPs
    and each algorithm's eligibility and workspace. Arguments as
    torch.nn.functional.conv2d's, with shapes or the tensors themselves: from a tensor input,
    ``dtype``, ``device`` and ``channels_last`` (the input's layout) default to its own, and
    from shapes to float32, "cpu" and NCHW. ``prepacked``: weights from the weight cache (an
    inference call of fastconv.nn.Conv2d or of a fastconv.prepack weight). Under autotune
    (fastconv.autotune) the tuned winner is reported with every candidate's time, once a call
    has timed them. ``print()`` the result for a readable summary."""
    from .functional import explicit_padding, pair
    if isinstance(input_shape, torch.Tensor):
        from .ops import _channels_last
        x = input_shape
        dtype = x.dtype if dtype is None else dtype
        device = x.device.type if device is None else device
        if channels_last is None:
            channels_last = _channels_last(x)
        input_shape = tuple(x.shape)
    from .weight_cache import PackedWeight
    if isinstance(weight_shape, PackedWeight):
        weight_shape = weight_shape.weight
    if isinstance(weight_shape, torch.Tensor):
        weight_shape = tuple(weight_shape.shape)
    dtype = torch.float32 if dtype is None else dtype
    device = "cpu" if device is None else device
    channels_last = bool(channels_last)
    stride, dilation = pair("stride", stride), pair("dilation", dilation)
    pad = explicit_padding(padding, tuple(weight_shape[2:]), stride, dilation)
    if len(input_shape) == 3:
        input_shape = (1, *input_shape)
    problem = conv2d_problem(input_shape, weight_shape, stride, pad, dilation, groups)
    device_type = torch.device(device).type
    candidates = []
    for a in ALGORITHMS:
        reason = a.unsupported(problem, device_type, dtype)
        ws = a.workspace_bytes(problem, Pass.FORWARD, dtype, device_type) if reason is None else 0
        candidates.append(Candidate(a.name, reason, ws))
    chosen = choose(problem, device_type, dtype, prepacked)
    to_torch = chosen is not None and leaves_to_torch(device_type, weight_shape, groups)
    if to_torch:
        chosen = None
        why = (f"a dense layer on {device_type}: fastconv.conv2d runs torch's convolution "
               "(cuDNN) under auto; algo='im2col' runs fastconv's implicit GEMM")
    elif chosen is None:
        why = "no fastconv algorithm can run it, so fastconv.conv2d calls torch's convolution"
    elif device_type != "cpu":
        why = f"{chosen.name} runs it on {device_type} (fastconv's CUDA kernels)"
    elif chosen.name == "im2col" and problem.R == problem.S == 1:
        why = "1x1 without groups: the packed GEMM beats the direct kernel on every such layer"
    elif chosen.name == "im2col" and problem.C <= 4:
        why = ("a stem (4 or fewer input channels): the packed GEMM's columns hold every tap, "
               "where the direct kernel's reduction is only C deep per tap")
    elif chosen.family == "winograd":
        why = (f"3x3 stride-1 layer with enough channels and pixels: Winograd "
               f"{chosen.name[-2:].upper()} does {chosen.name[-1]}x{chosen.name[-1]} outputs "
               f"per transform and beats the direct kernel there")
    elif chosen.name == "depthwise":
        why = "depthwise layer (groups == in_channels): every vector lane is a useful output"
    elif chosen.name == "grouped":
        why = ("grouped layer with few channels per group: vectors along the output pixels "
               "keep every lane busy, where the direct kernel's hold the group's few output "
               "channels")
    elif chosen.name == "direct":
        why = "spatial, strided or grouped kernel: the direct kernel wins there"
    else:
        why = "the first registered algorithm that can run it"
    choice = chosen.name if chosen else None
    from . import autotune
    if autotune.is_enabled() and choice is not None:
        entry = autotune.lookup(autotune.make_key(problem, Pass.FORWARD, dtype,
                                                  "nhwc" if channels_last else "nchw",
                                                  device_type, prepacked))
        if entry is None:
            why = ("autotune is on but has not timed this convolution yet (its first call "
                   f"will); until then the heuristic: {why}")
        else:
            times = ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(entry.times_ms.items(),
                                                                     key=lambda i: i[1]))
            why = f"autotune measured it fastest ({times or 'the only candidate'})"
            choice = entry.algo
    grad_input, grad_weight = (
        None if to_torch else choose(problem, device_type, dtype, False, p, channels_last)
        for p in (Pass.GRAD_INPUT, Pass.GRAD_WEIGHT))
    return Explanation(problem=problem, choice=choice, why=why, candidates=tuple(candidates),
                       grad_input_choice=grad_input.name if grad_input else None,
                       grad_weight_choice=grad_weight.name if grad_weight else None)
