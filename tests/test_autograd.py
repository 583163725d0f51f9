"""The eager autograd path (fastconv.autograd.Conv2dFunction) against the custom ops' own
autograd: the same gradients to the bit, double backward and checkpointing. (torch.compile
keeps the custom ops: tests/test_ops.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastconv
from fastconv import ops
from cases import CASE_IDS, CASES
from conftest import ALL_PASSES, assert_close, supported

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
    for got, ref in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(y_op, params, gy)):
        assert torch.equal(got, ref)


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
