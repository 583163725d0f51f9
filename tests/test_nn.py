"""fastconv.nn.Conv2d and fastconv.convert: drop-in replacements for torch.nn.Conv2d."""
from __future__ import annotations

import copy

import pytest
import torch

import fastconv
from conftest import ALL_PASSES, FORWARD, assert_close, model_outside_domain

MODULE_CONFIGS = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 2), padding="same", dilation=(1, 2)),
    dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=3),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="same"),
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("config", MODULE_CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_module_matches_torch(config, padding_mode, algo):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(**config, padding_mode=padding_mode).double()
    fast = fastconv.nn.Conv2d(**config, padding_mode=padding_mode, algo=algo).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, config["in_channels"], 9, 10, dtype=torch.float64, requires_grad=True)
    if model_outside_domain(algo, ref, x, ALL_PASSES, lambda: fast(x).sum().backward()):
        return
    y_ref, y = ref(x), fast(x)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10, what="module forward")
    gy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, [x] + list(ref.parameters()), gy)
    g = torch.autograd.grad(y, [x] + list(fast.parameters()), gy)
    for a, e in zip(g, g_ref):
        assert_close(a, e, atol=1e-11, rtol=1e-10, what="module gradient")


def test_state_dict_interchanges_both_ways():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(3, 5, 3, padding=1)
    fast = fastconv.nn.Conv2d(3, 5, 3, padding=1)
    assert set(ref.state_dict()) == set(fast.state_dict())
    fast.load_state_dict(ref.state_dict())
    other = torch.nn.Conv2d(3, 5, 3, padding=1)
    other.load_state_dict(fast.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(other.state_dict()[k], v) and torch.equal(fast.state_dict()[k], v)


def test_module_is_a_torch_conv2d_and_reports_algo():
    m = fastconv.nn.Conv2d(3, 5, 3, algo="direct")
    assert isinstance(m, torch.nn.Conv2d)
    assert "algo='direct'" in repr(m)
    with pytest.raises(ValueError, match="valid choices"):
        fastconv.nn.Conv2d(3, 5, 3, algo="bogus")


def test_module_channels_last_and_unbatched():
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(8, 16, 3, padding=1).to(memory_format=torch.channels_last)
    fast = fastconv.convert(ref)
    x = torch.randn(2, 8, 10, 10).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y_ref = torch.nn.functional.conv2d(x, ref.weight, ref.bias, padding=1)
        y = fast(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, y_ref, atol=1e-5, rtol=1e-5, what="channels_last module")
        assert_close(fast(x[0]), y_ref[0], atol=1e-5, rtol=1e-5, what="unbatched module")


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.inner = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1))

    def forward(self, x):
        return x + self.inner(self.bn(self.conv(x)))


class _MyConv(torch.nn.Conv2d):
    """A user subclass: convert() must leave it alone."""


def test_convert_replaces_every_conv_and_keeps_outputs(algo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                _Block(), _Block(), _MyConv(8, 4, 1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    params_before = {id(p) for p in model.parameters()}
    converted_copy = fastconv.convert(copy.deepcopy(model), algo=algo)
    if model_outside_domain(algo, model, x, FORWARD, lambda: converted_copy(x)):
        return
    converted = fastconv.convert(model, algo=algo)
    assert converted is model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(isinstance(m, fastconv.nn.Conv2d) for m in convs) == 5
    assert isinstance(model[4], _MyConv) and not isinstance(model[4], fastconv.nn.Conv2d)
    assert {id(p) for p in model.parameters()} == params_before  # same Parameter objects
    with torch.no_grad():
        assert_close(model(x), expected, atol=1e-5, rtol=1e-5, what="converted model")


def test_convert_a_bare_conv_and_train_it():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    fast = fastconv.convert(conv)
    assert isinstance(fast, fastconv.nn.Conv2d) and fast.weight is conv.weight
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    before = conv.weight.detach().clone()
    fast(x).square().mean().backward()
    opt.step()
    assert not torch.equal(before, conv.weight)  # the shared parameter was trained


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 3, stride=2, groups=4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_model_runs_dtypes_without_kernels_like_torch(dtype):
    # model.half() / .to(bfloat16) after convert: 'auto' runs torch's own convolution.
    ref = _small_model().to(dtype)
    fast = fastconv.convert(_small_model()).to(dtype)
    x = torch.randn(2, 3, 10, 10).to(dtype)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))
    with pytest.raises(fastconv.AlgorithmUnavailable, match="algo='direct'.*" + str(dtype)[6:]):
        fastconv.convert(_small_model(), algo="direct").to(dtype)(x)


def test_converted_model_under_autocast_matches_torch():
    ref, fast = _small_model(), fastconv.convert(_small_model())
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), fast(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)


def test_converted_model_on_a_device_without_kernels_runs_torchs_conv():
    # The meta device stands in for any device fastconv has no kernels for (CUDA today).
    fast = fastconv.convert(_small_model()).to("meta")
    y = fast(torch.randn(2, 3, 10, 10, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 4, 4, 4)


def test_module_trains_in_float64_and_float32_with_the_same_parameters():
    fast = fastconv.convert(_small_model()).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    fast(x).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in fast.parameters())
