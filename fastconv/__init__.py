"""fastconv: hand-tuned 2-D convolution kernels for PyTorch on the CPU.

Layers, from the bottom: ``fastconv._C`` (C++ kernels, one build per ISA, and their kernel
table), ``fastconv.registry`` (every algorithm declared once: devices, dtypes, eligibility,
workspace, kernels), ``fastconv.ops`` (torch custom ops with fake and autograd registrations,
dispatching through the registry), ``fastconv.functional.conv2d``
(torch.nn.functional.conv2d's semantics, and the fused conv2d_bn), ``fastconv.nn.Conv2d``
and ``ConvBNReLU2d``, ``fastconv.convert`` and ``fastconv.fuse``.
"""
__version__ = "0.1.0"

from . import autotune, backend, dispatch, errors, nn, ops, reference, registry
from .autotune import AutotuneWarning, autotuning
from .backend import available_isas, get_isa, set_isa, use_isa
from .convert import convert
from .fuse import FuseWarning, fuse
from .dispatch import Algo, explain
from .errors import AlgorithmUnavailable, InvalidConvolution, UnsupportedTensor
from .functional import conv2d
from .weight_cache import PackedWeight, cache_info, prepack, release_workspaces, set_cache_limit
from .problem import Conv2dProblem, conv2d_problem

__all__ = ["conv2d", "convert", "fuse", "FuseWarning", "explain", "nn", "ops", "reference", "registry", "Algo",
           "Conv2dProblem", "conv2d_problem", "AlgorithmUnavailable", "InvalidConvolution",
           "UnsupportedTensor", "available_isas", "get_isa", "set_isa", "use_isa",
           "release_workspaces", "backend", "dispatch", "errors", "prepack", "PackedWeight",
           "cache_info", "set_cache_limit", "autotune", "autotuning", "AutotuneWarning"]
