"""Time one synchronous round on loopback: N workers push and pull a whole model.

Compares, in one run on one machine:
  freezeps  a PS process and N worker processes; each round every worker pulls all
            blocks and pushes a gradient for all of them (no compute), through gRPC;
  bare gRPC the same gRPC streams, channel options and chunks, but a server that does
            no work (pulls stream a prepared chunk, pushes are dropped): the floor of
            Python gRPC itself on this machine;
  raw TCP   a server process and N client processes moving the same bytes up and
            down over plain sockets, the floor any transport pays on this machine.

    python -m bench.round --model resnet18 --workers 4 --rounds 5
    python -m bench.round --security none,token,tls,mtls   # what authentication costs a round
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench import machine


def _ps_process(port_q, num_workers: int, chunk_bytes: int, rounds: int, auth):
    from ps.main import serve_ps
    from ps.policy import FreezePolicy
    from ps.server import ServerSettings
    torch.set_num_threads(1)
    settings = ServerSettings(num_workers=num_workers, chunk_bytes=chunk_bytes, round_timeout_s=120)
    cpu = {}

    def on_round(record):  # CPU of the whole PS process (all threads) over the timed rounds
        if record["step"] == 0:
            cpu["start"] = time.process_time()
        if record["step"] == rounds:
            cpu["end"] = time.process_time()

    serve_ps(settings, FreezePolicy(), "127.0.0.1:0", None, auth=auth, max_wait_s=600, on_ready=port_q.put,
             on_round=on_round)
    port_q.put((cpu["end"] - cpu["start"]) / rounds)


def _worker_process(address: str, model: str, rounds: int, out_q, auth):
    from proto import freezeps_pb2 as pb
    from worker.client import PSClient
    from worker.flat import FlatModel
    from worker.models import build_model
    torch.set_num_threads(1)
    flat = FlatModel(build_model(model, 10, "random"))
    for g in flat.grads:
        g.fill_(1e-6)
    client = PSClient(address, auth=auth)
    joined = client.join(flat.manifest, f"bench-{mp.current_process().pid}")
    if joined.needs_init:
        client.init(flat, range(joined.owned.first, joined.owned.end), rounds)
    blocks = range(len(flat.layout))
    times = []
    for step in range(rounds + 1):  # round 0 warms up
        if step == 1:
            cpu0 = time.process_time()
        t0 = time.perf_counter()
        client.pull(step, 0, flat)
        client.push(pb.PushHeader(step=step, batch_size=1), flat, blocks)
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / rounds
    client.pull(rounds + 1, 0, flat)  # waits for the last round to be applied
    client.leave()
    out_q.put((times[1:], cpu))


def security_modes(folder: Path) -> dict:
    """{mode: (the PS's Auth, a worker's Auth)} with certificates and a token made in `folder`."""
    from freezeps.certs import make_secrets
    from proto.security import Auth, read_auth
    make_secrets(folder, [], ["worker"])
    f = {name: str(folder / name) for name in ("ca.pem", "ps.pem", "ps.key", "worker.pem", "worker.key", "token")}
    ps_tls = dict(tls=True, cert=f["ps.pem"], key=f["ps.key"])
    return {
        "none": (Auth(), Auth()),
        "token": (read_auth(token_file=f["token"]), read_auth(token_file=f["token"])),
        "tls": (read_auth(**ps_tls), read_auth(tls=True, ca=f["ca.pem"])),
        "mtls": (read_auth(**ps_tls, ca=f["ca.pem"], client_auth=True, token_file=f["token"]),
                 read_auth(tls=True, ca=f["ca.pem"], cert=f["worker.pem"], key=f["worker.key"],
                           token_file=f["token"])),
    }


def bench_freezeps(model: str, workers: int, rounds: int, chunk_bytes: int, auth: tuple | None = None
                   ) -> tuple[list[float], float, float]:
    """(round times, PS CPU seconds per round, workers' CPU seconds per round, summed).
    `auth`: (the PS's, the workers' Auth), from security_modes(); none by default."""
    from proto.security import Auth
    ps_auth, worker_auth = auth or (Auth(), Auth())
    ctx = mp.get_context("spawn")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    ps = ctx.Process(target=_ps_process, args=(port_q, workers, chunk_bytes, rounds, ps_auth))
    ps.start()
    address = f"127.0.0.1:{port_q.get(timeout=60)}"
    procs = [ctx.Process(target=_worker_process, args=(address, model, rounds, out_q, worker_auth))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [out_q.get(timeout=600) for _ in procs]
    ps_cpu = port_q.get(timeout=60)
    for p in procs + [ps]:
        p.join(timeout=60)
    per_worker = [times for times, _ in results]
    # A round ends when the slowest worker's pull+push ends.
    return [max(w[i] for w in per_worker) for i in range(rounds)], ps_cpu, sum(cpu for _, cpu in results)


def _bare_grpc_server(port_q, stop_q, nbytes: int, chunk_bytes: int):
    from concurrent import futures

    import grpc

    from proto.transport import CHANNEL_OPTIONS
    chunk = bytes(chunk_bytes)
    count = -(-nbytes // chunk_bytes)

    def pull(request, context):
        for _ in range(count):
            yield chunk

    def push(request_iterator, context):
        for _ in request_iterator:
            pass
        return b""

    same = dict(request_deserializer=None, response_serializer=None)
    handler = grpc.method_handlers_generic_handler("bench", {
        "Pull": grpc.unary_stream_rpc_method_handler(pull, **same),
        "Push": grpc.stream_unary_rpc_method_handler(push, **same)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cpu0 = time.process_time()
    port_q.put(port)
    stop_q.get(timeout=600)
    port_q.put(time.process_time() - cpu0)
    server.stop(0)


def _bare_grpc_client(port: int, nbytes: int, chunk_bytes: int, rounds: int, out_q, barrier):
    import grpc

    from proto.transport import CHANNEL_OPTIONS
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    pull = channel.unary_stream("/bench/Pull")
    push = channel.stream_unary("/bench/Push")
    chunk = bytes(chunk_bytes)
    count = -(-nbytes // chunk_bytes)
    times = []
    for _ in range(rounds + 1):
        barrier.wait()
        t0 = time.perf_counter()
        for _ in pull(b""):
            pass
        push(iter([chunk] * count))
        times.append(time.perf_counter() - t0)
    channel.close()
    out_q.put(times[1:])


def bench_bare_grpc(nbytes: int, workers: int, rounds: int, chunk_bytes: int) -> tuple[list[float], float]:
    """(round times, server CPU seconds per round, warm-up round included)."""
    ctx = mp.get_context("spawn")
    port_q, stop_q, out_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(workers)
    srv = ctx.Process(target=_bare_grpc_server, args=(port_q, stop_q, nbytes, chunk_bytes))
    srv.start()
    port = port_q.get(timeout=30)
    procs = [ctx.Process(target=_bare_grpc_client, args=(port, nbytes, chunk_bytes, rounds, out_q, barrier))
             for _ in range(workers)]
    for p in procs:
        p.start()
    per_worker = [out_q.get(timeout=300) for _ in procs]
    stop_q.put(None)
    server_cpu = port_q.get(timeout=30)
    for p in procs + [srv]:
        p.join(timeout=30)
    return [max(w[i] for w in per_worker) for i in range(rounds)], server_cpu / (rounds + 1)


def _tcp_server(port_q, workers: int, nbytes: int, rounds: int):
    import threading
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    payload = bytes(nbytes)

    def serve(conn):
        buf = bytearray(nbytes)
        view = memoryview(buf)
        with conn:
            for _ in range(rounds + 1):
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:])
                conn.sendall(payload)

    threads = []
    for _ in range(workers):
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=serve, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def _tcp_client(port: int, nbytes: int, rounds: int, out_q, barrier):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = bytes(nbytes)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    times = []
    for _ in range(rounds + 1):
        barrier.wait()
        t0 = time.perf_counter()
        sock.sendall(payload)  # "push"
        got = 0
        while got < nbytes:  # "pull"
            got += sock.recv_into(view[got:])
        times.append(time.perf_counter() - t0)
    sock.close()
    out_q.put(times[1:])


def bench_tcp(nbytes: int, workers: int, rounds: int) -> list[float]:
    ctx = mp.get_context("spawn")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(workers)
    srv = ctx.Process(target=_tcp_server, args=(port_q, workers, nbytes, rounds))
    srv.start()
    port = port_q.get(timeout=30)
    procs = [ctx.Process(target=_tcp_client, args=(port, nbytes, rounds, out_q, barrier)) for _ in range(workers)]
    for p in procs:
        p.start()
    per_worker = [out_q.get(timeout=300) for _ in procs]
    for p in procs + [srv]:
        p.join(timeout=30)
    return [max(w[i] for w in per_worker) for i in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20)
    parser.add_argument("--security", default="none", help="comma-separated: time the freezeps round with each of "
                        "none, token, tls, mtls (mutual TLS and a token)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        modes = security_modes(Path(folder))
    wanted = args.security.split(",")
    if not set(wanted) <= set(modes):
        parser.error(f"--security: {set(wanted) - set(modes)} not in {sorted(modes)}")
    from worker.flat import FlatModel
    from worker.models import build_model
    nbytes = sum(b.nbytes for b in FlatModel(build_model(args.model, 10, "random")).layout)
    by_mode = {mode: bench_freezeps(args.model, args.workers, args.rounds, args.chunk_bytes, modes[mode])
               for mode in wanted}
    ours, ps_cpu, workers_cpu = by_mode[wanted[0]]
    bare, bare_cpu = bench_bare_grpc(nbytes, args.workers, args.rounds, args.chunk_bytes)
    tcp = bench_tcp(nbytes, args.workers, args.rounds)
    result = {
        "date": date.today().isoformat(), "machine": machine.describe(),
        "model": args.model, "model_bytes": nbytes, "workers": args.workers, "rounds": args.rounds,
        "chunk_bytes": args.chunk_bytes,
        "freezeps_round_s": statistics.median(ours), "raw_tcp_round_s": statistics.median(tcp),
        "bare_grpc_round_s": statistics.median(bare), "bare_grpc_server_cpu_s_per_round": bare_cpu,
        "ps_cpu_s_per_round": ps_cpu, "workers_cpu_s_per_round": workers_cpu, "security": wanted[0],
        "by_security": {mode: {"round_s": statistics.median(times), "ps_cpu_s_per_round": ps,
                               "workers_cpu_s_per_round": w} for mode, (times, ps, w) in by_mode.items()},
    }
    result["ratio"] = result["freezeps_round_s"] / result["raw_tcp_round_s"]
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.workers} workers push and pull {nbytes / 1e6:.1f} MB each ({args.model}), "
          f"median of {args.rounds} rounds, chunks of {args.chunk_bytes} bytes")
    for mode, r in result["by_security"].items():
        print(f"  freezeps round   {r['round_s'] * 1000:8.1f} ms  security {mode:5s} (PS CPU "
              f"{r['ps_cpu_s_per_round'] * 1000:.0f} ms, workers' {r['workers_cpu_s_per_round'] * 1000:.0f} ms per round)")
    print(f"  bare gRPC        {result['bare_grpc_round_s'] * 1000:8.1f} ms "
          f"(server CPU {bare_cpu * 1000:.0f} ms per round)")
    print(f"  raw TCP          {result['raw_tcp_round_s'] * 1000:8.1f} ms")
    print(f"  ratio            {result['ratio']:8.2f}x")
    print(f"  CPU per round    PS {ps_cpu * 1000:.0f} ms, workers {workers_cpu * 1000:.0f} ms together")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
