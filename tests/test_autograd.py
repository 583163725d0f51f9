"""The eager autograd path (fastconv.autograd.Conv2dFunction, ConvBNFunction) against the
custom ops' own autograd: the same gradients to the bit, double backward and checkpointing. (torch.compile
keeps the custom ops: tests/test_ops.py.)"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import fastconv
from fastconv import ops
from cases import CASE_IDS, CASES
from conftest import ALL_PASSES, assert_close, supported, tolerances

CASES_HERE = [CASES[CASE_IDS.index(n)] for n in
              ("basic", "strided_asym", "groups_strided", "no_bias", "channels_last",
               "zero_batch")]


@pytest.mark.parametrize("case", CASES_HERE, ids=lambda c: c.name)
def test_eager_path_gives_the_ops_gradients_exactly(case, algo):
    if not supported(algo, case, torch.float32, ALL_PASSES):
        return
    x, w, b = case.make(torch.float32, requires_grad=True)
    y = fastconv.conv2d(x, w, b, **case.kwargs(), algo=algo)
    assert type(y.grad_fn).__name__ == "Conv2dFunctionBackward"
    stride, pad, dilation = case.explicit()
    y_op = ops.conv2d(x, w, b, list(stride), list(pad), list(dilation), case.groups, algo)
    assert torch.equal(y, y_op)
    gy = torch.randn_like(y)
    params = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, params, gy)
    ref = torch.autograd.grad(y_op, params, gy)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    if b is not None:
        # The eager path takes the bias gradient from grad-weight's sweep where the algorithm
        # has one (ops.grad_weight_bias_forward), summed in another order than the
        # conv2d_grad_bias op (float32 partial sums of a few hundred pixels, totals in
        # float64 in both), so the two agree to float32 summation error, not to the bit.
        torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_training_conv_bn_eager_path_gives_the_ops_results(activation, channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 9, 8, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = [x, torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64),
              torch.randn(6, generator=g, dtype=torch.float64),
              torch.rand(6, generator=g, dtype=torch.float64) + 0.5,
              torch.randn(6, generator=g, dtype=torch.float64)]
    for t in params:
        t.requires_grad_()
    conv = ([2, 1], [1, 1, 0, 0], [1, 1], 1, "auto", 1e-5, activation)
    mean, var = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    y = fastconv.functional.conv2d_bn(params[0], params[1], params[2], mean, var, params[3],
                                      params[4], True, 0.1, 1e-5, activation, stride=(2, 1),
                                      padding=(1, 0))
    assert type(y.grad_fn).__name__ == "ConvBNFunctionBackward"
    y_op, z_op, _, _ = ops.conv2d_bn(*params, *conv)
    assert torch.equal(y, y_op)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(y, params, gy)
    ref = torch.autograd.grad(y_op, params, gy)
    for name, a, e in zip(("x", "w", "b", "gamma", "beta"), got, ref):
        assert_close(a, e, atol=1e-12, rtol=1e-12, what=f"eager conv-bn grad {name}")


def test_double_backward_through_the_eager_path():
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return fastconv.conv2d(x, w, b, stride=2, padding=1)

    assert torch.autograd.gradgradcheck(f, (x, w, b))
    # A gradient penalty: the first backward builds a graph, the second differentiates it.
    y = f(x, w, b)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_checkpointing_recomputes_through_the_eager_path():
    torch.manual_seed(0)
    model = fastconv.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                                 torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)))
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    for p in model.parameters():
        p.grad = None
    x.grad = None
    model(x).sum().backward()
    for a, e in zip(grads, [p.grad for p in model.parameters()] + [x.grad]):
        assert_close(a, e, atol=1e-6, rtol=1e-6, what="checkpointed gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_grad_weight_bias_body_gives_both_gradients(case, dtype, algo, isa):
    # ops.grad_weight_bias_forward: one kernel call for the weight and the bias gradients
    # (direct sums the bias in its grad-weight sweep; the others run the shared pass after).
    if not supported(algo, case, dtype, ALL_PASSES):
        return
    x, w, _ = case.make(dtype)
    stride, pad, dilation = case.explicit()
    conv = (list(stride), list(pad), list(dilation), case.groups, algo)
    y = ops.conv2d(x, w, None, *conv)
    gy = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    if case.channels_last:
        gy = gy.contiguous(memory_format=torch.channels_last)
    gw, gb = ops.grad_weight_bias_forward(gy, x, list(w.shape), *conv)
    assert torch.equal(gw, ops.grad_weight_forward(gy, x, list(w.shape), *conv))
    pixels = max(1, gy.shape[0] * gy.shape[2] * gy.shape[3])
    assert_close(gb, gy.double().sum((0, 2, 3)), **tolerances(dtype, pixels, pixels ** .5),
                 what=f"{case.name} grad bias")
