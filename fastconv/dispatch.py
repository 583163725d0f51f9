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
from .registry import ALGORITHMS, BY_NAME, Algorithm

#: 'auto' plus one member per registered algorithm (Algo.DIRECT == "direct", ...).
Algo = enum.Enum("Algo", [("AUTO", "auto")] + [(a.name.upper(), a.name) for a in ALGORITHMS],
                 type=str, module=__name__)
VALID = tuple(a.value for a in Algo)


def check_algo(algo) -> str:
    """The algorithm's name, or ValueError listing the valid names."""
    try:
        return Algo(algo).value
    except ValueError:
        raise ValueError(f"unknown convolution algorithm {algo!r}; valid choices: "
                         f"{', '.join(VALID)}") from None


def choose(problem: Conv2dProblem, device_type: str = "cpu",
           dtype: torch.dtype = torch.float32) -> Optional[Algorithm]:
    """``auto``: the algorithm for one convolution, or None when no registered algorithm can
    run it (callers then use torch's own convolution, or report the reasons).

    Measured on ResNet-50's layers at batch 1 and 8 (benchmarks/report_layers.py, numbers in
    the README): the packed GEMM wins on every 1x1 layer without groups (1.0-1.35x torch at
    batch 1, against 0.44-1.0x for direct, whose register tile wastes lanes on 7x7 maps); the
    direct kernel wins on everything with a spatial kernel (3x3: 0.8-1.4x vs 0.55-0.95x), and
    on grouped and depthwise layers, where each group's GEMM is tiny.
    """
    def runs(name: str) -> bool:
        a = BY_NAME.get(name)
        return a is not None and a.unsupported(problem, device_type, dtype) is None

    if problem.R == problem.S == 1 and problem.groups == 1 and runs("im2col"):
        return BY_NAME["im2col"]
    if runs("direct"):
        return BY_NAME["direct"]
    return next((a for a in ALGORITHMS if a.unsupported(problem, device_type, dtype) is None),
                None)


def resolve(algo: str, problem: Conv2dProblem, device_type: str, dtype: torch.dtype,
            pass_: Pass = Pass.FORWARD):
    """(algorithm, its kernels for the device) for a call, or AlgorithmUnavailable saying
    why: the named algorithm's reason, or every algorithm's reason when ``auto`` finds none."""
    if algo == "auto":
        chosen = choose(problem, device_type, dtype)
        if chosen is None:
            reasons = "; ".join(f"{a.name}: {a.unsupported(problem, device_type, dtype)}"
                                for a in ALGORITHMS)
            raise AlgorithmUnavailable(f"fastconv: no algorithm can run this convolution "
                                       f"({reasons})")
        return chosen, chosen.require(problem, device_type, dtype, pass_)
    a = BY_NAME[check_algo(algo)]
    return a, a.require(problem, device_type, dtype, pass_)


@dataclass(frozen=True)
class Candidate:
    name: str
    reason: Optional[str]       # None: it can run the problem
    workspace_bytes: int        # forward, NCHW (0 when it cannot run)


@dataclass(frozen=True)
class Explanation:
    problem: Conv2dProblem
    choice: Optional[str]       # what auto picks (None: torch's own convolution)
    why: str
    candidates: tuple

    def __str__(self) -> str:
        p = self.problem
        lines = [f"conv {p.input_shape} * {p.weight_shape}, stride {p.stride}, padding "
                 f"{p.padding}, dilation {p.dilation}, groups {p.groups} -> {p.output_shape}: "
                 f"{p.flops / 1e9:.3f} GFLOP",
                 f"auto picks {self.choice or 'torch'}: {self.why}"]
        for c in self.candidates:
            state = (f"can run, workspace {c.workspace_bytes / 2**20:.2f} MiB"
                     if c.reason is None else f"cannot run: {c.reason}")
            lines.append(f"  {c.name:10s} {state}")
        return "\n".join(lines)


def explain(input_shape, weight_shape, stride=1, padding=0, dilation=1, groups: int = 1, *,
            dtype: torch.dtype = torch.float32, device: str = "cpu") -> Explanation:
    """Which algorithm ``auto`` picks for this convolution and why, with its FLOPs and each
    algorithm's eligibility and workspace. Arguments as torch.nn.functional.conv2d's
    (shapes instead of tensors); ``print()`` the result for a readable summary."""
    from .functional import explicit_padding, pair
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
    chosen = choose(problem, device_type, dtype)
    if chosen is None:
        why = "no fastconv algorithm can run it, so fastconv.conv2d calls torch's convolution"
    elif chosen.name == "im2col" and problem.R == problem.S == 1:
        why = "1x1 without groups: the packed GEMM beats the direct kernel on every such layer"
    elif chosen.name == "direct":
        why = "spatial or grouped kernel: the direct kernel wins there"
    else:
        why = "the first registered algorithm that can run it"
    return Explanation(problem, chosen.name if chosen else None, why, tuple(candidates))
