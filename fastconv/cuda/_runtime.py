"""numba-cuda, imported lazily, and the bridge from torch tensors to kernel arguments.

On a GPU the kernels take CUDA tensors as they are (``__cuda_array_interface__``: no copies)
and launch on torch's current stream, so they order with torch's own work. Under numba's
simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is imported) they take CPU tensors,
whose numpy views the simulated threads read and write in place.
"""
from __future__ import annotations

import functools
import os
import struct
import threading
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
    device, torch tensors among ``args`` passed as arrays.

    numba's own launch costs ~80 us of Python per call plus ~13 us per array and ~5 us per
    tuple element (H100, numba-cuda 0.30.4: 511 us for 5 arrays and a 20-int geometry), far
    more than most kernels here take. So only the first launch of each argument signature goes
    through numba (which compiles and types it) and leaves a LaunchPlan; later ones pack the
    parameters as numba would and call the driver's cuLaunchKernel (FASTCONV_CUDA_LAUNCH=numba
    keeps numba's path throughout)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if simulated():
        kernel[grid, block, 0, shared_bytes](*(array(a) if isinstance(a, torch.Tensor) else a
                                               for a in args))
        return
    key = (kernel, tuple(map(_signature_key, args)))
    plan = _PLANS.get(key, _UNPLANNED)
    if plan is _UNPLANNED or plan is None:
        # The device is made current first: custom ops do not switch devices, and numba takes
        # its context from the thread's current one (a model on cuda:1 while cuda:0 is
        # current would otherwise launch in the wrong one).
        with torch.cuda.device(device):
            arrays = [array(a) if isinstance(a, torch.Tensor) else a for a in args]
            kernel[grid, block, stream(device), shared_bytes](*arrays)
            if plan is _UNPLANNED:
                _PLANS[key] = LaunchPlan.of(kernel, arrays)
        return
    plan.launch(device.index, grid, block, shared_bytes, args)


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
    """An argument type the direct launch does not pack: numba launches these."""


def _append(v, out: list) -> None:
    out.append(v)


def _extend(v, out: list) -> None:
    out.extend(v)


_INTEGER_CODES = {8: "b", 16: "h", 32: "i", 64: "q"}


def _packer(ty) -> tuple:
    """(struct format, flatten) of the kernel parameters of numba type ``ty``, as numba's
    Kernel._prepare_args passes them (numba-cuda 0.30): an array as meminfo, parent, size,
    itemsize, data pointer, shape and strides (intp each); a scalar as its C type; a tuple
    element by element. ``flatten(value, out)`` appends the values; each parameter fills an
    8-byte slot of its own (cuLaunchKernel reads each through its own pointer, taking the
    size the kernel's image gives)."""
    from numba.cuda import types
    if isinstance(ty, types.Array):
        if ty.layout != "C":
            raise _NoPlan(ty)
        return "q" * (5 + 2 * ty.ndim), _tensor_parameters
    if ty == types.boolean:
        return "?7x", _append
    if isinstance(ty, types.Integer):
        code = _INTEGER_CODES[ty.bitwidth]
        code = code if ty.signed else code.upper()
        return (code if ty.bitwidth == 64 else f"{code}{8 - ty.bitwidth // 8}x"), _append
    if ty == types.float32:
        return "f4x", _append
    if ty == types.float64:
        return "d", _append
    if isinstance(ty, types.BaseTuple):
        parts = tuple(map(_packer, ty))
        fmt = "".join(f for f, _ in parts)
        if all(flatten is _append for _, flatten in parts):
            return fmt, _extend
        def flatten_tuple(v, out):
            for (_, flatten), item in zip(parts, v):
                flatten(item, out)
        return fmt, flatten_tuple
    raise _NoPlan(ty)


@functools.lru_cache(maxsize=1024)
def _c_strides(shape: torch.Size, itemsize: int) -> tuple:
    """C-order strides in bytes of ``shape`` (from the shape: a size-1 dimension's torch
    stride may be anything)."""
    strides = [itemsize] * len(shape)
    for i in range(len(shape) - 1, 0, -1):
        strides[i - 1] = strides[i] * shape[i]
    return tuple(strides)


def _tensor_parameters(t: torch.Tensor, out: list) -> None:
    """A contiguous tensor as numba passes a 'C' array."""
    shape = t.shape
    itemsize = t.element_size()
    out += (0, 0, t.numel(), itemsize, t.data_ptr(), *shape, *_c_strides(shape, itemsize))


def _dim3(d) -> tuple:
    """A grid or block size as three Python ints (ours may be numpy's)."""
    if not isinstance(d, tuple):
        return int(d), 1, 1
    return tuple(map(int, d)) + (1,) * (3 - len(d))


class LaunchPlan:
    """One compiled kernel and how to pack its parameters for cuLaunchKernel (see launch):
    into one buffer of 8-byte slots, whose slot addresses are the void** the driver takes.
    The driver copies the parameters during the call, so the buffer is reused, under a lock
    for callers on several threads."""

    def __init__(self, compiled, packers):
        import numpy as np
        self.compiled = compiled        # numba's _Kernel for this argument signature
        self.flatteners = tuple(flatten for _, flatten in packers)
        self.layout = struct.Struct("<" + "".join(fmt for fmt, _ in packers))
        slots = self.layout.size // 8
        self._values = np.zeros(max(slots, 1), np.uint64)
        self._addresses = (self._values.ctypes.data
                           + 8 * np.arange(len(self._values), dtype=np.uint64))
        self._lock = threading.Lock()
        self.handles = {}               # device index -> the kernel's CUkernel

    @classmethod
    def of(cls, kernel, arrays) -> Optional["LaunchPlan"]:
        """The plan of the launch numba just made with ``arrays``, or None where numba picked
        an overload of other types (a conversion) or an argument is not packed here."""
        if os.environ.get("FASTCONV_CUDA_LAUNCH", "") == "numba":
            return None
        types = tuple(kernel.typeof_pyval(a) for a in arrays)
        compiled = kernel.overloads.get(types)
        if compiled is None:
            return None
        try:
            return cls(compiled, tuple(map(_packer, types)))
        except _NoPlan:
            return None

    def pack(self, args) -> list:
        """The kernel's parameter values for ``args``, in order."""
        params = []
        for flatten, a in zip(self.flatteners, args):
            flatten(a, params)
        return params

    def launch(self, device_index: int, grid, block, shared_bytes: int, args) -> None:
        from cuda.bindings import driver
        handle = self.handles.get(device_index)
        if handle is None:
            with torch.cuda.device(device_index):   # numba's cubin, loaded in that context
                handle = self.handles[device_index] = (
                    self.compiled._codelibrary.get_cufunc().handle)
        params = self.pack(args)
        launch_args = (handle, *_dim3(grid), *_dim3(block), int(shared_bytes),
                       torch._C._cuda_getCurrentRawStream(device_index), self._addresses, 0)
        with self._lock:
            self.layout.pack_into(self._values, 0, *params)
            err, = driver.cuLaunchKernel(*launch_args)
            if err == driver.CUresult.CUDA_ERROR_INVALID_CONTEXT:
                # A thread whose CUDA context was never made current (torch's current device
                # is then 0 without a context): make the device's primary context current.
                _make_current(device_index)
                err, = driver.cuLaunchKernel(*launch_args)
        if err != driver.CUresult.CUDA_SUCCESS:
            name = getattr(self.compiled.py_func, "__name__", "a kernel")
            raise RuntimeError(f"fastconv.cuda: cuLaunchKernel failed for {name}: {err.name}")


def _make_current(device_index: int) -> None:
    """The device's primary context (torch's and numba's) current on this thread; retained,
    not released: it lives as long as the process, as torch keeps it."""
    from cuda.bindings import driver
    err, context = driver.cuDevicePrimaryCtxRetain(driver.cuDeviceGet(device_index)[1])
    if err == driver.CUresult.CUDA_SUCCESS:
        driver.cuCtxSetCurrent(context)
