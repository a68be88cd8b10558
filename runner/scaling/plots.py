"""The study's plots (matplotlib, PNG and SVG in DIR/plots/), one series per layout and cache."""

from __future__ import annotations

import os


def _series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(layout family, cfg split, cache) -> rows by GPU count; the 1-GPU point starts every layout's line."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("sampling_s")]
    out: dict[tuple, list[dict]] = {}
    layouts = sorted({r["layout"] for r in ok if r["layout"] != "-"}) or ["-"]
    for r in ok:
        targets = layouts if r["layout"] == "-" else [r["layout"]]
        for lay in targets:
            out.setdefault((lay, r["cfg_parallel"], r["cache"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["gpus"]) for k, v in sorted(out.items())}


def _label(key: tuple) -> str:
    lay, cfgp, cache = key
    return f"{lay}{' cfg2' if cfgp else ''}, {cache}"


def draw(study: str, rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(study, "plots")
    os.makedirs(out, exist_ok=True)
    series = _series(rows)
    paths: list[str] = []

    counts = sorted({r["gpus"] for r in rows if r["status"] == "ok"})

    def gpu_axis(ax):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()

    def save(fig, name):
        for a in fig.axes:
            if a.get_xscale() == "log":
                gpu_axis(a)
        for ext in ("png", "svg"):
            p = os.path.join(out, f"{name}.{ext}")
            fig.savefig(p, dpi=120, bbox_inches="tight")
            paths.append(p)
        plt.close(fig)

    # latency against GPUs, log-log, with the ideal line from each series' 1-GPU point
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, rs in series.items():
        g = [r["gpus"] for r in rs]
        line, = ax.plot(g, [r["sampling_s"] for r in rs], "o-", label=_label(key))
        if any(r.get("predicted_s") for r in rs):
            ax.plot(g, [r.get("predicted_s") or float("nan") for r in rs], "x:", color=line.get_color())
        if rs[0]["gpus"] == 1:
            ax.plot(g, [rs[0]["sampling_s"] / n for n in g], "--", color=line.get_color(), alpha=0.35)
    ax.set(xscale="log", yscale="log", xlabel="GPUs (processes)", ylabel="sampling seconds (median)",
           title="Latency (dashed: ideal; x: cost model)")
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.legend(fontsize=7)
    save(fig, "latency")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, rs in series.items():
        ax.plot([r["gpus"] for r in rs], [r.get("efficiency") or float("nan") for r in rs], "o-", label=_label(key))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="GPUs (processes)", ylabel="speed-up / GPUs", title="Parallel efficiency", ylim=(0, None))
    ax.legend(fontsize=7)
    save(fig, "efficiency")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, rs in series.items():
        if key[2] != "none":
            ax.plot([r["gpus"] for r in rs], [r.get("cache_speedup") or float("nan") for r in rs], "o-", label=_label(key))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="GPUs (processes)", ylabel="no-cache time / cached time",
           title="The cache's speed-up at each GPU count")
    if ax.lines[1:]:
        ax.legend(fontsize=7)
    save(fig, "cache_speedup")

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(ok)), 4.5))
    bottom = [0.0] * len(ok)
    for col, name in (("setup_s", "setup (load)"), ("text_s", "text encoding"), ("sampling_s", "sampling"),
                      ("decode_s", "decoding"), ("write_s", "writing")):
        vals = [r.get(col) or 0.0 for r in ok]
        ax.bar(range(len(ok)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(ok)), [r["point"] for r in ok], rotation=70, fontsize=7)
    ax.set(ylabel="seconds (median per video)", title="Time per phase")
    ax.legend(fontsize=7)
    save(fig, "phases")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, rs in series.items():
        rs = [r for r in rs if r["gpus"] > 1]
        if rs:
            ax.plot([r["gpus"] for r in rs], [r["bytes_per_computed_step"] / 1e6 for r in rs], "o-", label=_label(key))
    ax.set(xscale="log", xlabel="GPUs (processes)", ylabel="MB per rank per computed step",
           title="Collective payload per computed step (reused steps: none)")
    if ax.lines:
        ax.legend(fontsize=7)
    save(fig, "bytes")
    return paths
