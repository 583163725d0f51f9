"""Convolution algorithms and the ``auto`` heuristic."""
from __future__ import annotations

import enum


class Algo(str, enum.Enum):
    AUTO = "auto"
    DIRECT = "direct"
    IM2COL = "im2col"
    WINOGRAD = "winograd"


#: Algorithms with kernels in this build.
IMPLEMENTED = frozenset({Algo.DIRECT, Algo.IM2COL})
VALID = tuple(a.value for a in Algo)


def check_algo(algo) -> Algo:
    """Validates an algorithm name: ValueError if unknown, NotImplementedError if not built yet."""
    try:
        a = Algo(algo)
    except ValueError:
        raise ValueError(
            f"unknown convolution algorithm {algo!r}; valid choices: {', '.join(VALID)}"
        ) from None
    if a is not Algo.AUTO and a not in IMPLEMENTED:
        raise NotImplementedError(
            f"algo={a.value!r} is not implemented yet; implemented: "
            f"{', '.join(sorted(x.value for x in IMPLEMENTED))} (or 'auto')"
        )
    return a


def choose(algo: Algo, g: tuple) -> str:
    """The algorithm for one convolution, given as the geometry tuple of fastconv.ops:
    ``algo`` itself unless it is ``auto``.

    Measured on ResNet-50's layers at batch 1 and 8 (benchmarks/report_layers.py, numbers in
    the README): the packed GEMM wins on every 1x1 layer (1.0-1.35x torch at batch 1, against
    0.44-1.0x for direct, whose register tile wastes lanes on 7x7 maps); the direct kernel wins
    on everything with a spatial kernel (3x3: 0.8-1.4x vs 0.55-0.95x), and on grouped and
    depthwise layers, where each group's GEMM is tiny.
    """
    if algo is not Algo.AUTO:
        return algo.value
    N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pb, pl, pr, groups = g
    if R == 1 and S == 1 and groups == 1:
        return Algo.IM2COL.value
    return Algo.DIRECT.value
