"""Run the freeze engines side by side on one workload and write a report with plots.

    python -m bench.freeze_sweep --out docs/results/freeze-sweep [--only none,gradnorm-pct]

Each configuration is one `freezeps run` (a PS and 4 workers on this machine) with the
same data, model, seed and budget; only the freeze settings differ. Writes OUT/results.json,
OUT/README.md (the table) and OUT/*.png (accuracy vs wall time and vs bytes, frozen prefix
over time). The run folders themselves go to runs/sweep-<date>/.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from freezeps.report import read_jsonl, summarize_run

COMMON = ["--num-workers", "4", "--epochs", "2", "--train-samples", "24576", "--test-samples", "1000",
          "--eval-every", "48", "--seed", "0"]
ADAPTIVE = ["--freeze-warmup", "16", "--freeze-interval", "8"]
CONFIGS = {
    "none": ["--freeze", "none"],
    "static-15@0": ["--freeze", "static", "--freeze-blocks", "15", "--freeze-step", "0"],
    "static-15@96": ["--freeze", "static", "--freeze-blocks", "15", "--freeze-step", "96"],
    "linear-composer": ["--freeze", "linear", "--linear-mode", "composer", "--linear-start", "0.25",
                        "--linear-level", "0.8"],
    "gradnorm-min": ["--freeze", "gradnorm", "--freeze-variant", "min", *ADAPTIVE],
    "gradnorm-pct": ["--freeze", "gradnorm", "--freeze-variant", "percentile", *ADAPTIVE],
    "threshold": ["--freeze", "threshold", "--freeze-tau", "0.8", "--freeze-rate", "0.5", *ADAPTIVE],
    "gradnorm-pct-votes": ["--freeze", "gradnorm", "--freeze-decision", "votes", *ADAPTIVE],
    # After the first sweep: fewer tests (4 per epoch, as AutoFreeze) and the last 4 blocks kept training.
    "gradnorm-pct-T24-cap": ["--freeze", "gradnorm", "--freeze-warmup", "32", "--freeze-interval", "24",
                             "--freeze-max-fraction", "0.8"],
    "gradnorm-pct-T24-cap-votes": ["--freeze", "gradnorm", "--freeze-decision", "votes", "--freeze-warmup", "32",
                                   "--freeze-interval", "24", "--freeze-max-fraction", "0.8"],
    "none-dirichlet": ["--freeze", "none", "--sharding", "dirichlet", "--dirichlet-alpha", "0.3"],
    "gradnorm-pct-dirichlet": ["--freeze", "gradnorm", "--sharding", "dirichlet", "--dirichlet-alpha", "0.3",
                               *ADAPTIVE],
    "gradnorm-pct-votes-dirichlet": ["--freeze", "gradnorm", "--freeze-decision", "votes", "--sharding",
                                     "dirichlet", "--dirichlet-alpha", "0.3", *ADAPTIVE],
}


def run_one(name: str, args: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "freezeps", "run", *COMMON, *args, "--run-dir", str(run_dir)]
    print(f"[sweep] {name}: {' '.join(cmd[3:])}", flush=True)
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=1800)
    facts = summarize_run(run_dir)
    ps = read_jsonl(run_dir / "ps.jsonl")
    rounds = [r for r in ps if r.get("event") == "round"]
    t0 = rounds[0]["time"] - rounds[0]["round_s"]
    cumulative, total = {}, 0
    for r in rounds:
        total += sum(v["payload"] for m in ("Push", "Pull") for d in ("in", "out")
                     for k, v in r["bytes"]["by_block"].get(m, {}).get(d, {}).items())
        cumulative[r["step"]] = total
    evals = [e for e in read_jsonl(run_dir / "worker-0.jsonl") if e.get("event") == "eval"]
    return {
        "name": name, "args": args, "process_wall_s": time.monotonic() - started, **facts,
        "best_accuracy": max((e["accuracy"] for e in evals), default=None),
        "curve": [{"step": e["step"], "wall_s": e["time"] - t0, "accuracy": e["accuracy"],
                   "bytes": cumulative.get(e["step"] - 1, 0)} for e in evals],
        "frozen_over_time": [(r["time"] - t0, r["frozen_blocks"]) for r in rounds],
        "freezes": [{k: f.get(k) for k in ("step", "epoch", "from", "to", "blocks")}
                    for f in ps if f.get("event") == "freeze"],
    }


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    base = next((r for r in results if r["name"] == "none"), None)
    lines = [f"# Freeze engines side by side ({date.today().isoformat()})", "",
             f"Machine: {platform.machine()}, 2 vCPU, no GPU. Command: `python -m bench.freeze_sweep --out {out}`.",
             "Workload: EfficientNet-Lite0 (ImageNet weights) on 24,576 Fashion-MNIST samples, 4 workers x 1 thread, "
             "2 epochs of 96 rounds, batch 64 per worker, SGD lr 0.1; test accuracy on 1,000 test samples every "
             "48 rounds. Common flags: `" + " ".join(COMMON) + "`.", "",
             "| run | final acc | best acc | wall s | bytes (push+pull) | bytes saved | time saved | "
             "fwd/bwd/pull/wait/push ms | freezes (step: blocks) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        moved = r["push_payload"] + r["pull_payload"]
        saved_b = f"{1 - moved / (base['push_payload'] + base['pull_payload']):.1%}" if base else "-"
        saved_t = f"{1 - r['wall_s'] / base['wall_s']:.1%}" if base else "-"
        phases = "/".join(f"{v:.0f}" for v in r["phase_ms_per_step"].values())
        initial = r["frozen_over_time"][0][1] if r["frozen_over_time"] else 0
        freezes = "; ".join([f"0: 0->{initial}"] * bool(initial) +
                            [f"{f['step']}: {f['from']}->{f['to']}" for f in r["freezes"]]) or "-"
        lines.append(f"| {r['name']} | {r['accuracy']:.4f} | {r['best_accuracy']:.4f} | {r['wall_s']:.0f} | "
                     f"{moved / 1e9:.2f} GB | {saved_b} | {saved_t} | {phases} | {freezes} |")
    lines += ["", "![accuracy vs wall time](accuracy_vs_time.png) ![accuracy vs bytes](accuracy_vs_bytes.png)",
              "![frozen prefix over time](frozen_prefix.png)"]
    notes = out / "notes.md"  # the written analysis, kept apart from the generated table
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler
    plt.rcParams["axes.prop_cycle"] = cycler(color=plt.cm.tab20.colors)  # a colour for each of up to 20 runs
    for key, xlabel, fname in (("wall_s", "wall time (s)", "accuracy_vs_time.png"),
                               ("bytes", "tensor bytes moved (GB)", "accuracy_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in results:
            xs = [c[key] / (1e9 if key == "bytes" else 1) for c in r["curve"]]
            ax.plot(xs, [c["accuracy"] for c in r["curve"]], marker="o", label=r["name"])
        ax.set_xlabel(xlabel), ax.set_ylabel("test accuracy"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        fig.tight_layout(), fig.savefig(out / fname, dpi=110), plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.step([t for t, _ in r["frozen_over_time"]], [k for _, k in r["frozen_over_time"]], where="post",
                label=r["name"])
    ax.set_xlabel("wall time (s)"), ax.set_ylabel("frozen blocks (of 19)"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(out / "frozen_prefix.png", dpi=110), plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results/freeze-sweep"))
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from OUT/results.json")
    parser.add_argument("--append", action="store_true", help="add to (or replace in) OUT/results.json")
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / "results.json").read_text()), args.out)
        return
    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    runs = Path("runs") / f"sweep-{date.today().isoformat()}"
    results = json.loads((args.out / "results.json").read_text()) if args.append else []
    for name in names:
        results = [r for r in results if r["name"] != name]
        results.append(run_one(name, CONFIGS[name], runs / name))
        write_report(results, args.out)  # a partial report survives an interrupted sweep
    print((args.out / "README.md").read_text())


if __name__ == "__main__":
    main()
