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


def choose(algo: Algo, *, kernel: tuple, stride: tuple, dilation: tuple, groups: int,
           in_channels: int, out_channels: int) -> str:
    """The algorithm to run for one convolution: ``algo`` itself unless it is ``auto``."""
    if algo is not Algo.AUTO:
        return algo.value
    # Only the direct kernel exists so far; later algorithms add their measured rules here.
    return Algo.DIRECT.value


def choose_for_geometry(algo: Algo, g: tuple) -> str:
    """:func:`choose` for the flat geometry tuple of :mod:`fastconv.ops`."""
    N, C, H, W, K, R, S, OH, OW, sh, sw, dh, dw, pt, pb, pl, pr, groups = g
    return choose(algo, kernel=(R, S), stride=(sh, sw), dilation=(dh, dw), groups=groups,
                  in_channels=C, out_channels=K)
