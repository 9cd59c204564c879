"""Read a run folder's logs and print what a user wants at the end: accuracy, time, bytes, phases."""
from __future__ import annotations

import json
from pathlib import Path

PHASES = ("forward_s", "backward_s", "pull_s", "wait_s", "push_s")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 or n == 0 else f"{n / 1e3:,.1f} kB"


def summarize_run(run_dir: Path) -> dict:
    """The facts of a run as one dict (also what `freezeps report --json` prints)."""
    ps = read_jsonl(run_dir / "ps.jsonl")
    summary = next((r for r in reversed(ps) if r.get("event") == "summary"), None)
    if summary is None:
        raise FileNotFoundError(f"{run_dir / 'ps.jsonl'} has no summary record: did the PS finish?")
    workers = [read_jsonl(p) for p in sorted(run_dir.glob("worker-*.jsonl"))]
    evals = [r for w in workers for r in w if r.get("event") == "eval"]
    worker_sums = [r for w in workers for r in w if r.get("event") == "worker_summary"]
    steps = sum(w["steps"] for w in worker_sums) or 1
    phases = {k: sum(w["phases_s"][k] for w in worker_sums) / steps for k in PHASES}
    rounds = [r for r in ps if r.get("event") == "round"]
    return {
        "model": summary["model"], "workers": summary["num_workers"], "steps": summary["steps"],
        "wall_s": summary["wall_s"], "frozen_blocks": summary["frozen_blocks"],
        "accuracy": evals[-1]["accuracy"] if evals else None,
        "accuracy_by_epoch": [(round(e["epoch"], 3), e["accuracy"]) for e in evals],
        "final_loss": rounds[-1]["loss"] if rounds else None,
        "phase_ms_per_step": {k: v * 1000 for k, v in phases.items()},
        "push_payload": summary["push_payload"], "push_payload_no_freeze": summary["push_payload_no_freeze"],
        "pull_payload": summary["pull_payload"], "pull_payload_no_freeze": summary["pull_payload_no_freeze"],
        "message_bytes": summary["message_bytes"],
        "blocks": summary["blocks"], "push_by_block": summary["push_by_block"], "pull_by_block": summary["pull_by_block"],
    }


def format_report(facts: dict) -> str:
    lines = [f"model {facts['model']}, {facts['workers']} workers, {facts['steps']} steps, "
             f"wall {facts['wall_s']:.1f} s, {facts['frozen_blocks']} blocks frozen at the end"]
    if facts["accuracy"] is not None:
        curve = ", ".join(f"epoch {e:g}: {a:.4f}" for e, a in facts["accuracy_by_epoch"])
        lines.append(f"test accuracy {facts['accuracy']:.4f} ({curve})")
    if facts["final_loss"] is not None:
        lines.append(f"last round's training loss {facts['final_loss']:.4f}")
    lines.append("time per step and worker: " + ", ".join(
        f"{k.removesuffix('_s')} {v:.1f} ms" for k, v in facts["phase_ms_per_step"].items()))
    lines.append("")
    lines.append(f"{'tensor payload':<16}{'this run':>16}{'no freezing':>16}{'saved':>9}")
    for name in ("push", "pull"):
        got, full = facts[f"{name}_payload"], facts[f"{name}_payload_no_freeze"]
        saved = f"{1 - got / full:.1%}" if full else "-"
        lines.append(f"{name:<16}{_mb(got):>16}{_mb(full):>16}{saved:>9}")
    msg = facts["message_bytes"]
    lines.append(f"serialized messages: push {_mb(msg.get('Push', {}).get('in', 0))}, "
                 f"pull {_mb(msg.get('Pull', {}).get('out', 0))}")
    lines.append("")
    lines.append(f"{'block':<14}{'size':>12}{'pushed':>14}{'pulled':>14}")
    for b in facts["blocks"]:
        lines.append(f"{b['name']:<14}{_mb(b['bytes']):>12}{_mb(facts['push_by_block'].get(b['name'], 0)):>14}"
                     f"{_mb(facts['pull_by_block'].get(b['name'], 0)):>14}")
    return "\n".join(lines)
