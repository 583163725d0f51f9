"""The compiled kernels and the choice of instruction set.

Every kernel is compiled for AVX-512, AVX2+FMA and the baseline ("scalar") ISA; the fastest one
this CPU supports is used unless ``FASTCONV_ISA`` (read at import) or :func:`set_isa` says
otherwise.
"""
from __future__ import annotations

import contextlib
import os

import torch  # noqa: F401  (must be loaded first: _C then reuses torch's libgomp, see below)

# Importing torch has loaded its bundled libgomp (soname libgomp.so.1). _C needs libgomp.so.1
# too, and the dynamic loader resolves that to the copy already loaded, so the process has one
# OpenMP runtime and one thread pool: a second pool would spin against torch's on few cores.
from . import _C

ISAS = ("avx512", "avx2", "scalar")


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


_forced = os.environ.get("FASTCONV_ISA", "").strip().lower()
if _forced:
    set_isa(_forced)
