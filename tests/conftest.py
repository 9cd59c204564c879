"""Shared fixtures: an in-process parameter server on 127.0.0.1 with an ephemeral port."""
from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from proto import freezeps_pb2 as pb
from proto import freezeps_pb2_grpc as pb_grpc
from proto.codec import encode_header
from proto.runlog import JsonlLog
from proto.security import Auth, open_channel
from proto.transport import KEEPALIVE_S, ByteMeter, iter_chunks
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from ps.servicer import start_server
from worker.flat import FlatModel
from worker.models import build_model
from worker.train import WorkerSettings


class RunningPS:
    def __init__(self, server: ParameterServer, grpc_server, port: int, log_path: Path | None):
        self.server, self.grpc_server, self.port, self.log_path = server, grpc_server, port, log_path
        self.address = f"127.0.0.1:{port}"


@contextlib.contextmanager
def running_ps(num_workers: int = 2, policy: FreezePolicy | None = None, log_path: Path | None = None,
               observer=lambda server, record: None, auth: Auth = Auth(), keepalive_s: float = KEEPALIVE_S,
               **settings):
    """A PS on 127.0.0.1 that checks `auth` and pings silent workers after `keepalive_s`;
    `observer(server, record)` sees every run-log record as it is made."""
    meter = ByteMeter()
    runlog = JsonlLog(log_path)
    settings.setdefault("chunk_bytes", 1 << 20)
    settings.setdefault("round_timeout_s", 30.0)
    def on_record(record):
        observer(server, record)
        runlog.write({**record, "bytes": meter.take_window()} if record["event"] == "round" else record)

    server = ParameterServer(ServerSettings(num_workers=num_workers, **settings), policy or FreezePolicy(), on_record)
    grpc_server, port = start_server(server, meter, "127.0.0.1:0", auth, keepalive_s)
    stop = threading.Event()

    def enforce_deadlines():  # what serve_ps's loop does
        while not stop.wait(0.05):
            server.enforce_deadlines()

    deadlines = threading.Thread(target=enforce_deadlines, daemon=True)
    deadlines.start()
    try:
        yield RunningPS(server, grpc_server, port, log_path)
    finally:
        stop.set()
        deadlines.join(5)
        grpc_server.stop(grace=None).wait(5)
        runlog.close()


@pytest.fixture
def ps_factory():
    return running_ps


def as_pb_chunk(frame) -> pb.Chunk:
    c = frame.chunk
    return pb.Chunk(block=c.block, tensor=c.tensor, offset=c.offset, data=bytes(c.data))


def push_frames(header: pb.PushHeader, flat: FlatModel, grads: dict[int, bytes] | None = None,
                chunk_bytes: int = 1 << 20) -> list:
    """A whole push as the PS's push() reads it: the header, then every block's chunks, last
    block first as a push carries them (freezeps.proto, PushMessage); the model's current
    gradients, or `grads` (block -> bytes in the push layout)."""
    return [encode_header(header)] + [
        f for b in reversed(flat.push_layout)
        for f in iter_chunks(b, flat.push_bytes(b.index) if grads is None else np.frombuffer(grads[b.index], np.uint8),
                             chunk_bytes)]


def good_chunks(flat: FlatModel, chunk_bytes: int = 64) -> list[pb.Chunk]:
    """A whole push of the model's current gradients, as protobuf chunks (small, so several per
    block), last block first as a push carries them."""
    return [as_pb_chunk(f) for f in push_frames(pb.PushHeader(), flat, chunk_bytes=chunk_bytes)[1:]]


def init_frames(header: pb.PushHeader, flat: FlatModel, chunk_bytes: int = 1 << 20) -> list:
    """A whole Init as the PS's init() reads it: the header, then the model's current values,
    in block order."""
    return [encode_header(header)] + [f for b in flat.layout
                                      for f in iter_chunks(b, flat.value_bytes(b.index), chunk_bytes)]


def init_messages(worker_id: str, flat: FlatModel, total_steps: int, chunk_bytes: int = 64) -> list[pb.PushMessage]:
    """A whole Init of the model's current values as protobuf messages (for protobuf's own stub):
    the header, then the chunks in block order."""
    header = pb.PushHeader(worker_id=worker_id, total_steps=total_steps)
    return [pb.PushMessage(header=header)] + [pb.PushMessage(chunk=as_pb_chunk(f))
                                              for f in init_frames(header, flat, chunk_bytes)[1:]]


@contextlib.contextmanager
def one_worker(auth: Auth = Auth(), client: Auth | None = None, **settings):
    """A started run with one worker joined and initialised, through protobuf's generated stub:
    (ps, stub, worker_id, flat). The PS serves with `auth`; the stub's channel presents `client`
    (default: `auth`, which is right for a token)."""
    torch.manual_seed(0)
    flat = FlatModel(build_model("mlp", 4))
    with running_ps(num_workers=1, auth=auth, **settings) as ps, open_channel(ps.address, client or auth) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        joined = stub.Join(pb.JoinRequest(worker_name="t", manifest=flat.manifest), timeout=10)
        stub.Init(iter(init_messages(joined.worker_id, flat, 10, 1 << 20)), timeout=10)
        yield ps, stub, joined.worker_id, flat


@pytest.fixture
def one_worker_run():
    with one_worker() as run:
        yield run


def worker_settings(address: str | tuple[str, ...], **overrides) -> WorkerSettings:
    """A tiny worker against the PS at `address` (or the shards at a tuple of addresses)."""
    base = dict(ps_addresses=(address,) if isinstance(address, str) else address, model="mlp", weights="random", dataset="synthetic", data_dir=Path("data"),
                download=False, train_samples=0, test_samples=0, image_size=8, augment=False, sharding="iid",
                dirichlet_alpha=0.5, batch_size=16, epochs=1, steps=6, seed=0, threads=1, evaluate=False, eval_every=0,
                log_dir=None, connect_retries=3, rpc_timeout_s=30.0)
    base.update(overrides)
    return WorkerSettings(**base)


def run_workers(settings_list: list[WorkerSettings], timeout: float = 120.0) -> list:
    """Run workers in threads; returns their summaries, or raises the first worker error."""
    from worker.train import run_worker
    results: list = [None] * len(settings_list)

    def target(i):
        try:
            results[i] = run_worker(settings_list[i])
        except BaseException as e:  # reported below, as data
            results[i] = e

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(settings_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker did not finish in time"
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def read_strict_jsonl(path: Path) -> list[dict]:
    """A run log's records, refusing NaN and Infinity, which are not JSON (jq refuses them too)."""
    def refuse(token: str):
        raise AssertionError(f"{path.name} holds {token}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
