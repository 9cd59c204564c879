"""Run the freeze engines side by side on one workload and write a report with plots.

    python -m bench.freeze_sweep --out docs/results/freeze-sweep [--only none,gradnorm-pct]

Each configuration is one `freezeps run` (a PS and 4 workers on this machine) with the
same data, model, seed and budget; only the freeze settings differ. Writes OUT/results.json,
OUT/report.md and OUT/README.md (the table, with OUT/notes.md appended) and the plots of
`freezeps report` (rebuilt from OUT/results.json with --report-only). The run folders themselves go to runs/sweep-<date>/.
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from bench import FREEZEPS, machine, run_freezeps
from freezeps.report import summarize_run, write_comparison

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
    cmd = [*FREEZEPS, "run", *COMMON, *args, "--run-dir", str(run_dir)]
    print(f"[sweep] {name}: {' '.join(cmd[len(FREEZEPS):])}", flush=True)
    started = time.monotonic()
    run_freezeps(cmd, timeout_s=1800)
    return {**summarize_run(run_dir), "name": name, "args": args, "process_wall_s": time.monotonic() - started}


def write_report(results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    title = f"Freeze engines side by side ({date.today().isoformat()})"
    path = write_comparison(results, out, title, baseline="none")
    lines = [path.read_text().rstrip(), "",
             f"Machine: {machine.describe()}. Command: `python -m bench.freeze_sweep --out {out}`.",
             "Workload: EfficientNet-Lite0 (ImageNet weights) on 24,576 Fashion-MNIST samples, 4 workers x 1 thread, "
             "2 epochs of 96 rounds, batch 64 per worker, SGD lr 0.1; test accuracy on 1,000 test samples every "
             "48 rounds. Common flags: `" + " ".join(COMMON) + "`."]
    notes = out / "notes.md"  # the written analysis, kept apart from the generated table
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    (out / "README.md").write_text("\n".join(lines) + "\n")


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
