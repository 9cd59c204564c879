"""The worker's side of the wire: one gRPC channel to a PS and a method per RPC (PSClient),
and the same methods over every shard of a sharded PS (ShardedClient).

Every message sent or received passes through the transport's meter.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc

from proto import freezeps_pb2 as pb
from proto.codec import encode_header, encode_vote
from proto.security import Auth, open_channel
from proto.service import WORKER_METADATA, ParameterServerClient
from proto.transport import (
    KEEPALIVE_S,
    ByteMeter,
    ChunkReceiver,
    WireError,
    iter_chunks,
    metered,
)
from worker.flat import FlatModel, GradsReady, ValuesReady

log = logging.getLogger("freezeps.worker")


class Pulling:
    """A pull whose header has come: `receive()` takes the rest of its stream into the model.
    The forward pass may run meanwhile, each block as soon as it has landed (`landing`)."""

    def __init__(self, header: pb.PullHeader, wait_s: float, receive: Callable[[], object], flat: FlatModel,
                 landing: ValuesReady | None):
        self.header, self.wait_s = header, wait_s  # wait_s: until the header came (the round's end)
        self._receive, self._flat, self._landing = receive, flat, landing
        if landing is not None:
            landing.arm(header.blocks)

    def receive(self) -> float:
        """Take the rest of the pull; returns the seconds it took. An error also goes to the
        forward pass waiting for a block that did not land."""
        started = time.perf_counter()
        try:
            self._receive()
        except BaseException as e:
            if self._landing is not None:
                self._landing.fail(e)
            raise
        self._flat.pulled_step = self.header.step
        return time.perf_counter() - started


class _Pulls:
    """pull(), the whole of a pull, for a client that has open_pull()."""

    def pull(self, step: int, frozen_blocks: int, flat: FlatModel,
             rows: Sequence[pb.TensorRows] = ()) -> tuple[pb.PullHeader, float, float]:
        """The whole pull (open_pull, then receive): (header, wait_s, pull_s), the seconds until
        its header came and after."""
        pulling = self.open_pull(step, frozen_blocks, flat, rows)
        pull_s = pulling.receive()
        return pulling.header, pulling.wait_s, pull_s


class ConnectError(RuntimeError):
    """The PS could not be reached within the retry budget."""


class ShardMismatch(RuntimeError):
    """The PS shards disagree on where the run is (step, freeze state or workers)."""


class PSClient(_Pulls):
    def __init__(self, address: str, *, auth: Auth = Auth(),
                 connect_retries: int = 8, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 rpc_timeout_s: float = 600.0, meter: ByteMeter | None = None, keepalive_s: float = KEEPALIVE_S):
        if connect_retries < 1:
            raise ValueError(f"connect_retries {connect_retries}: a call needs at least one try")
        self.address = address
        self.meter = meter or ByteMeter()
        self._channel = open_channel(address, auth, keepalive_s)
        self._stub = ParameterServerClient(self._channel)
        self._retries = connect_retries
        self._backoff = backoff_s
        self._backoff_max = backoff_max_s
        self._timeout = rpc_timeout_s
        self.worker_id = ""
        self.chunk_bytes = 0
        self._heartbeat_every_s = 0.0  # a quarter of the PS's worker_timeout_s, from Join
        self._last_heartbeat = float("-inf")

    def _tries(self) -> Iterator[tuple[int, float]]:
        """(try number, seconds to wait before the next) for each of the `connect_retries` tries:
        exponential backoff from backoff_s, doubling up to backoff_max_s."""
        delay = self._backoff
        for attempt in range(1, self._retries + 1):
            yield attempt, delay
            delay = min(delay * 2, self._backoff_max)

    def _metadata(self):
        return ((WORKER_METADATA, self.worker_id or "?"),)

    def close(self) -> None:
        self._channel.close()

    def join(self, manifest: pb.Manifest, name: str, rank: int | None = None,
             plan: pb.DataPlan | None = None) -> pb.JoinReply:
        """Join, retrying with exponential backoff while the PS is unreachable. `rank`: the
        one PS shard 0 gave (for the other shards); `plan`: what this worker trains on."""
        request = pb.JoinRequest(worker_name=name, manifest=manifest, rank=rank, plan=plan)
        started = time.monotonic()
        for attempt, delay in self._tries():
            try:
                self.meter.count("Join", "out", name, request)
                reply = self._stub.Join(request, timeout=max(delay, 5.0), metadata=((WORKER_METADATA, name),))
                self.meter.count("Join", "in", name, reply)
                self.worker_id, self.chunk_bytes = reply.worker_id, reply.chunk_bytes
                self._heartbeat_every_s = reply.worker_timeout_s / 4
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
        raise ConnectError(f"cannot join the parameter server at {self.address}: "
                           f"{self._retries} tries over {time.monotonic() - started:.1f} s")

    def init(self, flat: FlatModel, owned: range, total_steps: int, steps_per_epoch: int = 0) -> pb.PushReply:
        header = pb.PushHeader(worker_id=self.worker_id, total_steps=total_steps, steps_per_epoch=steps_per_epoch)

        def stream() -> Iterator:
            yield encode_header(header)
            for b in owned:
                yield from iter_chunks(flat.layout[b], flat.value_bytes(b), self.chunk_bytes)
        reply = self._stub.Init(metered(stream(), self.meter, "Init", "out", self.worker_id),
                                timeout=self._timeout, metadata=self._metadata())
        self.meter.count("Init", "in", self.worker_id, reply)
        return reply

    def open_pull(self, step: int, frozen_blocks: int, flat: FlatModel, rows: Sequence[pb.TensorRows] = (),
                  landing: ValuesReady | None = None) -> Pulling:
        """Start pulling step `step` into the model's flat buffers, of the row-sparse tensors in
        `rows` only the rows named there (FlatModel.rows_asked), and wait for its header."""
        header, wait_s, receive = self.open_pull_since(step, frozen_blocks, flat, flat.pull_base(rows), rows,
                                                       landing.landed if landing else None)
        return Pulling(header, wait_s, receive, flat, landing)

    def open_pull_since(self, step: int, frozen_blocks: int, flat: FlatModel, base_step: int | None,
                        rows: Sequence[pb.TensorRows] = (), landed: Callable[[int], None] | None = None
                        ) -> tuple[pb.PullHeader, float, Callable[[], None]]:
        """open_pull(), with narrower changes asked for since `base_step` (the last pull, which
        Pulling records once the whole pull has landed: with shards, every shard's). Returns the
        header, the seconds it took to come, and what takes the rest of the stream, calling
        `landed(b)` as each block lands."""
        request = pb.PullRequest(worker_id=self.worker_id, step=step, frozen_blocks=frozen_blocks,
                                 base_step=base_step, rows=rows)
        self.meter.count("Pull", "out", self.worker_id, request)
        started = time.perf_counter()
        replies = metered(self._stub.Pull(request, timeout=self._timeout, metadata=self._metadata()),
                          self.meter, "Pull", "in", self.worker_id)
        first = next(replies, None)
        wait_s = time.perf_counter() - started
        if first is None:  # a bare StopIteration would escape as no error the caller knows
            raise WireError("pull stream ended before its header")
        if first.header is None:
            raise WireError(f"pull stream did not start with a header {first.error}")
        header = first.header
        if header.delta and (len(header.delta) != len(header.blocks) or not flat.held):
            raise WireError(f"pull header marks {len(header.delta)} of {len(header.blocks)} blocks as changes, "
                            f"with pull changes in {flat.pull_dtype}")

        def receive() -> None:
            sink = flat.pull_sink(header, rows)

            def land(b: int) -> None:
                sink.land(b)
                if landed is not None:
                    landed(b)
            receiver = ChunkReceiver(sink.layouts, list(header.blocks), sink.write, self.chunk_bytes,
                                     sink.write_rows, land)
            for msg in replies:
                if msg.chunk is None:
                    raise WireError(f"pull stream: expected a chunk {msg.error}")
                receiver.accept(msg.chunk)
            receiver.finish()
        return header, wait_s, receive

    def push(self, header: pb.PushHeader, flat: FlatModel, blocks: range,
             ready: GradsReady | None = None, vote: Callable[[], pb.Vote] | None = None) -> pb.PushReply:
        """Push the gradients of `blocks`, last block first, each once `ready` says backward
        has finished it (None: they are final now), then in votes mode the vote `vote()`
        returns (it may wait for backward to end). Tries again with backoff while the PS cannot
        be reached (UNAVAILABLE) or is still receiving an earlier try (ABORTED): the connection
        may have broken after the PS accepted the push, and a PS that did answers the retry as a
        duplicate (PushReply) without applying it twice. Other errors, or the last try's, are
        raised."""
        header.worker_id = self.worker_id
        for attempt, delay in self._tries():
            try:
                return self._push_once(header, flat, blocks, ready, vote)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED) or attempt >= self._retries:
                    raise
                log.warning("[Worker.Push] step %d to %s: %s (try %d/%d): %s; trying again in %.1f s", header.step,
                            self.address, e.code().name, attempt, self._retries, e.details(), delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last try returns or raises")

    def _push_once(self, header: pb.PushHeader, flat: FlatModel, blocks: range, ready: GradsReady | None,
                   vote: Callable[[], pb.Vote] | None) -> pb.PushReply:
        def stream() -> Iterator:
            # gRPC draws this in a thread of its own, so a block goes out while backward works on
            # the ones before it; an exception here (backward failed) cancels the call.
            yield encode_header(header)
            for b in reversed(blocks):
                if ready is not None:
                    ready.wait(b)
                data = flat.push_bytes(b)
                yield from iter_chunks(flat.push_layout[b], data, self.chunk_bytes, flat.push_rows(b))
            if vote is not None:
                yield encode_vote(vote())
        reply = self._stub.Push(metered(stream(), self.meter, "Push", "out", self.worker_id),
                                timeout=self._timeout, metadata=self._metadata())
        self.meter.count("Push", "in", self.worker_id, reply)
        return reply

    def status(self) -> pb.StatusReply:
        return self._stub.Status(pb.StatusRequest(), timeout=10.0)

    def heartbeat(self) -> None:
        """Tell the PS this worker is alive while it works without pushing (evaluating): call it
        often; a Heartbeat goes out when a quarter of the PS's worker_timeout_s has passed since
        the last one, so the PS does not drop the worker for being slow."""
        if time.monotonic() - self._last_heartbeat < self._heartbeat_every_s:
            return
        self._unary("Heartbeat", pb.HeartbeatRequest(worker_id=self.worker_id))
        self._last_heartbeat = time.monotonic()

    def leave(self) -> pb.LeaveReply:
        return self._unary("Leave", pb.LeaveRequest(worker_id=self.worker_id))

    def _unary(self, method: str, request):
        """A small unary call after Join, both messages counted."""
        self.meter.count(method, "out", self.worker_id, request)
        reply = getattr(self._stub, method)(request, timeout=30.0, metadata=self._metadata())
        self.meter.count(method, "in", self.worker_id, reply)
        return reply


class ShardedClient(_Pulls):
    """A PSClient per PS shard, in shard order, behind PSClient's methods; one meter for all.

    Join goes to shard 0 first, and the rank it gives is asked of the others, so that a rank
    (and the data shard it stands for) is the same everywhere. A pull or push goes to every
    shard at once, each with the blocks it owns; the headers of every shard still travel
    when it owns nothing left to train, since each shard completes its own rounds and makes
    the freeze decision from them. The shards must agree on the step and the freeze state
    (they decide the same from the same inputs); if they do not, ShardMismatch.
    """

    def __init__(self, addresses: Sequence[str], **client_options):
        if not addresses:
            raise ValueError("no PS address")
        self.meter = ByteMeter()
        self.shards = [PSClient(a, meter=self.meter, **client_options) for a in addresses]
        self._owned: list[range] = []
        self._needs_init: list[bool] = []
        # One shard: calls run in the caller's thread, as with a PSClient.
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="shard") if len(self.shards) > 1 else None

    @property
    def address(self) -> str:
        return ",".join(c.address for c in self.shards)

    @property
    def worker_id(self) -> str:
        return self.shards[0].worker_id

    def _each(self, call: Callable[[int, PSClient], object]) -> list:
        """call(shard, client) for every shard, in parallel; the first error is raised once all ended."""
        if self._pool is None:
            return [call(0, self.shards[0])]
        futures = [self._pool.submit(call, i, c) for i, c in enumerate(self.shards)]
        errors = [f.exception() for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def _agree(self, what: str, values: list) -> None:
        if any(v != values[0] for v in values[1:]):
            raise ShardMismatch(f"the PS shards disagree on {what}: " +
                                "; ".join(f"shard {i}: {str(v).strip() or 'unset'}" for i, v in enumerate(values)))

    def join(self, manifest: pb.Manifest, name: str, plan: pb.DataPlan | None = None) -> pb.JoinReply:
        first = self.shards[0].join(manifest, name, plan=plan)
        replies = [first] + [c.join(manifest, name, rank=first.rank, plan=plan) for c in self.shards[1:]]
        self._agree("the step", [r.step for r in replies])
        self._agree("the freeze state", [r.freeze for r in replies])
        self._agree("the number of workers", [r.num_workers for r in replies])
        self._agree("the push dtype", [r.push_dtype or "float32" for r in replies])
        self._agree("the pull dtype", [r.pull_dtype or "float32" for r in replies])
        self._owned = [range(r.owned.first, r.owned.end) for r in replies]
        if any(a.stop != b.start for a, b in zip(self._owned, self._owned[1:])) or self._owned[0].start != 0:
            raise ShardMismatch(f"the PS shards' blocks do not follow each other: {self._owned} (are the addresses "
                                f"in shard order, each shard told the same number of shards?)")
        self._needs_init = [r.needs_init for r in replies]
        merged = pb.JoinReply()
        merged.CopyFrom(first)
        merged.owned.CopyFrom(pb.BlockRange(first=0, end=self._owned[-1].stop))
        merged.needs_init = any(self._needs_init)
        return merged

    def init(self, flat: FlatModel, owned: range, total_steps: int, steps_per_epoch: int = 0) -> pb.PushReply:
        """Upload the initial values to every shard that asked this worker for them."""
        replies = self._each(lambda i, c: c.init(flat, _within(owned, self._owned[i]), total_steps, steps_per_epoch)
                             if self._needs_init[i] else None)
        return next(r for r in replies if r is not None)

    def open_pull(self, step: int, frozen_blocks: int, flat: FlatModel, rows: Sequence[pb.TensorRows] = (),
                  landing: ValuesReady | None = None) -> Pulling:
        """PSClient.open_pull from every shard at once, each for the blocks it owns: the headers
        must agree; the rest comes from all shards together."""
        base_step = flat.pull_base(rows)  # the same for every shard
        landed = landing.landed if landing else None
        opened = self._each(lambda i, c: c.open_pull_since(step, frozen_blocks, flat, base_step,
                                                           [r for r in rows if r.block in self._owned[i]], landed))
        headers = [h for h, _, _ in opened]
        self._agree("the step", [h.step for h in headers])
        self._agree("the freeze state", [h.freeze for h in headers])
        merged = pb.PullHeader(step=headers[0].step, freeze=headers[0].freeze,
                               blocks=[b for h in headers for b in h.blocks])
        if any(h.delta for h in headers):
            merged.delta.extend(d for h in headers for d in (h.delta or [False] * len(h.blocks)))
        return Pulling(merged, max(w for _, w, _ in opened), lambda: self._each(lambda i, c: opened[i][2]()),
                       flat, landing)

    def push(self, header: pb.PushHeader, flat: FlatModel, blocks: range,
             ready: GradsReady | None = None, vote: Callable[[], pb.Vote] | None = None) -> pb.PushReply:
        """PSClient.push to every shard at once, each the blocks it owns, and each the vote
        (in votes mode every shard combines the same votes)."""
        def push_to(i: int, client: PSClient) -> pb.PushReply:
            own = pb.PushHeader()
            own.CopyFrom(header)  # each shard's copy gets that shard's worker id
            return client.push(own, flat, _within(blocks, self._owned[i]), ready, vote)
        return self._each(push_to)[0]

    def status(self) -> pb.StatusReply:
        return self.shards[0].status()

    def heartbeat(self) -> None:
        self._each(lambda i, c: c.heartbeat())

    def leave(self) -> pb.LeaveReply:
        return self._each(lambda i, c: c.leave())[0]

    def close(self) -> None:
        for c in self.shards:
            c.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _within(blocks: range, owned: range) -> range:
    """The blocks of `blocks` that `owned` holds (an empty range when none)."""
    start = max(blocks.start, owned.start)
    return range(start, max(start, min(blocks.stop, owned.stop)))
