"""The worker's side of the wire: one gRPC channel to the PS and a method per RPC.

Every message sent or received passes through the transport's meter.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from proto import freezeps_pb2 as pb
from proto.codec import encode_header
from proto.security import Auth, open_channel
from proto.service import WORKER_METADATA, ParameterServerClient
from proto.transport import (
    ByteMeter,
    ChunkReceiver,
    WireError,
    copy_into,
    iter_chunks,
    metered,
)
from worker.flat import FlatModel

log = logging.getLogger("freezeps.worker")


class ConnectError(RuntimeError):
    """The PS could not be reached within the retry budget."""


class PSClient:
    def __init__(self, address: str, *, auth: Auth = Auth(),
                 connect_retries: int = 8, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 rpc_timeout_s: float = 600.0):
        self.address = address
        self.meter = ByteMeter()
        self._channel = open_channel(address, auth)
        self._stub = ParameterServerClient(self._channel)
        self._retries = connect_retries
        self._backoff = backoff_s
        self._backoff_max = backoff_max_s
        self._timeout = rpc_timeout_s
        self.worker_id = ""
        self.chunk_bytes = 0

    def _metadata(self):
        return ((WORKER_METADATA, self.worker_id or "?"),)

    def close(self) -> None:
        self._channel.close()

    def join(self, manifest: pb.Manifest, name: str) -> pb.JoinReply:
        """Join, retrying with exponential backoff while the PS is unreachable."""
        request = pb.JoinRequest(worker_name=name, manifest=manifest)
        delay, started = self._backoff, time.monotonic()
        for attempt in range(1, self._retries + 1):
            try:
                self.meter.count("Join", "out", name, request)
                reply = self._stub.Join(request, timeout=max(delay, 5.0), metadata=((WORKER_METADATA, name),))
                self.meter.count("Join", "in", name, reply)
                self.worker_id, self.chunk_bytes = reply.worker_id, reply.chunk_bytes
                return reply
            except grpc.RpcError as e:
                # UNAVAILABLE is also "the run is full": a slot frees when the PS drops the
                # worker this one replaces.
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                log.warning("[Worker.Join] PS at %s: %s (try %d/%d): %s; retrying in %.1f s",
                            self.address, e.code().name, attempt, self._retries, e.details(), delay)
                if attempt < self._retries:
                    time.sleep(delay)
                    delay = min(delay * 2, self._backoff_max)
        raise ConnectError(f"cannot join the parameter server at {self.address}: "
                           f"{self._retries} tries over {time.monotonic() - started:.1f} s")

    def _push_stream(self, header: pb.PushHeader, flat: FlatModel, blocks: range, values: bool) -> Iterator:
        yield encode_header(header)
        for b in blocks:
            if values:
                yield from iter_chunks(flat.layout[b], flat.value_bytes(b), self.chunk_bytes)
            else:
                data = flat.push_bytes(b)
                yield from iter_chunks(flat.layout[b], data, self.chunk_bytes, flat.push_rows(b))

    def init(self, flat: FlatModel, owned: range, total_steps: int, steps_per_epoch: int = 0) -> pb.PushReply:
        header = pb.PushHeader(worker_id=self.worker_id, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        stream = self._push_stream(header, flat, owned, values=True)
        reply = self._stub.Init(metered(stream, self.meter, "Init", "out", self.worker_id),
                                timeout=self._timeout, metadata=self._metadata())
        self.meter.count("Init", "in", self.worker_id, reply)
        return reply

    def pull(self, step: int, frozen_blocks: int, flat: FlatModel) -> tuple[pb.PullHeader, float, float]:
        """Pull step `step` into the model's flat buffers; returns (header, wait_s, pull_s)."""
        request = pb.PullRequest(worker_id=self.worker_id, step=step, frozen_blocks=frozen_blocks)
        self.meter.count("Pull", "out", self.worker_id, request)
        started = time.perf_counter()
        replies = metered(self._stub.Pull(request, timeout=self._timeout, metadata=self._metadata()),
                          self.meter, "Pull", "in", self.worker_id)
        first = next(replies)
        first_at = time.perf_counter()
        if first.header is None:
            raise WireError(f"pull stream did not start with a header {first.error}")
        header = first.header
        receiver = ChunkReceiver(flat.layout, list(header.blocks),
                                 copy_into({b: flat.value_bytes(b) for b in header.blocks}), self.chunk_bytes)
        for msg in replies:
            if msg.chunk is None:
                raise WireError(f"pull stream: expected a chunk {msg.error}")
            receiver.accept(msg.chunk)
        receiver.finish()
        return header, first_at - started, time.perf_counter() - first_at

    def push(self, header: pb.PushHeader, flat: FlatModel, blocks: range) -> pb.PushReply:
        header.worker_id = self.worker_id
        stream = self._push_stream(header, flat, blocks, values=False)
        reply = self._stub.Push(metered(stream, self.meter, "Push", "out", self.worker_id),
                                timeout=self._timeout, metadata=self._metadata())
        self.meter.count("Push", "in", self.worker_id, reply)
        return reply

    def status(self) -> pb.StatusReply:
        return self._stub.Status(pb.StatusRequest(), timeout=10.0)

    def leave(self) -> pb.LeaveReply:
        request = pb.LeaveRequest(worker_id=self.worker_id)
        self.meter.count("Leave", "out", self.worker_id, request)
        reply = self._stub.Leave(request, timeout=30.0, metadata=self._metadata())
        self.meter.count("Leave", "in", self.worker_id, reply)
        return reply
