"""Bad input raises an error that names the problem (a ValueError or TypeError that is also a
RuntimeError, the class torch raises); never a crash and never a silent wrong answer."""
from __future__ import annotations

import pytest
import torch

import fastconv

x4 = torch.randn(2, 4, 8, 8)
w4 = torch.randn(6, 4, 3, 3)

BAD = [
    # (id, call kwargs, exception type, message fragment)
    ("channel_mismatch", dict(input=torch.randn(2, 5, 8, 8)), ValueError, "channels"),
    ("groups_not_dividing_in", dict(input=torch.randn(2, 6, 8, 8), weight=torch.randn(6, 3, 3, 3), groups=4), ValueError, "divisible"),
    ("groups_not_dividing_out", dict(input=torch.randn(2, 6, 8, 8), weight=torch.randn(5, 3, 3, 3), groups=2), ValueError, "divisible"),
    ("groups_zero", dict(groups=0), ValueError, "groups"),
    ("input_rank_2", dict(input=torch.randn(4, 8)), ValueError, "input"),
    ("input_rank_5", dict(input=torch.randn(1, 2, 4, 8, 8)), ValueError, "input"),
    ("weight_rank_3", dict(weight=torch.randn(6, 4, 3)), ValueError, "weight"),
    ("kernel_larger_than_padded_input", dict(input=torch.randn(1, 4, 2, 8)), ValueError, "larger than the padded input"),
    ("kernel_larger_dilated", dict(dilation=5), ValueError, "larger than the padded input"),
    ("stride_zero", dict(stride=0), ValueError, "stride"),
    ("stride_negative", dict(stride=(1, -1)), ValueError, "stride"),
    ("dilation_zero", dict(dilation=0), ValueError, "dilation"),
    ("padding_negative", dict(padding=-1), ValueError, "padding"),
    ("same_with_stride", dict(padding="same", stride=2), ValueError, "same"),
    ("unknown_padding_string", dict(padding="full"), ValueError, "padding"),
    ("stride_three_values", dict(stride=(1, 1, 1)), ValueError, "stride"),
    ("stride_float", dict(stride=1.5), TypeError, "stride"),
    ("dtype_mismatch_weight", dict(weight=w4.double()), TypeError, "dtype"),
    ("dtype_mismatch_bias", dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "dtype"),
    ("unsupported_dtype_half", dict(input=x4.half(), weight=w4.half(), algo="direct"), ValueError, "algo='direct'.*float16"),
    ("unsupported_dtype_int", dict(input=x4.long(), weight=w4.long(), algo="im2col"), ValueError, "algo='im2col'.*int64"),
    ("meta_bias", dict(bias=torch.randn(6, device="meta")), RuntimeError, "same device"),
    ("meta_weight", dict(weight=torch.randn(6, 4, 3, 3, device="meta")), RuntimeError, "same device"),
    ("stride_bool", dict(stride=True), TypeError, "stride"),
    ("padding_float", dict(padding=1.0), TypeError, "padding"),
    ("dilation_float_in_pair", dict(dilation=(1, 1.0)), TypeError, "dilation"),
    ("no_output_channels", dict(weight=torch.randn(0, 4, 3, 3)), RuntimeError, "output channels"),
    ("bias_wrong_size", dict(bias=torch.randn(5)), ValueError, "bias"),
    ("bias_wrong_rank", dict(bias=torch.randn(6, 1)), ValueError, "bias"),
    ("unknown_algo", dict(algo="fft"), ValueError, "direct"),
    ("not_a_tensor", dict(input=[[1.0]]), TypeError, "tensor"),
]


@pytest.mark.parametrize("name,kwargs,exc,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, kwargs, exc, fragment):
    args = dict(input=x4, weight=w4, bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=fragment):
        fastconv.conv2d(**args)


@pytest.mark.parametrize("name,kwargs,exc,fragment", BAD[:6], ids=[b[0] for b in BAD[:6]])
def test_bad_input_raises_with_autograd(name, kwargs, exc, fragment):
    # The autograd/op path (not the eager fast path) reports the same errors.
    args = dict(input=x4.clone().requires_grad_(True), weight=w4.clone().requires_grad_(True),
                bias=None)
    args.update(kwargs)
    with pytest.raises(exc, match=fragment):
        fastconv.conv2d(**args)


def test_not_yet_built_algorithm_is_unknown():
    with pytest.raises(ValueError, match="valid choices"):
        fastconv.conv2d(x4, w4, algo="fused_conv_bn_relu")


TORCH_LIKE = [b for b in BAD if b[0] != "unknown_algo"]  # 'algo' is fastconv's own argument


@pytest.mark.parametrize("name,kwargs,exc,fragment", TORCH_LIKE, ids=[b[0] for b in TORCH_LIKE])
def test_errors_are_runtime_errors_like_torchs(name, kwargs, exc, fragment):
    # Code written around torch's conv catches RuntimeError; fastconv's argument errors are
    # RuntimeErrors too (TypeErrors of Python argument types excepted, as in torch).
    args = dict(input=x4, weight=w4, bias=None)
    args.update(kwargs)
    with pytest.raises((RuntimeError, TypeError)):
        fastconv.conv2d(**args)


def test_unknown_algorithm_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        fastconv.conv2d(x4, w4, algo="fft")
    for name in ["auto"] + [a.name for a in fastconv.registry.ALGORITHMS]:
        assert name in str(info.value)


def test_op_called_directly_validates_too():
    with pytest.raises(ValueError, match="channels"):
        torch.ops.fastconv.conv2d(torch.randn(1, 3, 8, 8), w4, None, [1, 1], [0, 0, 0, 0],
                                  [1, 1], 1, "direct")
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.fastconv.conv2d_grad_input(torch.randn(1, 6, 5, 5), w4, [1, 4, 8, 8], [1, 1],
                                             [0, 0, 0, 0], [1, 1], 1, "direct")


def test_validation_does_not_depend_on_call_history():
    fastconv.conv2d(x4, w4, stride=1)             # memoises the normalised arguments
    with pytest.raises(TypeError, match="stride"):
        fastconv.conv2d(x4, w4, stride=1.0)         # 1.0 == 1 as a dict key: not memoised
    fastconv.conv2d(x4, w4, padding=(1, 1))
    with pytest.raises(TypeError, match="padding"):
        fastconv.conv2d(x4, w4, padding=(1.0, 1))


def test_fake_kernel_raises_the_real_kernels_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    for bias, exc in ((torch.randn(5), ValueError), (torch.randn(6, dtype=torch.float64), TypeError)):
        args = (x4, w4, bias, [1, 1], [0, 0, 0, 0], [1, 1], 1, "direct")
        with pytest.raises(exc, match="bias") as real:
            torch.ops.fastconv.conv2d(*args)
        with FakeTensorMode() as mode:
            fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises(exc, match="bias") as fake:
                torch.ops.fastconv.conv2d(*fake_args)
        assert type(fake.value) is type(real.value)


def test_named_algorithm_on_a_device_without_kernels_names_the_reason():
    x, w = x4.to("meta"), w4.to("meta")
    # On the meta device the ops compute shapes only (as torch's own meta kernels do).
    assert fastconv.conv2d(x, w, algo="direct").shape == (2, 6, 6, 6)
    # A device without fastconv kernels under 'auto' runs torch's convolution.
    assert fastconv.conv2d(x, w).device.type == "meta"


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="avx512"):
        fastconv.set_isa("neon")
