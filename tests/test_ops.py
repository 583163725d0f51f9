"""The custom ops' registration: opcheck (schema, fake kernel, autograd registration,
AOT dispatch), gradcheck and gradgradcheck in float64, torch.compile(fullgraph=True)."""
from __future__ import annotations

import copy

import pytest
import torch

import fastconv
from fastconv import ops
from cases import CASE_IDS, CASES
from conftest import ALL_PASSES, FORWARD, assert_close, model_outside_domain, outside_domain, supported

OPCHECK_CASES = [CASES[CASE_IDS.index(n)] for n in
                 ("basic", "strided_asym", "dilated_asym_padded", "groups_strided", "no_bias",
                  "same_even_kernel", "channels_last", "channel_tails", "zero_batch")]


def _op_args(case, algo, requires_grad=False):
    x, w, b = case.make(torch.float64, requires_grad=requires_grad)
    stride, pad, dilation = case.explicit()
    return x, w, b, list(stride), list(pad), list(dilation), case.groups, algo


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_conv2d(case, algo):
    if not supported(algo, case, torch.float64):
        return
    args = _op_args(case, algo, requires_grad=True)
    torch.library.opcheck(ops.conv2d, args)


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=lambda c: c.name)
def test_opcheck_gradient_ops(case, algo):
    if not supported(algo, case, torch.float64):
        return
    x, w, b, stride, pad, dilation, groups, algo = _op_args(case, algo)
    y = ops.conv2d(x, w, b, stride, pad, dilation, groups, algo)
    gy = torch.randn_like(y).requires_grad_(True)
    conv = (stride, pad, dilation, groups, algo)
    torch.library.opcheck(ops.conv2d_grad_input,
                          (gy, w.requires_grad_(True), list(x.shape)) + conv)
    torch.library.opcheck(ops.conv2d_grad_weight,
                          (gy, x.requires_grad_(True), list(w.shape)) + conv)
    torch.library.opcheck(ops.conv2d_grad_bias, (gy,))


# Numerical Jacobians grow with the product of input and weight sizes: the small cases only.
GRADCHECK_CASES = [c for c in OPCHECK_CASES if c.name not in ("channel_tails", "zero_batch")]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.name)
def test_gradcheck(case, algo):
    if not supported(algo, case, torch.float64):
        return
    x, w, b = case.make(torch.float64, requires_grad=True)

    def f(x, w, b):
        return fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)

    inputs = (x, w, b) if b is not None else (x, w, None)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_torch_compile_fullgraph(algo):
    torch._dynamo.reset()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    w2 = torch.randn(4, 16, 2, 2, requires_grad=True)

    def f(x, w, b, w2):
        y = fastconv.conv2d(x, w, b, stride=2, padding="valid", algo=algo)
        return torch.relu(fastconv.conv2d(y, w2, None, padding="same", algo=algo)).sum()

    if (outside_domain(algo, x.shape, w.shape, x.dtype, ALL_PASSES, lambda: f(x, w, b, w2).backward(),
                       stride=2, padding="valid")
            or outside_domain(algo, (2, 16, 5, 5), w2.shape, x.dtype, ALL_PASSES,
                              lambda: f(x, w, b, w2).backward(), padding="same")):
        return
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    out = compiled(x, w, b, w2)
    grads = torch.autograd.grad(out, (x, w, b, w2))
    eager = f(x, w, b, w2)
    eager_grads = torch.autograd.grad(eager, (x, w, b, w2))
    assert_close(out, eager, atol=1e-3, rtol=1e-5, what="compiled forward")
    for g, e, name in zip(grads, eager_grads, ("x", "w", "b", "w2")):
        assert_close(g, e, atol=1e-4, rtol=1e-4, what=f"compiled grad {name}")


def test_module_under_torch_compile(algo):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, stride=2, padding_mode="reflect",
                                                padding=1))
    x = torch.randn(2, 3, 16, 16)
    expected = model(x)
    if model_outside_domain(algo, model, x, FORWARD,
                            lambda: fastconv.convert(copy.deepcopy(model), algo=algo)(x)):
        return
    fast = fastconv.convert(model, algo=algo)
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5, what="compiled module")


def test_fake_tensor_shapes_match_real(algo):
    from torch._subclasses.fake_tensor import FakeTensorMode
    case = CASES[CASE_IDS.index("channels_last_strided_groups")]
    if not supported(algo, case, torch.float32, FORWARD):
        return
    x, w, b = case.make(torch.float32)
    stride, pad, dilation = case.explicit()
    real = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    with FakeTensorMode() as mode:
        fx, fw, fb = (mode.from_tensor(t) for t in (x, w, b))
        fake = fastconv.conv2d(fx, fw, fb, **case.kwargs(), algo=algo)
    assert fake.shape == real.shape and fake.stride() == real.stride()
