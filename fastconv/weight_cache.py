"""The inference weight cache: packed or transformed weights kept between forward calls.

Every forward packs its weights before it convolves: direct into [tap][c][16k] blocks, im2col
into the GEMM's packed panels, Winograd into transformed filters (4x the weights for F(4,3)).
On weight-bound calls (batch 1, 3x3 512@7: 9 MiB of weights) that is much of the call. A
:class:`PackedWeight` wraps a weight tensor and keeps what the forward kernels made of it, so
later calls skip the packing:

    packed = fastconv.prepack(weight)
    y = fastconv.conv2d(x, packed, bias, padding=1)    # packs on the first call only

``fastconv.nn.Conv2d`` does this for its own weight. The cache is used only by calls that
need no gradient (``torch.no_grad()``, ``torch.inference_mode()``, or no operand requiring
grad) in eager mode: training, double backward and torch.compile always pack afresh.

**Never stale.** A packing is reused only while the weight is unchanged as torch tracks it:
same tensor, same storage (``data_ptr``), same version counter (``_version``: every in-place
op, ``optimizer.step()``, ``load_state_dict``, ``nn.init``), same dtype, device, shape and
strides, and the same ISA and tuning values. Weights whose memory other tensors can write
without touching that counter are never cached: views into a larger storage (what
``vector_to_parameters`` and ``w.data = flat[...]`` make) and shared-memory tensors
(``share_memory()``). What remains unseen are writes that bypass the weight's own counter:
through ``weight.data`` (``weight.data.mul_(2)``: ``.data`` has its own counter), through a
NumPy view, or freeing and reallocating the storage in place (``untyped_storage().resize_``).
After such a write call :meth:`PackedWeight.release` (or ``Conv2d.release_weight_cache()``,
or :func:`release_workspaces`); prefer in-place ops under ``torch.no_grad()``, which torch
tracks. Switching the ISA (``fastconv.set_isa``) while another thread runs convolutions is
not supported (as before the cache); a packing made while the ISA changed is not kept.

**Bounded memory.** All packings of the process share one budget, ``FASTCONV_WEIGHT_CACHE_MB``
(read at import, default 1024 MiB; :func:`set_cache_limit` changes it): beyond it the least
recently used packings are dropped, together with the weight storage each one keeps alive
(counted in the budget). A weight is cached only if its largest packing (7.1x the weight,
Winograd F(6,3)) fits the whole budget; otherwise its calls pack per call and ``auto``
chooses as without a cache. A packing takes about the weight's size (direct, im2col) or
(m+2)^2/9 times it (Winograd F(m,3): 1.8x, 4x, 7.1x). :func:`release_workspaces` frees every
packing (and the calling thread's scratch buffers); :func:`cache_info` reports the use.

**Which algorithm.** ``auto`` knows when the weights come from the cache (the filter transform
is then free, so Winograd pays from 49 output pixels), so the same layer may run another
algorithm, with its own rounding error, under ``torch.no_grad()`` than with gradients on;
``fastconv.explain(..., prepacked=True)`` shows the inference choice.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import backend

_MIB = 1 << 20


@dataclass(frozen=True)
class Packing:
    """One packing of a weight: what ``CppKernels.forward`` takes as ``packed``."""
    tensor: Tensor                  # the packed values (weight's dtype)
    packing: backend.WeightPacking  # what weight_packing said when it was made
    stamp: tuple                    # the weight's state it was made from (PackedWeight._stamp)
    source: Tensor                  # the weight's storage then, kept alive (see _stamp)


class _Cache:
    """Every packing in the process, least recently used first, under one byte budget."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lru: OrderedDict = OrderedDict()  # (owner token, key) -> Packing
        self._lock = threading.Lock()

    def get(self, owner: int, key: tuple, stamp: tuple) -> Optional[Packing]:
        with self._lock:
            entry = self._lru.get((owner, key))
            if entry is not None and entry.stamp == stamp:
                self._lru.move_to_end((owner, key))
                self.hits += 1
                return entry
            self.misses += 1
            return None

    def put(self, owner: int, key: tuple, entry: Packing) -> None:
        size = _bytes(entry)
        with self._lock:
            self._drop((owner, key))
            if size > self.limit:
                return
            while self._lru and self.bytes + size > self.limit:
                self._drop(next(iter(self._lru)))
                self.evictions += 1
            self._lru[(owner, key)] = entry
            self.bytes += size

    def drop_owner(self, owner: int, keep_stamp: Optional[tuple] = None) -> None:
        """Drop the owner's packings (those made from another state of the weight than
        ``keep_stamp``, if given: they can never be used again)."""
        with self._lock:
            for k in [k for k, e in self._lru.items()
                      if k[0] == owner and (keep_stamp is None or e.stamp != keep_stamp)]:
                self._drop(k)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self.bytes = 0

    def set_limit(self, limit_bytes: int) -> None:
        with self._lock:
            self.limit = limit_bytes
            while self._lru and self.bytes > self.limit:
                self._drop(next(iter(self._lru)))
                self.evictions += 1

    def _drop(self, k) -> None:  # lock held
        entry = self._lru.pop(k, None)
        if entry is not None:
            self.bytes -= _bytes(entry)

    def info(self) -> dict:
        with self._lock:
            return {"bytes": self.bytes, "limit_bytes": self.limit, "entries": len(self._lru),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


def _bytes(entry: Packing) -> int:
    """What an entry holds: its packing, and the weight storage it keeps alive."""
    return (entry.tensor.numel() * entry.tensor.element_size()
            + entry.source.untyped_storage().nbytes())


def _limit_from_env() -> int:
    text = os.environ.get("FASTCONV_WEIGHT_CACHE_MB", "1024").strip()
    try:
        mib = float(text)
    except ValueError:
        mib = float("nan")
    if not (math.isfinite(mib) and mib >= 0):
        raise ValueError(f"FASTCONV_WEIGHT_CACHE_MB must be a non-negative number of MiB, got "
                         f"{text!r}")
    return int(mib * _MIB)


_CACHE = _Cache(_limit_from_env())
_tokens = itertools.count()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CACHE._reset_after_fork)

#: The most a packing takes, relative to its weight: Winograd F(6,3)'s 64/9, plus padding.
_MAX_EXPANSION = 8


class PackedWeight:
    """A weight tensor and the packed copies fastconv's forward kernels made of it.

    Pass it to :func:`fastconv.conv2d` in place of the weight. Calls that need no gradient
    reuse its packings (one per algorithm, ISA and layout the calls used); all other calls
    use ``weight`` as if it were passed itself. Holds a reference to ``weight``; its
    packings live in the process-wide cache (module docstring: when they are reused, memory).
    """

    def __init__(self, weight: Tensor):
        if not isinstance(weight, Tensor):
            raise TypeError(f"fastconv.prepack: expected a weight tensor, got "
                            f"{type(weight).__name__}")
        if weight.dim() != 4:
            raise ValueError(f"fastconv.prepack: expected a 4-D weight (K, C/groups, R, S), "
                             f"got shape {tuple(weight.shape)}")
        self.weight = weight
        self._token = next(_tokens)
        self._finalizer = _finalizer(self)

    def usable(self) -> bool:
        """Whether calls can keep packings of this weight now: torch tracks its changes and
        its largest packing fits the budget. ``auto`` then chooses knowing the weights are
        packed."""
        w = self.weight
        return (_stamp(w) is not None
                and _MAX_EXPANSION * w.numel() * w.element_size() <= _CACHE.limit)

    def packed_for(self, kernels, problem, x_layout: int, y_layout: int) -> Optional[Packing]:
        """The packing of ``kernels``' forward for this call, made now if missing or stale;
        None when the algorithm packs nothing here or the weight cannot be cached."""
        weight_packing = getattr(kernels, "weight_packing", None)
        w = self.weight.detach()  # one snapshot: stamp, packing and source from one storage
        stamp = _stamp(w)
        if weight_packing is None or stamp is None:
            return None
        packing = weight_packing(problem, w.dtype, x_layout, y_layout)
        if packing.elements == 0:
            return None
        isa = backend.get_isa()
        key = (kernels.index, isa, backend.tuning_generation, problem.K, problem.C, problem.R,
               problem.S, problem.groups, packing)
        entry = _CACHE.get(self._token, key, stamp)
        if entry is None:
            _CACHE.drop_owner(self._token, keep_stamp=stamp)  # older states: never used again
            out = torch.empty(packing.elements, dtype=w.dtype)
            kernels.pack_weights(problem, x_layout, y_layout, w.contiguous(), out)
            entry = Packing(out, packing, stamp, w)
            if backend.get_isa() == isa:  # not packed across a concurrent set_isa
                _CACHE.put(self._token, key, entry)
        return entry

    def release(self) -> None:
        """Drop this weight's packings (they are made again by the next call that needs them)."""
        _CACHE.drop_owner(self._token)

    # Copies and pickles carry the weight only: packings are made again where they are used.
    def __getstate__(self):
        return {"weight": self.weight}

    def __setstate__(self, state):
        self.__init__(state["weight"])

    def __repr__(self) -> str:
        w = self.weight
        return f"PackedWeight(shape={tuple(w.shape)}, dtype={w.dtype}, device={w.device})"


def _stamp(w: Tensor) -> Optional[tuple]:
    """The weight's state as torch tracks it, or None if its changes cannot all be seen
    through its own version counter: an inference tensor has none; a view into a larger
    storage or a shared-memory tensor can be written through other tensors. The Packing keeps
    the storage alive, so no other tensor can take its address while the stamp is in use."""
    if w.is_inference() or not w.is_cpu or w.is_shared():
        return None
    if w.storage_offset() != 0 or w.untyped_storage().nbytes() != w.numel() * w.element_size():
        return None
    return (w.data_ptr(), w._version, w.dtype, tuple(w.shape), w.stride())


def _finalizer(owner: PackedWeight):
    # Drops the packings when their PackedWeight is garbage collected (weakref.finalize holds
    # no reference to it).
    import weakref
    return weakref.finalize(owner, _CACHE.drop_owner, owner._token)


def prepack(weight: Tensor) -> PackedWeight:
    """``weight`` wrapped for :func:`fastconv.conv2d`: inference calls with it reuse the
    packed or transformed weights of their algorithm instead of packing on every call.
    Nothing is packed until a call needs it. See :mod:`fastconv.weight_cache`."""
    return PackedWeight(weight)


def release_workspaces() -> None:
    """Free the memory fastconv keeps between calls: the calling thread's scratch buffers
    and every cached weight packing (they are made again when needed)."""
    backend.release_workspaces()
    _CACHE.clear()


def cache_info() -> dict:
    """The weight cache's use: bytes held, limit_bytes, entries, and counts of hits, misses
    (packings made) and evictions since the process started."""
    return _CACHE.info()


def set_cache_limit(limit_bytes: int) -> None:
    """Set the weight cache's budget in bytes (0 disables it); drops the least recently used
    packings beyond it."""
    if type(limit_bytes) is not int or limit_bytes < 0:
        raise ValueError(f"the weight cache limit must be a non-negative int, got {limit_bytes!r}")
    _CACHE.set_limit(limit_bytes)
