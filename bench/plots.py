"""The bench's plots: PNG files drawn with matplotlib (Debian's python3-matplotlib), written next to
the report and linked from it. Without matplotlib nothing is drawn and each function says why."""
import statistics

MISSING = "not drawn: matplotlib is not installed (Debian's python3-matplotlib; bench/run installs it)"


def _pyplot():
    """matplotlib's pyplot on a backend without a display, or None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def concurrency(path, series, title):
    """Wall time against concurrent clients, a line per peer: medians, min–max as error bars.
    `series` is {peer: [(clients, [seconds of each round])]}. Returns None, or why nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return MISSING
    points = {peer: sorted((n, vs) for n, vs in pts if vs) for peer, pts in series.items()}
    if not any(points.values()):
        return "not drawn: no pulls were measured"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for peer, pts in points.items():
        if not pts:
            continue
        ns = [n for n, _ in pts]
        med = [statistics.median(vs) for _, vs in pts]
        err = [[m - min(vs) for m, (_, vs) in zip(med, pts)], [max(vs) - m for m, (_, vs) in zip(med, pts)]]
        ax.errorbar(ns, med, yerr=err, marker="o", capsize=4, label=peer)
    ns = sorted({n for pts in points.values() for n, _ in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients (skopeo), cold")
    ax.set_ylabel("wall time until all finished, s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def cpu_per_gib(path, cases, floor, peers, title):
    """Grouped bars: CPU-s/GiB of each peer per case, the floor first. `floor` is {case: value},
    `peers` {peer: {case: median}}. Returns None, or why nothing was drawn."""
    plt = _pyplot()
    if plt is None:
        return MISSING
    bars = [("floor", floor)] + [(p, v) for p, v in peers.items() if v]
    if len(bars) == 1:
        return "not drawn: no CPU per GiB was measured"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.8 / len(bars)
    for i, (name, values) in enumerate(bars):
        xs = [c + (i - (len(bars) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [values.get(case, 0) for case in cases], width, label=name,
               color="0.6" if name == "floor" else None)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("CPU-s per GiB pulled (user + system)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None
