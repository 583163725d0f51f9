"""Shared fixtures: every ISA this CPU runs, every implemented algorithm, and a comparison
helper whose failure message names index, expected, actual and shape."""
from __future__ import annotations

import pytest
import torch

import fastconv
from fastconv.dispatch import IMPLEMENTED

ALL_ISAS = ("avx512", "avx2", "scalar")
ALGOS = sorted(a.value for a in IMPLEMENTED)


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Runs the test once per ISA path; skipped only where this CPU lacks the ISA."""
    if request.param not in fastconv.available_isas():
        pytest.skip(f"this CPU cannot run {request.param}")
    with fastconv.use_isa(request.param):
        yield request.param


@pytest.fixture(params=ALGOS)
def algo(request):
    return request.param


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float,
                 what: str = "") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected|, NaN where expected is NaN.
    On failure reports the count of bad elements and the first bad index with both values."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    nan_e, nan_a = torch.isnan(e), torch.isnan(a)
    both_inf = torch.isinf(e) & (a == e)
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = (nan_e != nan_a) | (~nan_e & ~both_inf & ~(diff <= tol))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        finite = ~nan_e & ~nan_a & ~torch.isinf(e)
        max_err = diff[finite].max().item() if finite.any() else float("nan")
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (shape "
            f"{tuple(e.shape)}); first at index {idx}: expected {e[idx].item()!r}, actual "
            f"{a[idx].item()!r}, tolerance {tol[idx].item():.3g}; max abs error {max_err:.3g}")


def tolerances(dtype: torch.dtype, reduction: int, magnitude: float = 1.0) -> dict:
    """Tolerances for results that are sums of `reduction` products and of typical size
    `magnitude` (1 with fan-in-scaled weights, sqrt(n) for n unscaled N(0,1) products).
    Rounding errors of a blocked sum grow like eps * sqrt(n) * magnitude; allow 4x that."""
    eps = torch.finfo(dtype).eps
    atol = 4 * eps * max(1.0, reduction) ** 0.5 * max(1.0, magnitude)
    return dict(atol=max(atol, 1e-12 if dtype == torch.float64 else 1e-6),
                rtol=1e-10 if dtype == torch.float64 else 1e-5)
