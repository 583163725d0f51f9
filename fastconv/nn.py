"""``fastconv.nn.Conv2d``: a drop-in torch.nn.Conv2d running fastconv's kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .functional import conv2d


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d with fastconv kernels. Same constructor plus ``algo``; same parameters
    and state_dict keys, so state_dicts load into and from torch.nn.Conv2d unchanged.

    A true drop-in: it runs whatever torch.nn.Conv2d runs. With ``algo="auto"`` (the
    default), calls that no fastconv kernel covers (dtypes other than float32/float64, such as
    after ``model.half()`` or ``.to(torch.bfloat16)``; devices without fastconv kernels; an
    enabled autocast) run torch's own convolution, silently. A named ``algo`` that cannot run
    a call raises :class:`fastconv.errors.AlgorithmUnavailable` naming the reason.
    """

    def __init__(self, *args, algo: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.algo = dispatch.check_algo(algo)

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
        return new

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups,
                          algo=self.algo)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                      algo=self.algo)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", algo={self.algo!r}"
