"""The CUDA kernels on a GPU, through the same custom ops, modules and autograd as the CPU's.
Skipped, with the reason, where there is no GPU (CI has none: the kernels' arithmetic is
tested under numba's simulator, tests/cuda_sim, and their compilation in test_cuda_ptx.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastconv
import fastconv.cuda as fc
import fastconv.nn as fnn
from fastconv import ops

from conftest import assert_close

_REASON = fc.unavailable() if torch.cuda.is_available() else "no CUDA device"
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"needs a GPU: {_REASON}")

DEV = "cuda"
# Depthwise layers (MobileNetV2-like, small) and dense ones with odd sizes.
DEPTHWISE = [  # (N, C, multiplier, H, W, k, stride, padding, dilation)
    (2, 32, 1, 17, 19, 3, 1, 1, 1),
    (2, 24, 1, 16, 15, 3, 2, 1, 1),
    (1, 8, 2, 13, 13, 5, 2, 2, 1),
    (3, 16, 1, 7, 7, 3, 1, 2, 2),
]
DENSE = [  # (N, C, K, H, W, k, stride, padding, groups)
    (2, 16, 24, 14, 14, 3, 1, 1, 1),
    (2, 32, 64, 15, 15, 3, 2, 1, 1),
    (2, 64, 32, 7, 7, 1, 1, 0, 1),
    (2, 32, 32, 9, 9, 3, 1, 1, 4),
]


def _tol(dtype):
    # cuDNN may run float32 convolutions in TF32: compare against float64 with room for it.
    return dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-9)


@pytest.fixture(autouse=True)
def _exact_torch():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", DEPTHWISE)
def test_depthwise_forward_backward_through_the_ops(shape, dtype):
    N, C, M, H, W, k, s, p, d = shape
    x = torch.randn(N, C, H, W, device=DEV, dtype=dtype, requires_grad=True)
    w = torch.randn(C * M, 1, k, k, device=DEV, dtype=dtype, requires_grad=True)
    b = torch.randn(C * M, device=DEV, dtype=dtype, requires_grad=True)
    y = fastconv.conv2d(x, w, b, s, p, d, C)          # auto: the CUDA depthwise kernels
    gy = torch.randn_like(y)
    y.backward(gy)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    yr = F.conv2d(xr, wr, br, s, p, d, C)
    yr.backward(gy.double())
    for name, got, want in (("y", y, yr), ("x", x.grad, xr.grad), ("w", w.grad, wr.grad),
                            ("b", b.grad, br.grad)):
        assert_close(got, want, **_tol(dtype), what=name)


@pytest.mark.parametrize("shape", DENSE)
def test_implicit_gemm_by_name(shape):
    N, C, K, H, W, k, s, p, g = shape
    x = torch.randn(N, C, H, W, device=DEV, requires_grad=True)
    w = torch.randn(K, C // g, k, k, device=DEV, requires_grad=True)
    y = fastconv.conv2d(x, w, None, s, p, 1, g, algo="im2col")
    y.backward(torch.ones_like(y))
    xr, wr = (t.detach().double().requires_grad_() for t in (x, w))
    F.conv2d(xr, wr, None, s, p, 1, g).backward(torch.ones_like(y).double())
    assert_close(y, F.conv2d(xr, wr, None, s, p, 1, g), **_tol(torch.float32), what="y")
    assert_close(x.grad, xr.grad, **_tol(torch.float32), what="x")
    assert_close(w.grad, wr.grad, atol=1e-2, rtol=1e-3, what="w")


def test_dense_layers_run_cudnn_under_auto(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "conv2d", lambda *a: calls.append(a))
    x = torch.randn(1, 8, 8, 8, device=DEV)
    fastconv.conv2d(x, torch.randn(8, 8, 3, 3, device=DEV), padding=1)
    assert not calls


@pytest.mark.parametrize("activation", ["relu", "relu6"])
@pytest.mark.parametrize("depthwise", [True, False])
def test_conv_bn_relu_module_train_and_eval(depthwise, activation):
    """ConvBNReLU2d on CUDA against torch's three modules (float64): three training steps
    (outputs, input gradients, running statistics), then eval. Depthwise layers take the
    CUDA kernels under auto; dense ones are asked for by name (algo="im2col")."""
    import copy
    C = 16
    groups = C if depthwise else 1
    ref = torch.nn.Sequential(torch.nn.Conv2d(C, C, 3, 1, 1, groups=groups),
                              torch.nn.BatchNorm2d(C),
                              torch.nn.ReLU() if activation == "relu" else torch.nn.ReLU6())
    ref = ref.to(DEV).double()
    twin = copy.deepcopy(ref)
    fused = fnn.ConvBNReLU2d.from_modules(twin[0], twin[1], activation,
                                          algo="auto" if depthwise else "im2col")
    for step in range(3):
        x = torch.randn(4, C, 10, 10, device=DEV, dtype=torch.float64, requires_grad=True)
        y, yr = fused(x), ref(x)
        assert_close(y, yr, atol=1e-8, rtol=1e-8, what=f"train step {step}")
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gxr,) = torch.autograd.grad(yr, x, g)
        assert_close(gx, gxr, atol=1e-8, rtol=1e-8, what=f"grad x, step {step}")
        assert_close(twin[1].running_var, ref[1].running_var, atol=1e-10, rtol=1e-10,
                     what="running_var")
    fused.eval(), ref.eval()
    x = torch.randn(2, C, 10, 10, device=DEV, dtype=torch.float64)
    assert_close(fused(x), ref(x), atol=1e-8, rtol=1e-8, what="eval")


def test_fuse_a_model_on_cuda():
    """convert + fuse of a small MobileNet-style block moved to CUDA."""
    C = 16
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, C, 3, 2, 1), torch.nn.BatchNorm2d(C), torch.nn.ReLU6(),
        torch.nn.Conv2d(C, C, 3, 1, 1, groups=C), torch.nn.BatchNorm2d(C), torch.nn.ReLU6(),
        torch.nn.Conv2d(C, 8, 1)).to(DEV).eval()
    x = torch.randn(2, 3, 32, 32, device=DEV)
    expected = model(x)
    fast = fastconv.fuse(fastconv.convert(model))
    assert_close(fast(x), expected, atol=1e-4, rtol=1e-4, what="fused model")


def test_opcheck_on_cuda():
    x = torch.randn(2, 8, 9, 9, device=DEV, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, device=DEV, requires_grad=True)
    args = (x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 8, "depthwise")
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, args)
    gy = torch.randn(2, 8, 9, 9, device=DEV)
    torch.library.opcheck(torch.ops.fastconv.conv2d_grad_weight.default,
                          (gy, x.detach(), [8, 1, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 8,
                           "depthwise"))


def test_gradcheck_depthwise_float64():
    x = torch.randn(1, 3, 6, 5, device=DEV, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, device=DEV, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastconv.conv2d(a, b, None, 2, 1, 1, 3),
                                    (x, w))


def test_torch_compile_on_cuda():
    m = fnn.Conv2d(8, 8, 3, padding=1, groups=8).to(DEV)
    x = torch.randn(2, 8, 12, 12, device=DEV)
    compiled = torch.compile(m, fullgraph=True)
    assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5, what="compiled")


def test_launchers_take_cuda_tensors():
    x = torch.randn(2, 8, 11, 11, device=DEV)
    w = torch.randn(8, 1, 3, 3, device=DEV)
    y = fc.depthwise_conv2d_forward(x, w, None, 2, 1)
    assert y.is_cuda
    assert_close(y, F.conv2d(x.double(), w.double(), None, 2, 1, 1, 8), atol=1e-4, rtol=1e-4,
                 what="launcher")
    with pytest.raises(ValueError, match="take cuda tensors"):
        fc.depthwise_conv2d_forward(x.cpu(), w.cpu())


def _train_step(dtype):
    """Outputs and gradients of a depthwise layer and a dense Conv-BN-ReLU (implicit GEMM):
    every kind of kernel (depthwise, GEMM, batchnorm) launched once."""
    from fastconv.functional import conv2d_bn
    gen = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(2, 8, 13, 11, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    wd = torch.randn(16, 1, 3, 3, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    wg = torch.randn(12, 16, 3, 3, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    gamma = torch.rand(12, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    beta = torch.randn(12, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
    mean, var = torch.zeros(12, device=DEV, dtype=dtype), torch.ones(12, device=DEV, dtype=dtype)
    h = fastconv.conv2d(x, wd, None, 2, 1, 1, 8)
    y = conv2d_bn(h, wg, None, mean, var, gamma, beta, True, 0.1, 1e-5, "relu", padding=1,
                  algo="im2col")
    grads = torch.autograd.grad(y.square().sum(), (x, wd, wg, gamma, beta))
    return (y.detach(),) + grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_launch_matches_numba_launch(monkeypatch, dtype):
    """The direct launch (fastconv.cuda._runtime.LaunchPlan), taken from the second launch of
    a signature on, gives numba's launch's results; and every kernel the ops launch has a plan
    (none left to numba's ~0.5 ms-per-call path)."""
    from fastconv.cuda import _runtime as rt
    monkeypatch.setenv("FASTCONV_CUDA_LAUNCH", "numba")
    monkeypatch.setattr(rt, "_PLANS", {})
    through_numba = _train_step(dtype)
    assert rt._PLANS and all(p is None for p in rt._PLANS.values())
    monkeypatch.delenv("FASTCONV_CUDA_LAUNCH")
    rt._PLANS.clear()
    _train_step(dtype)
    unplanned = [k[0] for k, p in rt._PLANS.items() if p is None]
    assert not unplanned, f"launched through numba's slow path: {unplanned}"
    direct = _train_step(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12   # atomics: the summation order varies
    for name, a, b in zip(("y", "gx", "gwd", "gwg", "ggamma", "gbeta"), through_numba, direct):
        assert_close(b, a, atol=tol, rtol=tol, what=f"direct launch, {name}")
