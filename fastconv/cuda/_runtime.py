"""numba-cuda, imported lazily, and the bridge from torch tensors to kernel arguments.

On a GPU the kernels take CUDA tensors as they are (``__cuda_array_interface__``: no copies)
and launch on torch's current stream, so they order with torch's own work. Under numba's
simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported) they take CPU tensors,
whose numpy views the simulated threads read and write in place.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

EXTRA = "pip install 'fastconv[cuda]'"


@functools.lru_cache(maxsize=1)
def import_error() -> Optional[str]:
    """Why numba-cuda cannot be used here, or None when it can."""
    try:
        from numba import cuda  # noqa: F401
    except Exception as e:  # ImportError, or a numba build that cannot load its CUDA target
        return f"numba-cuda is not installed ({EXTRA}): {type(e).__name__}: {e}"
    if not simulated():
        # numba-cuda loads its typing registries at the first compile; load them now so that an
        # incompatible numpy is reported here, not as an AttributeError from inside a launch
        # (seen: numba-cuda 0.30.4 with numpy 2.5, which removed np.row_stack).
        try:
            from numba.cuda.np import arrayobj  # noqa: F401
        except Exception as e:
            import numpy
            return (f"numba-cuda cannot load its CUDA target with numpy {numpy.__version__}: "
                    f"{type(e).__name__}: {e}")
    return None


def simulated() -> bool:
    """Whether numba runs CUDA kernels in its simulator (on the CPU, with CPU tensors)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def cuda():
    """The numba.cuda module (ImportError naming the extra when it is missing)."""
    reason = import_error()
    if reason is not None:
        raise ImportError(f"fastconv.cuda: {reason}")
    from numba import config
    from numba import cuda as numba_cuda
    # Small grids (a finalize over 64 channels) are deliberate: no warning on every call.
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    return numba_cuda


def check_tensor(name: str, t: torch.Tensor) -> None:
    """A tensor the kernels can take: on the GPU a CUDA tensor; under the simulator a CPU one."""
    want = "cpu" if simulated() else "cuda"
    if t.device.type != want:
        where = "the simulator (NUMBA_ENABLE_CUDASIM=1)" if simulated() else "a GPU"
        raise ValueError(f"fastconv.cuda: {name} is on {t.device}; on {where} the kernels take "
                         f"{want} tensors")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"fastconv.cuda: {name} has dtype {t.dtype}; the kernels run float32 "
                        "and float64")


def array(t: torch.Tensor):
    """The kernel argument for tensor t (a numba device array view, or a numpy view)."""
    if simulated():
        return t.detach().numpy()
    # sync=False: the kernels run on torch's current stream, which already orders them after
    # the work that wrote t; numba's default would synchronise the host on t's stream.
    return cuda().as_cuda_array(t.detach(), sync=False)


_STREAMS: dict = {}


def stream(device: torch.device):
    """torch's current CUDA stream of ``device`` as a numba stream (0, the default, under the
    simulator); one numba wrapper per torch stream, kept for the next launch."""
    if simulated():
        return 0
    handle = torch.cuda.current_stream(device).cuda_stream
    wrapped = _STREAMS.get((device.index, handle))
    if wrapped is None:
        wrapped = _STREAMS[(device.index, handle)] = cuda().external_stream(handle)
    return wrapped


def launch(kernel, grid, block, shared_bytes: int, *args) -> None:
    """kernel[grid, block, stream, shared_bytes](*args) on the current stream of the tensors'
    device, torch tensors among ``args`` passed as arrays. The device is made current first:
    custom ops do not switch devices, and numba takes its context from the thread's current
    one (a model on cuda:1 while cuda:0 is current would otherwise launch in the wrong one).

    numba's own launch costs ~80 us of Python per call plus ~13 us per array and ~5 us per
    tuple element (H100, numba-cuda 0.30.4: 511 us for 5 arrays and a 20-int geometry), far
    more than the kernels here take. So the first launch of each argument signature goes
    through numba (which compiles and types it) and leaves a LaunchPlan; later ones flatten
    the arguments as numba would and call cuda.core's launch directly (FASTCONV_CUDA_LAUNCH=
    numba keeps numba's path throughout)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if simulated():
        kernel[grid, block, 0, shared_bytes](*(array(a) if isinstance(a, torch.Tensor) else a
                                               for a in args))
        return
    with torch.cuda.device(device):
        key = (kernel, tuple(map(_signature_key, args)))
        plan = _PLANS.get(key, _UNPLANNED)
        if plan is _UNPLANNED or plan is None:
            arrays = [array(a) if isinstance(a, torch.Tensor) else a for a in args]
            kernel[grid, block, stream(device), shared_bytes](*arrays)
            if plan is _UNPLANNED:
                _PLANS[key] = LaunchPlan.of(kernel, arrays)
            return
        plan.launch(device, stream(device), grid, block, shared_bytes, args)


def _signature_key(a):
    """What decides numba's type of a launch argument: a tensor's dtype, rank and whether it
    is contiguous (its array is then 'C'); a scalar's or tuple's Python types."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.dim(), a.is_contiguous())
    if isinstance(a, tuple):
        return (type(a),) + tuple(map(type, a))
    return type(a)


_UNPLANNED = object()
_PLANS: dict = {}   # (kernel, argument signature keys) -> LaunchPlan, or None: numba's launch


class _NoPlan(Exception):
    """An argument type the direct launch does not flatten: numba launches these."""


def _flattener(ty):
    """A function(value, params) that appends ``value``'s kernel parameters as numba's
    Kernel._prepare_args does for numba type ``ty`` (numba-cuda 0.30)."""
    import ctypes
    from numba.cuda import types
    if isinstance(ty, types.Array):
        if ty.layout != "C":
            raise _NoPlan(ty)
        return _tensor_parameters
    if ty == types.boolean:
        return lambda v, out: out.append(bool(v))
    if isinstance(ty, types.Integer):
        c_int = getattr(ctypes, f"c_{ty}")
        return lambda v, out: out.append(c_int(v))
    if ty in (types.float32, types.float64):
        c_float = ctypes.c_float if ty == types.float32 else ctypes.c_double
        return lambda v, out: out.append(c_float(v))
    if isinstance(ty, types.BaseTuple):
        parts = tuple(map(_flattener, ty))
        def flatten_tuple(v, out):
            for flatten, item in zip(parts, v):
                flatten(item, out)
        return flatten_tuple
    raise _NoPlan(ty)


def _tensor_parameters(t: torch.Tensor, out: list) -> None:
    """A contiguous tensor as numba passes a 'C' array: meminfo, parent, size, itemsize, data
    pointer, shape, then C-order strides in bytes (from the shape: a size-1 dimension's torch
    stride may be anything)."""
    shape = t.shape
    itemsize = t.element_size()
    strides = [itemsize] * len(shape)
    for i in range(len(shape) - 1, 0, -1):
        strides[i - 1] = strides[i] * shape[i]
    out += (0, 0, t.numel(), itemsize, t.data_ptr(), *shape, *strides)


class LaunchPlan:
    """One compiled kernel and how to flatten its arguments (see launch)."""

    def __init__(self, compiled, flatteners):
        self.compiled = compiled        # numba's _Kernel for this argument signature
        self.flatteners = flatteners
        self.functions = {}             # device index -> cuda.core Kernel

    @classmethod
    def of(cls, kernel, arrays) -> Optional["LaunchPlan"]:
        """The plan of the launch numba just made with ``arrays``, or None where numba picked
        an overload of other types (a conversion) or an argument is not flattened here."""
        if os.environ.get("FASTCONV_CUDA_LAUNCH", "") == "numba":
            return None
        types = tuple(kernel.typeof_pyval(a) for a in arrays)
        compiled = kernel.overloads.get(types)
        if compiled is None:
            return None
        try:
            return cls(compiled, tuple(map(_flattener, types)))
        except _NoPlan:
            return None

    def launch(self, device, stream_, grid, block, shared_bytes, args) -> None:
        from cuda.core import LaunchConfig, launch as core_launch
        function = self.functions.get(device.index)
        if function is None:   # numba's cubin loaded in this device's context
            function = self.functions[device.index] = (
                self.compiled._codelibrary.get_cufunc().kernel)
        params = []
        for flatten, a in zip(self.flatteners, args):
            flatten(a, params)
        config = LaunchConfig(grid=_dims(grid), block=_dims(block), shmem_size=shared_bytes)
        core_launch(stream_, config, function, *params)


def _dims(d):
    """A grid or block size as cuda.core takes it: Python ints (ours may be numpy's)."""
    return tuple(map(int, d)) if isinstance(d, tuple) else int(d)
