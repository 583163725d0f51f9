"""The algorithm registry: every convolution algorithm, declared once.

An entry gives the algorithm's name, its kernels per device (each with a null-safe lookup per
pass), its dtypes, an eligibility check that returns the reason it cannot run a problem, and
its workspace estimate. The custom ops run kernels through it, ``auto`` and
:func:`fastconv.explain` choose from it, and tests and benchmarks take each algorithm's domain
from :meth:`Algorithm.unsupported` rather than from per-algorithm lists.

Adding an algorithm:
  1. a C++ folder ``csrc/<name>/`` defining ``template <typename T> ConvKernels<T>
     <name>_kernels();`` (csrc/isa/kernel_table.h states the contract);
  2. one line ``X(<name>)`` in FASTCONV_ALGORITHMS, csrc/isa/table.cpp;
  3. one :class:`Algorithm` entry in ``ALGORITHMS`` below.

(``naive`` is the exception: its plain loops are Cython, fastconv/_naive.pyx, behind
backend.NaiveKernels, the same calls as the C++ table's.)

A *family* (``winograd``) names algorithms that differ in one parameter (the tile size);
asking for the family lets fastconv.dispatch pick the member.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .backend import CppKernels, NaiveKernels, Pass
from .cuda.kernels import CudaKernels
from .errors import AlgorithmUnavailable
from .problem import Conv2dProblem

FLOATS = (torch.float32, torch.float64)


def _runs_everything(problem: Conv2dProblem) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    #: Kernels per torch device type ("cpu", "cuda"): objects with forward, grad_input,
    #: grad_weight, has(pass, dtype) and workspace_bytes(problem, pass, dtype), and
    #: optionally missing() (why they cannot run in this process, or None).
    kernels: Mapping[str, object]
    dtypes: tuple = FLOATS
    #: The reason this algorithm cannot run a (valid) problem, or None if it can.
    check: Callable[[Conv2dProblem], Optional[str]] = _runs_everything
    #: The family this algorithm belongs to ("winograd"), if any.
    family: Optional[str] = None
    #: Whether ``auto`` (and autotune) may pick it: False for baselines kept for comparison.
    in_auto: bool = True

    @property
    def devices(self) -> tuple:
        return tuple(self.kernels)

    def unsupported(self, problem: Conv2dProblem, device_type: str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    pass_: Pass = Pass.FORWARD) -> Optional[str]:
        """Why this algorithm cannot run ``pass_`` of ``problem`` on that device and dtype,
        or None when it can."""
        if device_type not in self.kernels:
            return f"it has no kernels for {device_type} tensors (only {', '.join(self.devices)})"
        missing = getattr(self.kernels[device_type], "missing", None)
        reason = missing() if missing is not None else None
        if reason is not None:  # an optional dependency (numba-cuda) is absent
            return f"its {device_type} kernels cannot run: {reason}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"it has no {str(dtype).replace('torch.', '')} kernels (only {names})"
        if not self.kernels[device_type].has(pass_, dtype):
            return f"it has no {pass_.name.lower()} kernel for {dtype} on {device_type}"
        return self.check(problem)

    def require(self, problem: Conv2dProblem, device_type: str, dtype: torch.dtype,
                pass_: Pass = Pass.FORWARD):
        """The device's kernels, or AlgorithmUnavailable saying why this call cannot run."""
        reason = self.unsupported(problem, device_type, dtype, pass_)
        if reason is not None:
            raise AlgorithmUnavailable(f"fastconv: algo={self.name!r} cannot run this "
                                       f"convolution: {reason}")
        return self.kernels[device_type]

    def workspace_bytes(self, problem: Conv2dProblem, pass_: Pass = Pass.FORWARD,
                        dtype: torch.dtype = torch.float32, device_type: str = "cpu") -> int:
        """Estimated scratch bytes of one call (NCHW tensors; channels_last needs less)."""
        return self.kernels[device_type].workspace_bytes(problem, pass_, dtype)


def _winograd_3x3(problem: Conv2dProblem) -> Optional[str]:
    wrong = []
    if (problem.R, problem.S) != (3, 3):
        wrong.append(f"a {problem.R}x{problem.S} kernel")
    if problem.stride != (1, 1):
        wrong.append(f"stride {problem.sh}x{problem.sw}")
    if problem.dilation != (1, 1):
        wrong.append(f"dilation {problem.dh}x{problem.dw}")
    if wrong:
        return ("Winograd F(m, 3) runs 3x3 kernels with stride 1 and dilation 1; this "
                "convolution has " + " and ".join(wrong))
    return None


def _winograd(m: int, note: str) -> "Algorithm":
    return Algorithm(
        name=f"winograd_f{m}",
        summary=f"Winograd F({m}x{m}, 3x3): {(m * m * 9) / (m + 2) ** 2:.2f}x fewer multiplies "
                f"than direct, as {(m + 2) ** 2} GEMMs on the packed-GEMM micro-kernels; {note}",
        kernels={"cpu": CppKernels(f"winograd_f{m}")},
        check=_winograd_3x3,
        family="winograd",
    )


def _depthwise(problem: Conv2dProblem) -> Optional[str]:
    if problem.Cg != 1:
        return (f"the depthwise kernel runs convolutions with one input channel per group "
                f"(groups == in_channels); this one has {problem.Cg} per group")
    return None


def _grouped(problem: Conv2dProblem) -> Optional[str]:
    if problem.groups < 2 or problem.Cg < 2:
        return (f"the grouped kernel runs grouped convolutions with 2+ input channels per "
                f"group; this one has groups={problem.groups}, {problem.Cg} per group")
    return None


ALGORITHMS: tuple = (
    Algorithm(
        name="direct",
        summary="register-blocked direct convolution (12 pixels x 32 channels per tile), "
                "padding applied in the kernel",
        kernels={"cpu": CppKernels("direct")},
    ),
    Algorithm(
        name="im2col",
        summary="im2col (implicit for large NCHW maps) + BLIS-style packed GEMM; 1x1 layers "
                "read the activation as the GEMM operand. On CUDA: an implicit GEMM (Numba, "
                "64x64 tiles), any groups",
        kernels={"cpu": CppKernels("im2col"), "cuda": CudaKernels("implicit_gemm")},
    ),
    _winograd(2, "the most accurate tile; all three passes"),
    _winograd(4, "all three passes"),
    _winograd(6, "points 0, +-1, +-2, +-1/2, inf; all three passes"),
    Algorithm(
        name="depthwise",
        summary="depthwise (groups == in_channels, any multiplier): NCHW vectorised along the "
                "width (3x3 and 5x5 in tiles of 7 rows sharing each input row), channels_last "
                "across channels (3- and 5-tap rows reuse each input vector across 16 "
                "pixels); grad-input as a rotated forward (stride 1), by stride phases "
                "(NCHW stride 2) or a scatter, grad-weight per channel (NCHW in the "
                "forward's tiles). On CUDA (Numba): shared-memory halo tiles, a gather "
                "grad-input, a per-block grad-weight",
        kernels={"cpu": CppKernels("depthwise"), "cuda": CudaKernels("depthwise")},
        check=_depthwise,
    ),
    Algorithm(
        name="grouped",
        summary="grouped convolutions with few channels per group: vectors along the output "
                "pixels (flat stride-phase staging), tiles of up to 8 output channels of a "
                "group; grad-input per stride phase, grad-weight per group",
        kernels={"cpu": CppKernels("grouped")},
        check=_grouped,
    ),
    Algorithm(
        name="naive",
        summary="the definition's plain loops in Cython (threads over output channels, no "
                "blocking or packing): the baseline every optimisation is measured against; "
                "never picked by auto",
        kernels={"cpu": NaiveKernels()},
        in_auto=False,
    ),
)

BY_NAME = {a.name: a for a in ALGORITHMS}
#: Family name -> its members, in registry order (algo="winograd" picks among them).
FAMILIES = {f: tuple(a for a in ALGORITHMS if a.family == f)
            for f in dict.fromkeys(a.family for a in ALGORITHMS if a.family)}
#: Torch device types that some algorithm has kernels for.
DEVICE_TYPES = tuple(sorted({d for a in ALGORITHMS for d in a.devices}))
#: (device type, dtype) pairs that some algorithm has kernels for.
RUNNABLE = frozenset((d, t) for a in ALGORITHMS for d in a.devices for t in a.dtypes)


def _can_run(device_type: str, dtype: torch.dtype) -> bool:
    return any(device_type in a.kernels and dtype in a.dtypes
               and a.kernels[device_type].has(Pass.FORWARD, dtype) for a in ALGORITHMS)


#: (device type, dtype) -> whether some algorithm's kernels can run in this process. The CPU
#: entries are known at import, so torch.compile reads a dict (it cannot trace into _C).
_RUNNABLE_NOW = {("cpu", t): _can_run("cpu", t) for t in FLOATS}


def runnable(device_type: str, dtype: torch.dtype) -> bool:
    """Whether some algorithm's kernels for that device and dtype can run in this process
    (the CUDA ones need numba-cuda, an optional extra). Cached: it is asked on every call."""
    known = _RUNNABLE_NOW.get((device_type, dtype))
    if known is None:
        known = _RUNNABLE_NOW[(device_type, dtype)] = _can_run(device_type, dtype)
    return known


def forget_runnable() -> None:
    """Ask the kernels again (after numba-cuda's availability changed: tests)."""
    for key in [k for k in _RUNNABLE_NOW if k[0] != "cpu"]:
        del _RUNNABLE_NOW[key]


def get(name: str) -> Algorithm:
    return BY_NAME[name]
