"""Printing and saving ``fastconv-bench`` results: the table, JSON, CSV and the comparison
with an earlier run."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, fields
from typing import Optional, TextIO

from .runner import Result
from .timing import geomean

#: A strategy whose samples spread more than this (half the interquartile range over the
#: median) is flagged: its median is less trustworthy than the others'.
NOISY = 0.10
#: A --compare row this much slower than before is called a regression.
REGRESSION = 0.10
FORMAT_VERSION = 1


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def table(runs: list, peak: float, out: TextIO) -> None:
    """One block per layer, one line per strategy: median ms and its spread, GFLOP/s, % of
    the measured peak, speedup vs torch, max relative error vs the float64 reference, and
    what ran. '*' marks each layer's fastest; '~' a noisy median."""
    head = (f"{'layer':34s} {'strategy':12s} {'ms':>9s} {'±%':>4s} {'GFLOP/s':>8s} "
            f"{'%peak':>5s} {'vs torch':>8s} {'rel err':>8s}  runs")
    print(head, file=out)
    print("-" * len(head), file=out)
    noisy = False
    for run in runs:
        fastest = min(run.results, key=lambda r: r.ms).strategy if run.results else None
        for i, r in enumerate(run.results):
            mark = "*" if r.strategy == fastest else " "
            flag = "~" if r.spread > NOISY else " "
            noisy |= r.spread > NOISY
            speedup = f"{r.speedup:7.2f}x" if r.speedup is not None else f"{'':8s}"
            runs_ = r.runs if r.runs != r.strategy else ""
            print(f"{(run.layer.id if i == 0 else ''):34.34s} {r.strategy:12.12s} "
                  f"{_fmt_ms(r.ms):>8s}{mark} {100 * r.spread:3.0f}{flag} {r.gflops:8.1f} "
                  f"{100 * r.gflops / peak:4.0f}% {speedup} {r.max_rel_err:8.1e}  {runs_}",
                  file=out)
            if r.phases:
                print(f"{'':34s} {'':12s} phases: " + ", ".join(
                    f"{p.replace('_', ' ')} {100 * v:.0f}%" for p, v in r.phases.items()),
                    file=out)
        if run.skipped:
            by_reason: dict = {}
            for n, why in run.skipped.items():
                by_reason.setdefault(why, []).append(n)
            for why, names in by_reason.items():
                print(f"{'':34s} {', '.join(names)} cannot run it: {why}", file=out)
    if noisy:
        print(f"~ spread over {100 * NOISY:.0f}% (half the interquartile range): the machine "
              f"was busy or the layer's time varies; rerun with more --rounds", file=out)


def summary(runs: list, out: TextIO) -> dict:
    """Per strategy, over the layers it ran: geometric-mean speedup vs torch, total ms (each
    layer weighted by how often its network runs it), that total against torch's over the
    same layers, and the largest error."""
    names = list(dict.fromkeys(r.strategy for run in runs for r in run.results))
    rows = {}
    for n in names:
        mine = [(run, r) for run in runs for r in run.results if r.strategy == n]
        torch_ms = {(run.layer.id, r.batch): r.ms for run in runs for r in run.results
                    if r.strategy == "torch"}
        total = sum(r.ms * run.layer.count for run, r in mine)
        torch_total = sum(torch_ms[run.layer.id, r.batch] * run.layer.count for run, r in mine
                          if (run.layer.id, r.batch) in torch_ms)
        rows[n] = dict(
            layers=len(mine), total_ms=total,
            geomean_speedup=geomean(r.speedup for _, r in mine if r.speedup is not None),
            total_vs_torch=(total / torch_total
                            if torch_total and all((run.layer.id, r.batch) in torch_ms
                                                   for run, r in mine)
                            else None),
            max_rel_err=max((r.max_rel_err for _, r in mine), default=0.0))
    print(f"\n{'strategy':12s} {'layers':>6s} {'geomean speedup':>15s} {'total ms':>10s} "
          f"{'time / torch':>12s} {'max rel err':>11s}", file=out)
    for n, s in rows.items():
        gm, ratio = s["geomean_speedup"], s["total_vs_torch"]
        print(f"{n:12s} {s['layers']:6d} {(f'{gm:.2f}x' if not math.isnan(gm) else '-'):>15s} "
              f"{s['total_ms']:10.1f} {(f'{ratio:.2f}' if ratio else '-'):>12s} "
              f"{s['max_rel_err']:11.1e}", file=out)
    print("(totals over the layers each strategy ran, each layer counted as often as its "
          "network runs it; time / torch below 1 is faster than torch on those layers)",
          file=out)
    return rows


def to_json(path: str, meta: dict, runs: list, totals: dict) -> None:
    data = dict(format="fastconv-bench", version=FORMAT_VERSION, meta=meta,
                results=[dict(asdict(r), count=run.layer.count) for run in runs
                         for r in run.results],
                skipped=[dict(layer=run.layer.id, strategy=n, why=why) for run in runs
                         for n, why in run.skipped.items()],
                summary=totals)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def to_csv(path: str, runs: list) -> None:
    names = [f.name for f in fields(Result)] + ["spread", "count"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        for run in runs:
            for r in run.results:
                row = asdict(r)
                row["phases"] = ";".join(f"{k}={v:.3f}" for k, v in r.phases.items())
                w.writerow(dict(row, spread=round(r.spread, 4), count=run.layer.count))


def load(path: str) -> dict:
    """A --json file of an earlier run (ValueError if it is not one)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--compare {path!r}: cannot read it ({e})") from None
    if not isinstance(data, dict) or data.get("format") != "fastconv-bench":
        raise ValueError(f"--compare {path!r}: not a fastconv-bench --json file")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"--compare {path!r}: format version {data.get('version')}, this "
                         f"fastconv-bench reads {FORMAT_VERSION}")
    return data


def _key(r: dict) -> tuple:
    return (r["layer"], r["strategy"], r["batch"], r["pass_"], r["dtype"], r["layout"])


def compare(old: dict, runs: list, out: TextIO) -> Optional[float]:
    """Each result against the same layer, strategy, batch, pass, dtype and layout in ``old``:
    old ms / new ms (above 1: faster now). Returns the geometric mean (None: nothing
    matched)."""
    before = {_key(r): r for r in old["results"]}
    ratios = []
    print(f"\ncompared with {old['meta'].get('date', 'an earlier run')} "
          f"({old['meta'].get('isa', '?')}, {old['meta'].get('threads', '?')} threads, fastconv "
          f"{old['meta'].get('fastconv', '?')}): old ms / new ms, above 1 is faster now",
          file=out)
    for run in runs:
        for r in run.results:
            o = before.get(_key(asdict(r)))
            if o is None:
                continue
            ratio = o["ms"] / r.ms
            ratios.append(ratio)
            flag = ("  REGRESSION" if ratio < 1 - REGRESSION else
                    "  faster" if ratio > 1 + REGRESSION else "")
            print(f"{r.layer:34.34s} {r.strategy:12s} {_fmt_ms(o['ms']):>9s} -> "
                  f"{_fmt_ms(r.ms):>9s} ms {ratio:6.2f}x{flag}", file=out)
    if not ratios:
        print("no result matches the earlier run (layer, strategy, batch, pass, dtype and "
              "layout must agree)", file=out)
        return None
    gm = geomean(ratios)
    print(f"geometric mean {gm:.2f}x over {len(ratios)} results (regression: slower by "
          f"more than {100 * REGRESSION:.0f}%; on a noisy machine compare medians of "
          f"several runs)", file=out)
    return gm
