"""The compiled CPU kernels: the choice of instruction set, and the C++ kernel table seen from
Python.

Every kernel is compiled for AVX-512, AVX2+FMA and the baseline ISA ("scalar") on x86-64 (only
"scalar" elsewhere); the fastest one this CPU supports is used unless ``FASTCONV_ISA`` (read at
import) or :func:`set_isa` says otherwise.
"""
from __future__ import annotations

import contextlib
import enum
import os
from typing import NamedTuple

import torch  # must be loaded first: _C then reuses torch's libgomp, see below

# Importing torch has loaded its bundled libgomp (soname libgomp.so.1). _C needs libgomp.so.1
# too, and the dynamic loader resolves that to the copy already loaded, so the process has one
# OpenMP runtime and one thread pool: a second pool would spin against torch's on few cores.
from . import _C

ISAS = ("avx512", "avx2", "scalar")
#: dtype codes of the C++ entry points (csrc/bindings.cpp: DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
NCHW, NHWC = 0, 1  # layout codes (csrc/common/problem.h: Layout)
#: Activations fused into a forward's output epilogue (csrc/common/epilogue.h: Activation).
ACT_NONE = 0
ACTIVATIONS = {"none": ACT_NONE, "relu": 1, "relu6": 2}


class Pass(enum.IntEnum):
    """The three passes of a convolution (csrc/common/problem.h: Pass)."""
    FORWARD = 0
    GRAD_INPUT = 1
    GRAD_WEIGHT = 2


def built_isas() -> list[str]:
    """ISAs compiled into this build, fastest first (only 'scalar' off x86-64)."""
    return list(_C.built_isas())


def available_isas() -> list[str]:
    """ISAs this CPU can run, fastest first."""
    return list(_C.available_isas())


def get_isa() -> str:
    """The ISA whose kernels run now."""
    return _C.get_isa()


def set_isa(isa: str) -> None:
    """Run the kernels of ``isa`` ('avx512', 'avx2' or 'scalar') from now on, in all threads."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}: expected one of {', '.join(ISAS)}")
    if isa not in built_isas():
        raise ValueError(f"ISA {isa!r} is not in this build (portable build: "
                         f"{', '.join(built_isas())})")
    _C.set_isa(isa)


@contextlib.contextmanager
def use_isa(isa: str):
    """Context manager: run the kernels of ``isa`` inside the block (not thread-safe)."""
    previous = get_isa()
    set_isa(isa)
    try:
        yield
    finally:
        set_isa(previous)


def release_workspaces() -> None:
    """Free the calling thread's scratch buffers. They are kept between calls on purpose:
    reusing warm pages avoids ~1 us of page faults per 4 KiB on every call."""
    _C.release_workspaces()


def workspace_high_water() -> dict:
    """Per scratch buffer of the calling thread (named by what it holds, see
    csrc/common/workspace.h): the largest size in bytes asked since the last release.
    Their sum is the most scratch memory the calls since then needed at once."""
    return dict(_C.workspace_high_water())


#: Bumped whenever the tuning values change: the weight cache keys its packings with it (a
#: tuning value may change a packed layout).
tuning_generation = 0


@contextlib.contextmanager
def tuning(**values: int):
    """Temporarily overrides the measured path thresholds and workspace budgets of
    csrc/common/tuning.h (for tests: small values drive small problems down every code path).
    ``fastconv.backend.tuning()`` with no arguments yields the current values."""
    previous = dict(_C.get_tuning())
    unknown = set(values) - set(previous)
    if unknown:
        raise ValueError(f"unknown tuning fields {sorted(unknown)}; known: {sorted(previous)}")
    global tuning_generation
    try:
        for name, value in values.items():
            _C.set_tuning(name, int(value))
        tuning_generation += 1  # after the values: a packing keyed by it used them
        yield dict(_C.get_tuning())
    finally:
        for name, value in previous.items():
            _C.set_tuning(name, value)
        tuning_generation += 1


class WeightPacking(NamedTuple):
    """What a forward makes of its weights (csrc/isa/kernel_table.h: WeightPacking)."""
    elements: int  # values of the weight's dtype; 0 when it packs nothing
    variant: int   # which packed layout (im2col: 0 GEMM operand B, 1 operand A)


_NO_PACKING = WeightPacking(0, 0)


class CppKernels:
    """The CPU kernels of one entry of the C++ kernel table (csrc/isa/table.cpp), called on
    dense CPU tensors. Found by name, so the registry and the table need no shared numbering."""

    def __init__(self, table_name: str):
        names = list(_C.algorithm_names())
        if table_name not in names:
            raise ImportError(f"fastconv: the registry declares CPU kernels {table_name!r}, but "
                              f"csrc/isa/table.cpp lists only {names}")
        self.index = names.index(table_name)

    def has(self, pass_: Pass, dtype: torch.dtype) -> bool:
        return dtype in DTYPE_CODES and _C.has_kernel(self.index, DTYPE_CODES[dtype], int(pass_))

    def workspace_bytes(self, problem, pass_: Pass, dtype: torch.dtype) -> int:
        return _C.workspace_bytes(self.index, DTYPE_CODES[dtype], problem.kernel_geometry,
                                  int(pass_))

    # Weight prepacking (fastconv.weight_cache): what the forward makes of the weights for a
    # call, and making it ahead of time.
    def weight_packing(self, problem, dtype: torch.dtype, x_layout: int,
                       y_layout: int) -> "WeightPacking":
        """The forward's packed weights for this call: how many elements (0: it packs
        nothing) and which layout variant. Depends on the ISA and the tuning values too."""
        p = _C.weight_packing(self.index, DTYPE_CODES[dtype], problem.kernel_geometry,
                              x_layout, y_layout)
        return WeightPacking(p["elements"], p["variant"])

    def pack_weights(self, problem, x_layout: int, y_layout: int, w, out) -> None:
        """Write the forward's packed weights for this call into ``out`` (a dense tensor of
        weight_packing's elements and w's dtype)."""
        _C.pack_weights(self.index, DTYPE_CODES[w.dtype], problem.kernel_geometry, x_layout,
                        y_layout, w.data_ptr(), out.data_ptr(), torch.get_num_threads())

    # The three passes. Tensors are dense, in the layout given by each *_layout code.
    def forward(self, problem, x, x_layout, w, b, y, y_layout, packed=None,
                activation: int = ACT_NONE, stats=None) -> None:
        """``packed``: an object with ``tensor`` and ``packing`` made by pack_weights for
        this call's geometry and layouts (checked), or None to pack w on the fly.
        ``activation``: an ACTIVATIONS code applied in the output's epilogue. ``stats``: None,
        or a float64 tensor of 2 K values that receives each channel's sum of y, then its
        sum of y^2, gathered in the same pass (not with an activation)."""
        pk_ptr, pk = (0, _NO_PACKING) if packed is None else (packed.tensor.data_ptr(),
                                                                packed.packing)
        _C.forward(self.index, DTYPE_CODES[x.dtype], problem.kernel_geometry, x.data_ptr(),
                   x_layout, w.data_ptr(), pk_ptr, pk.elements, pk.variant,
                   b.data_ptr() if b is not None else 0, y.data_ptr(), y_layout, activation,
                   stats.data_ptr() if stats is not None else 0, torch.get_num_threads())

    def grad_input(self, problem, gy, gy_layout, w, gx, gx_layout) -> None:
        _C.grad_input(self.index, DTYPE_CODES[gy.dtype], problem.kernel_geometry,
                      gy.data_ptr(), gy_layout, w.data_ptr(), gx.data_ptr(), gx_layout,
                      torch.get_num_threads())

    def grad_weight(self, problem, gy, gy_layout, x, x_layout, gw, gb=None) -> None:
        """gw = the weight gradient; with ``gb`` (K values) also the bias gradient, from
        grad-weight's own sweep over gy where the algorithm has one."""
        _C.grad_weight(self.index, DTYPE_CODES[gy.dtype], problem.kernel_geometry,
                       gy.data_ptr(), gy_layout, x.data_ptr(), x_layout, gw.data_ptr(),
                       gb.data_ptr() if gb is not None else 0, torch.get_num_threads())


class NaiveKernels:
    """The ``naive`` strategy's kernels (fastconv/_naive.pyx, Cython): the convolution's
    definition as plain loops, the baseline of the benchmarks. Same calls as CppKernels; it
    packs no weights and needs no workspace."""

    def __init__(self):
        from . import _naive
        self._naive = _naive

    def has(self, pass_: Pass, dtype: torch.dtype) -> bool:
        return dtype in DTYPE_CODES

    def workspace_bytes(self, problem, pass_: Pass, dtype: torch.dtype) -> int:
        return 0

    def forward(self, problem, x, x_layout, w, b, y, y_layout, packed=None,
                activation: int = ACT_NONE, stats=None) -> None:
        if packed is not None:
            raise ValueError("fastconv: 'naive' packs no weights; got a prepacked weight")
        if activation not in ACTIVATIONS.values():
            raise ValueError(f"fastconv: unknown activation code {activation}")
        if activation != ACT_NONE and stats is not None:
            raise ValueError("fastconv: a forward gathers statistics or applies an "
                             "activation, not both")
        self._naive.forward(problem, x.dtype == torch.float64, x.data_ptr(), x_layout,
                            w.data_ptr(), b.data_ptr() if b is not None else 0,
                            y.data_ptr(), y_layout, activation,
                            stats.data_ptr() if stats is not None else 0,
                            torch.get_num_threads())

    def grad_input(self, problem, gy, gy_layout, w, gx, gx_layout) -> None:
        self._naive.grad_input(problem, gy.dtype == torch.float64, gy.data_ptr(), gy_layout,
                               w.data_ptr(), gx.data_ptr(), gx_layout, torch.get_num_threads())

    def grad_weight(self, problem, gy, gy_layout, x, x_layout, gw, gb=None) -> None:
        self._naive.grad_weight(problem, gy.dtype == torch.float64, gy.data_ptr(), gy_layout,
                                x.data_ptr(), x_layout, gw.data_ptr(), torch.get_num_threads())
        if gb is not None:
            grad_bias(problem, gy, gy_layout, gb)


def grad_bias(problem, gy, gy_layout, gb) -> None:
    """Per-channel sums of grad_y into gb (CPU; accumulated in float64)."""
    _C.grad_bias(DTYPE_CODES[gy.dtype], problem.kernel_geometry, gy.data_ptr(), gy_layout,
                 gb.data_ptr(), torch.get_num_threads())


_forced = os.environ.get("FASTCONV_ISA", "").strip().lower()
if _forced:
    set_isa(_forced)
