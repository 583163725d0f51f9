"""Edge cases, each against torch.nn.functional.conv2d (or, where torch has no opinion, against
the rule written next to the test):

a. zero sizes (batch, channels, output channels, height, width, kernel): same shape and
   values as torch, forward and gradients, or an exception of the same class as torch's;
b. NaN and +/-Inf at every input position, weight tap and bias entry of a small problem: the
   same non-finite pattern as torch, on every algorithm and ISA;
c. non-contiguous, expanded (stride 0) and overlapping inputs, weights, biases and
   grad_outputs: torch's values, and the arguments are left unmodified;
d. tensors on the meta device: never a silently wrong CPU result;
e. argument validation does not depend on earlier calls with equal-comparing arguments;
f. the fake kernels raise the same errors as the real ones;
g. memory does not grow over many calls of each op.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastconv
from fastconv import registry
from fastconv.backend import Pass
from conftest import ALL_PASSES, FORWARD, assert_close, is_winograd, outside_domain, tolerances


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's intra-op thread count inside the block (fastconv reads the same setting)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _raised(fn):
    """The exception fn() raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the class is what the tests compare
        return e
    return None


# --------------------------------------------------------------------------------------------
# a. Zero sizes
# --------------------------------------------------------------------------------------------

ZERO_SIZE_CASES = [
    # (id, input shape, weight shape, conv kwargs); "weight_cl" in the id: the weight is
    # channels_last (so is the output)
    ("batch0", (0, 3, 5, 5), (4, 3, 3, 3), {}),
    ("batch0_padded_strided", (0, 3, 5, 5), (4, 3, 3, 3), dict(padding=1, stride=2)),
    ("batch0_kernel_too_large", (0, 3, 5, 5), (4, 3, 7, 7), {}),
    ("channels0", (2, 0, 5, 5), (4, 0, 3, 3), {}),
    ("channels0_batch1", (1, 0, 4, 4), (2, 0, 3, 3), {}),
    ("channels0_padded_strided", (2, 0, 5, 5), (4, 0, 3, 3), dict(padding=1, stride=2)),
    ("channels0_groups2", (2, 0, 5, 5), (4, 0, 3, 3), dict(groups=2)),
    ("channels0_groups4_same", (2, 0, 5, 5), (4, 0, 3, 3), dict(groups=4, padding="same")),
    ("channels0_groups_not_dividing_out", (2, 0, 5, 5), (3, 0, 3, 3), dict(groups=2)),
    ("channels0_kernel_too_large", (2, 0, 5, 5), (4, 0, 7, 7), {}),
    ("channels0_unbatched", (0, 5, 5), (4, 0, 3, 3), {}),
    ("batch0_channels0", (0, 0, 5, 5), (4, 0, 3, 3), {}),
    ("out_channels0", (2, 3, 5, 5), (0, 3, 3, 3), {}),
    ("out_channels0_groups2", (2, 4, 5, 5), (0, 2, 3, 3), dict(groups=2)),
    ("out_channels0_batch0", (0, 3, 5, 5), (0, 3, 3, 3), {}),
    ("out_channels0_channels0", (2, 0, 5, 5), (0, 0, 3, 3), {}),
    ("height0", (2, 3, 0, 5), (4, 3, 3, 3), {}),
    ("height0_padding_too_small", (2, 3, 0, 5), (4, 3, 3, 3), dict(padding=1)),
    ("height0_padded", (2, 3, 0, 5), (4, 3, 3, 3), dict(padding=2)),
    ("height0_padded_1x1", (2, 3, 0, 5), (4, 3, 1, 1), dict(padding=1)),
    ("height0_padded_weight_cl", (2, 3, 0, 5), (4, 3, 3, 3), dict(padding=2)),
    ("width0_padded", (2, 3, 5, 0), (4, 3, 3, 3), dict(padding=2)),
    ("width0_padded_weight_cl", (2, 3, 5, 0), (4, 3, 3, 3), dict(padding=2)),
    ("width0_padded_unbatched", (3, 5, 0), (4, 3, 3, 3), dict(padding=2)),
    ("height0_width0", (2, 3, 0, 0), (4, 3, 1, 1), {}),
    ("height0_width0_padded", (2, 3, 0, 0), (4, 3, 1, 1), dict(padding=1)),
    ("batch0_height0", (0, 3, 0, 5), (4, 3, 3, 3), {}),
    ("batch0_height0_padding_too_small", (0, 3, 0, 5), (4, 3, 3, 3), dict(padding=1)),
    ("batch0_height0_padded", (0, 3, 0, 5), (4, 3, 3, 3), dict(padding=2)),
    ("batch0_height0_padded_weight_cl", (0, 3, 0, 5), (4, 3, 3, 3), dict(padding=2)),
    ("batch0_height0_width0_padded", (0, 3, 0, 0), (4, 3, 1, 1), dict(padding=(1, 2))),
    ("channels0_height0_padded", (2, 0, 0, 5), (4, 0, 3, 3), dict(padding=2)),
    ("channels0_height0_width0_padded", (2, 0, 0, 0), (4, 0, 1, 1), dict(padding=1)),
    ("kernel_height0", (2, 3, 5, 5), (4, 3, 0, 3), {}),
    ("kernel_width0_padded", (2, 3, 5, 5), (4, 3, 3, 0), dict(padding=1)),
    ("kernel0x0", (2, 3, 5, 5), (4, 3, 0, 0), {}),
    ("all_zero", (0, 0, 0, 0), (0, 0, 0, 0), {}),
    ("all_zero_1x1", (0, 0, 0, 0), (4, 0, 1, 1), {}),
    ("all_zero_1x1_padded", (0, 0, 0, 0), (4, 0, 1, 1), dict(padding=1)),
]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name,input_shape,weight_shape,kwargs", ZERO_SIZE_CASES,
                         ids=[c[0] for c in ZERO_SIZE_CASES])
def test_zero_sizes_behave_like_torch(name, input_shape, weight_shape, kwargs, bias, algo):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, dtype=torch.float64, generator=g)
    w = torch.randn(weight_shape, dtype=torch.float64, generator=g)
    if "weight_cl" in name:
        w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(weight_shape[0], dtype=torch.float64, generator=g) if bias else None
    params = [t.clone().requires_grad_(True) for t in ([x, w, b] if bias else [x, w])]
    fast_params = [t.detach().clone().requires_grad_(True) for t in params]

    try:
        expected = F.conv2d(*params, **kwargs)
    except (RuntimeError, TypeError) as e:
        # Both the eager path (no autograd) and the op path (autograd) raise like torch.
        with pytest.raises(type(e)):
            fastconv.conv2d(x, w, b, **kwargs, algo=algo)
        with pytest.raises(type(e)):
            fastconv.conv2d(*fast_params, **kwargs, algo=algo)
        return

    if outside_domain(algo, x.shape, w.shape, x.dtype, ALL_PASSES,
                      lambda: fastconv.conv2d(*fast_params, **kwargs, algo=algo).sum().backward(),
                      **kwargs):
        return
    y_eager = fastconv.conv2d(x, w, b, **kwargs, algo=algo)
    y = fastconv.conv2d(*fast_params, **kwargs, algo=algo)
    for what, out in (("forward (no autograd)", y_eager), ("forward", y)):
        assert tuple(out.shape) == tuple(expected.shape), (
            f"{name}: {what} shape {tuple(out.shape)}, torch {tuple(expected.shape)}")
        assert_close(out, expected, atol=1e-12, rtol=1e-12, what=f"{name} {what}")

    gy = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    try:
        torch_grads = torch.autograd.grad(expected, params, gy, allow_unused=True)
    except (RuntimeError, TypeError) as e:
        with pytest.raises(type(e)):
            torch.autograd.grad(y, fast_params, gy, allow_unused=True)
        return
    grads = torch.autograd.grad(y, fast_params, gy, allow_unused=True)
    for what, got, ref, t in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                 torch_grads, params):
        got = torch.zeros_like(t) if got is None else got
        ref = torch.zeros_like(t) if ref is None else ref
        assert_close(got, ref, atol=1e-12, rtol=1e-12, what=f"{name} {what}")


# --------------------------------------------------------------------------------------------
# b. NaN and +/-Inf, one position at a time
# --------------------------------------------------------------------------------------------

NONFINITE = (float("nan"), float("inf"), -float("inf"))
# Border outputs read the zero padding in each variant; stride, dilation and asymmetric
# padding move which taps meet it.
NONFINITE_VARIANTS = [
    dict(padding=1),
    dict(padding=1, stride=2),
    dict(padding=2, dilation=2),
    dict(padding=(2, 1), stride=(2, 1), dilation=(1, 2)),
]


def _pattern(y: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.isnan(y), torch.isposinf(y), torch.isneginf(y)])


def _nonfinite_problems(dtype):
    """Yields (description, x, w, b, kwargs): one non-finite value at one input position,
    weight tap or bias entry of a 1x3x5x6 input and a 4x3x3x3 weight, for each variant."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 5, 6, generator=g, dtype=dtype)
    w0 = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype)
    b0 = torch.randn(4, generator=g, dtype=dtype)
    for kwargs in NONFINITE_VARIANTS:
        for value in NONFINITE:
            for which, t0 in (("input", x0), ("weight", w0), ("bias", b0)):
                for flat in range(t0.numel()):
                    t = t0.clone()
                    t.view(-1)[flat] = value
                    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat),
                                                                      t0.shape))
                    x, w, b = (t if which == "input" else x0, t if which == "weight" else w0,
                               t if which == "bias" else b0)
                    yield f"{value} at {which}{list(index)}, {kwargs}", x, w, b, kwargs


_EXPECTED_PATTERNS: dict = {}


def _expected_patterns(dtype) -> list:
    """torch's non-finite patterns for _nonfinite_problems(dtype), computed once per dtype (on
    one thread: thousands of tiny calls)."""
    if dtype not in _EXPECTED_PATTERNS:
        with _torch_threads(1):
            _EXPECTED_PATTERNS[dtype] = [_pattern(F.conv2d(x, w, b, **kw))
                                         for _, x, w, b, kw in _nonfinite_problems(dtype)]
    return _EXPECTED_PATTERNS[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nonfinite_at_every_position_propagates_like_torch(dtype, algo, isa):
    expected = _expected_patterns(dtype)
    failures = []
    for (what, x, w, b, kwargs), exp in zip(_nonfinite_problems(dtype), expected):
        if outside_domain(algo, x.shape, w.shape, dtype, FORWARD,
                          lambda: fastconv.conv2d(x, w, b, **kwargs, algo=algo), **kwargs):
            continue
        got = _pattern(fastconv.conv2d(x, w, b, **kwargs, algo=algo))
        if is_winograd(algo):  # a non-finite input spreads over its tile (conftest)
            nonfinite, exp_nonfinite = got.any(0), exp.any(0)
            if (exp_nonfinite & ~nonfinite).any():
                idx = tuple((exp_nonfinite & ~nonfinite).nonzero()[0].tolist())
                failures.append(f"{what}: output{idx} is finite, torch's is not")
            continue
        if not torch.equal(got, exp):
            kind, *idx = (int(i) for i in (got != exp).nonzero()[0])
            names = ("isnan", "isposinf", "isneginf")
            failures.append(f"{what}: output{idx} {names[kind]} is {bool(got[kind][tuple(idx)])}"
                            f", torch's is {bool(exp[kind][tuple(idx)])}")
    assert not failures, f"{len(failures)} of {len(expected)} problems differ; first: " + \
        "; ".join(failures[:5])


# --------------------------------------------------------------------------------------------
# c. Non-contiguous, expanded and overlapping arguments
# --------------------------------------------------------------------------------------------

N, C, H, W, K = 2, 4, 7, 8, 6


def _input_variants(g, dtype):
    """name -> (base tensor, view of shape (N, C, H, W) into it)."""
    def cl(t):
        return t.contiguous(memory_format=torch.channels_last)

    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    bases = {
        "contiguous": (r(N, C, H, W), lambda t: t),
        "channels_last": (cl(r(N, C, H, W)), lambda t: t),
        "storage_offset": (r(N + 2, C, H, W), lambda t: t[1:N + 1]),
        "channels_last_storage_offset": (cl(r(N + 2, C, H, W)), lambda t: t[1:N + 1]),
        "width_sliced": (r(N, C, H, 2 * W), lambda t: t[..., ::2]),
        "height_width_transposed": (r(N, C, W, H), lambda t: t.transpose(2, 3)),
        "batch_channel_transposed": (r(C, N, H, W), lambda t: t.transpose(0, 1)),
        "channels_last_width_sliced": (cl(r(N, C, H, 2 * W)), lambda t: t[..., ::2]),
        "channels_last_channel_sliced": (cl(r(N, 2 * C, H, W)), lambda t: t[:, ::2]),
        "expanded_channels": (r(1, C, 1, 1), lambda t: t.expand(N, C, H, W)),
        "expanded_batch": (r(1, C, H, W), lambda t: t.expand(N, C, H, W)),
        "expanded_width": (r(N, C, H, 1), lambda t: t.expand(N, C, H, W)),
        "expanded_scalar": (r(1, 1, 1, 1), lambda t: t.expand(N, C, H, W)),
        "overlapping_rows": (r(N * C * H * W), lambda t: t.as_strided((N, C, H, W),
                                                                     (40, 7, 3, 1))),
        "overlapping_windows": (r(N * C * H * W), lambda t: t.as_strided((N, C, H, W),
                                                                        (5, 1, 2, 3))),
    }
    return bases


def _weight_variants(g, dtype, k=K, cg=C):
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype) / 6  # noqa: E731
    return {
        "contiguous": (r(k, cg, 3, 3), lambda t: t),
        "channels_last": (r(k, cg, 3, 3).contiguous(memory_format=torch.channels_last),
                          lambda t: t),
        "in_out_transposed": (r(cg, k, 3, 3), lambda t: t.transpose(0, 1)),
        "kernel_sliced": (r(k, cg, 3, 6), lambda t: t[..., ::2]),
        "expanded_out_channels": (r(1, cg, 3, 3), lambda t: t.expand(k, cg, 3, 3)),
        "expanded_scalar": (r(1, 1, 1, 1), lambda t: t.expand(k, cg, 3, 3)),
        "overlapping": (r(k * cg * 9), lambda t: t.as_strided((k, cg, 3, 3), (9, 3, 2, 1))),
    }


def _bias_variants(g, dtype, k=K):
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return {
        "none": (None, None),
        "contiguous": (r(k), lambda t: t),
        "strided": (r(2 * k), lambda t: t[::2]),
        "reversed_offset": (r(2 * k), lambda t: t[1:k + 1]),
        "expanded": (r(1), lambda t: t.expand(k)),
    }


def _grad_output_variants(g, dtype, shape):
    n, k, oh, ow = shape
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {
        "contiguous": (r(n, k, oh, ow), lambda t: t),
        "channels_last": (r(n, k, oh, ow).contiguous(memory_format=torch.channels_last),
                          lambda t: t),
        "width_sliced": (r(n, k, oh, 2 * ow), lambda t: t[..., ::2]),
        "expanded_scalar": (r(1), lambda t: t.reshape(1, 1, 1, 1).expand(n, k, oh, ow)),
        "expanded_channels": (r(1, k, 1, 1), lambda t: t.expand(n, k, oh, ow)),
        "overlapping": (r(n * k * oh * ow), lambda t: t.as_strided((n, k, oh, ow),
                                                                  (oh * ow, 3, 2, 1))),
    }


def _check_strided(x_base, x_view, w_base, w_view, b_base, b_view, kwargs, algo, dtype,
                   gy_base=None, gy_view=None, what=""):
    """fastconv on the views vs torch on the same views, forward and the three gradients;
    the bases (and so the views) are unchanged afterwards."""
    bases = [t for t in (x_base, w_base, b_base, gy_base) if t is not None]
    snapshots = [t.clone() for t in bases]
    x, w = x_view(x_base), w_view(w_base)
    b = b_view(b_base) if b_base is not None else None
    if outside_domain(algo, x.shape, w.shape, dtype, ALL_PASSES,
                      lambda: fastconv.conv2d(x.detach().requires_grad_(True), w, b, **kwargs,
                                              algo=algo).sum().backward(), **kwargs):
        return
    expected = F.conv2d(x, w, b, **kwargs)
    red = w.shape[1] * w.shape[2] * w.shape[3]
    tol = tolerances(dtype, red, magnitude=6.0, algo=algo)
    y = fastconv.conv2d(x, w, b, **kwargs, algo=algo)
    assert_close(y, expected, **tol, what=f"{what} forward")

    # Gradients with respect to the views themselves (leaves cut from the bases).
    leaves = [t.detach().requires_grad_(True) for t in (x, w, b) if t is not None]
    ref_leaves = [t.detach().requires_grad_(True) for t in (x, w, b) if t is not None]
    y = fastconv.conv2d(*leaves, **kwargs, algo=algo)
    yt = F.conv2d(*ref_leaves, **kwargs)
    if gy_base is not None:
        gy = gy_view(gy_base)
    else:
        gy = torch.randn(yt.shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    got = torch.autograd.grad(y, leaves, gy)
    ref = torch.autograd.grad(yt, ref_leaves, gy)
    pixels = y.shape[0] * y.shape[2] * y.shape[3]
    scale = float(gy.abs().max()) if gy.numel() else 1.0
    for name, a, e, red_g in zip(("grad_input", "grad_weight", "grad_bias"), got, ref,
                                 (w.shape[0] * w.shape[2] * w.shape[3], pixels, pixels)):
        assert_close(a, e, **tolerances(dtype, red_g, magnitude=6.0 * scale * red_g ** 0.5, algo=algo),
                     what=f"{what} {name}")
    for t, s in zip(bases, snapshots):
        assert torch.equal(t, s), f"{what}: an argument was modified"


@pytest.mark.parametrize("variant", list(_input_variants(torch.Generator(), torch.float64)))
def test_strided_inputs(variant, algo):
    g = torch.Generator().manual_seed(1)
    xb, xv = _input_variants(g, torch.float64)[variant]
    bb, bv = _bias_variants(g, torch.float64)["strided"]
    for kwargs in (dict(padding=1), dict(stride=2, groups=2, padding=(0, 1))):
        groups = kwargs.get("groups", 1)
        wb, wv = _weight_variants(g, torch.float64, cg=C // groups)["contiguous"]
        _check_strided(xb, xv, wb, wv, bb, bv, kwargs, algo, torch.float64,
                       what=f"input {variant}, {kwargs}")


@pytest.mark.parametrize("variant", list(_weight_variants(torch.Generator(), torch.float64)))
def test_strided_weights(variant, algo):
    g = torch.Generator().manual_seed(2)
    xb, xv = _input_variants(g, torch.float64)["contiguous"]
    wb, wv = _weight_variants(g, torch.float64)[variant]
    bb, bv = _bias_variants(g, torch.float64)["expanded"]
    _check_strided(xb, xv, wb, wv, bb, bv, dict(padding=1), algo, torch.float64,
                   what=f"weight {variant}")
    xb, xv = _input_variants(g, torch.float64)["channels_last"]
    _check_strided(xb, xv, wb, wv, bb, bv, dict(padding=1, stride=2), algo, torch.float64,
                   what=f"weight {variant}, channels_last input")


@pytest.mark.parametrize("variant", list(_bias_variants(torch.Generator(), torch.float64)))
def test_strided_biases(variant, algo):
    g = torch.Generator().manual_seed(3)
    xb, xv = _input_variants(g, torch.float64)["contiguous"]
    wb, wv = _weight_variants(g, torch.float64)["contiguous"]
    bb, bv = _bias_variants(g, torch.float64)[variant]
    _check_strided(xb, xv, wb, wv, bb, bv, dict(padding=1), algo, torch.float64,
                   what=f"bias {variant}")


@pytest.mark.parametrize("variant", list(_grad_output_variants(torch.Generator(), torch.float64,
                                                                (N, K, H, W))))
def test_strided_grad_outputs(variant, algo):
    g = torch.Generator().manual_seed(4)
    for xname in ("contiguous", "channels_last"):
        xb, xv = _input_variants(g, torch.float64)[xname]
        wb, wv = _weight_variants(g, torch.float64)["contiguous"]
        bb, bv = _bias_variants(g, torch.float64)["contiguous"]
        gb, gv = _grad_output_variants(g, torch.float64, (N, K, H, W))[variant]
        _check_strided(xb, xv, wb, wv, bb, bv, dict(padding=1), algo, torch.float64, gb, gv,
                       what=f"grad_output {variant}, {xname} input")


def test_sum_backward_gives_a_stride0_grad_output(algo):
    # y.sum().backward() hands the op's backward a grad_output of strides (0, 0, 0, 0).
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    if outside_domain(algo, x.shape, w.shape, x.dtype, ALL_PASSES,
                      lambda: fastconv.conv2d(x.requires_grad_(True), w, b, padding=1,
                                              algo=algo).sum().backward(), padding=1):
        return
    grads = {}
    for name, conv in (("fastconv", lambda *a: fastconv.conv2d(*a, padding=1, algo=algo)),
                       ("torch", lambda *a: F.conv2d(*a, padding=1))):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
        conv(*leaves).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for what, a, e in zip(("grad_input", "grad_weight", "grad_bias"), *grads.values()):
        assert_close(a, e, atol=1e-10, rtol=1e-10, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_everything_strided_at_once(dtype, algo):
    g = torch.Generator().manual_seed(6)
    for xname, wname, bname, gname in [
            ("overlapping_windows", "overlapping", "expanded", "expanded_scalar"),
            ("expanded_channels", "in_out_transposed", "strided", "overlapping"),
            ("channels_last_channel_sliced", "expanded_out_channels", "reversed_offset",
             "width_sliced"),
            ("batch_channel_transposed", "kernel_sliced", "contiguous", "channels_last")]:
        xb, xv = _input_variants(g, dtype)[xname]
        wb, wv = _weight_variants(g, dtype)[wname]
        bb, bv = _bias_variants(g, dtype)[bname]
        gb, gv = _grad_output_variants(g, dtype, (N, K, H, W))[gname]
        _check_strided(xb, xv, wb, wv, bb, bv, dict(padding=1), algo, dtype, gb, gv,
                       what=f"input {xname}, weight {wname}, bias {bname}, grad_output {gname}")


# --------------------------------------------------------------------------------------------
# d. The meta device
# --------------------------------------------------------------------------------------------

def _meta_calls(x, w, b, algo):
    """The three ways in: eager fastconv.conv2d, fastconv.conv2d under autograd, the op."""
    def autograd_call():
        return fastconv.conv2d(x.detach().requires_grad_(x.is_floating_point()), w, b,
                               padding=1, algo=algo)
    return {
        "fastconv.conv2d": lambda: fastconv.conv2d(x, w, b, padding=1, algo=algo),
        "fastconv.conv2d (autograd)": autograd_call,
        "torch.ops.fastconv.conv2d": lambda: torch.ops.fastconv.conv2d(
            x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, algo),
    }


def _must_raise(calls: dict, what: str, describe=lambda y: f"a {y.device} tensor") -> None:
    """Every call raises RuntimeError or ValueError; lists the ones that returned."""
    returned = []
    for path, call in calls.items():
        try:
            y = call()
        except (RuntimeError, ValueError):
            continue
        returned.append(f"{path} returned {describe(y)}")
    assert not returned, f"{what}: " + "; ".join(returned)


def test_bias_on_meta_with_cpu_input_raises(algo):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    b = torch.randn(4, device="meta")
    without_bias = F.conv2d(x, w, None, padding=1)

    def describe(y):
        dropped = y.device.type == "cpu" and torch.allclose(y.detach(), without_bias,
                                                             atol=1e-5, rtol=1e-5)
        return f"a {y.device} tensor" + (" (the bias silently dropped)" if dropped else "")
    _must_raise(_meta_calls(x, w, b, algo), "bias on meta, input and weight on the CPU",
                describe)


def test_weight_on_meta_with_cpu_input_raises(algo):
    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3, device="meta"), torch.randn(4)
    for bias in (None, b):
        _must_raise(_meta_calls(x, w, bias, algo),
                    f"weight on meta, input {'and bias ' if bias is not None else ''}on the CPU")


def test_all_meta_returns_meta_or_raises(algo):
    x = torch.randn(1, 3, 6, 6, device="meta")
    w = torch.randn(4, 3, 3, 3, device="meta")
    b = torch.randn(4, device="meta")
    expected_shape = F.conv2d(x, w, b, padding=1).shape
    for bias in (None, b):
        for path, call in _meta_calls(x, w, bias, algo).items():
            try:
                y = call()
            except (RuntimeError, ValueError):
                continue  # raising clearly is allowed
            assert y.device.type == "meta", f"{path}: a {y.device} result from meta tensors"
            assert y.shape == expected_shape, f"{path}: shape {tuple(y.shape)}"


# --------------------------------------------------------------------------------------------
# e. Argument validation does not depend on call history
# --------------------------------------------------------------------------------------------

# (id, good kwargs, bad kwargs that compare (and hash) equal to the good ones). torch raises
# TypeError for every bad one.
EQUAL_BUT_WRONG_TYPE = [
    ("stride_float", dict(stride=1), dict(stride=1.0)),
    ("stride_bool", dict(stride=1), dict(stride=True)),
    ("padding_float", dict(padding=1), dict(padding=1.0)),
    ("padding_bool", dict(padding=1), dict(padding=True)),
    ("dilation_pair_with_float", dict(dilation=(1, 1)), dict(dilation=(1, 1.0))),
    ("dilation_bool", dict(dilation=1), dict(dilation=True)),
    ("groups_float", dict(groups=1), dict(groups=1.0)),
    ("groups_bool", dict(groups=1), dict(groups=True)),
]

_FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import fastconv
    w = torch.randn(4, 3, 3, 3)
    result = {}
    for i, (name, kwargs) in enumerate(json.loads(sys.argv[1])):
        # A shape of its own per case: a call that wrongly succeeds cannot prepare the next.
        x = torch.randn(1, 3, 6, 6 + i)
        try:
            fastconv.conv2d(x, w, **{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in kwargs.items()})
            result[name] = "returned"
        except Exception as e:
            result[name] = "TypeError" if isinstance(e, TypeError) else type(e).__name__
    print(json.dumps(result))
""")


def test_torch_rejects_the_wrong_types_too():
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    for name, _, bad in EQUAL_BUT_WRONG_TYPE:
        with pytest.raises(TypeError):
            F.conv2d(x, w, **bad)


def test_wrong_argument_types_raise_in_a_fresh_process():
    # Nothing has been called before in that process: no cache can let anything through.
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastconv.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cases = [(name, bad) for name, _, bad in EQUAL_BUT_WRONG_TYPE]
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_SCRIPT, json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {name: got for name, got in result.items() if got != "TypeError"}
    assert not wrong, f"expected TypeError, got: {wrong}"


@pytest.mark.parametrize("name,good,bad", EQUAL_BUT_WRONG_TYPE,
                         ids=[c[0] for c in EQUAL_BUT_WRONG_TYPE])
def test_wrong_argument_types_raise_after_a_good_call(name, good, bad, algo):
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    if registry.get(algo).unsupported(fastconv.explain(x.shape, w.shape).problem):
        x, w = x[:, :1], w[:, :1].contiguous()  # one input channel: depthwise runs it
    if registry.get(algo).unsupported(fastconv.explain(x.shape, w.shape).problem):
        # The grouped kernel: two groups of two channels (the bad call's groups fails its
        # type check before its value matters).
        x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 2, 3, 3)
        good, bad = {**good, "groups": 2}, {"groups": 2, **bad}
    fastconv.conv2d(x, w, **good, algo=algo)
    with pytest.raises(TypeError):
        fastconv.conv2d(x, w, **bad, algo=algo)
    # And on the autograd path.
    xg = x.clone().requires_grad_(True)
    fastconv.conv2d(xg, w, **good, algo=algo)
    with pytest.raises(TypeError):
        fastconv.conv2d(xg, w, **bad, algo=algo)


# --------------------------------------------------------------------------------------------
# f. The fake kernels raise what the real ones raise
# --------------------------------------------------------------------------------------------

_x = torch.randn(1, 3, 6, 6)
_w = torch.randn(4, 3, 3, 3)
_CONV = ([1, 1], [1, 1, 1, 1], [1, 1], 1)

FAKE_CONV2D_CASES = [
    # (id, input, weight, bias)
    ("bias_wrong_size", _x, _w, torch.randn(5)),
    ("bias_wrong_rank", _x, _w, torch.randn(4, 1)),
    ("bias_scalar", _x, _w, torch.tensor(1.0)),
    ("bias_wrong_dtype", _x, _w, torch.randn(4, dtype=torch.float64)),
    ("bias_unsupported_dtype", _x, _w, torch.ones(4, dtype=torch.int64)),
    # Controls: checked by code the real and fake kernels already share.
    ("channel_mismatch", torch.randn(1, 2, 6, 6), _w, None),
    ("weight_wrong_dtype", _x, _w.double(), None),
]


def _fake_and_real(call, tensors):
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = _raised(lambda: call(*tensors))
    with FakeTensorMode() as mode:
        fakes = [mode.from_tensor(t) if t is not None else None for t in tensors]
        fake = _raised(lambda: call(*fakes))
    return real, fake


@pytest.mark.parametrize("name,x,w,b", FAKE_CONV2D_CASES, ids=[c[0] for c in FAKE_CONV2D_CASES])
def test_fake_conv2d_raises_like_the_real_one(name, x, w, b, algo):
    real, fake = _fake_and_real(
        lambda x, w, b: torch.ops.fastconv.conv2d(x, w, b, *_CONV, algo), (x, w, b))
    assert real is not None, f"{name}: the real kernel accepted it"
    assert type(fake) is type(real), (
        f"{name}: real kernel raised {type(real).__name__}({real}), fake kernel "
        f"{'returned' if fake is None else f'raised {type(fake).__name__}({fake})'}")


_gy = torch.randn(1, 4, 6, 6)
FAKE_GRAD_CASES = [
    # (id, op, tensors, other arguments)
    ("grad_input_dtype_mismatch", "conv2d_grad_input", (_gy.double(), _w), ([1, 3, 6, 6],)),
    ("grad_input_unsupported_dtype", "conv2d_grad_input", (_gy.long(), _w.long()),
     ([1, 3, 6, 6],)),
    ("grad_weight_dtype_mismatch", "conv2d_grad_weight", (_gy.double(), _x), ([4, 3, 3, 3],)),
    ("grad_weight_unsupported_dtype", "conv2d_grad_weight", (_gy.long(), _x.long()),
     ([4, 3, 3, 3],)),
    ("grad_bias_not_4d", "conv2d_grad_bias", (_gy[0],), ()),
    ("grad_bias_unsupported_dtype", "conv2d_grad_bias", (_gy.long(),), ()),
    # Control: checked by code the real and fake kernels already share.
    ("grad_input_wrong_grad_output_shape", "conv2d_grad_input", (_gy[:, :3], _w),
     ([1, 3, 6, 6],)),
]


@pytest.mark.parametrize("name,op,tensors,extra", FAKE_GRAD_CASES,
                         ids=[c[0] for c in FAKE_GRAD_CASES])
def test_fake_gradient_ops_raise_like_the_real_ones(name, op, tensors, extra, algo):
    fn = getattr(torch.ops.fastconv, op)
    conv = (*_CONV, algo) if op != "conv2d_grad_bias" else ()
    real, fake = _fake_and_real(lambda *t: fn(*t, *extra, *conv), tensors)
    assert real is not None, f"{name}: the real kernel accepted it"
    assert type(fake) is type(real), (
        f"{name}: real kernel raised {type(real).__name__}({real}), fake kernel "
        f"{'returned' if fake is None else f'raised {type(fake).__name__}({fake})'}")


# --------------------------------------------------------------------------------------------
# g. No memory growth over many calls
# --------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# A small 3x3 problem in each algorithm's domain: (input shape, weight shape, groups).
_SMALL = [((1, 3, 6, 6), (4, 3, 3, 3), 1), ((1, 3, 6, 6), (6, 1, 3, 3), 3),
          ((1, 4, 6, 6), (4, 2, 3, 3), 2)]


def _small_problem(algo):
    for shape, weight, groups in _SMALL:
        problem = fastconv.explain(shape, weight, padding=1, groups=groups).problem
        if registry.get(algo).unsupported(problem) is None:
            return shape, weight, groups
    return _SMALL[0]


def _op_calls(algo):
    shape, weight, groups = _small_problem(algo)
    x, w, b = torch.randn(shape), torch.randn(weight), torch.randn(weight[0])
    gy = torch.randn(1, weight[0], 6, 6)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], groups, algo)
    return {
        "conv2d": lambda: torch.ops.fastconv.conv2d(x, w, b, *conv),
        "conv2d_grad_input": lambda: torch.ops.fastconv.conv2d_grad_input(gy, w, list(shape),
                                                                          *conv),
        "conv2d_grad_weight": lambda: torch.ops.fastconv.conv2d_grad_weight(gy, x, list(weight),
                                                                           *conv),
        "conv2d_grad_bias": lambda: torch.ops.fastconv.conv2d_grad_bias(gy),
        "fastconv.conv2d (eager)": lambda: fastconv.conv2d(x, w, b, padding=1, groups=groups,
                                                           algo=algo),
    }


@pytest.mark.parametrize("op", list(_op_calls("direct")))
def test_no_memory_growth_over_10000_calls(op, algo):
    call = _op_calls(algo)[op]
    shape, weight, groups = _small_problem(algo)
    passes = {"conv2d_grad_input": (Pass.GRAD_INPUT,), "conv2d_grad_weight": (Pass.GRAD_WEIGHT,)}
    if outside_domain(algo, shape, weight, torch.float32, passes.get(op, FORWARD),
                      call, padding=1, groups=groups):
        return
    for _ in range(500):
        call()
    # A leak grows the same in every window of 10,000 calls; the heap settling after the
    # tests before (arenas, fragmentation) grows one window only. Up to three windows.
    growth = []
    for _window in range(3):
        before = _rss_bytes()
        for _ in range(10_000):
            call()
        growth.append(_rss_bytes() - before)
        if growth[-1] <= 2 * 2**20:
            return
    assert False, (f"{op}: resident memory grew by "
                   f"{', '.join(f'{g / 2**20:.2f}' for g in growth)} MiB in three windows of "
                   "10,000 calls")


@pytest.mark.parametrize("view", ["width_sliced", "channel_sliced", "batch_sliced"])
def test_sliced_channels_last_views_give_torchs_memory_format(view, algo):
    x = torch.randn(4, 8, 9, 18, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x = {"width_sliced": x[..., ::2], "channel_sliced": x[:, ::2], "batch_sliced": x[::2]}[view]
    w = torch.randn(5, x.shape[1], 3, 3, dtype=torch.float64)
    if outside_domain(algo, x.shape, w.shape, x.dtype, FORWARD,
                      lambda: fastconv.conv2d(x, w, padding=1, algo=algo), padding=1):
        return
    y, expected = fastconv.conv2d(x, w, padding=1, algo=algo), F.conv2d(x, w, padding=1)
    assert_close(y, expected, atol=1e-12, rtol=1e-10, what=view)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
