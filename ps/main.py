"""Run one parameter server until its workers are done: serve, log each round, summarise.

The run log gets one "round" record per step (loss, phases, gradient norms, and the bytes
of that step per method, block and worker) and one "summary" record at the end that sets
the bytes moved against the no-freezing counterfactual; also "freeze", "drop" (a worker
past its deadline), "resume" (with the rounds lost since the checkpoint) and
"checkpoint" records.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from proto.runlog import JsonlLog, read_jsonl
from proto.security import Auth, check_listen
from proto.transport import KEEPALIVE_S, ByteMeter, InterfaceCounter
from ps.checkpoint import CheckpointError, list_checkpoints, read_latest, set_aside, write_checkpoint
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from ps.servicer import start_server

log = logging.getLogger("freezeps.ps")


@dataclass(frozen=True)
class CheckpointPlan:
    """Where and how often the PS saves itself: every `every` rounds (0: only at shutdown),
    at SIGTERM and at the end, keeping the newest `keep` files."""
    directory: Path
    every: int = 0
    keep: int = 2

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint every must be >= 0 and keep >= 1")


class _Counterfactual:
    """Bytes a run without freezing would have moved: every block, every push and pull. Pushes
    are those applied and those received after their round (backup workers), whose bytes moved."""

    def __init__(self):
        self.pushes = 0

    def on_record(self, record: dict) -> None:
        if record["event"] == "round":
            self.pushes += len(record["workers"])
        elif record["event"] == "late_push" and record["received"]:
            self.pushes += 1


class CannotServe(Exception):
    """The PS cannot start: its port is taken, or a folder it writes to cannot be written.
    (An I/O error once it serves is not this: a restart, with auto_resume, may get past it.)"""


def serve_ps(settings: ServerSettings, policy: FreezePolicy, address: str, run_log: Path | None,
             auth: Auth = Auth(), insecure: bool = False, max_wait_s: float = 0.0,
             on_ready=lambda port: None, on_round=lambda record: None,
             wire: InterfaceCounter | None = None, params_out: Path | None = None,
             checkpoints: CheckpointPlan | None = None, resume: Path | None = None,
             keepalive_s: float = KEEPALIVE_S) -> dict:
    """Serve until every worker that joined has left (or SIGTERM, or max_wait_s > 0 passes).

    With `wire`, each round record also gets the interface bytes of that round; with
    `params_out`, the final values are saved there ({manifest name: tensor}, torch.save).
    With `resume`, the newest good checkpoint in that folder is restored first (a
    CheckpointError when there is none that fits, before serving anything), and the newer ones
    it refused are set aside (renamed *.refused). Without it, a checkpoint folder that already
    holds checkpoints is refused (CheckpointError): two runs' files would mix. A non-loopback
    `address` needs a token or mutual TLS in `auth`, or `insecure` (an AuthError otherwise). A
    port or folder it cannot have raises CannotServe before anything is served."""
    check_listen(address, auth, insecure)
    meter = ByteMeter()
    wire_total: dict[str, int] = {}
    counter = _Counterfactual()
    server: ParameterServer | None = None

    def save_checkpoint() -> None:
        state = {"format": 1, "server": server.snapshot(), "bytes": meter.totals(),
                 "pushes": counter.pushes, "wire_rounds": dict(wire_total)}
        path = write_checkpoint(checkpoints.directory, state["server"]["step"], state, checkpoints.keep)
        runlog.write({"event": "checkpoint", "step": state["server"]["step"], "path": str(path)})

    def log_record(record: dict) -> None:
        counter.on_record(record)
        if record["event"] != "round":
            runlog.write(record)
            return
        on_round(record)
        extra = {}
        if wire is not None:
            extra["wire"] = wire.take_window()
            for k, v in extra["wire"].items():
                wire_total[k] = wire_total.get(k, 0) + v
        runlog.write({**record, "bytes": meter.take_window(), **extra})
        if record["step"] % 10 == 0:
            log.info("[PS.Round] step %d: loss %.4f, %d blocks frozen, %.3f s",
                     record["step"], record["loss"], record["frozen_blocks"], record["round_s"])
        if checkpoints is not None and checkpoints.every and (record["step"] + 1) % checkpoints.every == 0:
            save_checkpoint()  # under the server's lock, between two rounds

    server = ParameterServer(settings, policy, log_record)
    resumed = None
    # Checked before the run log opens: a refused start writes nothing.
    if resume is None and checkpoints is not None and (found := list_checkpoints(checkpoints.directory)):
        raise CheckpointError(f"{checkpoints.directory} already holds checkpoints (the newest {found[0].name}) "
                              f"and this run does not resume them: resume (resume, auto_resume) or give "
                              f"another checkpoint_dir, so that two runs' checkpoints do not mix")
    if resume is not None:
        try:
            path, state, refused = read_latest(resume)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume: {e}") from None
        try:
            server.restore(state["server"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"cannot resume: {path} does not fit this run: {e}") from None
        meter.restore(state["bytes"])
        counter.pushes = int(state["pushes"])
        wire_total.update(state["wire_rounds"])
        for refused_path, why in refused:
            log.error("[PS] checkpoint refused, set aside as %s: %s", set_aside(refused_path).name, why)
        resumed = {"event": "resume", "checkpoint": str(path), "step": int(state["server"]["step"]),
                   "refused": [why for _, why in refused],
                   "rounds_lost": _rounds_lost(run_log, int(state["server"]["step"]))}
        log.warning("[PS] resumed from %s at step %d (%d rounds lost since it was written)",
                    path, resumed["step"], resumed["rounds_lost"])
    try:  # what it cannot have at the start, it says now (the checkpoint folder: not at the first checkpoint)
        if checkpoints is not None:
            checkpoints.directory.mkdir(parents=True, exist_ok=True)
            if not os.access(checkpoints.directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{checkpoints.directory}: cannot write checkpoints there")
        runlog = JsonlLog(run_log)
        grpc_server, port = start_server(server, meter, address, auth, keepalive_s)
    except OSError as e:
        raise CannotServe(str(e)) from e
    if resumed:
        runlog.write(resumed)
    log.info("[PS] serving on %s (port %d), waiting for %d workers", address, port, settings.num_workers)
    on_ready(port)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    try:
        while not stop.is_set():
            if server.wait_done(timeout=0.5):
                break
            server.enforce_deadlines()
            if max_wait_s and time.monotonic() - started > max_wait_s:
                log.warning("[PS] giving up after %.0f s", max_wait_s)
                break
    finally:
        grpc_server.stop(grace=2.0).wait(5.0)
        if checkpoints is not None and server.status().initialized:
            save_checkpoint()
        if params_out is not None:
            save_params(server.values_by_name(), params_out)
        summary = summarize(server.describe(), meter.totals(), counter.pushes, time.monotonic() - started)
        if wire is not None:
            summary["wire_rounds"] = wire_total  # the rounds' windows summed; the first holds Join and Init
        runlog.write(summary)
        runlog.close()
    return summary


def _rounds_lost(run_log: Path | None, restored_step: int) -> int:
    """Rounds the previous process completed after the checkpoint: the run log's last round."""
    if run_log is None:
        return 0
    last = restored_step - 1
    for record in read_jsonl(run_log):  # without the line the crash cut short
        if record.get("event") == "round":
            last = max(last, record["step"])
        elif record.get("event") == "resume":
            last = record["step"] - 1  # rounds before an earlier resume were redone
    return last + 1 - restored_step


def save_params(values: dict, path: Path) -> None:
    """{name: tensor} to `path` atomically (a temporary file renamed over it)."""
    import torch
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: torch.as_tensor(v) for k, v in values.items()}, tmp)
    tmp.replace(path)


def summarize(run: dict, totals: dict, pushes: int, wall_s: float) -> dict:
    """The run's bytes per method and direction, next to what every block (of this PS's), dense,
    every step would have moved."""
    model_bytes = sum(b["bytes"] for b in run["blocks"])
    # A PS shard's counterfactual is its own blocks': the shards' summaries add up to the model's.
    first, end = run.get("owned") or (0, len(run["blocks"]))
    owned_bytes = sum(b["bytes"] for b in run["blocks"][first:end])
    names = {str(i): b["name"] for i, b in enumerate(run["blocks"])}

    def payload(method: str, direction: str) -> int:
        return sum(t["payload"] for t in totals.get(method, {}).get(direction, {}).values())

    def per_block(method: str, direction: str) -> dict:
        by_block = totals.get(method, {}).get(direction, {})
        return {names[k]: v["payload"] for k, v in by_block.items() if k in names}

    pulls = sum(t["messages"] for k, t in totals.get("Pull", {}).get("in", {}).items())
    return {
        "event": "summary", **run, "wall_s": round(wall_s, 3), "model_bytes": model_bytes,
        "push_payload": payload("Push", "in"), "pull_payload": payload("Pull", "out"),
        "push_payload_no_freeze": pushes * owned_bytes, "pull_payload_no_freeze": pulls * owned_bytes,
        "push_by_block": per_block("Push", "in"), "pull_by_block": per_block("Pull", "out"),
        "message_bytes": {m: {d: sum(t["message"] for t in v.values()) for d, v in dirs.items()}
                          for m, dirs in totals.items()},
        "bytes": totals,
    }
