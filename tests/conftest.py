"""Shared fixtures: every ISA this CPU runs, every registered algorithm, and a comparison
helper whose failure message names index, expected, actual and shape.

Which problems an algorithm runs comes from its registry entry (``supported``), never from
per-algorithm lists in the tests: a case outside an algorithm's domain checks the error."""
from __future__ import annotations

import os
import threading

import pytest
import torch

import fastconv
from fastconv import registry
from fastconv.backend import Pass
from fastconv.errors import AlgorithmUnavailable

# The simulated CUDA kernels run in a process of their own (NUMBA_ENABLE_CUDASIM must be set
# before numba is imported): NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim.
collect_ignore = [] if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") else [
    "cuda_sim"]

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


FORWARD = (Pass.FORWARD,)
ALL_PASSES = tuple(Pass)


def outside_domain(algo: str, input_shape, weight_shape, dtype: torch.dtype, passes, call,
                   **conv_args) -> bool:
    """Whether the registry says ``algo`` cannot run ``passes`` of this convolution (shapes
    and torch-style conv_args). If so, checks that ``call()`` (which should run those passes)
    raises AlgorithmUnavailable, so the test can return having tested the refusal; if not,
    the test goes on to check the result."""
    problem = fastconv.explain(input_shape, weight_shape, dtype=dtype, **conv_args).problem
    entry = registry.get(algo)
    if all(entry.unsupported(problem, "cpu", dtype, p) is None for p in passes):
        return False
    with pytest.raises(AlgorithmUnavailable, match=f"algo='{algo}'"):
        call()
    return True


def conv_calls(model: torch.nn.Module, x: torch.Tensor) -> list:
    """(input shape, weight shape, conv kwargs, dtype) of every Conv2d call that model(x)
    makes, as the convolution itself sees it (non-zero padding modes pad first)."""
    calls = []

    def record(m, inputs):
        inp = inputs[0]
        padding = m.padding
        if m.padding_mode != "zeros":
            inp = torch.nn.functional.pad(inp, m._reversed_padding_repeated_twice,
                                          mode=m.padding_mode)
            padding = 0
        calls.append((tuple(inp.shape), tuple(m.weight.shape),
                      dict(stride=m.stride, padding=padding, dilation=m.dilation,
                           groups=m.groups), m.weight.dtype))

    handles = [m.register_forward_pre_hook(record) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def model_outside_domain(algo: str, model: torch.nn.Module, x: torch.Tensor, passes,
                         call) -> bool:
    """outside_domain for every convolution of model(x)."""
    for input_shape, weight_shape, conv_args, dtype in conv_calls(model, x):
        if outside_domain(algo, input_shape, weight_shape, dtype, passes, call, **conv_args):
            return True
    return False


def supported(algo: str, case, dtype: torch.dtype, passes=ALL_PASSES) -> bool:
    """outside_domain for a tests/cases.py Case, inverted: True when ``algo`` runs it."""
    def call():
        x, w, b = case.make(dtype, requires_grad=passes != FORWARD)
        y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
        if passes != FORWARD:
            y.sum().backward()
    return not outside_domain(algo, case.input, case.weight, dtype, passes, call,
                              **case.kwargs())


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


#: How much more rounding error an algorithm makes than a plain blocked sum: Winograd's
#: transforms add and scale values before the products. Max relative errors measured on the
#: ResNet-50 / VGG-16 3x3 layers at batch 8 (report_layers.py --net winograd): direct 2.3e-6,
#: F2 7.7e-7, F4 1.7e-5, F6 2.1e-5; the factors leave 2-4x headroom on small cases.
ERROR_GROWTH = {"winograd_f2": 2.0, "winograd_f4": 8.0, "winograd_f6": 32.0}


def is_winograd(algo: str) -> bool:
    return algo.startswith("winograd")


def tolerances(dtype: torch.dtype, reduction: int, magnitude: float = 1.0,
               algo: str = "direct") -> dict:
    """Tolerances for results that are sums of `reduction` products and of typical size
    `magnitude` (1 with fan-in-scaled weights, sqrt(n) for n unscaled N(0,1) products).
    Rounding errors of a blocked sum grow like eps * sqrt(n) * magnitude; allow 4x that
    (times the algorithm's ERROR_GROWTH)."""
    eps = torch.finfo(dtype).eps
    atol = 4 * eps * max(1.0, reduction) ** 0.5 * max(1.0, magnitude) * ERROR_GROWTH.get(algo, 1.0)
    return dict(atol=max(atol, 1e-12 if dtype == torch.float64 else 1e-6),
                rtol=(1e-10 if dtype == torch.float64 else 1e-5) * ERROR_GROWTH.get(algo, 1.0))


def assert_nonfinite_like_torch(got: torch.Tensor, expected: torch.Tensor, algo: str) -> None:
    """NaN and +-inf where torch has them. Winograd mixes a tile's inputs in its transforms, so
    one non-finite input makes its whole output tile non-finite (as in any Winograd
    implementation): there, every non-finite output of torch must be non-finite in ours."""
    if is_winograd(algo):
        missing = ~torch.isfinite(expected) & torch.isfinite(got)
        assert not missing.any(), (f"finite where torch is not, first at index "
                                   f"{tuple(missing.nonzero()[0].tolist())}")
        return
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.isposinf(got), torch.isposinf(expected))
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))


def run_in_threads(body, count: int) -> None:
    """body(i) for i < count, each in its own thread, all at once; re-raises the first
    exception of any thread (pytest does not see failures inside threads)."""
    errors = []

    def run(i):
        try:
            body(i)
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def pytest_terminal_summary(terminalreporter):
    """The CUDA kernels' registers per thread (sm_90), when tests/test_cuda_ptx.py ran."""
    import sys
    ptx = sys.modules.get("test_cuda_ptx")
    if ptx is None or not ptx.REGISTERS:
        return
    terminalreporter.section(f"CUDA kernels, ptxas sm_90: {len(ptx.REGISTERS)} compiled")
    for name, (registers, spills) in sorted(ptx.REGISTERS.items()):
        terminalreporter.write_line(f"{name:34s} {registers:4d} registers, {spills} bytes "
                                    "spilled")
