"""PyTorch custom ops around the kernels: schema, fake (meta) kernel and autograd.

Four ops, all bilinear in their two tensor arguments, so their derivatives are each other:

=====================  =====================================  ==============================
op                     computes                               tensor arguments
=====================  =====================================  ==============================
conv2d                 y  = F(x, w) + b                       input, weight, bias
conv2d_grad_input      gx = Gx(gy, w)   (adjoint of F in x)   grad_output, weight
conv2d_grad_weight     gw = Gw(gy, x)   (adjoint of F in w)   grad_output, input
conv2d_grad_bias       gb = sum of gy over n, h, w            grad_output
=====================  =====================================  ==============================

Padding is always four explicit values (top, bottom, left, right); ``fastconv.functional``
turns torch's ints, pairs, 'same' and 'valid' into that form. The ops take an algorithm name
('auto' or a registered one) and run that algorithm's kernels for the tensors' device, found
through the registry (fastconv.registry); they are registered for every device type, so a
device without kernels gets an error that names the algorithm and the reason.

The real kernels and the fake kernels share one set of checks (``_plan`` and
``_check_operand``), so both raise the same errors.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as _F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import autotune, backend, dispatch
from .backend import ACT_NONE, ACTIVATIONS, DTYPE_CODES, NCHW, NHWC, Pass
from .errors import InvalidConvolution, UnsupportedTensor
from .problem import Conv2dProblem, conv2d_problem

# --------------------------------------------------------------------------------------------
# Checks and plans (shared by the real and the fake kernels)
# --------------------------------------------------------------------------------------------

class Plan(NamedTuple):
    problem: Conv2dProblem
    kernels: object  # the algorithm's kernels for the device (backend.CppKernels on the CPU)


_PLANS: dict = {}


def _plan(pass_: Pass, input_shape, weight_shape, stride, padding, dilation, groups: int,
          algo: str, device: str, dtype: torch.dtype, prepacked: bool = False,
          layout: Optional[str] = None, tune: bool = False, channels_last: bool = False):
    """The Plan of one call: the validated problem and the kernels of the algorithm that runs
    it (None on the meta device, where only shapes are computed; ``prepacked``: a forward
    whose weights come from the weight cache; ``channels_last``: a grad-input that reads or
    writes channels_last tensors, which ``auto`` routes differently). Memoised: a network
    calls the same few shapes over and over, and the checks cost microseconds.

    Under autotune (fastconv.autotune), ``auto`` runs the tuned winner for the call's
    ``layout`` (:func:`_layout_key`); ``tune``: time the candidates now if the key is new (real
    kernels only: a fake kernel inside torch.compile's tracing must not time anything)."""
    tuned = algo == "auto" and layout is not None and autotune.is_enabled()
    channels_last = channels_last and algo == "auto"  # a named algorithm runs either layout
    key = (pass_, input_shape, weight_shape, tuple(stride), tuple(padding), tuple(dilation),
           groups, algo, device, dtype, prepacked, channels_last,
           (layout, tune, autotune.generation()) if tuned else None)
    try:
        plan = _PLANS.get(key)
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes) do not hash,
        key = plan = None  # and nothing can be tuned for them
        tuned = False
    if plan is None:
        problem = conv2d_problem(input_shape, weight_shape, stride, padding, dilation, groups)
        kernels = None
        if device != "meta":
            name = algo
            if tuned:
                name = autotune.pick(problem, pass_, dtype, layout, device, prepacked,
                                     tune) or algo
            _, kernels = dispatch.resolve(name, problem, device, dtype, pass_, prepacked,
                                          channels_last)
        plan = Plan(problem, kernels)
        if key is not None:
            if len(_PLANS) > 4096:
                _PLANS.clear()
            _PLANS[key] = plan
    return plan


def device_type(t: Tensor) -> str:
    """t.device.type, without building a torch.device for the common CPU case (0.05 us, not
    0.3: this runs several times per call)."""
    return "cpu" if t.is_cpu else t.device.type


def _check_operand(name: str, t: Tensor, like: Tensor, like_name: str) -> None:
    """t must have like's dtype and device (as torch requires of a convolution's tensors)."""
    if t.dtype != like.dtype:
        raise UnsupportedTensor(f"fastconv: {name} dtype {t.dtype} does not match {like_name} "
                                f"dtype {like.dtype}")
    if not (t.is_cpu and like.is_cpu) and t.device != like.device:
        raise UnsupportedTensor(f"fastconv: expected all tensors on the same device, but "
                                f"{name} is on {t.device} and {like_name} on {like.device}")


def _check_bias(bias: Optional[Tensor], input: Tensor, problem: Conv2dProblem) -> None:
    if bias is None:
        return
    _check_operand("bias", bias, input, "input")
    if bias.shape != (problem.K,):
        raise InvalidConvolution(f"fastconv: bias must have shape ({problem.K},), got "
                                 f"{tuple(bias.shape)}")


def _check_grad_output(grad_output: Tensor, problem: Conv2dProblem) -> None:
    if grad_output.shape != problem.output_shape:
        raise InvalidConvolution(f"fastconv: grad_output has shape {tuple(grad_output.shape)}, "
                                 f"expected {problem.output_shape}")


def _channels_last(t: Tensor) -> bool:
    """Whether torch would treat t as channels_last (its suggest_memory_format): dense
    channels_last tensors, and strided views whose strides are ordered that way."""
    if t.is_contiguous():
        return False
    if t.is_contiguous(memory_format=torch.channels_last):
        return True
    return t.dim() == 4 and suggest_memory_format(t) == torch.channels_last


def _output_channels_last(operand_channels_last: bool, weight: Tensor) -> bool:
    """torch's layout rule for a convolution's output (y, or grad_x from grad_y):
    channels_last when the activation operand or the weight is."""
    return operand_channels_last or _channels_last(weight)


def _dense(t: Tensor) -> tuple[Tensor, int]:
    """t as a dense NCHW or NHWC tensor, following its memory format (a copy only if it is
    neither: strided, expanded or overlapping views are copied), and its layout code."""
    if _channels_last(t):
        return t.contiguous(memory_format=torch.channels_last), NHWC
    return t.contiguous(), NCHW


def _empty(shape, like: Tensor, channels_last: bool) -> Tensor:
    if not channels_last:  # new_empty: 1.9 us; torch.empty with dtype, device and format: 3.7
        return like.new_empty(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


# Fresh outputs this large ask for huge pages before the kernel first touches them (torch's
# allocator does so only under THP_MEM_ALLOC_ENABLE=1). Above glibc's 32 MiB mmap ceiling
# every allocation is new pages: MobileNetV2's 96 channels @112 grad-input at batch 8
# (38.5 MB), 2 threads, 16.8 ms with 4 KiB pages, 5.8-6.5 ms with huge pages. Smaller
# outputs mostly reuse heap pages already touched; advising those cost up to 2x (12.8 MB:
# 1.5 -> 2.8 ms), so they are left alone.
_HUGE_PAGE_OUTPUT_BYTES = 32 << 20


def _output(shape, like: Tensor, channels_last: bool) -> Tensor:
    """A kernel's fresh output (the real implementations; the fakes use _empty)."""
    out = _empty(shape, like, channels_last)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_PAGE_OUTPUT_BYTES and out.device.type == "cpu":
        backend._C.advise_huge_pages(out.data_ptr(), nbytes)
    return out


def _layout_key(algo: str, reads: Tensor, *writes: Tensor) -> Optional[str]:
    """Autotune's layout of an ``auto`` call (None otherwise, and while autotune is off: no
    per-call work then): that of the tensor its kernel reads as input (x; grad_y for
    grad-input), then, if different, that of its other tensor (channels_last if any of
    ``writes`` is: y, grad_x, grad_y)."""
    if algo != "auto" or not autotune.is_enabled():
        return None
    a = "nhwc" if _channels_last(reads) else "nchw"
    b = "nhwc" if any(_channels_last(t) for t in writes) else "nchw"
    return a if a == b else f"{a}>{b}"


def _forward_plan(input, weight, bias, stride, padding, dilation, groups, algo,
                  prepacked=False, tune=False):
    _check_operand("weight", weight, input, "input")
    plan = _plan(Pass.FORWARD, input.shape, weight.shape, stride, padding, dilation, groups,
                 algo, device_type(input), input.dtype, prepacked,
                 _layout_key(algo, input, input, weight), tune)
    _check_bias(bias, input, plan.problem)
    return plan


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------

def conv2d_forward(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                   dilation, groups: int, algo: str, cache=None, activation: int = ACT_NONE,
                   stats: Optional[Tensor] = None) -> Tensor:
    """The body of the conv2d ops: checks, allocates the output and runs the kernel. Called by
    the ops, and directly by fastconv.conv2d in eager calls that need no autograd, which may
    pass ``cache``, the fastconv.weight_cache.PackedWeight of ``weight``. ``activation`` (an
    ACTIVATIONS code) and ``stats`` (2 K float64 values: each channel's sum of y, then of y^2)
    are fused into the kernel's output epilogue."""
    cached = cache is not None and cache.usable()
    problem, kernels = _forward_plan(input, weight, bias, stride, padding, dilation, groups,
                                     algo, cached, tune=True)
    out_cl = _output_channels_last(_channels_last(input), weight)
    y = _output(problem.output_shape, input, out_cl)
    if y.numel() == 0:
        if stats is not None:
            stats.zero_()
        return y
    x, x_layout = _dense(input)
    y_layout = NHWC if out_cl else NCHW
    packed = cache.packed_for(kernels, problem, x_layout, y_layout) if cached else None
    kernels.forward(problem, x, x_layout, weight if packed is not None else weight.contiguous(),
                    bias.contiguous() if bias is not None else None, y, y_layout, packed,
                    activation, stats)
    return y


@torch.library.custom_op("fastconv::conv2d", mutates_args=())
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int, algo: str) -> Tensor:
    """y = conv(input, weight) + bias with explicit (top, bottom, left, right) padding."""
    return conv2d_forward(input, weight, bias, stride, padding, dilation, groups, algo)


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, algo):
    problem, _ = _forward_plan(input, weight, bias, stride, padding, dilation, groups, algo)
    return _empty(problem.output_shape, input, _output_channels_last(_channels_last(input), weight))


def conv2d_setup(ctx, inputs, output, saved=()):
    """The context conv2d_backward reads: input and weight saved first, then ``saved`` (what
    a fused op's own backward needs besides)."""
    input, weight, bias, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(input, weight, *saved)
    ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups, algo)
    ctx.bias_size = None if bias is None else bias.shape[0]


def conv2d_backward(ctx, grad, differentiable: bool = True):
    """The gradients of conv2d (input, weight, bias) from its saved context: through the ops
    (differentiable: double backward works) or through their bodies (plain eager backward,
    no dispatcher; fastconv.autograd)."""
    if not differentiable:
        return _conv2d_backward_eager(ctx, grad)
    input, weight = ctx.saved_tensors[:2]
    conv = ctx.conv
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = conv2d_grad_input(grad, weight, list(input.shape), *conv)
    if ctx.needs_input_grad[1]:
        gw = conv2d_grad_weight(grad, input, list(weight.shape), *conv)
    if ctx.bias_size is not None and ctx.needs_input_grad[2]:
        # With no input channels the output has no channels (torch's rule), so grad has
        # none to sum: the bias gradient is zero.
        gb = (conv2d_grad_bias(grad) if grad.shape[1] == ctx.bias_size
              else grad.new_zeros((ctx.bias_size,)))
    return gx, gw, gb, None, None, None, None, None


def _conv2d_backward_eager(ctx, grad):
    """conv2d_backward through the op bodies' parts. The forward checked the operands, and
    autograd hands over a grad of the output's shape, dtype and device, so only the plans are
    looked up (the checks cost ~2.5 us per pass on a tiny convolution)."""
    input, weight = ctx.saved_tensors[:2]
    needs = ctx.needs_input_grad
    conv = ctx.conv
    device, dtype, algo = device_type(input), input.dtype, conv[-1]
    # Once for both passes: autograd often hands over an expanded or strided grad (the
    # backward of y.sum() is a stride-0 view), which each pass would copy again.
    gy, gy_layout = _dense(grad)
    gx = gw = gb = None
    if needs[0]:
        gx_cl = _output_channels_last(gy_layout == NHWC, weight)
        plan = _plan(Pass.GRAD_INPUT, input.shape, weight.shape, *conv, device, dtype,
                     layout=_layout_key(algo, gy, gy, weight), tune=True, channels_last=gx_cl)
        gx = _grad_input_run(plan, gy, gy_layout, weight, gx_cl)
    wants_bias = ctx.bias_size is not None and needs[2]
    bias_from_grad = wants_bias and gy.shape[1] == ctx.bias_size
    if needs[1]:
        plan = _plan(Pass.GRAD_WEIGHT, input.shape, weight.shape, *conv, device, dtype,
                     layout=_layout_key(algo, input, gy), tune=True)
        gw, gb = _grad_weight_run(plan, gy, gy_layout, input, bias_from_grad)
    elif bias_from_grad:
        gb = grad_bias_forward(gy)
    if wants_bias and not bias_from_grad:  # no input channels: see conv2d_backward
        gb = gy.new_zeros((ctx.bias_size,))
    return gx, gw, gb, None, None, None, None, None


def _conv2d_backward(ctx, grad):
    return conv2d_backward(ctx, grad)


conv2d.register_autograd(_conv2d_backward, setup_context=conv2d_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_input
# --------------------------------------------------------------------------------------------

def _grad_input_plan(grad_output, weight, input_size, stride, padding, dilation, groups, algo,
                     tune=False, gx_channels_last=False):
    _check_operand("weight", weight, grad_output, "grad_output")
    plan = _plan(Pass.GRAD_INPUT, tuple(input_size), weight.shape, stride, padding, dilation,
                 groups, algo, device_type(grad_output), grad_output.dtype, False,
                 _layout_key(algo, grad_output, grad_output, weight), tune, gx_channels_last)
    _check_grad_output(grad_output, plan.problem)
    return plan


def grad_input_forward(grad_output: Tensor, weight: Tensor, input_size, stride, padding,
                       dilation, groups: int, algo: str) -> Tensor:
    """The body of the conv2d_grad_input op."""
    gy, gy_layout = _dense(grad_output)
    gx_cl = _output_channels_last(gy_layout == NHWC, weight)
    plan = _grad_input_plan(grad_output, weight, input_size, stride, padding, dilation, groups,
                            algo, tune=True, gx_channels_last=gx_cl)
    return _grad_input_run(plan, gy, gy_layout, weight, gx_cl)


def _grad_input_run(plan: Plan, gy: Tensor, gy_layout: int, weight: Tensor,
                    gx_channels_last: bool) -> Tensor:
    """grad-input from a dense grad_output: allocates grad_x in the layout the caller worked
    out (_output_channels_last) and runs the plan's kernel."""
    problem, kernels = plan
    gx = _output(problem.input_shape, gy, gx_channels_last)
    if gx.numel():
        kernels.grad_input(problem, gy, gy_layout, weight.contiguous(), gx,
                           NHWC if gx_channels_last else NCHW)
    return gx


@torch.library.custom_op("fastconv::conv2d_grad_input", mutates_args=())
def conv2d_grad_input(grad_output: Tensor, weight: Tensor, input_size: Sequence[int],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      groups: int, algo: str) -> Tensor:
    """Gradient of conv2d with respect to its input (a transposed convolution of grad_output)."""
    return grad_input_forward(grad_output, weight, input_size, stride, padding, dilation,
                              groups, algo)


@conv2d_grad_input.register_fake
def _(grad_output, weight, input_size, stride, padding, dilation, groups, algo):
    problem, _ = _grad_input_plan(grad_output, weight, input_size, stride, padding, dilation,
                                  groups, algo)
    return _empty(problem.input_shape, grad_output,
                  _output_channels_last(_channels_last(grad_output), weight))


def _grad_input_setup(ctx, inputs, output):
    grad_output, weight, input_size, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(grad_output, weight)
    ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups, algo)


def _grad_input_backward(ctx, ggx):
    # gx = Gx(gy, w): d/dgy = F(ggx, w), d/dw = Gw(gy, ggx).
    grad_output, weight = ctx.saved_tensors
    d_gy = d_w = None
    if ctx.needs_input_grad[0]:
        d_gy = conv2d(ggx, weight, None, *ctx.conv)
    if ctx.needs_input_grad[1]:
        d_w = conv2d_grad_weight(grad_output, ggx, list(weight.shape), *ctx.conv)
    return d_gy, d_w, None, None, None, None, None, None


conv2d_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_weight
# --------------------------------------------------------------------------------------------

def _grad_weight_plan(grad_output, input, weight_size, stride, padding, dilation, groups, algo,
                      tune=False):
    _check_operand("input", input, grad_output, "grad_output")
    plan = _plan(Pass.GRAD_WEIGHT, input.shape, tuple(weight_size), stride, padding, dilation,
                 groups, algo, device_type(grad_output), grad_output.dtype, False,
                 _layout_key(algo, input, grad_output), tune)
    _check_grad_output(grad_output, plan.problem)
    return plan


def grad_weight_forward(grad_output: Tensor, input: Tensor, weight_size, stride, padding,
                        dilation, groups: int, algo: str) -> Tensor:
    """The body of the conv2d_grad_weight op."""
    return _grad_weight_body(grad_output, input, weight_size, stride, padding, dilation,
                             groups, algo, False)[0]


def grad_weight_bias_forward(grad_output: Tensor, input: Tensor, weight_size, stride, padding,
                             dilation, groups: int, algo: str):
    """(grad-weight, grad-bias) in one kernel call: algorithms whose grad-weight sweeps
    grad_output in a cache-friendly order sum the bias gradient in that sweep instead of a
    second pass over grad_output (as the eager backward does when both are needed; the ops
    stay separate for double backward and torch.compile)."""
    return _grad_weight_body(grad_output, input, weight_size, stride, padding, dilation,
                             groups, algo, True)


def _grad_weight_body(grad_output, input, weight_size, stride, padding, dilation, groups, algo,
                      with_bias: bool):
    plan = _grad_weight_plan(grad_output, input, weight_size, stride, padding, dilation, groups,
                             algo, tune=True)
    return _grad_weight_run(plan, *_dense(grad_output), input, with_bias)


def _grad_weight_run(plan: Plan, gy: Tensor, gy_layout: int, input: Tensor, with_bias: bool):
    """(grad-weight, grad-bias or None) from a dense grad_output: allocates them and runs the
    plan's kernel."""
    problem, kernels = plan
    gw = input.new_empty(problem.weight_shape)
    gb = gy.new_empty((problem.K,)) if with_bias else None
    if gw.numel() == 0 and (gb is None or gb.numel() == 0):
        return gw, gb
    x, x_layout = _dense(input)
    kernels.grad_weight(problem, gy, gy_layout, x, x_layout, gw, gb)
    return gw, gb


@torch.library.custom_op("fastconv::conv2d_grad_weight", mutates_args=())
def conv2d_grad_weight(grad_output: Tensor, input: Tensor, weight_size: Sequence[int],
                       stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                       groups: int, algo: str) -> Tensor:
    """Gradient of conv2d with respect to its weight; returned OIHW-contiguous."""
    return grad_weight_forward(grad_output, input, weight_size, stride, padding, dilation,
                               groups, algo)


@conv2d_grad_weight.register_fake
def _(grad_output, input, weight_size, stride, padding, dilation, groups, algo):
    problem, _ = _grad_weight_plan(grad_output, input, weight_size, stride, padding, dilation,
                                   groups, algo)
    return input.new_empty(problem.weight_shape)


def _grad_weight_setup(ctx, inputs, output):
    grad_output, input, weight_size, stride, padding, dilation, groups, algo = inputs
    ctx.save_for_backward(grad_output, input)
    ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups, algo)


def _grad_weight_backward(ctx, ggw):
    # gw = Gw(gy, x): d/dgy = F(x, ggw), d/dx = Gx(gy, ggw).
    grad_output, input = ctx.saved_tensors
    d_gy = d_x = None
    if ctx.needs_input_grad[0]:
        d_gy = conv2d(input, ggw, None, *ctx.conv)
    if ctx.needs_input_grad[1]:
        d_x = conv2d_grad_input(grad_output, ggw, list(input.shape), *ctx.conv)
    return d_gy, d_x, None, None, None, None, None, None


conv2d_grad_weight.register_autograd(_grad_weight_backward, setup_context=_grad_weight_setup)


# --------------------------------------------------------------------------------------------
# conv2d_grad_bias
# --------------------------------------------------------------------------------------------

def _check_grad_bias(grad_output: Tensor) -> None:
    if grad_output.dim() != 4:
        raise InvalidConvolution(f"fastconv: grad_output must be 4-D, got shape "
                                 f"{tuple(grad_output.shape)}")
    if grad_output.dtype not in DTYPE_CODES:
        raise UnsupportedTensor(f"fastconv: grad_bias has no {grad_output.dtype} kernel "
                                "(float32, float64)")
    if grad_output.device.type not in ("cpu", "meta", "cuda"):
        raise UnsupportedTensor(f"fastconv: grad_bias has no kernel for {grad_output.device}")


def grad_bias_forward(grad_output: Tensor) -> Tensor:
    """The body of the conv2d_grad_bias op (also called directly by fastconv.autograd)."""
    _check_grad_bias(grad_output)
    N, K, OH, OW = grad_output.shape
    if not grad_output.is_cpu:  # a plain reduction: torch's own kernel
        return grad_output.sum((0, 2, 3))
    gb = grad_output.new_empty((K,))
    if gb.numel() == 0:
        return gb
    gy, gy_layout = _dense(grad_output)
    backend.grad_bias(_bias_problem(N, K, OH, OW), gy, gy_layout, gb)
    return gb


@torch.library.custom_op("fastconv::conv2d_grad_bias", mutates_args=())
def conv2d_grad_bias(grad_output: Tensor) -> Tensor:
    """Per-channel sum of grad_output over batch and space (accumulated in float64)."""
    return grad_bias_forward(grad_output)


@functools.lru_cache(maxsize=1024)
def _bias_problem(N: int, K: int, OH: int, OW: int) -> Conv2dProblem:
    """grad_output's shape as a problem (grad-bias reads N, K, OH and OW only)."""
    return Conv2dProblem(N=N, C=K, H=OH, W=OW, K=K, R=1, S=1, OH=OH, OW=OW)


@conv2d_grad_bias.register_fake
def _(grad_output):
    _check_grad_bias(grad_output)
    return grad_output.new_empty((grad_output.shape[1],))


def _grad_bias_setup(ctx, inputs, output):
    ctx.shape = tuple(inputs[0].shape)


def _grad_bias_backward(ctx, ggb):
    N, K, OH, OW = ctx.shape
    return ggb.reshape(1, K, 1, 1).expand(N, K, OH, OW).contiguous()


conv2d_grad_bias.register_autograd(_grad_bias_backward, setup_context=_grad_bias_setup)


# --------------------------------------------------------------------------------------------
# Fused activation and batch-norm (fastconv.nn.ConvBNReLU2d)
# --------------------------------------------------------------------------------------------

def _activation_code(activation: str) -> int:
    code = ACTIVATIONS.get(activation)
    if code is None:
        raise ValueError(f"fastconv: unknown activation {activation!r}; expected one of "
                         f"{', '.join(repr(a) for a in ACTIVATIONS)}")
    return code


def activation_grad(grad: Tensor, y: Tensor, activation: str) -> Tensor:
    """grad through the activation whose output is y (torch's rule: relu passes where y > 0,
    relu6 where 0 < y < 6)."""
    if activation == "none":
        return grad
    keep = y > 0 if activation == "relu" else (y > 0) & (y < 6)
    return torch.where(keep, grad, grad.new_zeros(()))


@torch.library.custom_op("fastconv::conv2d_activation", mutates_args=())
def conv2d_activation(input: Tensor, weight: Tensor, bias: Optional[Tensor],
                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                      groups: int, algo: str, activation: str) -> Tensor:
    """y = act(conv(input, weight) + bias), the activation ('none', 'relu', 'relu6') applied
    in the kernel's output epilogue (no pass of its own). An eval-mode Conv-BN-activation
    runs as this op on weights with the batch-norm folded in."""
    return conv2d_forward(input, weight, bias, stride, padding, dilation, groups, algo,
                          activation=_activation_code(activation))


@conv2d_activation.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, algo, activation):
    _activation_code(activation)
    problem, _ = _forward_plan(input, weight, bias, stride, padding, dilation, groups, algo)
    return _empty(problem.output_shape, input, _output_channels_last(_channels_last(input), weight))


def _conv2d_activation_setup(ctx, inputs, output):
    *conv_inputs, activation = inputs
    conv2d_setup(ctx, conv_inputs, output, saved=(output,))
    ctx.activation = activation


def _conv2d_activation_backward(ctx, grad):
    y = ctx.saved_tensors[2]
    return (*conv2d_backward(ctx, activation_grad(grad, y, ctx.activation)), None)


conv2d_activation.register_autograd(_conv2d_activation_backward,
                                    setup_context=_conv2d_activation_setup)


def _bn_geometry(z: Tensor):
    N, K, OH, OW = z.shape
    return _bias_problem(N, K, OH, OW).kernel_geometry


def _check_bn_params(K: int, like: Tensor, **params: Optional[Tensor]) -> None:
    for name, t in params.items():
        if t is None:
            continue
        _check_operand(name, t, like, "input")
        if tuple(t.shape) != (K,):
            raise InvalidConvolution(f"fastconv: {name} must have shape ({K},), got "
                                     f"{tuple(t.shape)}")


def conv2d_bn_forward(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation,
                      groups, algo, eps, activation):
    """The body of the conv2d_bn op."""
    act = _activation_code(activation)
    K = weight.shape[0]
    _check_bn_params(K, input, bn_weight=bn_weight, bn_bias=bn_bias)
    if not input.is_cpu:  # the CUDA kernels reduce float32 (count, mean, M2) per block
        problem, kernels = _forward_plan(input, weight, bias, stride, padding, dilation, groups,
                                         algo)
        y, z, mean, invstd = kernels.conv_bn_train(problem, input, weight, bias, bn_weight,
                                                   bn_bias, eps, act)
        if _output_channels_last(_channels_last(input), weight):  # what the fake promises
            y, z = (t.contiguous(memory_format=torch.channels_last) for t in (y, z))
        return y, z, mean, invstd
    stats = torch.empty(2 * K, dtype=torch.float64)
    z = conv2d_forward(input, weight, bias, stride, padding, dilation, groups, algo,
                       stats=stats)
    count = z.numel() // K if K else 0
    mean64 = stats[:K] / max(count, 1)
    var64 = (stats[K:] / max(count, 1) - mean64 * mean64).clamp_(min=0)
    mean, invstd = mean64.to(z.dtype), (var64 + eps).rsqrt_().to(z.dtype)
    y = torch.empty_like(z)
    if y.numel():
        backend._C.bn_act_forward(
            DTYPE_CODES[z.dtype], _bn_geometry(z), NHWC if _channels_last(z) else NCHW,
            z.data_ptr(), mean.data_ptr(), invstd.data_ptr(),
            bn_weight.contiguous().data_ptr() if bn_weight is not None else 0,
            bn_bias.contiguous().data_ptr() if bn_bias is not None else 0, act, y.data_ptr(),
            torch.get_num_threads())
    return y, z, mean, invstd


@torch.library.custom_op("fastconv::conv2d_bn", mutates_args=())
def conv2d_bn(input: Tensor, weight: Tensor, bias: Optional[Tensor],
              bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int, algo: str,
              eps: float, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Conv2d -> BatchNorm2d with batch statistics -> activation, as training runs it.

    Returns (y, z, mean, invstd): the output, the convolution's output (saved for the
    backward), and the batch's per-channel mean and 1 / sqrt(biased variance + eps). The
    statistics are gathered by the convolution's output epilogue while it writes z (float64
    sums), so z is then read once more, by the normalise + activation pass. Only y is
    differentiable."""
    return conv2d_bn_forward(input, weight, bias, bn_weight, bn_bias, stride, padding,
                             dilation, groups, algo, eps, activation)


@conv2d_bn.register_fake
def _(input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, algo, eps,
      activation):
    _activation_code(activation)
    problem, _ = _forward_plan(input, weight, bias, stride, padding, dilation, groups, algo)
    _check_bn_params(problem.K, input, bn_weight=bn_weight, bn_bias=bn_bias)
    z = _empty(problem.output_shape, input, _output_channels_last(_channels_last(input), weight))
    return torch.empty_like(z), z, input.new_empty((problem.K,)), input.new_empty((problem.K,))


def conv2d_bn_setup(ctx, inputs, output):
    (input, weight, bias, bn_weight, bn_bias, stride, padding, dilation, groups, algo, eps,
     activation) = inputs
    y, z, mean, invstd = output
    # Without an activation the backward needs no y: z stands in for it, so that y may be
    # changed in place afterwards (an inplace SiLU after Conv -> BN), as torch's BN allows.
    conv2d_setup(ctx, (input, weight, bias, stride, padding, dilation, groups, algo), None,
                 saved=(y if activation != "none" else z, z, mean, invstd, bn_weight, bn_bias))
    ctx.activation = activation
    ctx.eps = eps
    ctx.affine = bn_weight is not None, bn_bias is not None
    ctx.mark_non_differentiable(z, mean, invstd)


def conv2d_bn_backward(ctx, grad_y, differentiable: bool = True):
    """The gradients of conv2d_bn from its saved context: through the ops, or (plain eager
    backward, fastconv.autograd.ConvBNFunction) through their bodies. When a graph of the
    backward is being built (double backward), by recomputation instead (see
    _conv2d_bn_backward_graph)."""
    if differentiable and torch.is_grad_enabled():
        return _conv2d_bn_backward_graph(ctx, grad_y)
    _, _, y, z, mean, invstd, bn_weight, _ = ctx.saved_tensors
    f = bn_act_backward if differentiable else bn_act_backward_forward
    grad_z, grad_gamma, grad_beta = f(grad_y, y, z, mean, invstd, bn_weight, ctx.activation)
    gx, gw, gb = conv2d_backward(ctx, grad_z, differentiable)[:3]
    return (gx, gw, gb, grad_gamma if ctx.affine[0] else None,
            grad_beta if ctx.affine[1] else None, None, None, None, None, None, None, None)


def _conv2d_bn_backward_graph(ctx, grad_y):
    """conv2d_bn's gradients as a differentiable graph, for double backward (a gradient
    penalty through a fused layer). The saved statistics are constants to autograd, though
    they depend on the input and weight through z, so the gradients are recomputed from the
    saved inputs through differentiable pieces: the conv2d op (whose backward is itself
    differentiable) and torch's batch norm and activation. The conv's bias only shifts z and
    its batch mean: the output does not depend on it, its gradient is zero."""
    input, weight, _, _, _, _, bn_weight, bn_bias = ctx.saved_tensors
    stride, padding, dilation, groups, algo = ctx.conv
    with torch.enable_grad():
        z = conv2d(input, weight, None, list(stride), list(padding), list(dilation), groups,
                   algo)
        y = _F.batch_norm(z, None, None, bn_weight, bn_bias, True, 0.0, ctx.eps)
        if ctx.activation == "relu":
            y = _F.relu(y)
        elif ctx.activation == "relu6":
            y = _F.relu6(y)
        wanted = {i: t for i, t in ((0, input), (1, weight), (3, bn_weight), (4, bn_bias))
                  if ctx.needs_input_grad[i]}
        grads = dict(zip(wanted, torch.autograd.grad(y, list(wanted.values()), grad_y,
                                                     create_graph=True))) if wanted else {}
    if ctx.bias_size is not None and ctx.needs_input_grad[2]:
        grads[2] = grad_y.new_zeros((ctx.bias_size,))
    return (*(grads.get(i) for i in range(5)), None, None, None, None, None, None, None)


def _conv2d_bn_backward(ctx, grad_y, _grad_z, _grad_mean, _grad_invstd):
    return conv2d_bn_backward(ctx, grad_y)


conv2d_bn.register_autograd(_conv2d_bn_backward, setup_context=conv2d_bn_setup)


def bn_act_backward_forward(grad_y: Tensor, y: Tensor, z: Tensor, mean: Tensor,
                            invstd: Tensor, bn_weight: Optional[Tensor], activation: str
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """The body of the bn_act_backward op."""
    act = _activation_code(activation)
    K = z.shape[1]
    if not z.is_cpu:
        from .cuda import launch
        grad_z, grad_gamma, grad_beta = launch.bn_backward(
            grad_y.contiguous(), y.contiguous(), z.contiguous(), mean, invstd, bn_weight, act)
        fmt = torch.channels_last if _channels_last(z) else torch.contiguous_format
        return grad_z.contiguous(memory_format=fmt), grad_gamma, grad_beta
    z = z.contiguous(memory_format=torch.channels_last) if _channels_last(z) else z.contiguous()
    layout = NHWC if _channels_last(z) else NCHW
    fmt = torch.channels_last if layout == NHWC else torch.contiguous_format
    grad_y, y = grad_y.contiguous(memory_format=fmt), y.contiguous(memory_format=fmt)
    grad_z = torch.empty_like(z)
    grad_gamma, grad_beta = z.new_zeros((K,)), z.new_zeros((K,))
    if z.numel():
        backend._C.bn_act_backward(
            DTYPE_CODES[z.dtype], _bn_geometry(z), layout, grad_y.data_ptr(), y.data_ptr(),
            z.data_ptr(), mean.contiguous().data_ptr(), invstd.contiguous().data_ptr(),
            bn_weight.contiguous().data_ptr() if bn_weight is not None else 0, act,
            grad_z.data_ptr(), grad_gamma.data_ptr(), grad_beta.data_ptr(),
            torch.get_num_threads())
    return grad_z, grad_gamma, grad_beta


@torch.library.custom_op("fastconv::bn_act_backward", mutates_args=())
def bn_act_backward(grad_y: Tensor, y: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                    bn_weight: Optional[Tensor], activation: str
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of conv2d_bn's normalise + activation: (grad_z, grad_gamma, grad_beta)
    from the saved statistics, in two passes (per-channel sums, then grad_z). Not itself
    differentiable: conv2d_bn has no double backward."""
    return bn_act_backward_forward(grad_y, y, z, mean, invstd, bn_weight, activation)


@bn_act_backward.register_fake
def _(grad_y, y, z, mean, invstd, bn_weight, activation):
    _activation_code(activation)
    K = z.shape[1]
    return torch.empty_like(z), z.new_empty((K,)), z.new_empty((K,))


# --------------------------------------------------------------------------------------------
# GEMM (tests and benchmarks only)
# --------------------------------------------------------------------------------------------

def gemm(a: Tensor, b: Tensor, c: Optional[Tensor] = None, *, accumulate: bool = False,
         scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, per_row: bool = True,
         relu: bool = False) -> Tensor:
    """C = A @ B (+ C if accumulate), then C = relu(C * scale + shift) per row or column, with
    fastconv's packed GEMM. A and B may be any strided 2-D views; C must have unit column
    stride. Not differentiable; for testing and benchmarking the kernel."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    M, K = a.shape
    N = b.shape[1]
    c = _gemm_output(a, b, c, (M, N), accumulate, scale, shift, M if per_row else N)
    _run_gemm(a, b, c, (M, N, K), (a.stride(0), a.stride(1)), (b.stride(0), b.stride(1)), (),
              accumulate, scale, shift, per_row, relu)
    return c


def gemm_column_segments(a: Tensor, b: Tensor, c: Optional[Tensor] = None, *,
                         accumulate: bool = False, scale: Optional[Tensor] = None,
                         shift: Optional[Tensor] = None, per_row: bool = True,
                         relu: bool = False) -> Tensor:
    """C[s] = A @ B[s] for every s as one GEMM whose N runs over S segments of L columns: a
    is M x K, b is S x K x L and c is S x M x L (any strides, c's last unit). The GEMM's
    column segments (csrc/gemm/gemm.h), with which one GEMM covers an NCHW batch's images;
    the epilogue as in gemm(), per row or per column of the whole S * L columns. For testing
    the kernel."""
    if a.dim() != 2 or b.dim() != 3 or a.shape[1] != b.shape[1]:
        raise ValueError(f"gemm_column_segments: shapes {tuple(a.shape)} and {tuple(b.shape)} "
                         "are not M x K and S x K x L")
    M, K = a.shape
    S, _, L = b.shape
    c = _gemm_output(a, b, c, (S, M, L), accumulate, scale, shift, M if per_row else S * L)
    _run_gemm(a, b, c, (M, S * L, K), (a.stride(0), a.stride(1)), (b.stride(1), b.stride(2)),
              (L, b.stride(0), c.stride(0)), accumulate, scale, shift, per_row, relu,
              ldc=c.stride(1))
    return c


def _gemm_output(a, b, c, shape, accumulate, scale, shift, channels) -> Tensor:
    """Checks the operands of a gemm call and returns C (new when c is None)."""
    if a.dtype not in DTYPE_CODES or not a.is_cpu:
        raise UnsupportedTensor(f"gemm: a must be a float32 or float64 CPU tensor, got "
                                f"{a.dtype} on {a.device}")
    _check_operand("b", b, a, "a")
    if c is None:
        if accumulate:
            raise ValueError("gemm: accumulate needs c")
        c = a.new_empty(shape)
    if (tuple(c.shape) != tuple(shape) or (shape[-1] > 1 and c.stride(-1) != 1)
            or c.dtype != a.dtype or not c.is_cpu):
        raise ValueError(f"gemm: c must be a {tuple(shape)} CPU tensor of a's dtype with unit "
                         "column stride")
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None and (v.dtype != a.dtype or v.dim() != 1 or v.numel() != channels
                              or v.stride(0) != 1 or not v.is_cpu):
            raise ValueError(f"gemm: {name} must be a contiguous CPU vector of {channels} "
                             "values")
    return c


def _run_gemm(a, b, c, shape, a_strides, b_strides, segments, accumulate=False, scale=None,
              shift=None, per_row=True, relu=False, ldc=None) -> None:
    backend._C.gemm(DTYPE_CODES[a.dtype], shape, a.data_ptr(), *a_strides, b.data_ptr(),
                    *b_strides, c.data_ptr(), c.stride(0) if ldc is None else ldc, accumulate,
                    scale.data_ptr() if scale is not None else 0,
                    shift.data_ptr() if shift is not None else 0, per_row, relu, segments,
                    torch.get_num_threads())


def gemm_segmented(a: Tensor, b: Tensor, first: int = 0, count: Optional[int] = None,
                   c: Optional[Tensor] = None, *, accumulate: bool = False) -> Tensor:
    """C = sum over k in [first, first + count) of A(:, k) B(k, :), where K runs over S
    segments: a is S x M x L and b is S x L x N (any strides), and k = s * L + l. The GEMM's
    K-segment packing (csrc/gemm/gemm.h), with which one GEMM sums over several images'
    pixels; for testing the kernel."""
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"gemm_segmented: shapes {tuple(a.shape)} and {tuple(b.shape)} are "
                         "not S x M x L and S x L x N")
    _check_operand("b", b, a, "a")
    S, M, L = a.shape
    N = b.shape[2]
    count = S * L - first if count is None else count
    if not (0 <= first and 0 <= count and first + count <= S * L) or L == 0:
        raise ValueError(f"gemm_segmented: range [{first}, {first + count}) outside "
                         f"{S} segments of {L}")
    if c is None:
        c = a.new_empty((M, N))
    _run_gemm(a, b, c, (M, N, count), (a.stride(1), a.stride(2)), (b.stride(1), b.stride(2)),
              (L, first, a.stride(0), b.stride(0)), accumulate)
    return c


def gemm_blocking(dtype: torch.dtype = torch.float32) -> dict:
    """The active ISA's GEMM register tile (mr x nr) and cache blocks (kc, mc, nc)."""
    return dict(backend._C.gemm_blocking(DTYPE_CODES[dtype]))
