"""Soak: many worker processes, a fixed number of rounds, random worker kills and restarts.

    python -m bench.soak --workers 4,8,16,32 --rounds 40 --kills 4 --out docs/results/soak

For each worker count: one run without faults (its median round time), then one with
`--kills` workers killed with SIGKILL at random moments, each replaced at once by a fresh
process (which waits for the PS to drop the dead one, then takes its rank). Every run is
bounded: a run still going after --timeout seconds counts as a hang and is killed.
Checks after each faulty run: every round 0..R-1 applied exactly once, every process
ended, and (with --verify) the PS's final parameters equal serial SGD on the pushes it
accepted, as the run log lists them.

The workload is the tests' MLP on the synthetic set: small, so the round time measures
the PS's per-worker overhead rather than compute.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import FREEZEPS
from bench.machine import one_torch_thread
from freezeps.launch import free_port
from freezeps.report import applied_rounds
from proto.runlog import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = dict(lr=0.05, momentum=0.9, weight_decay=0.0, batch_size=16, image_size=8)


@dataclass
class SoakResult:
    workers: int
    rounds: int
    kills: int
    wall_s: float = 0.0
    median_round_s: float = 0.0
    hung: bool = False
    failed_processes: int = 0
    # started too late to take part: still joining when the run ended, or joined after its last round
    late_replacements: int = 0
    joined_replacements: int = 0  # worker ids that pushed beyond the first `workers` (no PS kill: ids name its incarnation)
    ps_kills: int = 0
    redone_rounds: int = 0  # rounds after the PS's last checkpoint, lost with it and done again
    # PS restarted -> first round completed after the resume; None where the PS was not restarted or no round
    # completed after its resume (results.json is strict JSON: no Infinity token)
    recovery_s: float | None = None
    drops: int = 0
    applied_steps: list[int] = field(default_factory=list)
    ranks_per_step: list[list[int]] = field(default_factory=list)
    params: Path | None = None

    @property
    def rounds_lost(self) -> int:
        """Rounds missing from, or applied twice in, the run log."""
        return len(set(range(self.rounds)) ^ set(self.applied_steps)) + len(self.applied_steps) - len(
            set(self.applied_steps))


def soak(workers: int, rounds: int, kills: int, run_dir: Path, weights: Path, *, seed: int = 0,
         worker_timeout_s: float = 2.0, timeout_s: float = 300.0,
         kill_window: tuple[float, float] = (0.1, 0.5), ps_kill_at: float | None = None) -> SoakResult:
    """One bounded run: a PS, `workers` worker processes, `kills` of them killed and replaced, at
    random rounds within kill_window (fractions of the run: early enough for a replacement,
    which needs seconds to start, to join before the end). With ps_kill_at, the PS is killed
    (SIGKILL) at that fraction of the rounds and started again with --resume."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FREEZEPS_LOG_LEVEL": "warning"}
    ps_cmd = [*FREEZEPS, "ps", "--listen", f"127.0.0.1:{port}", "--num-workers", str(workers), "--freeze", "none",
              "--lr", str(WORKLOAD["lr"]), "--momentum", str(WORKLOAD["momentum"]),
              "--weight-decay", str(WORKLOAD["weight_decay"]), "--worker-timeout-s", str(worker_timeout_s),
              "--start-timeout-s", "30",
              "--round-timeout-s", "60", "--run-log", str(run_dir / "ps.jsonl"),
              "--params-out", str(run_dir / "params.pt"), "--checkpoint-dir", str(run_dir / "ckpt"),
              "--checkpoint-every", "10"]
    worker_cmd = [*FREEZEPS, "worker", "--ps-address", f"127.0.0.1:{port}", "--model", "mlp", "--weights", str(weights),
                  "--dataset", "synthetic", "--train-samples", "0", "--image-size", str(WORKLOAD["image_size"]),
                  "--batch-size", str(WORKLOAD["batch_size"]), "--steps", str(rounds), "--seed", "0",
                  "--threads", "1", "--no-evaluate",
                  "--connect-retries", "12", "--rpc-timeout-s", "60"]
    result = SoakResult(workers, rounds, kills, ps_kills=int(ps_kill_at is not None))
    restarted_at = 0.0
    logs = open(run_dir / "processes.log", "w")
    started = time.monotonic()
    ps = subprocess.Popen(ps_cmd, cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT)
    live = [subprocess.Popen(worker_cmd, cwd=ROOT, env=env, stdout=logs, stderr=subprocess.STDOUT)
            for _ in range(workers)]
    replacements: list[subprocess.Popen] = []
    kill_at = sorted(rng.uniform(*kill_window) for _ in range(kills))  # fractions of the rounds
    try:
        while ps.poll() is None:
            if time.monotonic() - started > timeout_s:
                result.hung = True
                break
            step = _progress(run_dir / "ps.jsonl")
            if ps_kill_at is not None and step >= ps_kill_at * rounds:
                ps_kill_at = None
                ps.send_signal(signal.SIGKILL)
                ps.wait(10)
                restarted_at = time.time()
                ps = subprocess.Popen(ps_cmd + ["--resume", str(run_dir / "ckpt")], cwd=ROOT, env=env, stdout=logs,
                                      stderr=subprocess.STDOUT)
            if kill_at and step >= kill_at[0] * rounds:
                kill_at.pop(0)
                # An original worker: it has joined, so its death must show as a drop.
                victim = rng.choice([p for p in live if p.poll() is None and p not in replacements])
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                live.remove(victim)
                replacements.append(subprocess.Popen(worker_cmd, cwd=ROOT, env=env, stdout=logs,
                                                     stderr=subprocess.STDOUT))
                live.append(replacements[-1])
            time.sleep(0.1)
        # Workers that were in the run have left when the PS ends; a replacement that was still
        # waiting for a free slot retries Join until its budget runs out: stop it after a grace.
        grace_end = time.monotonic() + 10.0
        for p in live:
            try:
                p.wait(max(0.1, grace_end - time.monotonic()))
            except subprocess.TimeoutExpired:
                if p not in replacements or ps.returncode != 0:
                    result.hung = True
                p.terminate()
                p.wait(10)
    finally:
        for p in [ps, *live]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        logs.close()
    result.wall_s = time.monotonic() - started
    late = {id(p) for p in replacements if p.returncode in (3, -signal.SIGTERM)}  # could not join: run over
    result.failed_processes = sum(p.returncode != 0 and id(p) not in late for p in live) + (ps.returncode != 0)
    records = read_jsonl(run_dir / "ps.jsonl")
    # A replacement that joins once every round is done has nothing to push and leaves (exit 0).
    result.late_replacements = len(late) + sum(r["event"] == "join" and r["step"] >= rounds for r in records)
    rounds_logged = applied_rounds(records)
    resume = next((r for r in records if r["event"] == "resume"), None)
    if resume is not None:
        result.redone_rounds = resume["rounds_lost"]
        after = [r for r in records[records.index(resume):] if r["event"] == "round"]
        result.recovery_s = after[0]["time"] - restarted_at if after else None
    result.applied_steps = [r["step"] for r in rounds_logged]
    result.ranks_per_step = [sorted(w["rank"] for w in r["workers"].values()) for r in rounds_logged]
    result.joined_replacements = len({w for r in rounds_logged for w in r["workers"]}) - workers
    result.drops = sum(r["event"] == "drop" for r in records)
    times = [r["round_s"] for r in rounds_logged[1:]]
    result.median_round_s = statistics.median(times) if times else 0.0
    result.params = run_dir / "params.pt"
    return result


def _progress(run_log: Path) -> int:
    """Rounds completed so far, from the PS's run log (0 before it exists)."""
    if not run_log.is_file():
        return 0
    with open(run_log, encoding="utf-8") as f:
        return sum('"event": "round"' in line for line in f)


def serial_training(weights: Path, num_workers: int, ranks_per_step: list[list[int]], *, batch_size: int, lr: float,
               momentum: float, weight_decay: float, image_size: int = 8, freeze_blocks: int = 0,
               freeze_step: int = 0, optimizer: str = "sgd", push_dtype: str = "float32",
               pull_dtype: str = "float32") -> dict:
    """The MLP on the synthetic set trained serially, step t on the batches of ranks_per_step[t]
    (the pushes the PS accepted), freezing as the PS does: what a freezeps run's final values
    must be. {tensor name: array}.

    Each rank's gradient comes from its own batch and they are summed in rank order, weighted
    by batch size, as the workers and the PS compute them. One forward over the concatenated
    batches is the same sum in exact arithmetic, but its float rounding differs, and a ReLU input
    within rounding of zero then flips: one step's gradient jumps (1e-5 relative, seen once in
    the soak's 100 rounds of 16 workers) and the runs part by more than any fair tolerance.
    For the same reason it runs on one torch thread, as the soak's and the tests' workers do.
    `push_dtype`: each rank's gradient is rounded to it before the sum, as a push in it is.
    `pull_dtype`: the ranks compute on what they hold, a copy to which each step's change of
    the trained parameters, rounded to it, is added (ps/store.BlockStore.publish); a block
    that freezes is held at its final values."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ps.optim import torch_adamw
    from worker.data import batch_order, load_dataset, make_batch, shard_indices
    from worker.flat import manifest_for
    from worker.models import build_model

    train = load_dataset("synthetic", None, True)
    model = build_model("mlp", train.num_classes, str(weights))  # the PS's values, which the optimizer steps
    held = build_model("mlp", train.num_classes, str(weights)) if pull_dtype != "float32" else model  # the ranks'
    if optimizer == "adamw":
        opt = torch_adamw(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    shards = [shard_indices(train.labels.numpy(), r, num_workers) for r in range(num_workers)]
    steps_per_epoch = max(len(train) // (num_workers * batch_size), 1)
    with one_torch_thread():
        for step, ranks in enumerate(ranks_per_step):
            epoch, pos = step // steps_per_epoch, (step % steps_per_epoch) * batch_size
            summed = [torch.zeros_like(p) for p in model.parameters()]
            for r in sorted(ranks):
                idx = np.take(batch_order(shards[r], epoch, r, 0), np.arange(pos, pos + batch_size), mode="wrap")
                x, y = make_batch(train, idx, image_size, 3, augment=False)
                held.zero_grad()
                F.cross_entropy(held(x), y).backward()
                for acc, p in zip(summed, held.parameters()):
                    acc.add_(p.grad.to(getattr(torch, push_dtype)).float(), alpha=batch_size)
            for acc, p in zip(summed, model.parameters()):
                p.grad = acc / (batch_size * len(ranks))
            if freeze_blocks and step >= freeze_step:
                for block in model.blocks[:freeze_blocks]:
                    for p in block.parameters():
                        p.grad = None  # torch's optimizers skip a parameter without a gradient
            opt.step()
            if held is not model:
                with torch.no_grad():
                    frozen_next = freeze_blocks if freeze_blocks and step + 1 >= freeze_step else 0
                    for b, (block, copy) in enumerate(zip(model.blocks, held.blocks)):
                        for p, q in zip(block.parameters(), copy.parameters()):
                            if b < frozen_next:
                                q.copy_(p)  # its last pull: the final values
                            else:
                                q.add_((p - q).to(getattr(torch, pull_dtype)))
    names = [t.name for b in manifest_for(model).blocks for t in b.tensors]
    return dict(zip(names, [p.detach().numpy() for p in model.parameters()]))


def params_mismatch(result: SoakResult, weights: Path) -> dict[str, float]:
    """The PS's final tensors that differ by any bit from serial training on the pushes it
    accepted: {name: largest absolute difference}; empty where all match. To the bit, because
    the PS sums in rank order and steps with torch's operations in torch's order: a tolerance
    would not hold anyway, as one flipped ReLU (serial_training's docstring) grows over rounds."""
    import numpy as np
    import torch
    got = torch.load(result.params, weights_only=True)
    want = serial_training(weights, result.workers, result.ranks_per_step, **WORKLOAD)
    return {k: float(np.abs(got[k].numpy() - v).max()) for k, v in want.items() if not np.array_equal(got[k].numpy(), v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="4,8,16,32", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--kills", type=int, default=4, help="worker kills per faulty run")
    parser.add_argument("--out", type=Path, default=None, help="write OUT/results.json and OUT/README.md")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a run counts as hung")
    args = parser.parse_args()
    import torch

    from worker.models import build_model
    runs_dir = ROOT / "runs" / f"soak-{int(time.time())}"
    runs_dir.mkdir(parents=True)
    weights = runs_dir / "init.pt"
    torch.manual_seed(0)
    torch.save(build_model("mlp", 4).state_dict(), weights)
    rows = []
    for n in [int(x) for x in args.workers.split(",")]:
        clean = soak(n, args.rounds, 0, runs_dir / f"w{n}-clean", weights, timeout_s=args.timeout)
        faulty = soak(n, args.rounds, args.kills, runs_dir / f"w{n}-kills", weights, timeout_s=args.timeout,
                      ps_kill_at=0.6)
        row = {"workers": n, "median_round_ms": round(clean.median_round_s * 1000, 1),
               "kills": args.kills, "drops": faulty.drops, "hangs": int(clean.hung) + int(faulty.hung),
               "failed_processes": clean.failed_processes + faulty.failed_processes,
               "rounds_lost": clean.rounds_lost + faulty.rounds_lost,
               "short_rounds": sum(len(r) < n for r in faulty.ranks_per_step),
               "ps_kills": faulty.ps_kills, "redone_rounds": faulty.redone_rounds,
               "ps_recovery_s": None if faulty.recovery_s is None else round(faulty.recovery_s, 2),
               "late_replacements": faulty.late_replacements,
               "params_match_reference": not params_mismatch(faulty, weights) and not params_mismatch(clean, weights),
               "faulty_wall_s": round(faulty.wall_s, 1)}
        rows.append(row)
        print(json.dumps(row, allow_nan=False), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
