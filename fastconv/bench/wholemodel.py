"""``fastconv-bench --model NAME``: a whole network's eval forward and training step, torch's
model against the same model after ``fastconv.convert`` and ``fastconv.fuse``, interleaved.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import convert, fuse
from .timing import measure


@dataclass
class ModelResult:
    model: str
    mode: str               # "eval forward" or "train step"
    batch: int
    torch_ms: float         # medians
    fastconv_ms: float
    speedup: float          # median of the per-round ratios
    max_abs_diff: float     # eval: outputs; train: first step's losses
    reference_scale: float  # eval: max |torch's output|; train: torch's first loss
    detail: str


def _fastconv_copy(model: torch.nn.Module) -> torch.nn.Module:
    return fuse(convert(copy.deepcopy(model)))


def _interleaved(fns: dict, rounds: int, min_time: float, tick: Callable) -> dict:
    medians = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            medians[k].append(measure(fn, min_time=min_time, min_reps=2, warmup=1).median)
            tick(k)
    return medians


def _result(name, mode, batch, medians, diff, scale, detail) -> ModelResult:
    t, f = medians["torch"], medians["fastconv"]
    return ModelResult(model=name, mode=mode, batch=batch,
                       torch_ms=statistics.median(t) * 1e3,
                       fastconv_ms=statistics.median(f) * 1e3,
                       speedup=statistics.median(a / b for a, b in zip(t, f)),
                       max_abs_diff=diff, reference_scale=scale, detail=detail)


def run_model(name: str, model: torch.nn.Module, batch: int, rounds: int = 3,
              min_time: float = 0.5, resolution: int = 224, channels_last: bool = False,
              dtype: torch.dtype = torch.float32, train: bool = True,
              tick: Callable = lambda _: None) -> list:
    """Eval forward (and, with ``train``, an SGD training step on random labels) of ``model``
    and of its fastconv copy; both start from the same weights."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, resolution, resolution, generator=g,
                    dtype=dtype).contiguous(memory_format=fmt)
    model = model.to(dtype=dtype, memory_format=fmt)
    results = []

    ref = copy.deepcopy(model).eval()
    ours = _fastconv_copy(ref).eval()
    with torch.no_grad():
        expected = ref(x)
        diff = (expected - ours(x)).abs().max().item()
        scale = expected.abs().max().item()
        medians = _interleaved({"torch": lambda: ref(x), "fastconv": lambda: ours(x)}, rounds,
                               min_time, tick)
    results.append(_result(name, "eval forward", batch, medians, diff, scale,
                           "convert + fuse; max |output difference|"))
    if not train:
        return results

    ref = copy.deepcopy(model).train()
    ours = _fastconv_copy(ref).train()
    labels = torch.randint(0, 1000, (batch,), generator=g)
    first = {}

    def step(m, opt, key):
        def run():
            if key not in first:
                torch.manual_seed(1)   # same random draws (dropout, stochastic depth)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), labels)
            loss.backward()
            opt.step()
            first.setdefault(key, loss.item())
        return run

    # lr 0: every step sees the same weights, so the two models stay comparable.
    fns = {"torch": step(ref, torch.optim.SGD(ref.parameters(), lr=0.0), "torch"),
           "fastconv": step(ours, torch.optim.SGD(ours.parameters(), lr=0.0), "fastconv")}
    medians = _interleaved(fns, rounds, min_time, tick)
    results.append(_result(name, "train step", batch, medians,
                           abs(first["torch"] - first["fastconv"]), abs(first["torch"]),
                           "forward + backward + SGD step; |loss difference| of the first step"))
    return results
