"""Property test: random convolutions drawn by hypothesis against torch.nn.functional.conv2d.

Each example draws a whole problem -- batch 0..3, groups 1..3, 1..6 input and output channels
per group (now and then 0 input channels), a 0..40 x 0..40 map, a 1..5 x 1..5 kernel, stride
and dilation 1..3 per dimension, padding as an int, a pair, 'same' (stride 1), 'valid' or an
asymmetric (top, bottom, left, right) 4-tuple, NCHW or channels_last input, contiguous or
channels_last weight, with or without bias -- and checks, for every implemented algorithm in
float64 and float32:

* if torch raises for the problem, fastconv raises an instance of the same exception class
  (RuntimeError or TypeError: fastconv's argument errors subclass RuntimeError);
* otherwise the output's shape, its memory format (channels_last iff torch's is, checked when
  it has elements) and its values, and the gradients in input, weight and bias, against torch
  computed in float64 from the same inputs.

Asymmetric padding has no torch.nn.functional.conv2d spelling: it goes through
``fastconv.ops.conv2d`` with the explicit 4 values and is compared with
``F.conv2d(F.pad(x, (left, right, top, bottom)), ...)``, with torch's rule that a map of zero
height or width is only accepted in a batch of zero images or zero channels applied first
(F.pad would make such a map non-empty).

ISAs: the main test runs hypothesis on the default (fastest) ISA only; a second test runs a
quarter as many examples on each ISA (the `isa` fixture). The ISA paths are also checked
against each other and against the reference on the fixed case matrix (tests/test_conv2d.py).
The number of examples per test is FASTCONV_HYPOTHESIS_EXAMPLES (default 40); without that
variable the run is derandomized, so CI sees the same examples every time. To explore:
``FASTCONV_HYPOTHESIS_EXAMPLES=2000 pytest tests/test_properties.py``.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastconv
from conftest import ALGOS, ALL_PASSES, assert_close, outside_domain, tolerances

_EXAMPLES = os.environ.get("FASTCONV_HYPOTHESIS_EXAMPLES")
SETTINGS = settings(
    max_examples=int(_EXAMPLES or "40"),
    deadline=None,
    derandomize=_EXAMPLES is None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)

# torch warns that 'same' padding with an even kernel copies the input; that is its business.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# Upper bounds on the work of one example, so that 40 examples x 4 tests stay within seconds.
MAX_ELEMENTS = 12_000        # of the input, the output and the weight, each
MAX_MACS = 400_000           # multiply-adds of the forward (= of each gradient)


@st.composite
def problems(draw):
    n = draw(st.integers(0, 3))
    groups = draw(st.integers(1, 3))
    cin_g = 0 if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, 6))
    kout_g = draw(st.integers(1, 6))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["int", "pair", "same", "valid", "asym"]))
    stride = (1, 1) if mode == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if mode == "int":
        padding = draw(st.integers(0, 4))
    elif mode == "pair":
        padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    elif mode == "asym":
        padding = tuple(draw(st.integers(0, 4)) for _ in range(4))
    else:
        padding = mode
    p = dict(
        input=(n, cin_g * groups, h, w), weight=(kout_g * groups, cin_g, r, s), stride=stride,
        padding=padding, dilation=dilation, groups=groups, bias=draw(st.booleans()),
        channels_last=draw(st.booleans()), weight_channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)))
    pt, pb, pl, pr = _explicit(p)
    oh = max(0, (h + pt + pb - dilation[0] * (r - 1) - 1) // stride[0] + 1)
    ow = max(0, (w + pl + pr - dilation[1] * (s - 1) - 1) // stride[1] + 1)
    k = kout_g * groups
    assume(n * cin_g * groups * h * w <= MAX_ELEMENTS)
    assume(n * k * oh * ow <= MAX_ELEMENTS)
    assume(n * k * oh * ow * cin_g * r * s <= MAX_MACS)
    return p


def _explicit(p) -> tuple:
    """The drawn padding as (top, bottom, left, right), as torch applies it."""
    padding = p["padding"]
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        th = p["dilation"][0] * (p["weight"][2] - 1)
        tw = p["dilation"][1] * (p["weight"][3] - 1)
        return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return tuple(padding)


def _make(p, dtype):
    """(x, w, b) in dtype and the drawn layouts; weights scaled by 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["input"], generator=g, dtype=torch.float64)
    fan_in = max(1, p["weight"][1] * p["weight"][2] * p["weight"][3])
    w = torch.randn(p["weight"], generator=g, dtype=torch.float64) / fan_in ** 0.5
    b = torch.randn(p["weight"][0], generator=g, dtype=torch.float64) if p["bias"] else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if b is not None else None
    if p["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    if p["weight_channels_last"]:
        w = w.contiguous(memory_format=torch.channels_last)
    return x, w, b


def _torch_conv(p, x, w, b):
    if isinstance(p["padding"], tuple) and len(p["padding"]) == 4:
        top, bottom, left, right = p["padding"]
        N, C, H, W = x.shape
        if (H == 0 or W == 0) and N > 0 and C > 0:
            # What F.conv2d says for this input whatever its padding; F.pad would hide it.
            raise RuntimeError(f"Only zero batch or zero channel inputs are supported, but "
                               f"got input shape: {list(x.shape)}")
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, p["stride"], 0,
                        p["dilation"], p["groups"])
    return F.conv2d(x, w, b, p["stride"], p["padding"], p["dilation"], p["groups"])


def _fastconv_conv(p, x, w, b, algo):
    if isinstance(p["padding"], tuple) and len(p["padding"]) == 4:
        return fastconv.ops.conv2d(x, w, b, list(p["stride"]), list(p["padding"]),
                                   list(p["dilation"]), p["groups"], algo)
    return fastconv.conv2d(x, w, b, p["stride"], p["padding"], p["dilation"], p["groups"],
                           algo=algo)


def _describe(p) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def _check_problem(p, dtype, algo):
    what = _describe(p)
    x, w, b = _make(p, dtype)
    params = [x, w] + ([b] if b is not None else [])
    for t in params:
        t.requires_grad_(True)
    # torch in float64, from the same values and layouts.
    params64 = [t.detach().double().requires_grad_(True) for t in params]
    x64, w64 = params64[0], params64[1]
    b64 = params64[2] if b is not None else None
    try:
        expected = _torch_conv(p, x64, w64, b64)
    except (RuntimeError, TypeError) as e:
        with pytest.raises(type(e)):
            _fastconv_conv(p, x, w, b, algo)
        # The eager path (no autograd) validates the same way.
        with pytest.raises(type(e)):
            with torch.no_grad():
                _fastconv_conv(p, x, w, b, algo)
        return

    # Outside the algorithm's domain (its registry eligibility check), the refusal is tested.
    conv_args = dict(stride=p["stride"], dilation=p["dilation"], groups=p["groups"],
                     padding=0)
    input_shape = list(x.shape)
    if isinstance(p["padding"], str) or not isinstance(p["padding"], tuple) or \
            len(p["padding"]) != 4:
        conv_args["padding"] = p["padding"]
    else:  # asymmetric: the same problem as a padded input
        top, bottom, left, right = p["padding"]
        input_shape[2:] = [input_shape[2] + top + bottom, input_shape[3] + left + right]
    if outside_domain(algo, input_shape, w.shape, dtype, ALL_PASSES,
                      lambda: _fastconv_conv(p, x, w, b, algo).sum().backward(), **conv_args):
        return

    with torch.no_grad():
        y_eager = _fastconv_conv(p, x, w, b, algo)
    y = _fastconv_conv(p, x, w, b, algo)
    for name, out in (("forward", y), ("forward (no grad)", y_eager)):
        assert tuple(out.shape) == tuple(expected.shape), (
            f"{name} shape {tuple(out.shape)}, torch {tuple(expected.shape)}; {what}")
        assert out.dtype == dtype
        if out.numel() > 0:
            for fmt in (torch.contiguous_format, torch.channels_last):
                assert out.is_contiguous(memory_format=fmt) == \
                    expected.is_contiguous(memory_format=fmt), (
                        f"{name}: is_contiguous({fmt}) is {out.is_contiguous(memory_format=fmt)}"
                        f", torch's {expected.is_contiguous(memory_format=fmt)}; output strides "
                        f"{out.stride()}, torch's {expected.stride()}; {what}")
        assert_close(out, expected, **tolerances(dtype, p["weight"][1] * p["weight"][2]
                                                 * p["weight"][3], algo=algo),
                     what=f"{name}; {what}")

    gen = torch.Generator().manual_seed(p["seed"] + 1)
    gy = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    try:
        torch_grads = torch.autograd.grad(expected, params64, gy, allow_unused=True)
    except (RuntimeError, TypeError) as e:
        with pytest.raises(type(e)):
            torch.autograd.grad(y, params, gy.to(dtype), allow_unused=True)
        return
    grads = torch.autograd.grad(y, params, gy.to(dtype), allow_unused=True)
    N, _, OH, OW = expected.shape
    K, Cg, R, S = p["weight"]
    pixels = max(1, N * OH * OW)
    reductions = [K // p["groups"] * R * S, pixels, pixels]
    magnitudes = [1.0, pixels ** 0.5, pixels ** 0.5]
    for name, got, ref, red, mag, t in zip(("grad_input", "grad_weight", "grad_bias"), grads,
                                           torch_grads, reductions, magnitudes, params):
        if ref is None:
            ref = torch.zeros_like(t, dtype=torch.float64)
        if got is None:
            got = torch.zeros_like(t)
        assert got.dtype == dtype, f"{name} dtype {got.dtype}; {what}"
        assert_close(got, ref, **tolerances(dtype, red, mag, algo=algo), what=f"{name}; {what}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("algo", ALGOS)
@SETTINGS
@given(p=problems())
def test_random_convolutions_match_torch(p, algo, dtype):
    _check_problem(p, dtype, algo)


# A few examples on every ISA (the main test above runs on the default one only): the vector
# tails and masks of each ISA's kernels meet odd channel counts and map widths here too.
@pytest.mark.parametrize("algo", ALGOS)
@settings(SETTINGS, max_examples=max(1, SETTINGS.max_examples // 4),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=problems(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_random_convolutions_match_torch_on_every_isa(p, dtype, algo, isa):
    _check_problem(p, dtype, algo)
