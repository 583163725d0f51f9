"""Bad input raises a ValueError/TypeError/RuntimeError that names the problem; never a crash
and never a silent wrong answer."""
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
    ("unsupported_dtype_half", dict(input=x4.half(), weight=w4.half()), TypeError, "float16"),
    ("unsupported_dtype_int", dict(input=x4.long(), weight=w4.long()), TypeError, "int64"),
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


def test_unimplemented_algorithm_names_itself():
    with pytest.raises(NotImplementedError, match="winograd"):
        fastconv.conv2d(x4, w4, algo="winograd")


def test_unknown_algorithm_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        fastconv.conv2d(x4, w4, algo="fft")
    for name in ("auto", "direct", "im2col", "winograd"):
        assert name in str(info.value)


def test_op_called_directly_validates_too():
    with pytest.raises(ValueError, match="channels"):
        torch.ops.fastconv.conv2d(torch.randn(1, 3, 8, 8), w4, None, [1, 1], [0, 0, 0, 0],
                                  [1, 1], 1, "direct")
    with pytest.raises(ValueError, match="grad_output"):
        torch.ops.fastconv.conv2d_grad_input(torch.randn(1, 6, 5, 5), w4, [1, 4, 8, 8], [1, 1],
                                             [0, 0, 0, 0], [1, 1], 1, "direct")


def test_meta_device_is_rejected_by_the_kernel_not_crashing():
    with pytest.raises((ValueError, RuntimeError, NotImplementedError)):
        fastconv.ops.conv2d_forward(torch.randn(1, 4, 8, 8), w4, None, (1, 1), (0, 0, 0, 0),
                                    (1, 1), 1, "nonsense")


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="avx512"):
        fastconv.set_isa("neon")
