"""Stragglers: the same run with and without backup workers while its workers stall at random.

    python -m bench.stragglers --backup 0,1 --pause-s 1.0 --every-s 8 --calm \
        --runs-dir runs/stragglers --out docs/results/stragglers [freezeps run flags]

Each worker process is stopped (SIGSTOP) for --pause-s seconds at random moments and then
continued (SIGCONT), as a loaded or preempted host stalls a worker: the gaps between its
stalls are exponential with mean --every-s seconds, drawn from a generator seeded by
--seed and the worker's place in launch order, and counted from the run's first round, so
every run meets the same stalls at the same seconds of its training. One run per value of
--backup (`freezeps run --backup-workers B`), and with --calm each once more without stalls
(what waiting out the slowest costs when no worker stalls). Flags the bench does not know go
to every `freezeps run` (default: the main job).

Writes OUT/report.md and its plots (`freezeps report`), OUT/results.json (each run's facts
and its stalls) and OUT/README.md (a table of wall time, rounds, samples applied, late
pushes and accuracy; the command, the machine, the date; OUT/notes.md when there is one).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

from bench import FREEZEPS, machine, run_freezeps
from bench.compare import write_readme
from freezeps.report import summarize_run, write_comparison
from proto.runlog import read_jsonl


def worker_pids(launcher: int) -> list[int]:
    """The launcher's `freezeps worker` children, in launch order (pid order)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == launcher and b"worker" in argv:
            found.append(int(entry.name))
    return sorted(found)


def _first_round(run_log: Path) -> bool:
    return run_log.is_file() and '"event": "round"' in run_log.read_text()


class Stalls:
    """While a run goes on (`with stalls(launcher_pid):`), stop each of its `workers` worker
    processes for `pause_s` at random moments; `log` lists them (worker, start s, pause s)."""

    def __init__(self, pause_s: float, every_s: float, seed: int, workers: int, run_log: Path):
        self.pause_s, self.every_s, self.seed, self.workers, self.run_log = pause_s, every_s, seed, workers, run_log
        self.log: list[dict] = []

    @contextlib.contextmanager
    def __call__(self, launcher: int) -> Iterator[None]:
        done = threading.Event()
        stopped: set[int] = set()
        lock = threading.Lock()

        def stall(i: int, pid: int, t0: float) -> None:
            rng = random.Random(self.seed * 1000 + i)
            at = 0.0
            while True:
                at += rng.expovariate(1 / self.every_s)
                if done.wait(max(0.0, t0 + at - time.monotonic())):
                    return
                try:
                    with lock:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.add(pid)
                    self.log.append({"worker": i, "start_s": round(time.monotonic() - t0, 3), "pause_s": self.pause_s})
                    done.wait(self.pause_s)
                    with lock:
                        os.kill(pid, signal.SIGCONT)
                        stopped.discard(pid)
                except ProcessLookupError:  # the worker has ended
                    return
                at += self.pause_s

        def start() -> None:
            while not done.is_set() and (len(pids := worker_pids(launcher)) < self.workers
                                         or not _first_round(self.run_log)):
                done.wait(0.2)
            if done.is_set():
                return
            t0 = time.monotonic()
            for i, pid in enumerate(pids[:self.workers]):
                threading.Thread(target=stall, args=(i, pid, t0), daemon=True).start()

        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        try:
            yield
        finally:
            done.set()
            starter.join()
            with lock:  # never leave a process stopped: its launcher would wait for it forever
                for pid in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)


def round_facts(run_log: Path) -> dict:
    """From the PS's run log: rounds, samples applied, late pushes, median round seconds."""
    records = read_jsonl(run_log)
    rounds = [r for r in records if r["event"] == "round"]
    return {"rounds": len(rounds), "samples": sum(r["samples"] for r in rounds),
            "late_pushes": sum(1 for r in records if r["event"] == "late_push"),
            "median_round_s": statistics.median(r["round_s"] for r in rounds) if rounds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a new runs/stragglers-DATE-TIME")
    parser.add_argument("--backup", default="0,1", help="comma-separated --backup-workers values, one run each")
    parser.add_argument("--pause-s", type=float, default=1.0, help="how long a stall stops a worker")
    parser.add_argument("--every-s", type=float, default=8.0, help="mean seconds between a worker's stalls")
    parser.add_argument("--seed", type=int, default=0, help="seeds the stalls (not the run)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--calm", action="store_true", help="each configuration once more without stalls")
    parser.add_argument("--run-timeout", type=float, default=3600)
    args, extra = parser.parse_known_args()
    if args.pause_s <= 0 or args.every_s <= 0:
        parser.error("--pause-s and --every-s must be > 0")
    runs_dir = args.runs_dir or Path("runs") / f"stragglers-{date.today().isoformat()}-{int(time.time())}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    backups = [int(b) for b in args.backup.split(",") if b]
    plan = [(b, True) for b in backups] + ([(b, False) for b in backups] if args.calm else [])
    results, table, stalls_by_run = [], [], {}
    for backup, stalled in plan:
        name = f"backup{backup}" + ("-stalls" if stalled else "-calm")
        run_dir = runs_dir / name
        cmd = [*FREEZEPS, "run", "--num-workers", str(args.num_workers), "--backup-workers", str(backup),
               *extra, "--run-dir", str(run_dir)]
        print(f"[stragglers] {name}: {' '.join(cmd[len(FREEZEPS):])}", flush=True)
        stalls = Stalls(args.pause_s, args.every_s, args.seed, args.num_workers, run_dir / "ps.jsonl")
        run_freezeps(cmd, args.run_timeout, alongside=stalls if stalled else None)
        facts = summarize_run(run_dir)
        rounds = round_facts(run_dir / "ps.jsonl")
        stalls_by_run[name] = stalls.log
        results.append(facts)
        table.append(f"| {name} | {backup} | {len(stalls.log)} | {facts['wall_s']:.1f} | {facts['train_s']:.1f} | "
                     f"{rounds['rounds']} | {rounds['samples']:,} | {rounds['late_pushes']} | "
                     f"{rounds['median_round_s']:.3f} | {facts['accuracy']:.4f} |")
        print(f"[stragglers] {table[-1]}", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = write_comparison(results, out, f"stragglers: --backup-workers {args.backup} ({date.today().isoformat()})",
                            baseline=results[0]["name"])
    (out / "results.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k not in ("curve", "payload_per_step", "wire_per_step", "frozen_over_time")}
         | {"stalls": stalls_by_run[r["name"]]} for r in results], indent=1) + "\n")
    text = [f"# Stragglers: backup workers {args.backup}, stalls of {args.pause_s:g} s every {args.every_s:g} s "
            "per worker on average", "",
            "| run | backup workers | stalls | wall s | training s | rounds | samples applied | late pushes | "
            "median round s | accuracy |", "|---|---|---|---|---|---|---|---|---|---|", *table, "",
            path.read_text().rstrip(), "",
            f"Machine: {machine.describe()}. Command: `python -m bench.stragglers "
            f"{' '.join(sys.argv[1:])}`."]
    write_readme(out, text)


if __name__ == "__main__":
    main()
