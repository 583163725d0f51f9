"""``fastconv.nn.Conv2d``: a drop-in torch.nn.Conv2d running fastconv's kernels."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .functional import conv2d
from .weight_cache import PackedWeight


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
