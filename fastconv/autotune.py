"""Autotune: time every algorithm that can run a convolution, once, and let ``auto`` use the
fastest (as ``torch.backends.cudnn.benchmark`` does for cuDNN).

    fastconv.autotune.enable()                      # or FASTCONV_AUTOTUNE=1
    with fastconv.autotuning("tuned.json"): ...      # a block; winners kept in that file

A winner is kept per *tuning key*: the problem's shapes, strides, padding, dilation and
groups, the pass (forward, grad-input and grad-weight are tuned separately: a layer's fastest
backward need not be its fastest forward), dtype, the layouts of the tensors the kernel reads
and writes, thread count, ISA, device, and whether the weights come from the weight cache.
The first ``auto`` call of a new key times each candidate on random tensors of the same
shapes: two interleaved rounds of about 0.025 s each (at least a warm-up and two calls per
round, so a 100 ms layer costs ~0.6 s per candidate), each keeping its best round. The
fastest wins, unless auto's own choice is within 5 % of it; later calls look the winner up.
Candidates are the registry's algorithms that ``auto`` may pick (``naive`` is left out) and
that can run the pass.

Winners live in memory; with a cache file they are also written there after each new key
(atomically; processes sharing a file each write their own winners: the last writer's file
stands), and read back by the next process. The file is versioned JSON. A file that cannot
be read, is not an autotune file, has another format version or comes from another fastconv
version or build (whose kernels, and so timings, differ: :func:`build_id`) is ignored with an
:class:`AutotuneWarning`, and rewritten at the next new key; a file that cannot be written is
a warning too.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from . import backend
from .backend import NCHW, NHWC, Pass
from .problem import Conv2dProblem

#: Bumped when the file's structure changes; files of another version are ignored.
FORMAT_VERSION = 1
FORMAT_NAME = "fastconv-autotune"
_CODES = {"nchw": NCHW, "nhwc": NHWC}
#: A key's layout: the layout of the tensor the kernel reads as its input (x; grad_y for
#: grad-input), then, where it differs, that of its other tensor (y, grad_x, grad_y).
LAYOUTS = ("nchw", "nhwc", "nchw>nhwc", "nhwc>nchw")


def _layout_codes(layout: str) -> tuple:
    first, _, second = layout.partition(">")
    return _CODES[first], _CODES[second or first]


class AutotuneWarning(UserWarning):
    """An autotune cache file was ignored (unreadable, another version, or stale)."""


@dataclass(frozen=True)
class TuneKey:
    """Everything a winner depends on."""
    problem: Conv2dProblem
    pass_: str          # "forward", "grad_input", "grad_weight"
    dtype: str          # "float32", "float64"
    layout: str         # one of LAYOUTS
    threads: int
    isa: str
    device: str
    prepacked: bool     # forward weights from the weight cache (packing not timed)


@dataclass(frozen=True)
class Entry:
    key: TuneKey
    algo: str                   # the winner
    times_ms: dict              # median ms of every candidate, by name


#: Seconds of timing per candidate (after one warm-up call; at least 3 calls).
TIME_PER_CANDIDATE = 0.05


def _version() -> str:
    from . import __version__
    return __version__


_BUILD: Optional[str] = None


def build_id() -> str:
    """A digest of the compiled kernels (the extension files): timings made by another build
    are stale even under the same version number."""
    global _BUILD
    if _BUILD is None:
        import hashlib
        from . import _C, _naive
        digest = hashlib.sha1()
        for module in (_C, _naive):
            with open(module.__file__, "rb") as f:
                digest.update(f.read())
        _BUILD = digest.hexdigest()[:16]
    return _BUILD


class _State:
    def __init__(self):
        self.enabled = False
        self.path: Optional[str] = None
        self.entries: dict = {}            # TuneKey -> Entry
        self.generation = 0                # bumped on every change (ops' plan memo keys it)
        self.lock = threading.RLock()          # guards the state above
        self.tuning = threading.Lock()         # one timing run at a time (they would disturb
                                               # each other); lookups never wait for it


_STATE = _State()


def is_enabled() -> bool:
    return _STATE.enabled


def generation() -> int:
    """Changes whenever a winner may change (enable, disable, clear, load, a new entry)."""
    return _STATE.generation


def enable(cache_file: Optional[str] = None) -> None:
    """Tune ``auto`` calls from now on. ``cache_file``: read winners from this JSON file (if it
    exists and is valid) and write new ones to it."""
    with _STATE.lock:
        _STATE.enabled = True
        _STATE.path = os.fspath(cache_file) if cache_file is not None else None
        if _STATE.path is not None and os.path.exists(_STATE.path):
            _load(_STATE.path)
        _STATE.generation += 1


def disable() -> None:
    """Back to the ``auto`` heuristic (winners stay in memory for a later enable)."""
    with _STATE.lock:
        _STATE.enabled = False
        _STATE.path = None
        _STATE.generation += 1


def clear() -> None:
    """Forget every winner in memory (a cache file is left as it is)."""
    with _STATE.lock:
        _STATE.entries.clear()
        _STATE.generation += 1


def entries() -> list:
    """The winners known now, as :class:`Entry` values."""
    with _STATE.lock:
        return list(_STATE.entries.values())


@contextlib.contextmanager
def autotuning(cache_file: Optional[str] = None):
    """Context manager: ``auto`` is tuned inside the block (see the module docstring). The
    setting is process-wide, like torch.backends.cudnn.benchmark: the block's exit restores
    what was set before it, in every thread."""
    previous = (_STATE.enabled, _STATE.path)
    enable(cache_file)
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.enabled, _STATE.path = previous
            _STATE.generation += 1


@contextlib.contextmanager
def suspended():
    """Context manager: ``auto`` runs its heuristic inside the block, even where autotune is
    on (benchmarks comparing auto with autotune)."""
    with _STATE.lock:
        previous = _STATE.enabled
        _STATE.enabled = False
        _STATE.generation += 1
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.enabled = previous
            _STATE.generation += 1


def make_key(problem: Conv2dProblem, pass_: Pass, dtype: torch.dtype, layout: str,
             device: str = "cpu", prepacked: bool = False) -> TuneKey:
    return TuneKey(problem, pass_.name.lower(), str(dtype).replace("torch.", ""), layout,
                   torch.get_num_threads(), backend.get_isa(), device,
                   bool(prepacked) and pass_ == Pass.FORWARD)


def lookup(key: TuneKey) -> Optional[Entry]:
    return _STATE.entries.get(key)   # one dict read: atomic, needs no lock


def pick(problem: Conv2dProblem, pass_: Pass, dtype: torch.dtype, layout: str,
         device: str = "cpu", prepacked: bool = False, tune: bool = True) -> Optional[str]:
    """The tuned algorithm for this call: the known winner, or (``tune``) the winner of a
    timing run made now. None when there is none (nothing to time, or ``tune`` is off)."""
    key = make_key(problem, pass_, dtype, layout, device, prepacked)
    entry = lookup(key)
    if entry is not None or not tune:
        return entry.algo if entry is not None else None
    with _STATE.tuning:
        entry = _STATE.entries.get(key)   # tuned by another thread meanwhile?
        if entry is None:
            entry = _tune(key)
            if entry is None:
                return None
            with _STATE.lock:
                _STATE.entries[key] = entry
                _STATE.generation += 1
                path = _STATE.path
            if path is not None:
                _save(path)
    return entry.algo


def candidates(problem: Conv2dProblem, pass_: Pass, dtype: torch.dtype,
               device: str = "cpu") -> list:
    """The algorithms autotune times for this pass: those auto may pick that can run it."""
    from .registry import ALGORITHMS
    return [a for a in ALGORITHMS
            if a.in_auto and a.unsupported(problem, device, dtype, pass_) is None]


class _Operands:
    """Random tensors of one key's shapes and layouts, shared by every candidate. Drawn from
    a private generator: tuning leaves the caller's random stream alone."""

    def __init__(self, problem: Conv2dProblem, dtype: torch.dtype, layout: str):
        self.problem, self.dtype = problem, dtype
        self.first, self.second = _layout_codes(layout)
        self.generator = torch.Generator().manual_seed(0)
        self.w = self._randn(problem.weight_shape, NCHW)
        self.b = self._randn((problem.K,), NCHW)
        self.gw = torch.empty(problem.weight_shape, dtype=dtype)

    def _randn(self, shape, code):
        t = torch.randn(shape, dtype=self.dtype, generator=self.generator)
        return t.contiguous(memory_format=torch.channels_last) if code == NHWC else t

    def call(self, algorithm, pass_: Pass, device: str = "cpu", prepacked: bool = False):
        """A no-argument callable running ``algorithm``'s kernel for this pass (prepacked:
        weights packed first, outside the call, as the weight cache does)."""
        k, p, a, c = algorithm.kernels[device], self.problem, self.first, self.second
        w, b = self.w, self.b
        if pass_ == Pass.FORWARD:   # reads x (a), writes y (c)
            x, y = self._randn(p.input_shape, a), self._randn(p.output_shape, c)
            packed = _packed(k, p, w, a, c) if prepacked else None
            return lambda: k.forward(p, x, a, w, b, y, c, packed)
        if pass_ == Pass.GRAD_INPUT:   # reads grad_y (a), writes grad_x (c)
            gy, gx = self._randn(p.output_shape, a), self._randn(p.input_shape, c)
            return lambda: k.grad_input(p, gy, a, w, gx, c)
        x, gy = self._randn(p.input_shape, a), self._randn(p.output_shape, c)  # grad-weight
        return lambda: k.grad_weight(p, gy, c, x, a, self.gw)


@dataclass(frozen=True)
class _Packed:
    """What CppKernels.forward takes as ``packed``."""
    tensor: torch.Tensor
    packing: backend.WeightPacking


def _packed(kernels, problem, w, x_code: int, y_code: int) -> Optional[_Packed]:
    weight_packing = getattr(kernels, "weight_packing", None)
    if weight_packing is None:
        return None
    packing = weight_packing(problem, w.dtype, x_code, y_code)
    if packing.elements == 0:
        return None
    out = torch.empty(packing.elements, dtype=w.dtype)
    kernels.pack_weights(problem, x_code, y_code, w, out)
    return _Packed(out, packing)


#: Candidates are timed in this many interleaved rounds and keep their best round: a short
#: slowdown of the machine then hurts no candidate's time.
ROUNDS = 2
#: auto's own choice is kept unless another candidate is faster by more than this: two
#: kernels within a few per cent are a coin toss on a noisy machine (measured here, one 0.05 s
#: timing picked direct for a 1x1 layer 20 % slower than auto's im2col).
KEEP_HEURISTIC_WITHIN = 0.05


def _tune(key: TuneKey) -> Optional[Entry]:
    from .bench.timing import measure
    from .dispatch import choose
    p = key.problem
    if p.N * p.K * p.OH * p.OW == 0 or p.C == 0 or p.Cg * p.R * p.S == 0:
        return None    # degenerate: no kernel runs
    dtype = getattr(torch, key.dtype)
    pass_ = Pass[key.pass_.upper()]
    found = candidates(p, pass_, dtype, key.device)
    if len(found) < 2:
        return Entry(key, found[0].name, {}) if found else None
    operands = _Operands(p, dtype, key.layout)
    calls = {a.name: operands.call(a, pass_, key.device, key.prepacked) for a in found}
    best: dict = {}
    for _ in range(ROUNDS):
        for name, fn in calls.items():
            t = measure(fn, min_time=TIME_PER_CANDIDATE / ROUNDS, min_reps=2, max_reps=50,
                        warmup=1).median * 1e3
            best[name] = min(best.get(name, t), t)
    winner = min(best, key=best.get)
    heuristic = choose(p, key.device, dtype, key.prepacked, pass_, "nhwc" in key.layout)
    if (heuristic is not None and heuristic.name in best
            and best[heuristic.name] <= best[winner] * (1 + KEEP_HEURISTIC_WITHIN)):
        winner = heuristic.name
    return Entry(key, winner, best)


# ------------------------------------------------------------------------------------------
# The cache file
# ------------------------------------------------------------------------------------------

def _entry_json(e: Entry) -> dict:
    k = asdict(e.key)
    k["pass"] = k.pop("pass_")
    return dict(k, algo=e.algo, times_ms=e.times_ms)


def _entry_from_json(d: dict) -> Entry:
    from .registry import BY_NAME
    problem = Conv2dProblem(**{f.name: int(d["problem"][f.name]) for f in fields(Conv2dProblem)})
    key = TuneKey(problem, str(d["pass"]), str(d["dtype"]), str(d["layout"]), int(d["threads"]),
                  str(d["isa"]), str(d["device"]), bool(d["prepacked"]))
    if d["algo"] not in BY_NAME or not BY_NAME[d["algo"]].in_auto:
        raise ValueError(f"unknown algorithm {d['algo']!r}")
    if key.pass_ not in ("forward", "grad_input", "grad_weight") or key.layout not in LAYOUTS:
        raise ValueError(f"bad pass or layout in {d}")
    return Entry(key, d["algo"], {str(k): float(v) for k, v in d.get("times_ms", {}).items()})


def _save(path: str) -> None:
    """Writes every winner to ``path``; a failure is a warning, never an error of the
    convolution that found the winner."""
    try:
        _write(path)
    except OSError as e:
        warnings.warn(f"fastconv autotune: cannot write cache file {path!r} ({e}); winners "
                      f"stay in memory", AutotuneWarning, stacklevel=5)


def _write(path: str) -> None:
    with _STATE.lock:
        entries = list(_STATE.entries.values())
    data = dict(format=FORMAT_NAME, version=FORMAT_VERSION, fastconv=_version(), build=build_id(),
                entries=[_entry_json(e) for e in entries])
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)   # readers never see a half-written file


def _load(path: str) -> None:
    def ignore(why: str) -> None:
        warnings.warn(f"fastconv autotune: ignoring cache file {path!r}: {why}",
                      AutotuneWarning, stacklevel=4)

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return ignore(f"it cannot be read as JSON ({e})")
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return ignore("it is not a fastconv autotune file")
    if data.get("version") != FORMAT_VERSION:
        return ignore(f"format version {data.get('version')!r}, this fastconv reads "
                      f"{FORMAT_VERSION}")
    if data.get("fastconv") != _version() or data.get("build") != build_id():
        return ignore(f"stale: made by fastconv {data.get('fastconv')!r} build "
                      f"{data.get('build')!r}, this is {_version()} build {build_id()} (its "
                      f"kernels and timings differ)")
    try:
        loaded = [_entry_from_json(d) for d in data["entries"]]
    except (KeyError, TypeError, ValueError) as e:
        return ignore(f"an entry is malformed ({type(e).__name__}: {e})")
    for e in loaded:
        _STATE.entries[e.key] = e


def _from_environment() -> None:
    if os.environ.get("FASTCONV_AUTOTUNE", "") not in ("", "0"):
        enable(os.environ.get("FASTCONV_AUTOTUNE_FILE") or None)


_from_environment()
