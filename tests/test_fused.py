"""Fused Conv-BN-activation (issue #8): every algorithm's output epilogue (ReLU, ReLU6 and the
batch statistics gathered in the same pass) on the shared case matrix, every ISA and dtype;
the ops (opcheck, gradcheck, torch.compile); fastconv.nn.ConvBNReLU2d against torch's
Conv2d -> BatchNorm2d -> activation in train and eval for every BatchNorm2d option over
several steps; and fastconv.fuse on nn.Sequential, fx-traceable and untraceable models."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune

import fastconv
from fastconv import backend, ops
from fastconv.nn import ConvBNReLU2d
from conftest import FORWARD, assert_close, supported, tolerances
from cases import CASES, CASE_IDS
from test_depthwise import GEOMETRIES as DEPTHWISE_GEOMETRIES

# --------------------------------------------------------------------------------------------
# The output epilogue of every algorithm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_epilogue_activation_and_statistics(case, dtype, algo, isa):
    if not supported(algo, case, dtype, FORWARD):
        return
    x, w, b = case.make(dtype)
    x = x * 4  # outputs of a few units: relu6 clips some
    stride, pad, dilation = case.explicit()
    args = (list(stride), list(pad), list(dilation), case.groups, algo)
    exact = F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                     **case.kwargs())
    tol = tolerances(dtype, case.reduction(), magnitude=4, algo=algo)
    for name, code in backend.ACTIVATIONS.items():
        y = ops.conv2d_forward(x, w, b, *args, activation=code)
        expected = {"none": exact, "relu": exact.relu(), "relu6": F.relu6(exact)}[name]
        assert_close(y, expected, **tol, what=f"{algo} {name}")
    stats = torch.full((2 * case.weight[0],), float("nan"), dtype=torch.float64)
    y = ops.conv2d_forward(x, w, b, *args, stats=stats)
    assert_close(y, exact, **tol, what=f"{algo} with statistics")
    count = max(1, exact.numel() // max(1, exact.shape[1]))
    K = case.weight[0]
    sums = exact.transpose(0, 1).reshape(K, -1)
    scale = count * (1 + exact.abs().amax().item() if exact.numel() else 1) ** 2
    assert_close(stats[:K], sums.sum(1), atol=tol["atol"] * scale, rtol=1e-5, what="sums")
    assert_close(stats[K:], sums.square().sum(1), atol=tol["atol"] * scale, rtol=1e-5,
                 what="sums of squares")


@pytest.mark.parametrize("geometry", DEPTHWISE_GEOMETRIES,
                         ids=lambda g: f"C{g[0]}m{g[1]}k{g[2]}s{g[3]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_depthwise_epilogue_on_every_tile(geometry, channels_last, dtype, isa):
    # The depthwise kernel's whole-vector tiles, partial rows and gathered tails (its own
    # geometries, tests/test_depthwise.py), which the shared cases are too small to reach.
    C, m, k, stride, padding, dilation, H, W = geometry
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, C, H, W, generator=g, dtype=dtype) * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C * m, 1, k, k, generator=g, dtype=dtype) / k
    b = torch.randn(C * m, generator=g, dtype=dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=C)
    exact = F.conv2d(x.double(), w.double(), b.double(), **kw)
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    y = fastconv.functional.conv2d_activation(x, w, b, **kw, algo="depthwise",
                                              activation="relu6")
    assert_close(y, F.relu6(exact), atol=tol, rtol=tol, what="relu6")
    p = fastconv.explain(x.shape, w.shape, **kw).problem
    stats = torch.empty(2 * C * m, dtype=torch.float64)
    ops.conv2d_forward(x, w, b, list(p.stride), list(p.padding), list(p.dilation), C,
                       "depthwise", stats=stats)
    per_channel = exact.transpose(0, 1).reshape(C * m, -1)
    assert_close(stats[:C * m], per_channel.sum(1), atol=tol * per_channel.shape[1], rtol=tol,
                 what="sums")
    assert_close(stats[C * m:], per_channel.square().sum(1), atol=tol * per_channel.shape[1] * 50,
                 rtol=tol, what="sums of squares")


def test_epilogue_keeps_nan():
    x = torch.randn(1, 4, 8, 8)
    x[0, :, 3, 3] = float("nan")
    w = torch.randn(4, 4, 3, 3)
    for algo in ("direct", "im2col", "winograd_f2"):
        for act in ("relu", "relu6"):
            y = fastconv.functional.conv2d_activation(x, w, padding=1, algo=algo,
                                                      activation=act)
            assert torch.isnan(y[0, :, 3, 3]).all(), (algo, act)


def test_activation_and_statistics_together_are_refused():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="not both"):
        ops.conv2d_forward(x, w, None, [1, 1], [0, 0, 0, 0], [1, 1], 1, "direct",
                           activation=1, stats=torch.empty(6, dtype=torch.float64))


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        fastconv.functional.conv2d_activation(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3),
                                              activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        ConvBNReLU2d(2, 3, 3, activation="gelu")


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------

def _bn_op_args(channels_last=False, bias=True, affine=True, activation="relu", algo="auto"):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64) if bias else None
    gamma = torch.rand(5, generator=g, dtype=torch.float64) + 0.5 if affine else None
    beta = torch.randn(5, generator=g, dtype=torch.float64) if affine else None
    tensors = [t.requires_grad_(True) if t is not None else None for t in (x, w, b, gamma, beta)]
    return (*tensors, [1, 1], [1, 1, 0, 1], [1, 1], 1, algo, 1e-5, activation)


@pytest.mark.parametrize("activation", ["relu", "relu6", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_opcheck_fused_ops(activation, channels_last):
    args = _bn_op_args(channels_last, activation=activation)
    torch.library.opcheck(ops.conv2d_bn, args)
    x, w, b = args[:3]
    conv = ([1, 1], [1, 1, 0, 1], [1, 1], 1, "auto")
    torch.library.opcheck(ops.conv2d_activation, (x, w, b) + conv + (activation,))
    y, z, mean, invstd = ops.conv2d_bn(*args)
    gy = torch.randn_like(y)
    torch.library.opcheck(ops.bn_act_backward, (gy, y.detach(), z, mean, invstd,
                                                args[3].detach(), activation))


@pytest.mark.parametrize("bias,affine", [(True, True), (False, False)])
@pytest.mark.parametrize("activation", ["relu", "relu6", "none"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_conv2d_bn(bias, affine, activation, channels_last):
    args = _bn_op_args(channels_last, bias, affine, activation)
    tensors, rest = args[:5], args[5:]
    present = [t for t in tensors if t is not None]

    def f(*ts):
        it = iter(ts)
        full = [next(it) if t is not None else None for t in tensors]
        return ops.conv2d_bn(*full, *rest)[0]

    torch.autograd.gradcheck(f, present)
    torch.autograd.gradgradcheck(f, present)
    x, w, b = tensors[:3]
    torch.autograd.gradcheck(
        lambda x, w: ops.conv2d_activation(x, w, b, *rest[:5], activation), (x, w))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_compile_fused_module(momentum):
    torch.manual_seed(0)
    m = ConvBNReLU2d(3, 6, 3, padding=1, activation="relu6", momentum=momentum)
    ref = _torch_sequence(m)
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    for step in range(2):
        x = torch.randn(2, 3, 8, 8)
        assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5, what=f"train, step {step}")
        for (name, buf), buf_ref in zip(m[1].named_buffers(), ref[1].buffers()):
            assert_close(buf.double(), buf_ref.double(), atol=1e-6, rtol=1e-6,
                         what=f"{name}, step {step}")
    m.eval(), ref.eval()
    with torch.no_grad():
        assert_close(compiled(x), ref(x), atol=1e-5, rtol=1e-5, what="eval")


def test_compile_fused_module_trains():
    # A compiled training step (dynamo traces conv2d_bn's Python front end) against eager.
    torch.manual_seed(0)
    m = ConvBNReLU2d(3, 6, 3, padding=1)
    ref = _torch_sequence(m)
    compiled = torch.compile(m, backend="inductor")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for step in range(2):
        compiled(x).square().sum().backward()
        ref(x_ref).square().sum().backward()
        assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4, what=f"step {step} input grad")
        for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
            assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, what=f"step {step} {name}")


# --------------------------------------------------------------------------------------------
# ConvBNReLU2d against torch's modules
# --------------------------------------------------------------------------------------------

BN_OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(track_running_stats=False),
    dict(affine=False),
    dict(affine=False, track_running_stats=False),
]


def _torch_sequence(m: ConvBNReLU2d) -> nn.Sequential:
    conv, bn = m[0], m[1]
    ref = nn.Sequential(
        nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, dtype=conv.weight.dtype),
        nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                       dtype=conv.weight.dtype),
        *([type(m[2])()] if len(m) > 2 else []))
    ref.load_state_dict(m.state_dict())
    return ref


def _compare_training(m, ref, make_input, steps=3, atol=1e-5):
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01)
    for step in range(steps):
        x = make_input()
        xr = x.detach().clone().requires_grad_(True)
        x.requires_grad_(True)
        y, yr = m(x), ref(xr)
        assert_close(y, yr, atol=atol, rtol=atol, what=f"train output, step {step}")
        gy = torch.randn_like(yr)
        y.backward(gy)
        yr.backward(gy)
        assert_close(x.grad, xr.grad, atol=atol, rtol=atol, what=f"grad input, step {step}")
        for (name, p), pr in zip(m.named_parameters(), ref.parameters()):
            assert_close(p.grad, pr.grad, atol=10 * atol, rtol=atol,
                         what=f"grad {name}, step {step}")
        for (name, buf), br in zip(m.named_buffers(), ref.buffers()):
            assert_close(buf.double(), br.double(), atol=atol, rtol=atol,
                         what=f"{name}, step {step}")
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()


@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in
                                                                      o.items()) or "default")
@pytest.mark.parametrize("activation", ["relu", "relu6", None])
def test_module_matches_torch_sequence(options, activation):
    torch.manual_seed(0)
    m = ConvBNReLU2d(4, 6, 3, padding=1, stride=(1, 2), activation=activation, **options)
    ref = _torch_sequence(m)
    _compare_training(m, ref, lambda: torch.randn(3, 4, 9, 10) * 3)
    m.eval(), ref.eval()
    for step in range(2):
        x = torch.randn(2, 4, 9, 10) * 3
        with torch.no_grad():  # folded weights, cached
            assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5, what="eval, no grad")
        x.requires_grad_(True)  # folded weights, differentiable
        xr = x.detach().clone().requires_grad_(True)
        y, yr = m(x), ref(xr)
        assert_close(y, yr, atol=1e-5, rtol=1e-5, what="eval")
        y.sum().backward()
        yr.sum().backward()
        assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5, what="eval grad input")
        for (name, p), pr in zip(m.named_parameters(), ref.parameters()):
            assert_close(p.grad, pr.grad, atol=1e-4, rtol=1e-5, what=f"eval grad {name}")
        with torch.no_grad():  # a changed parameter must reach the cached folding
            for p, pr in zip(m.parameters(), ref.parameters()):
                p.mul_(0.9)
                pr.mul_(0.9)


@pytest.mark.parametrize("options", [dict(), dict(affine=False, track_running_stats=False)],
                         ids=["affine", "plain"])
@pytest.mark.parametrize("activation", ["relu", "relu6", None])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_double_backward_matches_torch_sequence(options, activation, bias):
    # A gradient penalty through the fused layer: the input gradient is differentiated again.
    torch.manual_seed(0)
    m = ConvBNReLU2d(3, 4, 3, padding=1, bias=bias, activation=activation, **options).double()
    ref = _torch_sequence(m)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for model, inp in ((m, x), (ref, x_ref)):
        y = model(inp)
        (g,) = torch.autograd.grad((y * y.detach().cos()).sum(), inp, create_graph=True)
        (g.square().sum() + y.sum()).backward()
    assert_close(x.grad, x_ref.grad, atol=1e-9, rtol=1e-7, what="input")
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, atol=1e-9, rtol=1e-7, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["depthwise", "grouped", "pointwise", "winograd", "strided"])
def test_module_layers_and_layouts(kind, dtype):
    torch.manual_seed(1)
    conv = {"depthwise": dict(in_channels=8, out_channels=16, kernel_size=3, padding=1,
                              groups=8),
            "grouped": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=2),
            "pointwise": dict(in_channels=8, out_channels=12, kernel_size=1),
            "winograd": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1,
                             bias=False),
            "strided": dict(in_channels=8, out_channels=8, kernel_size=5, stride=2,
                            padding=2, padding_mode="reflect")}[kind]
    m = ConvBNReLU2d(**conv, dtype=dtype)
    ref = _torch_sequence(m)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    for channels_last in (False, True):
        def make():
            x = torch.randn(2, 8, 11, 12, dtype=dtype)
            return x.contiguous(memory_format=torch.channels_last) if channels_last else x
        _compare_training(m, ref, make, steps=2, atol=atol)
    m.eval(), ref.eval()
    with torch.no_grad():
        x = torch.randn(2, 8, 11, 12, dtype=dtype)
        assert_close(m(x), ref(x), atol=atol, rtol=atol, what="eval")


@pytest.mark.parametrize("algo,groups", [("direct", 1), ("im2col", 1), ("winograd_f2", 1),
                                         ("winograd_f4", 1), ("winograd_f6", 1),
                                         ("depthwise", 16), ("grouped", 4)])
def test_module_runs_every_algorithm_named(algo, groups):
    """Each algorithm by name, in train (batch statistics from its epilogue) and in eval (its
    packing of the folded weights, made once and reused, and the activation epilogue)."""
    torch.manual_seed(2)
    m = ConvBNReLU2d(16, 16, 3, padding=1, groups=groups, activation="relu6", algo=algo)
    ref = _torch_sequence(m)
    atol = 2e-4 if algo.startswith("winograd") else 2e-5
    _compare_training(m, ref, lambda: torch.randn(2, 16, 9, 10), steps=2, atol=atol)
    m.eval(), ref.eval()
    x = torch.randn(2, 16, 9, 10)
    with torch.no_grad():
        for call in ("first", "cached"):
            assert_close(m(x), ref(x), atol=atol, rtol=atol, what=f"eval, {call} call")
    assert m._folded is not None  # the folded weights were kept for the second call


def test_state_dict_loads_into_the_torch_sequence_and_back():
    m = ConvBNReLU2d(3, 4, 3, activation="relu6")
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6())
    assert list(m.state_dict()) == list(ref.state_dict())
    assert "1.running_mean" in m.state_dict() and "1.num_batches_tracked" in m.state_dict()
    ref.train()(torch.randn(2, 3, 6, 6))
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    m.eval(), ref.eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5, what="after load")


def test_from_modules_shares_parameters_and_checks():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    m = ConvBNReLU2d.from_modules(conv, bn, nn.ReLU(inplace=True))
    assert m[0].weight is conv.weight and m[1] is bn and m.activation == "relu"
    assert ConvBNReLU2d.from_modules(conv, bn).activation == "none"
    with pytest.raises(ValueError, match="4 features but the Conv2d has 5"):
        ConvBNReLU2d.from_modules(nn.Conv2d(3, 5, 3), bn)
    with pytest.raises(TypeError, match="GELU"):
        ConvBNReLU2d.from_modules(conv, bn, nn.GELU())


def test_one_value_per_channel_in_training_is_an_error_like_torch():
    m = ConvBNReLU2d(3, 4, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 3, 3, 3))


def test_other_dtypes_run_torch():
    m = ConvBNReLU2d(3, 4, 3, padding=1).to(torch.bfloat16)
    ref = _torch_sequence(m)
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    assert torch.equal(m(x), ref(x))
    m.eval(), ref.eval()
    with torch.no_grad():  # eval without gradients: torch's modules too, no bfloat16 fold
        assert torch.equal(m(x), ref(x))


def test_inference_mode_folds_per_call():
    m = ConvBNReLU2d(3, 4, 3, padding=1).eval()
    ref = _torch_sequence(m).eval()
    with torch.inference_mode():
        x = torch.randn(2, 3, 6, 6)
        assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5, what="inference mode")


# --------------------------------------------------------------------------------------------
# fuse()
# --------------------------------------------------------------------------------------------

class _Block(nn.Module):
    """A residual block written with a forward method, functional activations."""

    def __init__(self, c, last):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.last = last

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.last(self.bn2(self.conv2(y)))
        z = self.conv3(y)  # used twice: not fused
        return self.bn3(z) + z + x


class _Untraceable(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.inner = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU6())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = self.bn(self.conv(x))
        return self.inner(x)


@pytest.mark.parametrize("last", [torch.relu, lambda t: t.relu(), lambda t: F.hardtanh(t, 0, 6),
                                  F.relu6, nn.ReLU6(), lambda t: t],
                         ids=["torch.relu", "method", "hardtanh", "relu6", "ReLU6", "none"])
def test_fuse_keeps_outputs_in_train_and_eval(last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          _Block(8, last), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    ref = copy.deepcopy(model)
    fused = fastconv.fuse(fastconv.convert(model))
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(ConvBNReLU2d) == 4  # stem, block's conv1 and conv2, head
    _compare_training(fused, ref, lambda: torch.randn(2, 3, 10, 10), steps=2, atol=2e-5)
    fused.eval(), ref.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 10, 10)
        assert_close(fused(x), ref(x), atol=2e-5, rtol=2e-5, what="eval")


def test_fuse_warns_about_untraceable_modules_and_fuses_their_children():
    model = nn.Sequential(_Untraceable(4))
    ref = copy.deepcopy(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fastconv.fuse(model).eval()
    messages = [str(w.message) for w in caught if issubclass(w.category, fastconv.FuseWarning)]
    assert len(messages) == 1 and "_Untraceable" in messages[0] and "control flow" in messages[0]
    assert isinstance(fused[0].inner[0], ConvBNReLU2d) and type(fused[0].bn) is nn.BatchNorm2d
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5, what="eval")


def test_fuse_leaves_models_without_chains_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fastconv.fuse(model) is model and type(model[0]) is nn.Conv2d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastconv.fuse(lambda x: x)


def test_output_changed_in_place_after_conv_bn_trains_like_torch():
    """Conv -> BN (no activation) -> an in-place activation, as EfficientNet's SiLU(inplace)
    does: the backward needs no BN output, so changing it in place is allowed (as in torch)."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6),
                              torch.nn.SiLU(inplace=True))
    ours = fastconv.fuse(fastconv.convert(copy.deepcopy(ref)))
    assert isinstance(ours[0], fastconv.nn.ConvBNReLU2d)
    x = torch.randn(2, 4, 8, 8)
    grads = []
    for m in (ref, ours):
        m.train()
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for g_ref, g_ours in zip(*grads):
        assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-4, what="gradient")


# --------------------------------------------------------------------------------------------
# What fuse() and ConvBNReLU2d must not fuse, and children changed after fusing
# --------------------------------------------------------------------------------------------

class _ModeDependent(nn.Module):
    """Dropout through self.training: fx would record the mode the trace saw."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.dropout(F.relu(self.bn(self.conv(x))), 0.5, self.training)


def test_fuse_leaves_a_forward_that_reads_the_mode_unfused():
    torch.manual_seed(0)
    model = nn.Sequential(_ModeDependent(4))
    ref = copy.deepcopy(model)
    with pytest.warns(fastconv.FuseWarning, match="train and eval"):
        fused = fastconv.fuse(model)  # traced in train mode
    assert type(fused[0].conv) is nn.Conv2d  # not fused, so dropout still follows the mode
    fused.eval(), ref.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), ref(x), atol=1e-6, rtol=1e-6, what="eval after fuse in train")


def test_fuse_leaves_the_original_model_as_it_was():
    torch.manual_seed(0)
    model = _Block(4, torch.relu).eval()
    model.bn3.train()  # a mixed mode survives the traces
    keys = list(model.state_dict())
    fused = fastconv.fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    assert list(model.state_dict()) == keys  # no '*_fused' copies added to the original
    assert not fused.training and fused.bn3.training and not fused.conv3.training


class _StandardizedConv(nn.Conv2d):
    """Weight standardisation: a Conv2d subclass whose output is not conv(x, weight)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def _pruned_conv():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)  # a forward pre-hook
    return conv


@pytest.mark.parametrize("make_conv", [lambda: _StandardizedConv(3, 4, 3, padding=1), _pruned_conv],
                         ids=["subclass", "pruned"])
def test_convs_that_compute_otherwise_are_not_fused(make_conv):
    torch.manual_seed(0)
    model = nn.Sequential(make_conv(), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)  # (a pruned conv's weight is not a leaf: no deepcopy)
    fused = fastconv.fuse(model)
    assert not any(isinstance(m, ConvBNReLU2d) for m in fused.modules())
    assert_close(fused(x), expected, atol=1e-6, rtol=1e-6, what="eval output")
    with pytest.raises((TypeError, ValueError), match="cannot fuse"):
        ConvBNReLU2d.from_modules(make_conv(), nn.BatchNorm2d(4))


def test_fuse_keeps_a_sequential_subclass_forward():
    class Twice(nn.Sequential):  # uses the conv's output twice
        def forward(self, x):
            z = self[0](x)
            return self[1](z) + z

    torch.manual_seed(0)
    model = Twice(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    ref = copy.deepcopy(model)
    fused = fastconv.fuse(model)
    assert not any(isinstance(m, ConvBNReLU2d) for m in fused.modules())
    x = torch.randn(2, 3, 6, 6)
    assert_close(fused(x), ref(x), atol=1e-6, rtol=1e-6, what="train output")


def test_changed_children_run_one_after_another():
    torch.manual_seed(0)
    m = ConvBNReLU2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 6, 6)
    m[1] = nn.GroupNorm(2, 4)  # as SyncBatchNorm.convert_sync_batchnorm swaps the BN
    assert_close(m(x), F.relu(m[1](m[0](x))), atol=0, rtol=0, what="swapped norm")
    m = ConvBNReLU2d(3, 4, 3, padding=1, activation=None)
    m.append(nn.Sigmoid())
    assert m.activation is None
    assert_close(m(x), torch.sigmoid(m[1](m[0](x))), atol=0, rtol=0, what="appended child")
    head = m[0:2]
    assert type(head) is nn.Sequential and len(head) == 2 and head[0] is m[0]


def test_hooks_added_after_fusing_still_run():
    m = ConvBNReLU2d(3, 4, 3, padding=1).eval()
    seen = []
    m[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        m(torch.randn(1, 3, 5, 5))
    assert seen == [torch.Size([1, 4, 5, 5])]


def test_refused_input_does_not_count_a_batch():
    m = ConvBNReLU2d(3, 4, 3, padding=1, momentum=None)
    with pytest.raises(Exception):
        m(torch.randn(2, 5, 6, 6))  # 5 channels, the conv takes 3
    assert m[1].num_batches_tracked.item() == 0
    m(torch.randn(2, 3, 6, 6))
    assert m[1].num_batches_tracked.item() == 1


def test_activation_none_by_name():
    m = ConvBNReLU2d(3, 4, 3, activation="none")
    assert len(m) == 2 and m.activation == "none"
    again = ConvBNReLU2d.from_modules(m[0], m[1], m.activation)
    assert len(again) == 2


def test_constant_channel_keeps_a_running_variance_of_zero():
    m = ConvBNReLU2d(3, 4, 1, momentum=1.0)
    with torch.no_grad():
        m[0].weight.zero_()
        m[0].bias.fill_(3.0)  # every output value of each channel equal
    m(torch.randn(2, 3, 5, 5))
    assert (m[1].running_var >= 0).all() and m[1].running_var.abs().max() < 1e-9


class _WithConstant(nn.Module):
    """A forward that makes a tensor constant, which fx stores on the model."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) * torch.tensor(2.0)


class _FreezesInEval(nn.Module):
    """train() does more than set the flags."""

    def __init__(self, c):
        super().__init__()
        self.block = _WithConstant(c)

    def forward(self, x):
        return self.block(x)

    def train(self, mode=True):
        super().train(mode)
        self.block.conv.weight.requires_grad_(mode)
        return self


def test_fuse_traces_constants_and_modes_without_side_effects():
    torch.manual_seed(0)
    model = _FreezesInEval(4)
    ref = copy.deepcopy(model)
    names = set(model.__dict__) | set(model.block.__dict__)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastconv.FuseWarning)
        fused = fastconv.fuse(model)
    assert any(isinstance(m, ConvBNReLU2d) for m in fused.modules())
    assert set(model.__dict__) | set(model.block.__dict__) == names  # no fx constants left
    assert model.block.conv.weight.requires_grad  # its train() override never ran
    x = torch.randn(2, 4, 6, 6)
    assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5, what="train output")


def test_activation_with_hooks_is_not_absorbed():
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    seen = []
    seq[2].register_forward_hook(lambda mod, args, out: seen.append(1))
    fused = fastconv.fuse(seq)
    assert isinstance(fused[0], ConvBNReLU2d) and fused[0].activation == "none"
    assert isinstance(fused[2], nn.ReLU)
    fused(torch.randn(1, 3, 6, 6))
    assert seen == [1]
