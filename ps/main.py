"""Run one parameter server until its workers are done: serve, log each round, summarise.

The run log gets one "round" record per step (loss, phases, gradient norms, and the bytes
of that step per method, block and worker) and one "summary" record at the end that sets
the bytes moved against the no-freezing counterfactual.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import grpc

from proto.runlog import JsonlLog
from proto.transport import ByteMeter, InterfaceCounter
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from ps.servicer import start_server

log = logging.getLogger("freezeps.ps")


class _Counterfactual:
    """Bytes a run without freezing would have moved: every block, every push and pull."""

    def __init__(self):
        self.pushes = 0

    def on_round(self, record: dict) -> None:
        self.pushes += len(record["workers"])


def serve_ps(settings: ServerSettings, policy: FreezePolicy, address: str, run_log: Path | None,
             credentials: grpc.ServerCredentials | None = None, max_wait_s: float = 0.0,
             on_ready=lambda port: None, on_round=lambda record: None,
             wire: InterfaceCounter | None = None, params_out: Path | None = None) -> dict:
    """Serve until every worker that joined has left (or SIGTERM, or max_wait_s > 0 passes).

    With `wire`, each round record also gets the interface bytes of that round; with
    `params_out`, the final values are saved there ({manifest name: tensor}, torch.save)."""
    meter = ByteMeter()
    wire_total: dict[str, int] = {}
    runlog = JsonlLog(run_log)
    counter = _Counterfactual()

    def log_record(record: dict) -> None:
        if record["event"] != "round":
            runlog.write(record)
            return
        on_round(record)
        counter.on_round(record)
        extra = {}
        if wire is not None:
            extra["wire"] = wire.take_window()
            for k, v in extra["wire"].items():
                wire_total[k] = wire_total.get(k, 0) + v
        runlog.write({**record, "bytes": meter.take_window(), **extra})
        if record["step"] % 10 == 0:
            log.info("[PS.Round] step %d: loss %.4f, %d blocks frozen, %.3f s",
                     record["step"], record["loss"], record["frozen_blocks"], record["round_s"])

    server = ParameterServer(settings, policy, log_record)
    grpc_server, port = start_server(server, meter, address, credentials)
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
            if max_wait_s and time.monotonic() - started > max_wait_s:
                log.warning("[PS] giving up after %.0f s", max_wait_s)
                break
    finally:
        grpc_server.stop(grace=2.0).wait(5.0)
        if params_out is not None:
            save_params(server.values_by_name(), params_out)
        summary = summarize(server.describe(), meter.totals(), counter.pushes, time.monotonic() - started)
        if wire is not None:
            summary["wire_rounds"] = wire_total  # the rounds' windows summed; the first holds Join and Init
        runlog.write(summary)
        runlog.close()
    return summary


def save_params(values: dict, path: Path) -> None:
    """{name: tensor} to `path` atomically (a temporary file renamed over it)."""
    import torch
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: torch.as_tensor(v) for k, v in values.items()}, tmp)
    tmp.replace(path)


def summarize(run: dict, totals: dict, pushes: int, wall_s: float) -> dict:
    """The run's bytes per method and direction, next to what no freezing would have moved."""
    model_bytes = sum(b["bytes"] for b in run["blocks"])
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
        "push_payload_no_freeze": pushes * model_bytes, "pull_payload_no_freeze": pulls * model_bytes,
        "push_by_block": per_block("Push", "in"), "pull_by_block": per_block("Pull", "out"),
        "message_bytes": {m: {d: sum(t["message"] for t in v.values()) for d, v in dirs.items()}
                          for m, dirs in totals.items()},
        "bytes": totals,
    }
