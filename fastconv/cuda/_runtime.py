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
    one (a model on cuda:1 while cuda:0 is current would otherwise launch in the wrong one)."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if simulated():
        kernel[grid, block, 0, shared_bytes](*(array(a) if isinstance(a, torch.Tensor) else a
                                               for a in args))
        return
    with torch.cuda.device(device):
        arrays = [array(a) if isinstance(a, torch.Tensor) else a for a in args]
        kernel[grid, block, stream(device), shared_bytes](*arrays)
