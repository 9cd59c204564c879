"""Read run folders' logs and turn them into what a user wants: a report per run, and for
several runs a markdown comparison with plots (see freezeps/plots.py).

A run folder holds ps.jsonl (one "round" record per step, "freeze" records, a "summary"),
worker-RANK.jsonl, config.toml, and with --network netns wire.json (the links' counters).
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from proto.runlog import read_jsonl
from worker.cached_prefix import PrefixCounters

PHASES = ("forward_s", "backward_s", "pull_s", "wait_s", "push_s")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 or n == 0 else f"{n / 1e3:,.1f} kB"


TENSOR_METHODS = ("Push", "Pull", "Allreduce")  # the PS's streams and DDP's all-reduce


def _payload(by_method: dict, methods=TENSOR_METHODS) -> dict[str, int]:
    """Tensor payload per block index (as a string) over the given methods, both directions."""
    out: dict[str, int] = {}
    for method in methods:
        for direction in by_method.get(method, {}).values():
            for block, traffic in direction.items():
                if traffic["payload"]:
                    out[block] = out.get(block, 0) + traffic["payload"]
    return out


def applied_rounds(records: list[dict]) -> list[dict]:
    """The round records that count: a resumed PS redoes the rounds after its checkpoint, so a
    "resume" record drops the rounds logged from its step on (their bytes and time were spent,
    and stay in the log, but their updates were lost)."""
    rounds: list[dict] = []
    for r in records:
        if r.get("event") == "resume":
            rounds = [x for x in rounds if x["step"] < r["step"]]
        elif r.get("event") == "round":
            rounds.append(r)
    return rounds


def _added(a, b):
    """Two byte tallies added: numbers added, nested dicts key by key."""
    if isinstance(a, dict):
        return {k: _added(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    return a + b


SUMMED = ("bytes", "message_bytes", "push_payload", "pull_payload", "push_payload_no_freeze",
          "pull_payload_no_freeze", "push_by_block", "pull_by_block", "optimizer_state_bytes")


def merge_shards(logs: list[list[dict]]) -> list[dict]:
    """The run logs of a sharded PS as one log: shard 0's records, with each round's bytes and
    the summary's tallies added over the shards (their blocks are disjoint). A round ends when
    its last shard ends it, and its optimizer step takes the longest shard's time (they run at
    once); freezes are shard 0's (every shard makes the same decisions)."""
    if len(logs) == 1:
        return logs[0]
    rounds = [{r["step"]: r for r in applied_rounds(log)} for log in logs]
    merged = []
    for step, first in rounds[0].items():
        same = [shard[step] for shard in rounds if step in shard]
        if len(same) < len(rounds):
            raise ValueError(f"round {step} is missing from the logs of {len(rounds) - len(same)} PS shard(s)")
        record = {**first, "time": max(r["time"] for r in same),
                  "bytes": {"by_block": _added_all([r["bytes"]["by_block"] for r in same]),
                            "by_worker": _added_all([r["bytes"]["by_worker"] for r in same])},
                  "grad_norm": {k: v for r in same for k, v in r["grad_norm"].items()}}
        if all("optimizer_s" in r for r in same):
            record["optimizer_s"] = max(r["optimizer_s"] for r in same)
        merged.append(record)
    summaries = [next((r for r in reversed(log) if r.get("event") == "summary"), None) for log in logs]
    if any(s is None for s in summaries):
        raise FileNotFoundError(f"PS shard {summaries.index(None)} logged no summary: did the run finish?")
    summary = {**summaries[0], **{k: _added_all([s[k] for s in summaries]) for k in SUMMED if k in summaries[0]},
               "wall_s": max(s["wall_s"] for s in summaries)}
    rest = [r for r in logs[0] if r.get("event") not in ("round", "resume", "summary")]
    return rest + merged + [summary]


def _added_all(tallies: list):
    return functools.reduce(_added, tallies)


def ps_logs(run_dir: Path) -> list[list[dict]]:
    """The PS's run log, or a sharded PS's, shard 0's (ps.jsonl) first."""
    shards = sorted(run_dir.glob("ps-shard*.jsonl"), key=lambda p: int(p.stem.removeprefix("ps-shard")))
    return [read_jsonl(run_dir / "ps.jsonl")] + [read_jsonl(p) for p in shards]


def merge_evals(records: list[dict]) -> list[dict]:
    """One evaluation per step from the workers' `eval` records, each scoring its share
    `(rank, world)` of the test set (worker.train.evaluate): the misclassified samples and the
    losses added up over the shares; its time is the last share's end, its `eval_s` the longest
    share's (they ran at once).

    A share scored twice (a worker that rejoined) counts once, the later. Where the shares do
    not cover the test set (a worker dropped before it scored), the step keeps what was scored:
    `scored` says how much, and it has no `test_set`, so it is never paired sample by sample
    with another run. A record without a share (logged before the split) is a whole evaluation.
    """
    by_step: dict[int, dict[tuple[int, int], dict]] = {}
    for r in records:
        rank, world = r.get("share", (0, 1))
        by_step.setdefault(r["step"], {})[(rank, world)] = r
    merged = []
    for step in sorted(by_step):
        shares = list(by_step[step].values())
        if len(shares) == 1 and "share" not in shares[0]:
            merged.append({**shares[0], "scored": shares[0].get("test_samples")})
            continue
        # Shares of different world sizes overlap (a run that changed size): the world that scored most.
        worlds: dict[int, list[dict]] = {}
        for r in shares:
            worlds.setdefault(r["share"][1], []).append(r)
        parts = max(worlds.values(), key=lambda rs: sum(r["scored"] for r in rs))
        scored = sum(r["scored"] for r in parts)
        wrong = sorted(w for r in parts for w in r["wrong"])
        whole = scored == parts[0]["test_samples"]
        merged.append({**{k: v for k, v in parts[0].items() if k != "share"}, "shares": len(parts), "scored": scored,
                       "accuracy": 1 - len(wrong) / scored if scored else 0.0,
                       "loss": _weighted_loss(parts, scored),
                       "wrong": wrong, "time": max(r["time"] for r in parts),
                       "eval_s": max(r["eval_s"] for r in parts),
                       "test_set": parts[0]["test_set"] if whole else None})
    return merged


def _weighted_loss(shares: list[dict], scored: int) -> float | None:
    """The shares' mean loss weighted by what each scored; None where one had no finite loss
    (the run log writes a diverged loss as null)."""
    if not scored:
        return 0.0
    if any(r["loss"] is None for r in shares):
        return None
    return sum(r["loss"] * r["scored"] for r in shares) / scored


def summarize_run(run_dir: Path) -> dict:
    """The facts of a run as one dict (also what `freezeps report --json` prints)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    is_ps = (run_dir / "ps.jsonl").exists() or not (run_dir / "ddp.jsonl").exists()
    log_file = run_dir / "ps.jsonl" if is_ps else run_dir / "ddp.jsonl"
    ps = merge_shards(ps_logs(run_dir)) if is_ps else read_jsonl(log_file)
    summary = next((r for r in reversed(ps) if r.get("event") == "summary"), None)
    if summary is None:
        raise FileNotFoundError(f"{log_file} has no summary record: did the run finish?")
    workers = [read_jsonl(p) for p in sorted(run_dir.glob("worker-*.jsonl"))]
    evals = merge_evals([r for w in workers for r in w if r.get("event") == "eval"])
    worker_sums = [r for w in workers for r in w if r.get("event") == "worker_summary"]
    steps = sum(w["steps"] for w in worker_sums) or 1
    keys = [k for k in worker_sums[0]["phases_s"]] if worker_sums else list(PHASES)
    phases = {k: sum(w["phases_s"].get(k, 0.0) for w in worker_sums) / steps for k in keys}
    rounds = applied_rounds(ps)
    if rounds and all("optimizer_s" in r for r in rounds):  # a PS run: the optimizer runs once per round, there
        phases["ps_optimizer_s"] = sum(r["optimizer_s"] for r in rounds) / len(rounds)
    names = [b["name"] for b in summary["blocks"]]
    # Time axis: the PS's clock, from the start of round 0.
    t0 = rounds[0]["time"] - rounds[0]["round_s"] if rounds else 0.0
    moved, cumulative, per_step = 0, {}, []
    for r in rounds:
        by_block = _payload(r["bytes"]["by_block"])
        moved += sum(by_block.values())
        cumulative[r["step"]] = moved
        per_step.append({names[int(k)]: v for k, v in by_block.items() if int(k) >= 0})
    config_file = run_dir / "config.toml"
    config = tomllib.loads(config_file.read_text()) if config_file.is_file() else {}
    total_payload = sum(_payload(summary["bytes"], methods=tuple(summary["bytes"])).values())
    wire_file = run_dir / "wire.json"
    wire = json.loads(wire_file.read_text()) if wire_file.is_file() else None
    if wire is not None:
        wire["payload_bytes"] = total_payload
        wire["message_bytes"] = sum(sum(d.values()) for d in summary["message_bytes"].values())
        wire["wire_per_payload"] = wire["wire_bytes"] / total_payload if total_payload else None
    return {
        "name": run_dir.name, "mode": summary.get("mode", "ps"), "ps_shards": summary.get("num_shards", 1), "model": summary["model"], "workers": summary["num_workers"],
        "steps": summary["steps"], "wall_s": summary["wall_s"],
        # Round 0's start to the last round's end: what the modes share (the PS's wall_s also
        # holds the wait for workers to start and join).
        "train_s": rounds[-1]["time"] - t0 if rounds else 0.0, "frozen_blocks": summary["frozen_blocks"],
        # Evaluations inside the training time (the rounds wait for the evaluators); None
        # for runs logged before evaluations were timed.
        "eval_s": sum(e["eval_s"] for e in evals if e["step"] < summary["steps"])
        if all("eval_s" in e for e in evals) else None,
        "freeze": config.get("freeze"), "config": config,
        "accuracy": evals[-1]["accuracy"] if evals else None,
        "best_accuracy": max((e["accuracy"] for e in evals), default=None),
        "accuracy_by_epoch": [(round(e["epoch"], 3), e["accuracy"]) for e in evals],
        # The last evaluation's misclassified test samples (None from runs logged before they were kept).
        "test_wrong": evals[-1].get("wrong") if evals else None,
        "test_samples": evals[-1]["scored"] if evals else None,
        "test_set": evals[-1].get("test_set") if evals else None,
        "final_loss": rounds[-1]["loss"] if rounds else None,
        "phase_ms_per_step": {k: v * 1000 for k, v in phases.items()},
        "push_payload": summary["push_payload"], "push_payload_no_freeze": summary["push_payload_no_freeze"],
        "pull_payload": summary["pull_payload"], "pull_payload_no_freeze": summary["pull_payload_no_freeze"],
        "message_bytes": summary["message_bytes"], "wire": wire,
        "blocks": summary["blocks"], "push_by_block": summary["push_by_block"], "pull_by_block": summary["pull_by_block"],
        # Curves for the comparison and plots.
        "curve": [{"step": e["step"], "wall_s": e["time"] - t0, "accuracy": e["accuracy"],
                   "bytes": cumulative.get(e["step"] - 1, 0)} for e in evals],
        "payload_per_step": per_step,
        "wire_per_step": [r["wire"] for r in rounds if "wire" in r],
        "frozen_over_time": [(r["time"] - t0, r["frozen_blocks"]) for r in rounds],
        "freezes": [{k: f.get(k) for k in ("step", "epoch", "from", "to", "blocks")}
                    for f in ps if f.get("event") == "freeze" and not f.get("initial")],
        # Workers the PS dropped for not pushing in time: the rounds went on without them until
        # they joined again, so the run trained on fewer samples than planned.
        "drops": [{"step": d["step"], "rank": d["rank"]} for d in ps if d.get("event") == "drop"],
        # Pushes that came after their round completed without them (--backup-workers): not applied.
        "late_pushes": sum(1 for r in ps if r.get("event") == "late_push"),
        # Evaluations whose shares did not cover the test set: their accuracy is over fewer samples.
        "partial_evals": [{"step": e["step"], "scored": e["scored"], "test_samples": e["test_samples"]}
                          for e in evals if "shares" in e and e["scored"] < e["test_samples"]],
        "cache": cache_facts([w["cache"] for w in worker_sums if "cache" in w]),
        "eval_cache": cache_facts([w["eval_cache"] for w in worker_sums if "eval_cache" in w]),
        "speed_probe": speed_probe(run_dir),
    }


def speed_probe(run_dir: Path) -> dict | None:
    """How fast the machine ran just before and after this run (`what`: the fixed piece of work
    timed, `before_ms`, `after_ms`), where the bench that made it noted that in its folder's
    bench.json (bench.compare: {"probe": what, "probe_ms": {run: [before, after]}}); else None.
    Two runs' times compare where their probes agree."""
    noted = run_dir.parent / "bench.json"
    bench = json.loads(noted.read_text()) if noted.is_file() else {}
    ms = bench.get("probe_ms", {}).get(run_dir.name)
    return {"what": bench.get("probe", ""), "before_ms": ms[0], "after_ms": ms[1]} if ms else None


def cache_facts(reports: list[dict]) -> dict | None:
    """The workers' activation-cache reports added up (None: no worker cached)."""
    if not reports:
        return None
    # A counter an older run's log lacks (ahead, before 2026-12-03) was 0 then.
    total = PrefixCounters(**{f.name: sum(r.get(f.name, 0) for r in reports) for f in fields(PrefixCounters)})
    store = {k: sum(r["store"][k] for r in reports) for k in reports[0]["store"]} if "store" in reports[0] else None
    return {**asdict(total), "hit_rate": total.hit_rate(), "store": store}


def format_cache(cache: dict, what: str = "activation cache") -> str:
    rows = (f"{what}: hit rate {cache['hit_rate']:.1%} ({cache['cached']} rows read, {cache['extended']} "
            f"extended, {cache['computed']} computed, {cache['uncached']} not cached; {cache['ahead']} of those run "
            f"ahead, in a short run's places), about {cache['saved_s']:.1f} s of prefix compute saved")
    store = cache["store"]
    if store is None:
        return rows
    return (f"{rows}; held {_mb(store['memory_bytes'])} in memory, {_mb(store['disk_bytes'])} on "
            f"disk; {store['disk_hits']} disk reads in the loop, {store['prefetched']} ahead; "
            f"{store['memory_evictions'] + store['disk_evictions']} evictions, {store['corrupt']} corrupt entries")


def _narrower(facts: dict) -> list[str]:
    """What the run sent narrower than float32: "bfloat16 pushes" (DDP: "bfloat16 all-reduce"),
    "bfloat16 pull changes"; none for runs from before the settings."""
    config = facts.get("config", {})
    push, pull = config.get("push_dtype", "float32"), config.get("pull_dtype", "float32")
    return ([f"{push} pushes" if facts["mode"] == "ps" else f"{push} all-reduce"] if push != "float32" else []) + \
        ([f"{pull} pull changes"] if pull != "float32" else [])


def _mode(facts: dict) -> str:
    """"ps", "ddp", "ps, 2 shards", "ps, bfloat16 pushes", "ps, bfloat16 pushes, bfloat16 pull
    changes"; "ddp on cuda" where the processes computed on a GPU (every run before --device: the CPU)."""
    device = facts.get("config", {}).get("device", "cpu")
    parts = [facts["mode"] + (f" on {device}" if device != "cpu" else "")]
    if facts.get("ps_shards", 1) > 1:
        parts.append(f"{facts['ps_shards']} shards")
    return ", ".join(parts + _narrower(facts))


def _round_work(facts: dict) -> tuple[str, str]:
    """What a full-model round costs besides computing: the mode with its wire settings, and the
    network (with its link rate)."""
    config = facts.get("config", {})
    network = config.get("network", "loopback") + (f" at {config['link_rate']}" if config.get("link_rate") else "")
    return _mode(facts), network


def format_report(facts: dict) -> str:
    lines = [f"{_mode(facts)}: model {facts['model']}, {facts['workers']} workers, {facts['steps']} steps, "
             f"wall {facts['wall_s']:.1f} s (training {facts['train_s']:.1f} s), {facts['frozen_blocks']} blocks frozen at the end"]
    if facts["accuracy"] is not None:
        curve = ", ".join(f"epoch {e:g}: {a:.4f}" for e, a in facts["accuracy_by_epoch"])
        lines.append(f"test accuracy {facts['accuracy']:.4f} ({curve})")
    if facts["final_loss"] is not None:
        lines.append(f"last round's training loss {facts['final_loss']:.4f}")
    lines.append("time per step and worker: " + ", ".join(
        f"{k.removesuffix('_s')} {v:.1f} ms" for k, v in facts["phase_ms_per_step"].items()))
    if facts.get("drops"):
        lines.append(f"workers dropped: {format_drops(facts['drops'])}")
    if facts.get("late_pushes"):
        lines.append(f"late pushes (rounds completed without them, not applied): {facts['late_pushes']}")
    if facts.get("partial_evals"):
        lines.append("evaluations short of shares: " + ", ".join(
            f"step {e['step']} scored {e['scored']} of {e['test_samples']} test samples" for e in facts["partial_evals"]))
    if facts.get("cache"):
        lines.append(format_cache(facts["cache"]))
    if facts.get("eval_cache"):
        lines.append(format_cache(facts["eval_cache"], "evaluation through the cache"))
    lines.append("")
    # The reference is every block, dense, float32, every step: savings from row-sparse and
    # bfloat16 pushes count too.
    lines.append(f"{'tensor payload':<16}{'this run':>16}{'dense, no freeze':>18}{'saved':>9}")
    for name in ("push", "pull"):
        got, full = facts[f"{name}_payload"], facts[f"{name}_payload_no_freeze"]
        saved = f"{1 - got / full:.1%}" if full else "-"
        lines.append(f"{name:<16}{_mb(got):>16}{_mb(full):>18}{saved:>9}")
    if narrower := _narrower(facts):
        lines.append(f"({', '.join(narrower)}: 'dense, no freeze' counts float32, so 'saved' holds the narrower "
                     f"dtype too)")
    msg = facts["message_bytes"]
    if facts["mode"] == "ps":
        lines.append(f"serialized messages: push {_mb(msg.get('Push', {}).get('in', 0))}, "
                     f"pull {_mb(msg.get('Pull', {}).get('out', 0))}")
    else:
        lines.append("(ddp/single: push = gradient bytes the ranks handed to the all-reduce, pull = the same back)")
    wire = facts["wire"]
    if wire is not None:
        ratio = f"{wire['wire_per_payload']:.4f}" if wire["wire_per_payload"] else "-"
        lines.append(f"wire (every frame sent on the links, MTU {wire['mtu']}{', offload' if wire['offload'] else ''}"
                     f"{', ' + wire['rate'] if wire['rate'] else ''}): {_mb(wire['wire_bytes'])} for "
                     f"{_mb(wire['payload_bytes'])} of payload, wire/payload {ratio}")
    lines.append("")
    lines.append(f"{'block':<14}{'size':>12}{'pushed':>14}{'pulled':>14}")
    for b in facts["blocks"]:
        lines.append(f"{b['name']:<14}{_mb(b['bytes']):>12}{_mb(facts['push_by_block'].get(b['name'], 0)):>14}"
                     f"{_mb(facts['pull_by_block'].get(b['name'], 0)):>14}")
    return "\n".join(lines)


def time_to_accuracy(facts: dict, target: float) -> float | None:
    """Seconds from round 0 to the first evaluation at or above `target`, or None."""
    return next((c["wall_s"] for c in facts["curve"] if c["accuracy"] >= target), None)


def _time_to_target(seconds: float | None, base_seconds: float | None) -> str:
    """A run's time to the target, and how many times less it is than the baseline's."""
    if seconds is None:
        return "not reached"
    return f"{seconds:.0f} ({base_seconds / seconds:.2f}x)" if base_seconds and seconds > 0 else f"{seconds:.0f}"


def paired_difference(wrong: Sequence[int], base_wrong: Sequence[int], samples: int) -> tuple[float, float]:
    """(accuracy - baseline accuracy, its standard error), in points, of two models scored on the
    same `samples` test samples, given the test samples each got wrong.

    Only the samples they disagree on move the difference: b the baseline got right and the
    other wrong, c the reverse. The difference is (c - b) / n and its standard error, the one
    McNemar's test rests on, sqrt(b + c - (c - b)^2 / n) / n. It measures how much the test set's
    draw alone could move the difference; the spread over training seeds comes on top.
    """
    if samples <= 0:
        raise ValueError(f"samples must be positive, got {samples}")
    run, base = set(wrong), set(base_wrong)
    b, c = len(run - base), len(base - run)
    return 100 * (c - b) / samples, 100 * math.sqrt(b + c - (c - b) ** 2 / samples) / samples


def _paired(r: dict, base: dict) -> tuple[float, float] | None:
    """paired_difference of two run summaries, or None when either lacks its errors or they were
    scored on different test samples."""
    if r["test_wrong"] is None or base["test_wrong"] is None or r["test_set"] is None \
            or r["test_set"] != base["test_set"]:
        return None
    return paired_difference(r["test_wrong"], base["test_wrong"], r["test_samples"])


def _moved(facts: dict) -> int:
    """Tensor payload bytes a run pushed and pulled."""
    return facts["push_payload"] + facts["pull_payload"]


def comparison_markdown(runs: list[dict], baseline: str | None = None) -> str:
    """One table row per run; savings are against `baseline` (a run name; default the first)."""
    base = runs[0] if baseline is None else next((r for r in runs if r["name"] == baseline), None)
    if base is None:  # a misspelt name would otherwise report savings against the wrong run
        raise ValueError(f"no run named {baseline!r} to compare with; the runs are "
                         f"{', '.join(r['name'] for r in runs)}")
    target = (base["best_accuracy"] or 0.0) - 0.005
    lines = [f"Savings and time to accuracy are against `{base['name']}`; the accuracy target is its best "
             f"test accuracy minus 0.5 point ({target:.4f}). `vs base`: the final accuracy's difference in points "
             "± its standard error over the test samples, paired by sample (freezeps.report.paired_difference). "
             "`time to target s`: from round 0 to the run's first evaluation at or above the target, and in "
             "brackets the baseline's time over it (how many times less time the run took to get there).", "",
             "| run | mode | freeze | final acc | vs base | best acc | train s | of which eval s | samples/s | "
             "time to target s | "
             "payload (push+pull) | bytes saved | time saved | wire bytes | wire/payload | ms per step and worker | "
             "freezes (step: blocks) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_moved = _moved(base)
    base_tta = time_to_accuracy(base, target)
    for r in runs:
        moved = _moved(r)
        tta = time_to_accuracy(r, target)
        wire = f"{r['wire']['wire_per_payload']:.4f}" if r["wire"] and r["wire"]["wire_per_payload"] else "-"
        wire_bytes = f"{r['wire']['wire_bytes'] / 1e9:.3f} GB" if r["wire"] else "-"
        phases = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in r["phase_ms_per_step"].items())
        samples = r["config"].get("batch_size", 0) * r["workers"] * r["steps"]
        rate = f"{samples / r['train_s']:.1f}" if samples and r["train_s"] else "-"
        initial = r["frozen_over_time"][0][1] if r["frozen_over_time"] else 0
        freezes = "; ".join([f"0: 0->{initial}"] * bool(initial) +
                            [f"{f['step']}: {f['from']}->{f['to']}" for f in r["freezes"]]) or "-"
        acc = lambda a: f"{a:.4f}" if a is not None else "-"  # noqa: E731
        eval_s = f"{r['eval_s']:.1f}" if r.get("eval_s") is not None else "-"
        paired = _paired(r, base)
        vs_base = f"{paired[0]:+.1f} ± {paired[1]:.1f}" if paired else "-"
        lines.append(f"| {r['name']} | {_mode(r)} | {r['freeze'] or '-'} | {acc(r['accuracy'])} | {vs_base} | "
                     f"{acc(r['best_accuracy'])} | {r['train_s']:.1f} | "
                     f"{eval_s} | {rate} | "
                     f"{_time_to_target(tta, base_tta)} | "
                     f"{moved / 1e9:.3f} GB | {1 - moved / base_moved:.1%} | {1 - r['train_s'] / base['train_s']:.1%} | "
                     f"{wire_bytes} | {wire} | {phases} | {freezes} |")
    if paced := full_model_pace(runs):
        rounds, pace = paced
        lines += ["", f"Seconds per round over rounds 1-{rounds}, before any of these runs froze a block (the same "
                  "work in runs of one mode on one network; their times compare where these agree): " +
                  ", ".join(f"{name} {s:.2f}" for name, s in pace.items()) + "."]
        if len(works := {_round_work(r) for r in runs}) > 1:
            # A PS and DDP (or float32 and bfloat16 pushes, or two links) differ in pace by design,
            # not by the machine's speed: dividing by the pace would hide the difference measured.
            lines += ["", "These runs move a round's bytes differently (" + "; ".join(sorted(map(", ".join, works))) +
                      "), so their paces differ by design: their measured times are the comparison."]
        elif all(pace.values()) and all(r["train_s"] for r in runs):  # else a clock stood still: nothing to divide by
            own = {r["name"]: r["train_s"] / pace[r["name"]] for r in runs}
            lines += ["", f"Training time in each run's own rounds 1-{rounds} (its train s over its pace above), "
                      f"and `{base['name']}`'s over it: the time saved at one machine speed, where the machine's "
                      f"speed held after round {rounds} as before it: " +
                      ", ".join(f"{name} {n:.0f} ({own[base['name']] / n:.2f}x)" for name, n in own.items()) + "."]
    if probed := [r["speed_probe"] for r in runs if r.get("speed_probe")]:  # results.json before 2026-12-03: none
        lines += ["", f"Speed probe, ms before / after each run ({probed[0]['what']}; lower is faster; times compare "
                  "where these agree): " + ", ".join(
                      f"{r['name']} {r['speed_probe']['before_ms']:.1f} / {r['speed_probe']['after_ms']:.1f}"
                      if r.get("speed_probe") else f"{r['name']} not probed" for r in runs) + "."]
    return "\n".join(lines)


MIN_PACE_ROUNDS = 8  # fewer rounds say more about start-up than about the machine's speed


def full_model_pace(runs: list[dict]) -> tuple[int, dict[str, float]] | None:
    """`(n, {run: seconds per round})` over rounds 1..n, where none of `runs` had a block frozen
    yet: the same work in every run of one workload (bit for bit on one seed), so where two runs'
    paces differ, the machine ran at another speed under each and their times do not compare
    (this machine kind drifts by tens of percent within an hour). Round 0 is left out: it holds
    the workers' start. None where a run has no per-round series (facts read from results.json)
    or fewer than MIN_PACE_ROUNDS such rounds."""
    series = [r.get("frozen_over_time") or [] for r in runs]
    if not runs or not all(series):
        return None
    n = min(next((i for i, (_, frozen) in enumerate(s) if frozen), len(s)) for s in series) - 1
    if n < MIN_PACE_ROUNDS:
        return None
    return n, {r["name"]: (s[n][0] - s[0][0]) / n for r, s in zip(runs, series)}


def evaluations_markdown(runs: list[dict]) -> str:
    """Test accuracy at each evaluation, one row per run, one column per epoch evaluated
    (fractions of an epoch where evaluations came mid-epoch); "-" where a run has none."""
    epochs = sorted({epoch for r in runs for epoch, _ in r["accuracy_by_epoch"]})
    lines = ["Test accuracy at each evaluation, by epoch:", "",
             "| run | " + " | ".join(f"{e:g}" for e in epochs) + " |", "|---|" + "---|" * len(epochs)]
    for r in runs:
        at = dict(r["accuracy_by_epoch"])
        lines.append(f"| {r['name']} | " + " | ".join(f"{at[e]:.4f}" if e in at else "-" for e in epochs) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float], fmt: str) -> str:
    mean = f"{statistics.fmean(values):{fmt}}"
    return f"{mean} ± {statistics.stdev(values):{fmt.lstrip('+')}}" if len(values) > 1 else mean


def seeds_markdown(groups: dict[str, list[dict]], baseline: str) -> str:
    """Mean ± sample standard deviation over seeds, one row per configuration.

    `groups` maps a configuration's name to its runs, one per seed. Differences to `baseline`
    are paired by seed (same data order and initial head), which cancels much of the
    seed-to-seed spread that the absolute accuracies show. The speedups (the baseline's
    training time over the run's) are listed seed by seed, in the order of the seeds column:
    a mean of ratios would hide which seed fell short.
    """
    base = {r["config"].get("seed"): r for r in groups[baseline]}
    lines = [f"Over seeds: mean ± sample standard deviation; differences are to `{baseline}` with the same seed. "
             "`test-set SE` is the standard error that the test set's draw alone gives the mean accuracy "
             "difference (paired by sample, freezeps.report.paired_difference, pooled over the seeds).",
             "", "| configuration | seeds | final acc | acc - baseline (points) | test-set SE (points) | "
             "worst seed (points) | train s | time saved | less time, by seed | payload | bytes saved |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        paired = [(r, base[r["config"].get("seed")]) for r in runs if r["config"].get("seed") in base]
        if len(paired) != len(runs):
            raise ValueError(f"{name}: a run's seed has no `{baseline}` run to compare with")
        diff = [100 * (r["accuracy"] - b["accuracy"]) for r, b in paired]
        by_sample = [_paired(r, b) for r, b in paired]
        speedups = ", ".join(f"{b['train_s'] / r['train_s']:.2f}x" for r, b in paired)
        test_se = "-" if None in by_sample else f"{math.sqrt(sum(se ** 2 for _, se in by_sample)) / len(by_sample):.2f}"
        lines.append(
            f"| {name} | {', '.join(str(r['config'].get('seed')) for r in runs)} | "
            f"{_mean_sd([r['accuracy'] for r in runs], '.4f')} | {_mean_sd(diff, '+.2f')} | {test_se} | {min(diff):+.2f} | "
            f"{_mean_sd([r['train_s'] for r in runs], '.1f')} | "
            f"{_mean_sd([1 - r['train_s'] / b['train_s'] for r, b in paired], '.1%')} | "
            f"{speedups} | "
            f"{statistics.fmean(_moved(r) for r in runs) / 1e9:.3f} GB | "
            f"{_mean_sd([1 - _moved(r) / _moved(b) for r, b in paired], '.1%')} |")
    return "\n".join(lines)


def format_drops(drops: list[dict]) -> str:
    """"rank 0 at steps 85, 170; rank 2 at step 9": each rank's drops in one place."""
    steps: dict[int, list[int]] = {}
    for d in drops:
        steps.setdefault(d["rank"], []).append(d["step"])
    return "; ".join(f"rank {rank} at step{'s' * (len(at) > 1)} {', '.join(map(str, at))}"
                     for rank, at in sorted(steps.items()))


def _tables(runs: list[dict], baseline: str | None) -> list[str]:
    """The comparison, any workers dropped, and, where the runs were evaluated, their accuracy
    at each evaluation."""
    text = [comparison_markdown(runs, baseline), ""]
    dropped = [r for r in runs if r.get("drops")]
    if dropped:
        text += ["Workers dropped (the rounds went on without them until they joined again):", "",
                 *[f"- {r['name']}: {format_drops(r['drops'])}" for r in dropped], ""]
    if any(r["accuracy_by_epoch"] for r in runs):
        text += [evaluations_markdown(runs), ""]
    return text


# The per-step series a run's facts carry for the plots; results.json leaves them out (a few MB a run).
PER_STEP = ("payload_per_step", "wire_per_step", "frozen_over_time")


def write_comparison(runs: list[dict], out: Path, title: str, baseline: str | None = None,
                     groups: dict[str, list[dict]] | None = None) -> Path:
    """OUT/report.md (the table and the plots), OUT/*.png and OUT/results.json (each run's facts
    less the per-step series, what bench.pool reads); returns the markdown's path.

    With `groups` (configuration -> its runs over seeds, as bench/compare makes them; `baseline`
    then names a configuration) the report starts with the over-seeds table, then one table per
    seed against that seed's baseline run; the plots show each configuration's first seed.
    """
    from freezeps.plots import write_plots
    out.mkdir(parents=True, exist_ok=True)
    seeded = groups is not None and any(len(g) > 1 for g in groups.values())
    images = write_plots([g[0] for g in groups.values()] if seeded else runs, out)
    text = [f"# {title}", ""]
    if seeded:
        base_group = baseline if baseline in groups else next(iter(groups))
        text += [seeds_markdown(groups, base_group), ""]
        for base in groups[base_group]:
            seed = base["config"].get("seed")
            text += [f"## Seed {seed}", "", *_tables([r for r in runs if r["config"].get("seed") == seed], base["name"])]
    else:  # one run per configuration: with `groups`, `baseline` names a configuration, not its run
        text += _tables(runs, groups[baseline][0]["name"] if groups and baseline in groups else baseline)
    text += [f"![{name}]({path.name})" for name, path in images.items()]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    (out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k not in PER_STEP} for r in runs],
                                                 indent=1))
    return path
