"""Shared fixtures: every ISA this CPU runs, every registered algorithm, and a comparison
helper whose failure message names index, expected, actual and shape.

Which problems an algorithm runs comes from its registry entry (``supported``), never from
per-algorithm lists in the tests: a case outside an algorithm's domain checks the error."""
from __future__ import annotations

import pytest
import torch

import fastconv
from fastconv import registry
from fastconv.backend import Pass
from fastconv.errors import AlgorithmUnavailable

ALL_ISAS = ("avx512", "avx2", "scalar")
ALGOS = [a.name for a in registry.ALGORITHMS]


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


def supported(algo: str, case, dtype: torch.dtype, passes=tuple(Pass)) -> bool:
    """Whether the registry says ``algo`` runs ``case`` (a tests/cases.py Case) in ``dtype``.
    When it does not, checks that calling it raises AlgorithmUnavailable with that reason, so
    a test can return early having tested the refusal."""
    problem = case.problem()
    for pass_ in passes:
        reason = registry.get(algo).unsupported(problem, "cpu", dtype, pass_)
        if reason is not None:
            x, w, b = case.make(dtype)
            with pytest.raises(AlgorithmUnavailable, match=f"algo='{algo}'"):
                fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
            return False
    return True


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
