"""PS vs DDP vs one process, with and without freezing, side by side in one invocation.

    python -m bench.compare --out docs/results/compare-loopback [--network netns --link-rate 1gbit]
    python -m bench.compare --workload minilm-rt --steps 0 --eval-every 0 \
        --only ps-none,ps-gradnorm,ps-gradnorm-votes,ps-gradnorm-cache --out docs/results/text-rt
    python -m bench.compare --workload minilm-rt --steps 0 --eval-every 0 --seeds 0,1,2 \
        --only ps-none,ps-gradnorm --out docs/results/text-rt-seeds
    python -m bench.compare --network netns --link-rate 1gbit --link-offload --steps 24 --model resnet18-fine \
        --only ps-none,ps-none-shards2,ps-none-shards3,ddp-none --out docs/results/compare-1gbit-shards
    python -m bench.compare --workload resnet18-seed --steps 0 --eval-every 0 \
        --only ps-none,ps-static-1,ps-static-2,ps-static-3,ps-static-4,ps-static-5,ps-static-6,ps-gradnorm-min,ddp-none \
        --out docs/results/seed-resnet18

Each configuration is one `freezeps run` with the same model, data, seed and steps; only
--mode and the freeze settings differ. Flags the bench does not know (`--epochs 4`, `--freeze-warmup 86`)
go to every run after the configuration's, so they win. Writes OUT/report.md and the plots (`freezeps report`),
OUT/results.json (the facts of each run, without the per-step curves) and OUT/README.md
(the report, the command, the machine, the date, and OUT/notes.md when there is one).

The runs go to a new runs/compare-DATE-TIME folder, or with `--runs-dir` to a given one: a
run that finished there is kept and not run again, so a bench that was stopped goes on where it
stopped, and a configuration can be added to earlier runs on the same machine. A finished run
whose settings (config.toml) differ from what this bench would run is refused, not reused; where
it lies is no setting, so a runs folder can be moved or copied.
Before and after each run the bench times a fixed piece of work (bench.machine.speed_probe_ms)
and keeps it in the runs folder's bench.json, which the report shows under its table: this
machine kind drifts by up to half from one hour to the next. The probe does not follow a
4-worker run's speed closely; the report's line of each run's seconds per round before any
freeze (freezeps.report.full_model_pace) says better whether two runs' times compare, and the
line under it reads each run's time in those rounds' units. A run
that outlives `--run-timeout` is stopped, PS and workers with it (bench.run_freezeps), and the
bench ends with its error.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

from bench import FREEZEPS, machine, run_freezeps
from freezeps.cli import build_parser, config_from_args
from freezeps.config import load_config
from freezeps.report import summarize_run, write_comparison

WORKLOADS = {
    "resnet18": ["--model", "resnet18", "--weights", "random", "--dataset", "fashion_mnist", "--num-workers", "4",
                 "--batch-size", "32", "--lr", "0.02", "--train-samples", "8192", "--test-samples", "1000",
                 "--seed", "0"],
    # The seed's experiments (REFERENCE 1.1) as far as this machine allows: ResNet-18's 7 groups, the seed's
    # optimizer (SGD lr 0.1, momentum 0.9, weight decay 1e-4) and augmentation (random crop, flip), on
    # Fashion-MNIST from random weights: CIFAR-10 and torchvision's pretrained ResNet-18 are not to be had
    # offline here (where there is internet, add `--dataset cifar10 --download --weights imagenet`).
    "resnet18-seed": ["--model", "resnet18", "--weights", "random", "--dataset", "fashion_mnist", "--num-workers",
                      "4", "--batch-size", "32", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "1e-4",
                      "--augment", "--train-samples", "8192", "--test-samples", "1000", "--epochs", "3",
                      "--seed", "0"],
    # MiniLM fine-tuning as BERT is fine-tuned: AdamW, 10% warm-up then linear decay, weight decay 0.01.
    **{f"minilm-{short}": ["--model", "minilm", "--weights", "pretrained", "--dataset", dataset, "--num-workers", "4",
                           "--batch-size", "16", "--max-seq-len", str(max_len), "--optimizer", "adamw",
                           "--lr", "1e-4", "--weight-decay", "0.01", "--lr-schedule", "linear",
                           "--warmup-steps", "6", "--train-samples", "2048", "--test-samples", "1000",
                           "--epochs", "2", "--seed", "0"]
       for short, dataset, max_len in (("rt", "rotten_tomatoes", 64), ("r8", "reuters_r8", 128))},
}
# The seed's ResNet-18 groups: conv1, bn1, layer1, layer2, layer3, layer4, fc.
ADAPTIVE = ["--freeze", "gradnorm", "--freeze-variant", "percentile", "--freeze-warmup", "8",
            "--freeze-interval", "4"]
# Both guards: only the bottom half may freeze, and only what two tests in a row proposed.
GUARDED = [*ADAPTIVE, "--freeze-patience", "2", "--freeze-max-fraction", "0.5"]
CACHE = ["--cache-memory-bytes", str(1 << 30)]
# AutoFreeze's own rule and cadence (REFERENCE 1.2): L1 norms, the 50th percentile, 20 tests per run.
AUTOFREEZE = ["--freeze", "gradnorm", "--freeze-variant", "percentile", "--freeze-percentile", "50",
              "--freeze-norm", "1", "--freeze-interval", "0", "--freeze-warmup", "0"]
# Settings of the freeze engine and its guards (freezeps.config's freeze_*, linear_* and vote_*),
# which a run that freezes nothing never reads.
FREEZE_SETTINGS = ("freeze_", "linear_", "vote_")
CONFIGS = {
    "ps-none": ["--mode", "ps", "--freeze", "none"],
    "ddp-none": ["--mode", "ddp", "--freeze", "none"],
    # The seed's static sweep: the first k groups frozen from the start (k = 0 is `none`).
    **{f"{mode}-static-{k}": ["--mode", mode, "--freeze", "static", "--freeze-blocks", str(k), "--freeze-step", "0"]
       for k in range(1, 7) for mode in ("ps", "ddp")},
    "ps-gradnorm": ["--mode", "ps", *ADAPTIVE],
    "ddp-gradnorm": ["--mode", "ddp", *ADAPTIVE],
    # The seed's rule: the first active group freezes when its η is the smallest, 20 tests per run.
    "ps-gradnorm-min": ["--mode", "ps", "--freeze", "gradnorm", "--freeze-variant", "min", "--freeze-interval", "0",
                        "--freeze-warmup", "0"],
    "single-none": ["--mode", "single", "--freeze", "none"],
    # The PS split into k shards, each owning a contiguous block range of roughly equal bytes (ps-lite style):
    # with --network netns each shard has its own link, so N workers no longer share one PS's bandwidth.
    **{f"ps-none-shards{k}": ["--mode", "ps", "--freeze", "none", "--ps-shards", str(k)] for k in (2, 3, 4)},
    "ps-gradnorm-votes": ["--mode", "ps", *ADAPTIVE, "--freeze-decision", "votes"],
    "ps-gradnorm-cache": ["--mode", "ps", *ADAPTIVE, *CACHE],
    # The top half stays trainable (MiniLM: embeddings and layer0-2 may freeze; layer3-5 and the head never).
    "ps-gradnorm-half": ["--mode", "ps", *ADAPTIVE, "--freeze-max-fraction", "0.5"],
    # A prefix freezes once two tests in a row proposed it: one noisy test freezes nothing.
    "ps-gradnorm-patience": ["--mode", "ps", *ADAPTIVE, "--freeze-patience", "2"],
    "ps-gradnorm-votes-patience": ["--mode", "ps", *ADAPTIVE, "--freeze-decision", "votes", "--freeze-patience", "2"],
    "ps-gradnorm-patience-half": ["--mode", "ps", *GUARDED],
    "ps-gradnorm-patience-half-cache": ["--mode", "ps", *GUARDED, *CACHE],
    "ps-autofreeze": ["--mode", "ps", *AUTOFREEZE],
    "ps-autofreeze-cache": ["--mode", "ps", *AUTOFREEZE, *CACHE],
    "ps-autofreeze-half": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.5"],
    "ps-autofreeze-half-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.5", *CACHE],
    # The same with each worker testing its own gradients and the PS freezing what a weighted quorum proposes.
    "ps-autofreeze-votes-half-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-decision", "votes",
                                       "--freeze-max-fraction", "0.5", *CACHE],
    # The top quarter stays trainable (MiniLM: embeddings and layer0-4 may freeze; layer5 and the head never).
    "ps-autofreeze-quarter-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.75", *CACHE],
    "ps-autofreeze-votes-quarter-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-decision", "votes",
                                          "--freeze-max-fraction", "0.75", *CACHE],
    # Between the two (MiniLM: embeddings and layer0-3 may freeze; layer4-5 and the head never).
    "ps-autofreeze-5of8": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.625"],
    "ps-autofreeze-5of8-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.625", *CACHE],
    "ps-autofreeze-votes-5of8-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-decision", "votes",
                                       "--freeze-max-fraction", "0.625", *CACHE],
    # The same with dropout kept on in the frozen blocks, as full fine-tuning has it (no cache then).
    "ps-autofreeze-5of8-dropout": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.625", "--frozen-dropout"],
    # The same, with the five frozen by round 104 at the latest whatever the tests say: 1.22 epochs of R8,
    # when the seeds that met issue 8's goals at 6 epochs had frozen all five (a later --freeze-deadline wins).
    "ps-autofreeze-5of8-deadline-cache": ["--mode", "ps", *AUTOFREEZE, "--freeze-max-fraction", "0.625",
                                          "--freeze-deadline", "104", *CACHE],
}
# The same with bfloat16 pushes (DDP: torch's bf16 compression hook): half the push bytes (DDP's both ways).
CONFIGS.update({f"{name}-bf16": [*CONFIGS[name], "--push-dtype", "bfloat16"]
                for name in ("ps-none", "ddp-none", "ps-none-shards3", "ps-autofreeze-5of8-cache",
                             "ps-autofreeze-votes-5of8-cache")})
# ... and pulls too: each round's change in bfloat16, with error feedback (a PS's; DDP's hook already narrows both).
CONFIGS.update({f"{name}-bf16both": [*CONFIGS[f"{name}-bf16"], "--pull-dtype", "bfloat16"]
                for name in ("ps-none", "ps-none-shards3", "ps-autofreeze-5of8-cache", "ps-autofreeze-votes-5of8-cache")})
# Whole pulls of the embedding matrices, as before sparse pulls (on by default: a pull then asks for
# only the rows of its next batch); the same training to the bit, more pull bytes.
CONFIGS.update({f"{name}-wholepull": [*CONFIGS[name], "--no-sparse-pull"]
                for name in ("ps-none", "ps-none-bf16both", "ps-autofreeze-5of8-cache-bf16both")})
# Pushes that start when backward has ended, as before they overlapped it (on by default: a
# block goes as soon as backward has finished it, last block first; in votes mode, until
# 2026-12-06, every push waited for backward); the same bytes and training.
CONFIGS.update({f"{name}-nooverlap": [*CONFIGS[name], "--no-overlap-push"]
                for name in ("ps-none", "ps-none-bf16both", "ps-autofreeze-5of8-cache-bf16both",
                             "ps-autofreeze-votes-5of8-cache-bf16both")})
# Forward passes that start when all of the pull has come, as before they overlapped it (on by
# default: forward runs each block as soon as it has landed); the same bytes and training.
CONFIGS.update({f"{name}-nooverlappull": [*CONFIGS[name], "--no-overlap-pull"]
                for name in ("ps-none", "ps-none-bf16both", "ps-autofreeze-5of8-cache-bf16both")})


def run_command(common: list[str], name: str, extra: list[str], run_dir: Path, seed: int | None) -> list[str]:
    """One `freezeps run`: the workload's flags, the configuration's, then the flags the bench did not
    know (so `--epochs 4` or `--freeze-warmup 86` given to the bench win over both), then the seed.
    A flag given twice takes its last value."""
    cmd = [*FREEZEPS, "run", *common, *CONFIGS[name], *extra, "--run-dir", str(run_dir)]
    return cmd + ([] if seed is None else ["--seed", str(seed)])


def _without_report_from(argv: list[str]) -> list[str]:
    """The command line that runs the benchmark: a rebuilt report names how its runs were made."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--report-from"):
            skip = arg == "--report-from"
            continue
        out.append(arg)
    return out


def _where_and_when(runs_dir: Path, rebuilding: bool) -> dict:
    """The date and machine of the runs in `runs_dir`: noted there when the bench starts them,
    read back when a report is rebuilt from them (possibly on another day and machine). Runs
    added to a folder must come from the machine its first runs came from; their dates span."""
    noted = runs_dir / "bench.json"
    earlier = json.loads(noted.read_text()) if noted.is_file() else None
    if rebuilding:
        return earlier or {"date": "date not recorded", "machine": "not recorded with these runs"}
    made = {"date": date.today().isoformat(), "machine": machine.describe()}
    if earlier is not None:
        if earlier["machine"] != made["machine"]:
            raise ValueError(f"{runs_dir} holds runs from another machine ({earlier['machine']}); this is "
                             f"{made['machine']}: their times do not compare")
        first = earlier["date"].split(" to ")[0]
        made = {**earlier, **made, "date": first if first == made["date"] else f"{first} to {made['date']}"}
    runs_dir.mkdir(parents=True, exist_ok=True)
    noted.write_text(json.dumps(made))
    return made


def _note_probes(runs_dir: Path, run: str, before_ms: float, after_ms: float) -> None:
    """Keep the machine's speed probe before and after `run` in its folder's bench.json."""
    noted = runs_dir / "bench.json"
    made = {**json.loads(noted.read_text()), "probe": machine.PROBE}
    made.setdefault("probe_ms", {})[run] = [round(before_ms, 1), round(after_ms, 1)]
    noted.write_text(json.dumps(made))  # freezeps.report.speed_probe reads it


def _finished_facts(run_dir: Path) -> dict | None:
    """The facts of the run in `run_dir` if it ended (its PS or DDP log has its summary), else None."""
    try:
        return summarize_run(run_dir)
    except (FileNotFoundError, ValueError):  # no summary yet, or a line cut short
        return None


def _settings_differ(run_dir: Path, cmd: list[str]) -> list[str]:
    """How the settings of the run in `run_dir` (its config.toml) differ from those `cmd` would run
    with, as 'name: had -> wants'; empty when they are the same. The environment counts on both
    sides, as it did for the run: the bench's runs inherit it. Between two runs that freeze nothing
    the freeze settings do not count (FREEZE_SETTINGS), so a none run serves benches of another
    freeze setting (`--freeze-warmup 86` beside one made with 64)."""
    wanted = asdict(config_from_args(build_parser().parse_args(cmd[len(FREEZEPS):])))
    try:
        had = asdict(load_config(config_file=str(run_dir / "config.toml"), environ={}))
    except (OSError, ValueError) as e:  # no config.toml, or one of another version of freezeps
        return [f"its config.toml does not load here ({e})"]
    ignored = FREEZE_SETTINGS if had["freeze"] == wanted["freeze"] == "none" else ()
    # Where the run lies is not how it ran: a runs folder moved or copied keeps its runs.
    return [f"{name}: {had[name]!r} -> {value!r}" for name, value in wanted.items()
            if had[name] != value and name != "run_dir" and not name.startswith(ignored)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workload", default="resnet18", choices=tuple(WORKLOADS))
    parser.add_argument("--only", default="", help="comma-separated configuration names")
    parser.add_argument("--baseline", default="", help="the configuration the others' savings and accuracy "
                        "are measured against (default: the first of --only); the order of --only is the order of runs")
    parser.add_argument("--steps", type=int, default=32, help="rounds per run; 0: the workload's epochs")
    parser.add_argument("--eval-every", type=int, default=16)
    parser.add_argument("--seeds", default="", help="comma-separated seeds, each configuration run once per seed "
                        "(default: the workload's seed); the report adds mean ± sd over them")
    parser.add_argument("--report-from", type=Path, default=None,
                        help="rebuild the report from this earlier runs/compare-* folder instead of running")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="run into this folder (default: a new runs/compare-DATE-TIME); runs that finished "
                        "there with the same settings are kept, not run again (other settings: refused)")
    parser.add_argument("--run-timeout", type=float, default=6 * 3600,
                        help="seconds one run may take before it is stopped, PS and workers with it, and the bench "
                        "with an error (6 epochs of R8 without freezing took 62-68 minutes on 2 vCPUs)")
    parser.add_argument("--network", default="loopback", choices=("loopback", "netns"))
    parser.add_argument("--link-rate", default="")
    parser.add_argument("--link-mtu", type=int, default=1500)
    parser.add_argument("--link-offload", action="store_true")
    args, extra = parser.parse_known_args()
    names = [n for n in (args.only.split(",") if args.only else CONFIGS) if n]
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"no configuration named {', '.join(unknown)}; there are {', '.join(CONFIGS)}")
    if args.run_timeout <= 0:
        parser.error(f"--run-timeout {args.run_timeout:g}: a run needs more than 0 seconds")
    baseline = args.baseline or names[0]
    if baseline not in names:
        parser.error(f"--baseline {baseline} is not among the configurations run ({', '.join(names)})")
    net = ["--network", args.network, "--link-mtu", str(args.link_mtu)]
    if args.link_rate:
        net += ["--link-rate", args.link_rate]
    if args.link_offload:
        net += ["--link-offload"]
    common = [*WORKLOADS[args.workload], "--steps", str(args.steps), "--eval-every", str(args.eval_every)]
    if args.network == "netns":
        common += net
    if args.report_from and args.runs_dir:
        parser.error("--report-from rebuilds a report without running: it takes no --runs-dir")
    runs_dir = args.report_from or args.runs_dir or Path("runs") / f"compare-{date.today().isoformat()}-{int(time.time())}"
    seeds = [int(s) for s in args.seeds.split(",") if s]
    made = _where_and_when(runs_dir, rebuilding=args.report_from is not None)
    results, groups = [], {}
    # Seed-major: a run interrupted late still leaves every configuration's first seeds.
    for seed in seeds or [None]:
        for name in names:
            if args.network == "netns" and CONFIGS[name][1] == "single":
                continue  # one process has no network
            run = name if seed is None else f"{name}-s{seed}"
            cmd = run_command(common, name, extra, runs_dir / run, seed)
            facts = _finished_facts(runs_dir / run) if args.report_from is None else None
            if facts is not None and (differ := _settings_differ(runs_dir / run, cmd)):
                # A finished run is kept only for the command that made it: a changed flag would
                # otherwise report an old run under the new command.
                raise ValueError(f"{runs_dir / run} finished with other settings than this bench asks for "
                                 f"({'; '.join(differ)}): give another --runs-dir, or delete that run")
            if facts is not None:
                print(f"[compare] {run}: finished in {runs_dir}, not run again", flush=True)
            elif args.report_from is None:
                if (runs_dir / run).exists():  # a run that was stopped: its logs would mix with the new one's
                    shutil.rmtree(runs_dir / run)
                print(f"[compare] {run}: {' '.join(cmd[len(FREEZEPS):])}", flush=True)
                before_ms = machine.speed_probe_ms()
                run_freezeps(cmd, args.run_timeout)
                _note_probes(runs_dir, run, before_ms, machine.speed_probe_ms())
            results.append(facts or summarize_run(runs_dir / run))
            groups.setdefault(name, []).append(results[-1])
            print(f"[compare] {run}: {results[-1]['wall_s']:.1f} s, accuracy {results[-1]['accuracy']}", flush=True)
    out = args.out
    title = f"{args.workload}: {', '.join(names)} ({made['date']}, {args.network}" + \
        (f", {args.link_rate}" if args.link_rate else "") + ")"
    path = write_comparison(results, out, title, baseline=baseline, groups=groups)
    text = [path.read_text().rstrip(), "",
            f"Machine: {made['machine']}. Command: `python -m bench.compare "
            f"{' '.join(_without_report_from(sys.argv[1:]))}`.", f"Common flags: `{' '.join(common)}`, then the "
            "configuration's" + (f", then `{' '.join(extra)}`" if extra else "") +
            (", then each run's `--seed N`" if seeds else "") + " (the last one counts)."]
    write_readme(out, text)


def write_readme(out: Path, text: list[str]) -> None:
    """OUT/README.md: `text`, then the hand-written reading of the results in OUT/notes.md when
    there is one (a rebuilt report keeps it); printed as well."""
    notes = out / "notes.md"
    if notes.is_file():
        text = [*text, "", notes.read_text().rstrip()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text("\n".join(text) + "\n")
    print((out / "README.md").read_text())


if __name__ == "__main__":
    main()
