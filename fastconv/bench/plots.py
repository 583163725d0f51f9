"""``fastconv-bench --plot FILE.png``: GFLOP/s per layer and strategy with the measured peak,
and each strategy's speedup over torch. matplotlib is an optional extra
(``pip install fastconv[plot]``)."""
from __future__ import annotations


def plot(runs: list, peak: float, title: str, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fastconv[plot]' "
                           "(or pip install matplotlib)") from None
    matplotlib.use("Agg")   # files only, no display needed
    import matplotlib.pyplot as plt

    layers = [run.layer.name for run in runs]
    from .runner import strategies
    ran = {r.strategy for run in runs for r in run.results}
    names = [n for n in strategies() if n in ran]       # the CLI's order, colours stable
    width = 0.8 / max(1, len(names))
    size = (max(9.0, 0.25 * len(layers) * len(names) ** 0.5 + 3), 9)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=size, sharex=True)
    colors = plt.get_cmap("tab10")
    for j, n in enumerate(names):
        xs, gf, sp = [], [], []
        for i, run in enumerate(runs):
            r = next((r for r in run.results if r.strategy == n), None)
            if r is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            gf.append(r.gflops)
            sp.append(r.speedup)
        top.bar(xs, gf, width, label=n, color=colors(j % 10))
        if n != "torch":
            bottom.bar([x for x, s in zip(xs, sp) if s is not None],
                       [s for s in sp if s is not None], width, label=n, color=colors(j % 10))
    top.axhline(peak, color="black", linestyle="--", linewidth=1)
    top.text(len(layers) - 0.5, peak, f"measured peak {peak:.0f} GFLOP/s", ha="right",
             va="bottom", fontsize=8)
    top.set_ylabel("GFLOP/s")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.axhline(1.0, color="black", linewidth=1)
    bottom.set_yscale("log")
    bottom.set_ylabel("speedup over torch (log)")
    bottom.set_xticks(range(len(layers)))
    bottom.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
