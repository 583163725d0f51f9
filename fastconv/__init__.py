"""fastconv: hand-tuned 2-D convolution kernels for PyTorch on the CPU.

Layers, from the bottom: ``fastconv._C`` (C++ kernels, one build per ISA), ``fastconv.ops``
(torch custom ops with fake and autograd registrations), ``fastconv.functional.conv2d``
(torch.nn.functional.conv2d's semantics), ``fastconv.nn.Conv2d`` and ``fastconv.convert``.
"""
from . import backend, dispatch, nn, ops, reference
from .backend import available_isas, get_isa, release_workspaces, set_isa, use_isa
from .convert import convert
from .dispatch import Algo
from .functional import conv2d

__version__ = "0.1.0"
__all__ = ["conv2d", "convert", "nn", "ops", "reference", "Algo", "available_isas", "get_isa",
           "set_isa", "use_isa", "release_workspaces", "backend", "dispatch"]
