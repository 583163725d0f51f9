"""``fastconv.nn.Conv2d``: a drop-in torch.nn.Conv2d running fastconv's kernels."""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch, ops
from .functional import (_has_fastconv_kernels, conv2d, conv2d_activation, conv2d_bn,
                         fold_batch_norm)
from .weight_cache import PackedWeight

#: Activation modules ConvBNReLU2d can absorb, by fastconv's activation name.
ACTIVATION_MODULES = {"relu": torch.nn.ReLU, "relu6": torch.nn.ReLU6}
_ACTIVATION_NAMES = {t: n for n, t in ACTIVATION_MODULES.items()}
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hooks_of(module: torch.nn.Module) -> list:
    """The names of module's non-empty hook tables (a fused forward would not run them)."""
    return [t for t in _HOOK_TABLES if getattr(module, t, None)]


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d with fastconv kernels. Same constructor plus ``algo``; same parameters
    and state_dict keys, so state_dicts load into and from torch.nn.Conv2d unchanged.

    A true drop-in: it runs whatever torch.nn.Conv2d runs. With ``algo="auto"`` (the
    default), calls that no fastconv kernel covers (dtypes other than float32/float64, such as
    after ``model.half()`` or ``.to(torch.bfloat16)``; devices without fastconv kernels; an
    enabled autocast) run torch's own convolution, silently. A named ``algo`` that cannot run
    a call raises :class:`fastconv.errors.AlgorithmUnavailable` naming the reason.

    Calls that need no gradient (``torch.no_grad()``, ``torch.inference_mode()``, frozen
    weights) keep the packed or transformed weights of their algorithm and reuse them until
    the weight changes; :meth:`release_weight_cache` or ``fastconv.release_workspaces()``
    frees them. Training never uses them. See :mod:`fastconv.weight_cache`.
    """

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = dispatch.check_algo(algo)
        self._packed: Optional[PackedWeight] = None

    @classmethod
    def from_torch(cls, module: torch.nn.Conv2d, algo: str = "auto") -> "Conv2d":
        """A fastconv Conv2d sharing ``module``'s parameters, buffers and hooks (no copies)."""
        if not isinstance(module, torch.nn.Conv2d):
            raise TypeError(f"expected a torch.nn.Conv2d, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__ = module.__dict__.copy()
        for table in ("_parameters", "_buffers", "_modules"):
            setattr(new, table, getattr(module, table).copy())
        new.algo = dispatch.check_algo(algo)
        new._packed = None
        return new

    def _weight_arg(self, weight: Tensor):
        """weight, or its PackedWeight when it is this module's own parameter (not one a
        parametrization computes afresh per call): calls without gradients then reuse its
        packings (fastconv.weight_cache). Never while torch.compile traces (the graph takes
        the tensor) or while the weight needs a gradient (training packs afresh)."""
        if (weight is not self._parameters.get("weight")
                or not isinstance(weight, torch.nn.Parameter)  # torch.func.functional_call
                or torch.compiler.is_compiling()
                or (weight.requires_grad and torch.is_grad_enabled())):
            return weight
        packed = self.__dict__.get("_packed")
        if packed is None or packed.weight is not weight:
            packed = self._packed = PackedWeight(weight)
        return packed

    def release_weight_cache(self) -> None:
        """Drop the packed weights this module keeps for inference (made again by the next
        call that needs them). Needed only after writing through ``weight.data``, which torch
        does not track; every other change of the weight is noticed (fastconv.weight_cache)."""
        packed = self.__dict__.get("_packed")
        if packed is not None:
            packed.release()
        self._packed = None

    def _load_from_state_dict(self, *args, **kwargs):
        # The copy bumps the weight's version, which the cache would notice anyway; dropping
        # the packings here frees their memory at once.
        self.release_weight_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        weight = self._weight_arg(weight)
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups,
                          algo=self.algo)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                      algo=self.algo)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algo={self.algo!r}"


def fusable_conv_bn(conv: torch.nn.Module, bn: torch.nn.Module) -> Optional[str]:
    """None if ``conv`` -> ``bn`` can run as one ConvBNReLU2d computing the same thing, else
    why not. Only torch's and fastconv's own Conv2d classes (a subclass, parametrized ones
    included, may compute its weight or output otherwise), torch.nn.BatchNorm2d itself (not
    SyncBatchNorm), matching channels, and no hooks on either (pruning and the older
    weight_norm recompute the weight in a forward pre-hook)."""
    if type(conv) not in (torch.nn.Conv2d, Conv2d):
        return (f"{type(conv).__name__} is not torch.nn.Conv2d or fastconv.nn.Conv2d (a "
                "subclass may compute differently)")
    if type(bn) is not torch.nn.BatchNorm2d:
        return f"{type(bn).__name__} is not torch.nn.BatchNorm2d"
    if bn.num_features != conv.out_channels:
        return (f"BatchNorm2d has {bn.num_features} features but the Conv2d has "
                f"{conv.out_channels} output channels")
    for name, m in (("Conv2d", conv), ("BatchNorm2d", bn)):
        if _hooks_of(m):
            return (f"the {name} has hooks ({', '.join(_hooks_of(m))}), which a fused "
                    "forward would not run")
    return None


class ConvBNReLU2d(torch.nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation in one fused operation, behaving exactly like
    ``torch.nn.Sequential(Conv2d(...), BatchNorm2d(...), ReLU())`` in train and in eval.

    Takes Conv2d's arguments, BatchNorm2d's (``eps``, ``momentum``, ``affine``,
    ``track_running_stats``) and ``activation``: 'relu' (default), 'relu6' or None (Conv ->
    BN alone). Its children are that sequence's modules (a fastconv.nn.Conv2d, a
    torch.nn.BatchNorm2d and the activation module), so the parameters, the buffers
    (running_mean, running_var, num_batches_tracked under "1.") and the state_dict keys are
    those of the torch sequence, and state_dicts load either way.

    * Training (and eval without running statistics): one convolution pass that also
      gathers each channel's batch sum and sum of squares, then one normalise + activation
      pass (fastconv.ops.conv2d_bn); running statistics are updated as BatchNorm2d does
      (momentum, momentum=None for a cumulative average, num_batches_tracked).
    * Eval: the running statistics folded into the convolution's weights and bias, the
      activation applied in its output epilogue. Calls that need no gradient keep the folded,
      packed weights until a parameter or statistic changes (fastconv.weight_cache).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, activation: Optional[str] = "relu", *,
                 algo: str = "auto", device=None, dtype=None):
        activation = None if activation == "none" else activation
        factory = {"device": device, "dtype": dtype}
        conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      bias, padding_mode, algo=algo, **factory)
        bn = torch.nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats,
                                  **factory)
        modules = [conv, bn]
        if activation is not None:
            modules.append(_activation_module(activation))
        super().__init__(*modules)
        self._folded = None

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d,
                     activation=None, algo: Optional[str] = None) -> "ConvBNReLU2d":
        """One fused module from existing ones, sharing their parameters and buffers (no
        copies). ``activation``: None, 'relu', 'relu6' or a torch.nn.ReLU / ReLU6 module. A
        torch.nn.Conv2d becomes a fastconv.nn.Conv2d (``algo``, default 'auto'); a fastconv
        one keeps its algo unless ``algo`` is given."""
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"expected a Conv2d, got {type(conv).__name__}")
        if type(bn) is not torch.nn.BatchNorm2d:
            raise TypeError(f"expected a torch.nn.BatchNorm2d, got {type(bn).__name__}")
        why = fusable_conv_bn(conv, bn)
        if why is not None:
            raise (TypeError if type(conv) not in (torch.nn.Conv2d, Conv2d) else
                   ValueError)(f"cannot fuse: {why}")
        if not isinstance(conv, Conv2d):
            conv = Conv2d.from_torch(conv, algo or "auto")
        elif algo is not None:
            conv = Conv2d.from_torch(conv, algo)
        if isinstance(activation, torch.nn.Module):
            name = next((n for n, t in ACTIVATION_MODULES.items() if type(activation) is t), None)
            if name is None:
                raise TypeError(f"cannot fuse activation {type(activation).__name__}; expected "
                                "ReLU or ReLU6")
            activation = name
        activation = None if activation == "none" else activation
        new = cls.__new__(cls)
        modules = [conv, bn] + ([_activation_module(activation)] if activation else [])
        torch.nn.Sequential.__init__(new, *modules)
        new._folded = None
        return new

    def __getitem__(self, idx):
        # Sequential slices by calling the class with an OrderedDict, which this constructor
        # does not take: a slice is a plain Sequential of those children.
        if isinstance(idx, slice):
            return torch.nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    @property
    def activation(self) -> Optional[str]:
        """'relu', 'relu6' or 'none' (from the third child, so swapping it is noticed); None
        when the children are no longer a fusable Conv2d -> BatchNorm2d (-> ReLU / ReLU6)."""
        mods = self._modules
        act = mods.get("2")
        if act is None:
            return "none" if len(mods) == 2 else None
        return _ACTIVATION_NAMES.get(type(act)) if len(mods) == 3 else None

    def _fused(self) -> bool:
        """Whether the children are still what the fused forward computes: a fastconv
        Conv2d, a BatchNorm2d and ReLU / ReLU6 or nothing, none with hooks. Swapped or
        added children (SyncBatchNorm.convert_sync_batchnorm, append) run one after
        another, as nn.Sequential runs them."""
        mods = self._modules  # (every call: plain checks, 0.3 us; fusable_conv_bn's 1.5)
        conv, bn = mods.get("0"), mods.get("1")
        if type(conv) is not Conv2d or type(bn) is not torch.nn.BatchNorm2d:
            return False
        if len(mods) != 2 and not (len(mods) == 3 and type(mods.get("2")) in _ACTIVATION_NAMES):
            return False
        for m in mods.values():
            if (m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                    or m._backward_hooks):
                return False
        return bn.num_features == conv.out_channels

    def _batch_norm_args(self):
        """BatchNorm2d.forward's bookkeeping: (training with batch statistics, running
        statistics to use or update, the update's momentum, whether num_batches_tracked
        counts this call: done by the caller once the call has succeeded, so that an input
        the convolution refuses leaves it as torch's sequence would)."""
        bn = self._modules["1"]
        factor = 0.0 if bn.momentum is None else bn.momentum
        counts = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
        if counts:
            factor = (1.0 / (float(bn.num_batches_tracked) + 1) if bn.momentum is None
                      else bn.momentum)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_running = not bn.training or bn.track_running_stats
        return (batch_stats, bn.running_mean if use_running else None,
                bn.running_var if use_running else None, factor, counts)

    def _folded_weights(self):
        """The folded (weight, bias) as a PackedWeight and a tensor, kept while every
        tensor they come from is unchanged (eval calls without gradients only)."""
        conv, bn = self._modules["0"], self._modules["1"]
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        try:
            stamp = tuple((id(t), t._version) for t in sources if t is not None) + (bn.eps,)
        except RuntimeError:  # inference tensors have no version counter: fold per call
            stamp = None
        if stamp is not None and self._folded is not None and self._folded[0] == stamp:
            return self._folded[1], self._folded[2]
        self.release_weight_cache()
        w, b = fold_batch_norm(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                               bn.weight, bn.bias, bn.eps)
        packed = PackedWeight(w)
        if stamp is not None:
            self._folded = (stamp, packed, b)
        return packed, b

    def release_weight_cache(self) -> None:
        """Drop the folded, packed weights kept for inference (remade when needed)."""
        folded = self.__dict__.get("_folded")
        if folded is not None:
            folded[1].release()
        self._folded = None
        self[0].release_weight_cache()

    def _load_from_state_dict(self, *args, **kwargs):
        self.release_weight_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if not self._fused():
            return torch.nn.Sequential.forward(self, input)
        conv, bn = self._modules["0"], self._modules["1"]
        batch_stats, running_mean, running_var, momentum, counts = self._batch_norm_args()
        if conv.padding_mode != "zeros":
            input = F.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        args = (conv.stride, padding, conv.dilation, conv.groups)
        no_grad = not torch.is_grad_enabled() or not any(
            p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias)
            if p is not None)
        # (folding needs fastconv kernels: other dtypes run torch's three modules' functions
        # through conv2d_bn, not a fold rounded to bfloat16)
        if (not batch_stats and no_grad and not torch.compiler.is_compiling()
                and input.dim() == 4 and _has_fastconv_kernels(input)):
            packed, b = self._folded_weights()
            return conv2d_activation(input, packed, b, *args, algo=conv.algo,
                                     activation=self.activation)
        y = conv2d_bn(input, conv.weight, conv.bias, running_mean, running_var, bn.weight,
                      bn.bias, batch_stats, momentum, bn.eps, self.activation, *args,
                      algo=conv.algo)
        if counts:
            bn.num_batches_tracked.add_(1)
        return y


def _activation_module(activation: str) -> torch.nn.Module:
    ops._activation_code(activation)
    if activation not in ACTIVATION_MODULES:
        raise ValueError(f"fastconv: activation must be 'relu', 'relu6' or None, got "
                         f"{activation!r}")
    return ACTIVATION_MODULES[activation]()
