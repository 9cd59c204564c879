"""`freezeps run`: a PS (or one process per PS shard) and N workers as separate processes on
this machine, over loopback or (--network netns) each in its own network namespace on an
emulated switch.

The merged configuration is written to RUN_DIR/config.toml and every process reads it,
so the run folder alone says how the run was made. Progress comes from the PS's Status RPC.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import torch
from google.protobuf.json_format import MessageToDict

from freezeps import netns
from freezeps.certs import make_secrets
from freezeps.config import STATUS, Config, auth_for, link_shape, to_toml
from freezeps.report import format_report, summarize_run
from proto import freezeps_pb2 as pb
from proto.security import Auth, AuthError, open_channel, read_auth
from proto.service import ParameterServerClient
from worker.device import nccl_refusal, resolve_device


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(stub, timeout: float = 2.0) -> pb.StatusReply | None:
    try:
        return stub.Status(pb.StatusRequest(), timeout=timeout)
    except grpc.RpcError:
        return None


def print_status(address: str, timeout: float, cfg: Config) -> int:
    """`freezeps status`: one line of JSON with the PS's state; exit 1 when it does not answer
    (or refuses this caller's credentials), 2 when they cannot be read."""
    try:
        auth = auth_for(cfg, STATUS)
    except AuthError as e:
        print(f"freezeps status: {e}", file=sys.stderr)
        return 2
    with open_channel(address, auth) as channel:
        try:
            status = ParameterServerClient(channel).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            print(f"freezeps status: no answer from {address} within {timeout:g} s: {e.code().name}: {e.details()}",
                  file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(status, always_print_fields_with_no_presence=True)))
    return 0


def run_job(cfg: Config, config_file: str | None = None) -> int:
    run_dir = Path(cfg.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "ps.jsonl").exists():
        print(f"freezeps run: {run_dir} already holds a run (ps.jsonl); logs are appended to, so give "
              f"another --run-dir or delete that folder", file=sys.stderr)
        return 2
    if why := device_refusal_here(cfg, torch.cuda.device_count()):
        print(f"freezeps run: {why}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    if cfg.network == "loopback":
        return _run_processes(cfg, run_dir, Placement.loopback([free_port() for _ in range(cfg.ps_shards)],
                                                               cfg.num_workers))
    if cfg.mode == "single":
        print("freezeps run: --mode single has no network; use --network loopback", file=sys.stderr)
        return 2
    reason = netns.unavailable()
    if reason:
        print(f"freezeps run: --network netns is not available here: {reason}", file=sys.stderr)
        return 2
    try:
        with netns.Topology(cfg.num_workers, link_shape(cfg), servers=cfg.ps_shards) as topology:
            placement = Placement.in_namespaces(topology, port=50051)
            before = topology.counters()
            code = _run_processes(cfg, run_dir, placement, after=lambda: _write_wire(run_dir, topology, before, cfg))
    except netns.NetnsError as e:
        print(f"freezeps run: {e}", file=sys.stderr)
        return 2
    return code


def device_refusal_here(cfg: Config, gpus: int) -> str | None:
    """Why the processes this launcher starts cannot have their devices on a host with `gpus`
    CUDA GPUs (each gets LOCAL_RANK = its index), or None."""
    processes = 1 if cfg.mode == "single" else cfg.num_workers
    try:
        devices = [resolve_device(cfg.device, i, gpus) for i in range(processes)]
    except ValueError as e:
        return str(e)
    return nccl_refusal(devices) if cfg.mode == "ddp" and cfg.device != "cpu" else None


@dataclass(frozen=True)
class RunSecrets:
    """The security flags of the PS and the workers of one run, and what the launcher presents
    when it asks for the status. Every run carries a token (`token_file`, or a fresh one);
    with --tls, a fresh CA signs the PS's certificate (and the workers' with --tls-client-auth)."""
    ps_flags: list[str]
    worker_flags: list[str]
    launcher: Auth

    @classmethod
    def make(cls, cfg: Config, run_dir: Path, ps_hosts: list[str]) -> "RunSecrets":
        folder = run_dir / "secrets"
        token = cfg.token_file or str(folder / "token")
        ca, ps_cert, ps_key, client_cert, client_key = (
            str(folder / name) for name in ("ca.pem", "ps.pem", "ps.key", "worker.pem", "worker.key"))
        if cfg.tls or not cfg.token_file:
            make_secrets(folder, ps_hosts, ["worker"] if cfg.tls_client_auth else [], token=not cfg.token_file)
        ps, worker = ["--token-file", token], ["--token-file", token]
        if cfg.tls:
            ps += ["--tls", "--tls-cert", ps_cert, "--tls-key", ps_key]
            worker += ["--tls", "--tls-ca", ca]
        if not cfg.tls_client_auth:
            client_cert = client_key = ""
        else:
            ps += ["--tls-client-auth", "--tls-ca", ca]
            worker += ["--tls-cert", client_cert, "--tls-key", client_key]
        # The launcher asks for the status as a worker would.
        launcher = read_auth(tls=cfg.tls, ca=ca if cfg.tls else "", cert=client_cert, key=client_key,
                             token_file=token)
        return cls(ps, worker, launcher)


@dataclass(frozen=True)
class Placement:
    """Where each process of a run lives and which addresses it uses."""
    listen: list[str]  # what each PS shard binds, in shard order; the launcher asks shard 0 for the status
    worker_ps_address: list[str]  # each worker's --ps-address: every shard's, comma-separated
    ps_prefix: list[list[str]]  # per shard: argv prefix that starts a process in its place (ip netns exec ...)
    worker_prefix: list[list[str]]
    ddp_master: str  # DDP's rendezvous: rank 0's host and a free port
    interface: str  # the network interface gloo uses

    @classmethod
    def loopback(cls, ports: list[int], workers: int) -> "Placement":
        listen = [f"127.0.0.1:{port}" for port in ports]
        return cls(listen, [",".join(listen)] * workers, [[]] * len(ports), [[]] * workers,
                   f"127.0.0.1:{free_port()}", "lo")

    @classmethod
    def in_namespaces(cls, topology: netns.Topology, port: int) -> "Placement":
        listen = [f"{topology.server_ip(i)}:{port}" for i in range(topology.servers)]
        return cls(listen, [",".join(listen)] * topology.workers, [topology.exec_prefix(ns) for ns in topology.ps_ns],
                   [topology.exec_prefix(ns) for ns in topology.worker_ns], f"{topology.worker_ip(0)}:29500", "eth0")


def shard_file(name: str, shard: int) -> str:
    """A PS shard's file in the run folder: shard 0 keeps the plain name (ps.jsonl), shard i
    gets ps-shardI.jsonl."""
    stem, dot, ext = name.partition(".")
    return name if shard == 0 else f"{stem}-shard{shard}{dot}{ext}"


def _write_wire(run_dir: Path, topology: netns.Topology, before: dict, cfg: Config) -> None:
    """wire.json: what each namespace's link sent and received during the run."""
    after = topology.counters()
    links = {ns: {k: after[ns][k] - before[ns][k] for k in after[ns]} for ns in after}
    workers = [links[ns] for ns in topology.worker_ns]
    record = {
        "network": "netns", "rate": cfg.link_rate, "delay_ms": cfg.link_delay_ms, "mtu": cfg.link_mtu,
        "offload": cfg.link_offload,
        # Every frame once, where it was sent: what crossed the switch. The worker links
        # carry nothing but the run; the PS's also carries the launcher's Status calls.
        "wire_bytes": sum(link["tx_bytes"] for link in links.values()),
        "workers_tx_bytes": sum(w["tx_bytes"] for w in workers),
        "workers_rx_bytes": sum(w["rx_bytes"] for w in workers),
        "links": {**{shard_file("ps", i): links[ns] for i, ns in enumerate(topology.ps_ns)},
                  **{f"worker-{i}": w for i, w in enumerate(workers)}},
    }
    (run_dir / "wire.json").write_text(json.dumps(record, indent=1) + "\n")


def _stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """Terminate what still runs, all at once (a PS shard may take a few seconds to stop its
    server and write its summary: one after another, those seconds add up), then kill what
    has not ended `grace_s` after that."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _failed(procs: list[subprocess.Popen]) -> int | None:
    """The index of the first process that ended with a non-zero status, or None."""
    return next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)


def _report_failure(what: str, proc: subprocess.Popen, log_file: Path) -> None:
    tail = log_file.read_text().strip().splitlines()[-30:]
    print(f"freezeps run: {what} failed (exit {proc.returncode}):\n  " + "\n  ".join(tail), file=sys.stderr)


def _run_baseline(cfg: Config, run_dir: Path, where: Placement) -> int:
    """--mode ddp: N DDP processes in the workers' places; --mode single: one process."""
    ranks = 1 if cfg.mode == "single" else cfg.num_workers
    print(f"freezeps run: {cfg.mode}, {ranks} process(es), {cfg.model} on {cfg.dataset}, freeze {cfg.freeze}, "
          f"{cfg.network}; logs in {run_dir}", flush=True)
    # NCCL's bootstrap and socket transport too (on one host its rings use NVLink or PCIe, which
    # the links' counters do not see).
    env = {**os.environ, "GLOO_SOCKET_IFNAME": where.interface, "NCCL_SOCKET_IFNAME": where.interface}
    procs, logs = [], []
    for rank in range(ranks):
        log = open(run_dir / f"ddp-{rank}.log", "w")
        logs.append(log)
        argv = [sys.executable, "-m", "freezeps.ddp", "--config", str(run_dir / "config.toml"), "--rank", str(rank),
                "--world", str(ranks), "--master", where.ddp_master, "--run-dir", str(run_dir)]
        procs.append(subprocess.Popen(where.worker_prefix[rank] + argv + (["--single"] if cfg.mode == "single" else []),
                                      stdout=log, stderr=subprocess.STDOUT, env={**env, "LOCAL_RANK": str(rank)}))
    try:
        while any(p.poll() is None for p in procs):
            if _failed(procs) is not None:
                break
            time.sleep(1.0)
        bad = _failed(procs)
        if bad is not None:
            _report_failure(f"{cfg.mode} rank {bad}", procs[bad], run_dir / f"ddp-{bad}.log")
            return 1
    finally:
        _stop(procs)
        for log in logs:
            log.close()
    return 0


def _run_processes(cfg: Config, run_dir: Path, where: Placement, after=lambda: None) -> int:
    if cfg.mode != "ps":
        code = _run_baseline(cfg, run_dir, where)
        if code == 0:
            after()
            print()
            print(format_report(summarize_run(run_dir)))
        return code
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.num_workers)
    base = [sys.executable, "-m", "freezeps"]
    common = ["--config", str(run_dir / "config.toml")]
    print(f"freezeps run: {cfg.num_workers} workers x {threads} threads, {cfg.model} on {cfg.dataset}, "
          f"freeze {cfg.freeze}, {cfg.network}; logs in {run_dir}", flush=True)
    hosts = sorted({address.rsplit(":", 1)[0] for address in where.listen})
    try:
        secrets = RunSecrets.make(cfg, run_dir, hosts)
    except (AuthError, OSError) as e:
        print(f"freezeps run: cannot set up the run's credentials: {e}", file=sys.stderr)
        return 2
    wire = ["--count-wire-bytes"] if cfg.network == "netns" else []
    servers, logs = [], []
    for shard, listen in enumerate(where.listen):
        logs.append(open(run_dir / shard_file("ps.log", shard), "w"))
        checkpoints = run_dir / shard_file("checkpoints", shard)
        servers.append(subprocess.Popen(
            where.ps_prefix[shard] + base + ["ps"] + common + wire + secrets.ps_flags +
            ["--listen", listen, "--ps-shard", str(shard), "--run-log", str(run_dir / shard_file("ps.jsonl", shard)),
             "--params-out", str(run_dir / shard_file("params.pt", shard))] +
            (["--checkpoint-dir", str(checkpoints)] if cfg.checkpoint_every else []),
            stdout=logs[-1], stderr=subprocess.STDOUT))
    workers = []
    for i in range(cfg.num_workers):
        log = open(run_dir / f"worker-{i}.log", "w")
        logs.append(log)
        workers.append(subprocess.Popen(
            where.worker_prefix[i] + base + ["worker"] + common + secrets.worker_flags +
            ["--ps-address", where.worker_ps_address[i], "--log-dir", str(run_dir), "--threads", str(threads)] +
            (["--cache-dir", str(run_dir / "cache")] if cfg.cache_disk_bytes and not cfg.cache_dir else []),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "LOCAL_RANK": str(i)}))
    channel = open_channel(where.listen[0], secrets.launcher)
    stub = ParameterServerClient(channel)
    started, last_line, failed = time.monotonic(), "", None
    try:
        while any(w.poll() is None for w in workers):
            failed = _failed(workers)
            if failed is not None or any(p.poll() is not None for p in servers):
                break
            status = _status(stub)
            if status is not None and status.initialized:
                total = f"/{status.total_steps}" if status.total_steps else ""
                line = (f"  step {status.step}{total}  workers {status.live_workers}/{status.num_workers}  "
                        f"frozen {status.freeze.frozen_blocks}/{len(status.blocks)} blocks  "
                        f"in {status.payload_bytes_in / 1e6:,.0f} MB  out {status.payload_bytes_out / 1e6:,.0f} MB  "
                        f"{time.monotonic() - started:,.0f} s")
                if line.split("  ")[1] != last_line:
                    print(line, flush=True)
                    last_line = line.split("  ")[1]
            time.sleep(2.0)
        # A PS that died is the cause of whatever its workers do next (they would go on trying
        # to join it for minutes): report it at once.
        bad = _failed(servers)
        if bad is None and (failed is not None or any(w.wait() != 0 for w in workers)):
            bad = failed if failed is not None else _failed(workers)
            _report_failure(f"worker {bad}", workers[bad], run_dir / f"worker-{bad}.log")
            return 1
        bad = _failed(servers) if bad is None else bad
        if bad is not None:
            _report_failure(f"PS shard {bad}" if len(servers) > 1 else "the PS", servers[bad],
                            run_dir / shard_file("ps.log", bad))
            return 1
        for p in servers:
            p.wait(timeout=60)
        after()
    finally:
        _stop([*workers, *servers])
        channel.close()
        for log in logs:
            log.close()
    print()
    print(format_report(summarize_run(run_dir)))
    print(f"\nrun log: {run_dir / 'ps.jsonl'}; report again with: freezeps report {run_dir}")
    return 0
