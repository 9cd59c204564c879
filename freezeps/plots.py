"""PNG plots of one or more runs (the facts from freezeps.report.summarize_run), with
matplotlib's file-only backend."""
from __future__ import annotations

from pathlib import Path


def write_plots(runs: list[dict], out: Path) -> dict[str, Path]:
    """Bytes per step stacked by block, accuracy vs wall time and vs bytes, the freeze
    timeline. Returns {title: file}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler
    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.cm.tab20.colors)
    files: dict[str, Path] = {}

    def save(fig, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files[title] = out / name

    # Tensor bytes per step, stacked by block: one panel per run.
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.2 * len(runs) + 0.6), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], runs):
        names = [b["name"] for b in r["blocks"]]
        series = [[step.get(n, 0) / 1e6 for step in r["payload_per_step"]] for n in names]
        ax.stackplot(range(len(r["payload_per_step"])), series, labels=names, step="post")
        ax.set_title(r["name"], fontsize=9), ax.set_ylabel("MB per step"), ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles[::-1], labels[::-1], loc="center right", fontsize=6, ncol=1)
    fig.subplots_adjust(right=0.8)
    save(fig, "bytes_per_step.png", "tensor bytes per step, stacked by block")

    for key, xlabel, name, title in (("wall_s", "wall time (s)", "accuracy_vs_time.png", "accuracy vs wall time"),
                                     ("bytes", "tensor bytes moved (GB)", "accuracy_vs_bytes.png",
                                      "accuracy vs bytes")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in runs:
            xs = [c[key] / (1e9 if key == "bytes" else 1) for c in r["curve"]]
            ax.plot(xs, [c["accuracy"] for c in r["curve"]], marker="o", label=r["name"])
        ax.set_xlabel(xlabel), ax.set_ylabel("test accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        save(fig, name, title)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.step([t for t, _ in r["frozen_over_time"]], [k for _, k in r["frozen_over_time"]], where="post",
                label=r["name"])
    blocks = max(len(r["blocks"]) for r in runs)
    ax.set_xlabel("wall time (s)"), ax.set_ylabel(f"frozen blocks (of {blocks})"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, "freeze_timeline.png", "freeze timeline")
    return files
