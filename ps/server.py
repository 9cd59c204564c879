"""The parameter server's state machine: join, init, synchronous rounds, freeze, leave.

Plain Python with one lock and one condition; no gRPC here beyond the message types.
Every method either does what was asked or raises a PSError and changes nothing.
"""
from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from freeze.engines import RoundStats
from proto import freezeps_pb2 as pb
from proto.codec import Frame, encode_header
from proto.layout import (
    BlockLayout,
    ManifestError,
    assign_blocks,
    layout_from_manifest,
    model_bytes,
    wire_layout,
)
from proto.transport import ChunkReceiver, WireError, copy_into, iter_chunks, row_requests
from ps.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    PSError,
    RunFull,
    Timeout,
    TooLarge,
    UnknownWorker,
)
from ps.optim import Optimizer, make_optimizer
from ps.policy import FreezeHistory, FreezePolicy, decide
from ps.schedule import block_lr_scales, learning_rate
from ps.store import BlockStore, ReceivedPush, as_bytes

log = logging.getLogger("freezeps.ps")

# Every shard decides from what it holds; a central gradient decision needs all blocks' gradients.
SHARDED_CENTRAL = ("a central gradient decision needs every block's averaged gradient on one PS: with several "
                   "PS shards use freeze_decision 'votes' (every shard combines the same votes) or a "
                   "gradient-blind engine (none, static, linear)")

MAX_WORKER_NAME = 512  # bytes: the PS keeps each worker's name and logs it


def straggler_refusal(num_workers: int, backup_workers: int, max_staleness: int, num_shards: int) -> str | None:
    """Why these backup-worker settings cannot run, or None. One rule for ServerSettings and
    Config.validate (at load time)."""
    if not 0 <= backup_workers < num_workers:
        return f"backup_workers {backup_workers}: need 0 <= backup_workers < num_workers ({num_workers})"
    if max_staleness < 0 or (max_staleness and not backup_workers):
        return (f"max_staleness {max_staleness}: at least 0, and more only with backup_workers (without them no "
                "push comes after its round)")
    if backup_workers and num_shards > 1:
        return (f"backup_workers {backup_workers} with {num_shards} PS shards: each shard would complete its "
                "rounds with the pushes that reached it first, and the shards' blocks would mix different rounds")
    return None


@dataclass(frozen=True)
class ServerSettings:
    num_workers: int
    chunk_bytes: int
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd
    weight_decay: float = 1e-4  # sgd: L2 added to the gradient; adamw: decoupled
    nesterov: bool = False  # sgd
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_step_size: int = 0
    lr_gamma: float = 0.1
    lr_block_decay: float = 1.0  # block b of n at lr * decay^(n-1-b) (ps/schedule.block_lr_scales)
    round_timeout_s: float = 300.0  # longest a pull waits for its round
    # A worker that has not pushed the current step this long after the round began is
    # dropped, and the round completes without it. The same bound ends a run that every
    # worker has left before its last step.
    worker_timeout_s: float = 120.0
    # A run (or a resumed one) still waiting for workers this long after its initial values
    # arrived starts with the workers present.
    start_timeout_s: float = 120.0
    # The PS allocates values, an accumulator and momentum per tensor the first manifest
    # declares: a bound, so that a Join cannot make it allocate without limit.
    max_model_bytes: int = 4 << 30
    # This PS is shard `shard` of `num_shards`: it owns the shard-th of num_shards contiguous
    # block ranges of roughly equal bytes (proto/layout.assign_blocks), ps-lite style.
    shard: int = 0
    num_shards: int = 1
    # What pushes travel in (JoinReply.push_dtype): float32, or bfloat16 for half the bytes.
    push_dtype: str = "float32"
    # What a pull's changes travel in (JoinReply.pull_dtype): float32 (whole values every
    # pull), or bfloat16 for changes with error feedback, half the bytes.
    pull_dtype: str = "float32"
    # A round completes once every live worker but this many has pushed (Chen et al. 2016's
    # backup workers): the slowest are waited out, and their pushes, late, are not applied.
    backup_workers: int = 0
    # A late push (backup workers) whose params are at most this many rounds old, and no freeze
    # since, is applied in the current round instead of thrown away (bounded staleness).
    max_staleness: int = 0

    def __post_init__(self):
        if self.worker_timeout_s <= 0 or self.round_timeout_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError("timeouts must be > 0")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard {self.shard} of {self.num_shards}: need 0 <= shard < num_shards")
        if why := straggler_refusal(self.num_workers, self.backup_workers, self.max_staleness, self.num_shards):
            raise ValueError(why)
        wire_layout([], self.push_dtype)  # ValueError now, not at the first Join, as the two below
        wire_layout([], self.pull_dtype)
        self.make_optimizer()
        block_lr_scales(1, self.lr_block_decay)

    def make_optimizer(self) -> Optimizer:
        return make_optimizer(self.optimizer, momentum=self.momentum, weight_decay=self.weight_decay,
                              nesterov=self.nesterov, betas=self.adam_betas, eps=self.adam_eps)


@dataclass
class _Worker:
    worker_id: str
    name: str
    rank: int
    pushing: bool = False
    pushed_step: int = -1  # the round its last accepted push went into
    pushed_as: int = -1  # ... and the step that push was for (older when it was applied stale)
    alive_at: float = float("-inf")  # its last Heartbeat (time.monotonic)
    # Since when its next push is due: it joined, its last round or late push ended, or the run
    # started. Its drop timer runs from here (or its last Heartbeat); with backup workers the
    # rounds may go on without it meanwhile.
    due_since: float = float("-inf")


class ParameterServer:
    def __init__(self, settings: ServerSettings, policy: FreezePolicy,
                 on_record: Callable[[dict], None] = lambda record: None):
        """on_record gets one "round" record per step and a "freeze" record per freeze."""
        self.settings = settings
        self.policy = policy.validate()
        if settings.num_shards > 1 and policy.needs_gradients:
            raise ValueError(SHARDED_CENTRAL)
        self.engine = policy.make_engine()
        self._on_record = on_record
        self._cond = threading.Condition()
        self._ids = itertools.count()
        # Worker ids differ between server processes, so that an id issued before a restart
        # is unknown after it (NOT_FOUND: join again) instead of naming someone else.
        self._incarnation = secrets.token_hex(4)
        self._workers: dict[str, _Worker] = {}
        self._ever_joined = 0
        self._manifest: pb.Manifest | None = None
        self._plan: pb.DataPlan | None = None  # the first Join's that brought one
        self._blocks: list[BlockLayout] = []
        self._push_blocks: list[BlockLayout] = []  # the same blocks as a push carries them (push_dtype)
        self._change_blocks: list[BlockLayout] = []  # ... and as a pull's changes (pull_dtype)
        self._changes_step: int | None = None  # the step a pull of the store's changes leads to
        self._store: BlockStore | None = None
        self._owned = range(0)
        self._initialized = False
        self._init_worker: str | None = None
        self._started = False  # num_workers have joined once: round 0 may begin
        self._step = 0
        self._total_steps = 0
        self._steps_per_epoch = 0
        self._freeze_history = FreezeHistory()
        self._weight = 0.0
        self._round_pushes: list[dict] = []  # accepted pushes of the current step, for the run log
        # Accepted pushes are summed in rank order (float addition is not associative, and
        # arrival order would make runs irreproducible): a push waits here only until every
        # lower rank's push of the round has been summed, so summing overlaps receiving. A free
        # rank counts too: a worker joining mid-round takes it and pushes this round (so after a
        # drop, the pushes above the free rank are held until the round completes).
        self._accepted: dict[tuple[int, str], tuple[ReceivedPush, float]] = {}  # (rank, worker id) ->
        self._summed_ranks: set[int] = set()  # ranks whose push of the current round is summed
        self._freeze = pb.FreezeState()
        self._round_started = time.monotonic()
        self._waiting_since = time.monotonic()  # initialized, not started: when the wait for workers began
        self._empty_since: float | None = None  # started, no live worker: since when
        self._abandoned = False  # every worker gone for worker_timeout_s before the last step
        self._dropped = 0
        self._pull_cache: dict[tuple[int, str], list[Frame]] = {}  # the current step's, by (block, kind)

    # -- helpers (call with the lock held) -------------------------------------------------
    def _worker(self, worker_id: str) -> _Worker:
        if worker_id not in self._workers:
            raise UnknownWorker(f"unknown worker id {worker_id!r}: call Join first")
        return self._workers[worker_id]

    def _freeze_copy(self) -> pb.FreezeState:
        return pb.FreezeState(frozen_blocks=self._freeze.frozen_blocks, version=self._freeze.version,
                              since_step=self._freeze.since_step)

    def _owned_range(self, blocks: list[BlockLayout]) -> range:
        return assign_blocks([b.nbytes for b in blocks], self.settings.num_shards)[self.settings.shard]

    def _new_store(self, blocks: list[BlockLayout], owned: range) -> BlockStore:
        """Storage for the owned blocks, with this run's optimizer and per-block rates (a fresh
        run's and a resumed one's alike)."""
        return BlockStore(blocks, owned, self.settings.make_optimizer(),
                          block_lr_scales(len(blocks), self.settings.lr_block_decay), self.settings.pull_dtype)

    def _adopt(self, manifest: pb.Manifest, blocks: list[BlockLayout], owned: range, store: BlockStore) -> None:
        """Make this the run's model (at the first Join, or from a checkpoint)."""
        self._manifest, self._blocks, self._owned, self._store = manifest, blocks, owned, store
        self._push_blocks = wire_layout(blocks, self.settings.push_dtype)
        self._change_blocks = wire_layout(blocks, self.settings.pull_dtype)

    def _active(self) -> range:
        return range(max(self._owned.start, self._freeze.frozen_blocks), self._owned.stop)

    # -- Join / Init -----------------------------------------------------------------------
    def join(self, req: pb.JoinRequest) -> pb.JoinReply:
        if len(req.worker_name.encode()) > MAX_WORKER_NAME:
            raise InvalidArgument(f"worker_name of {len(req.worker_name.encode()):,} bytes: at most "
                                  f"{MAX_WORKER_NAME} (freezeps.proto, JoinRequest)")
        with self._cond:
            if self._manifest is None:
                try:
                    blocks = layout_from_manifest(req.manifest)
                except ManifestError as e:
                    raise InvalidArgument(f"bad manifest: {e}") from None
                if model_bytes(blocks) > self.settings.max_model_bytes:
                    raise TooLarge(f"the manifest declares {model_bytes(blocks):,} bytes of tensors; this PS "
                                   f"holds at most {self.settings.max_model_bytes:,} (max_model_bytes)")
                try:
                    frozen = self.engine.initial(len(blocks))
                except ValueError as e:
                    raise FailedPrecondition(f"freeze engine does not fit this model: {e}") from None
                try:
                    owned = self._owned_range(blocks)
                except ValueError as e:
                    raise FailedPrecondition(f"this model does not fit the PS shards: {e}") from None
                manifest = pb.Manifest()
                manifest.CopyFrom(req.manifest)
                self._adopt(manifest, blocks, owned, self._new_store(blocks, owned))
                if frozen:
                    self._set_frozen(frozen, since_step=0)
                    self._on_record(self._freeze_record(-1, 0, frozen, {"initial": True}, self.settings.num_workers))
                log.info("[PS.Join] manifest: model %r, %d blocks, %d bytes", req.manifest.model,
                         len(blocks), model_bytes(blocks))
            elif req.manifest != self._manifest:
                raise FailedPrecondition(f"manifest differs from the run's: {_manifest_diff(self._manifest, req.manifest)}")
            if req.HasField("plan") and self._plan is not None and req.plan != self._plan:
                raise FailedPrecondition(f"data plan differs from the run's: {_plan_diff(self._plan, req.plan)}")
            again = next((w for w in self._workers.values() if req.worker_name and w.name == req.worker_name), None)
            if again is not None and req.HasField("rank") and req.rank != again.rank:
                raise FailedPrecondition(f"worker {req.worker_name!r} holds rank {again.rank} here, asked for {req.rank}")
            if again is not None:  # a retried Join whose reply was lost: same registration
                return self._join_reply(again, needs_init=self._init_worker == again.worker_id and not self._initialized)
            if len(self._workers) >= self.settings.num_workers:
                raise RunFull(f"run is full: {len(self._workers)} of {self.settings.num_workers} workers live")
            taken = {w.rank for w in self._workers.values()}
            if req.HasField("rank"):  # a later PS shard: the rank shard 0 gave
                if req.rank >= self.settings.num_workers or req.rank in taken:
                    why = "out of range" if req.rank >= self.settings.num_workers else "held by another worker"
                    raise FailedPrecondition(f"rank {req.rank} asked for is {why} (num_workers "
                                             f"{self.settings.num_workers}, taken {sorted(taken)})")
                rank = req.rank
            else:
                rank = next(r for r in itertools.count() if r not in taken)
            worker_id = f"w{next(self._ids)}-{rank}-{self._incarnation}"
            self._workers[worker_id] = _Worker(worker_id, req.worker_name, rank, due_since=time.monotonic())
            if req.HasField("plan") and self._plan is None:
                self._plan = pb.DataPlan()
                self._plan.CopyFrom(req.plan)
            self._ever_joined += 1
            self._empty_since = None
            needs_init = not self._initialized and self._init_worker is None
            if needs_init:
                self._init_worker = worker_id
            self._maybe_start()
            log.info("[PS.Join] %s (%s) joined as rank %d; %d live", worker_id, req.worker_name, rank, len(self._workers))
            self._on_record({"event": "join", "step": self._step, "worker": worker_id, "rank": rank})
            return self._join_reply(self._workers[worker_id], needs_init)

    def _join_reply(self, worker: _Worker, needs_init: bool) -> pb.JoinReply:
        return pb.JoinReply(worker_id=worker.worker_id, rank=worker.rank, num_workers=self.settings.num_workers,
                            needs_init=needs_init, step=self._step, freeze=self._freeze_copy(),
                            owned=pb.BlockRange(first=self._owned.start, end=self._owned.stop),
                            chunk_bytes=self.settings.chunk_bytes, total_steps=self._total_steps,
                            engine=self.policy.engine_config(), worker_timeout_s=self.settings.worker_timeout_s,
                            push_dtype=self.settings.push_dtype, pull_dtype=self.settings.pull_dtype)

    def init(self, messages: Iterable[Frame]) -> pb.PushReply:
        messages = iter(messages)
        header = _first_header(messages)
        with self._cond:
            self._worker(header.worker_id)
            if self._initialized or self._init_worker != header.worker_id:
                raise FailedPrecondition("Init is only for the first worker, once, before training")
        receiver = ChunkReceiver(self._blocks, list(self._owned),
                                 copy_into({b: as_bytes(self._store.values[b]) for b in self._owned}),
                                 self.settings.chunk_bytes)
        _receive(receiver, messages)
        bad = self._store.non_finite(self._store.values_as_push())
        if bad:
            raise InvalidArgument(f"initial value of tensor {bad!r} holds NaN or Inf")
        with self._cond:
            self._store.hold(self._active())
            self._initialized = True
            self._waiting_since = time.monotonic()
            self._total_steps = header.total_steps
            self._steps_per_epoch = header.steps_per_epoch
            self._maybe_start()
            self._cond.notify_all()
            return pb.PushReply(step=self._step, freeze=self._freeze_copy())

    def _maybe_start(self, short: bool = False) -> None:
        if self._initialized and not self._started and (short or len(self._workers) >= self.settings.num_workers):
            self._started = True
            self._round_started = time.monotonic()
            for w in self._workers.values():
                w.due_since = self._round_started
            self._cond.notify_all()

    # -- Pull ------------------------------------------------------------------------------
    def pull(self, req: pb.PullRequest) -> Iterator[Frame]:
        """Wait until parameters of version req.step exist, then stream the unfrozen blocks: of
        the current version, which is newer when the rounds went on without this worker (backup
        workers; PullHeader.step says which). Of a row-sparse tensor the worker asked rows of
        (PullRequest.rows), only those rows, as what the worker is to hold, in float32."""
        deadline = time.monotonic() + self.settings.round_timeout_s
        with self._cond:
            self._worker(req.worker_id)
            try:
                asked = row_requests(req.rows, self._blocks)
            except WireError as e:
                raise InvalidArgument(f"pull: {e}") from None
            if req.frozen_blocks > self._freeze.frozen_blocks:
                raise FailedPrecondition(f"worker claims {req.frozen_blocks} frozen blocks; "
                                         f"the run has {self._freeze.frozen_blocks}")
            if req.step > self._step + 1:
                raise FailedPrecondition(f"pull for step {req.step}, but the server is at step {self._step}")
            while not (self._started and self._step >= req.step):
                # A live worker that says it is busy holds the round up legitimately: wait on.
                busy = max((w.alive_at for w in self._workers.values()), default=float("-inf"))
                left = max(deadline, busy + self.settings.round_timeout_s) - time.monotonic()
                if left <= 0:
                    raise Timeout(f"step {req.step} not ready after {self.settings.round_timeout_s:.0f} s "
                                  f"(server at step {self._step}, {len(self._workers)} workers live)")
                self._cond.wait(left)
                self._worker(req.worker_id)  # it may have been dropped meanwhile
            blocks = [b for b in self._owned if b >= req.frozen_blocks]
            # A block that has just frozen comes whole, whatever rows were asked of it.
            rows = {b: asked[b] for b in blocks if b in asked and b >= self._freeze.frozen_blocks}
            kinds = [self._pull_kind(req, b, b in rows) for b in blocks]
            header = pb.PullHeader(step=self._step, freeze=self._freeze_copy(), blocks=blocks,
                                   delta=[k == "change" for k in kinds] if self._store.held else [])
            # Encoded now, under the lock: with backup workers the round may complete, and the
            # values change, while this streams. Every worker pulls the same bytes in a round
            # (each block is encoded once per (step, block, kind)), but the rows it asked for.
            frames = [self._row_frames(b, kind, rows[b]) if b in rows else self._pull_frames(b, kind)
                      for b, kind in zip(blocks, kinds)]
        return _stream(encode_header(header), frames)

    def _pull_kind(self, req: pb.PullRequest, b: int, rows: bool = False) -> str:
        """What a pull carries of block b: "values" (float32: always without narrower changes,
        and a block's last pull when it has just frozen), "change" (the last round's, for a
        worker that pulled the round before), or "held" (float32: what the other workers hold;
        also where the worker asked for rows of it, which a change cannot be added to)."""
        if b < self._freeze.frozen_blocks or b not in self._store.held:
            return "values"
        if rows:
            return "held"
        follows = req.HasField("base_step") and req.base_step + 1 == self._step == self._changes_step
        return "change" if follows and b in self._store.changes else "held"

    def _pull_frames(self, b: int, kind: str) -> list[Frame]:
        """Block b's frames for a pull of the current step (call with the lock held; the cache
        holds the current step's only: a round's completion clears it)."""
        frames = self._pull_cache.get((b, kind))
        if frames is None:
            layout = self._change_blocks[b] if kind == "change" else self._blocks[b]
            frames = self._pull_cache[(b, kind)] = list(
                iter_chunks(layout, self._store.pull_bytes(b, kind), self.settings.chunk_bytes))
        return frames

    def _row_frames(self, b: int, kind: str, rows: dict[int, np.ndarray]) -> list[Frame]:
        """Block b's frames for a pull that asked for `rows` of some of its tensors ({tensor: rows}):
        those as row chunks of the rows asked, the rest as _pull_frames sends it (call with the
        lock held). Each worker asks for its own rows: nothing to share between pulls."""
        layout, data = self._blocks[b], self._store.pull_bytes(b, kind)
        floats = data.view(np.float32)
        sparse = {}
        for t, wanted in rows.items():
            tensor = layout.tensors[t]
            matrix = floats[tensor.offset // 4:(tensor.offset + tensor.nbytes) // 4].reshape(tensor.shape[0], -1)
            sparse[t] = (wanted, matrix[wanted])
        return list(iter_chunks(layout, data, self.settings.chunk_bytes, sparse))

    # -- Push ------------------------------------------------------------------------------
    def push(self, messages: Iterable[Frame]) -> pb.PushReply:
        messages = iter(messages)
        header = _first_header(messages)
        with self._cond:
            worker = self._worker(header.worker_id)
            if worker.pushed_as == header.step:  # a retry whose first try's reply was lost
                log.info("[PS.Push] %s pushed step %d again: acknowledged, not applied", worker.worker_id, header.step)
                self._on_record({"event": "duplicate_push", "step": header.step, "worker": worker.worker_id,
                                 "rank": worker.rank})
                return pb.PushReply(step=worker.pushed_step, freeze=self._freeze_copy(), duplicate=True)
            if self._started and header.step < self._step and not self._takes_stale(worker, header):
                return self._late(worker, header, received=False)
            self._check_push(worker, header)
            worker.pushing = True
            active = self._active()
        try:
            received = ReceivedPush(self.settings.push_dtype)
            # last block first, as backward finishes them (freezeps.proto, PushMessage)
            receiver = ChunkReceiver(self._push_blocks, active[::-1], received.write, self.settings.chunk_bytes,
                                     write_rows=received.write_rows)
            vote = _receive(receiver, messages, takes_vote=True)
            bad = self._store.non_finite(received)
            if bad:
                raise InvalidArgument(f"push for step {header.step}: tensor {bad!r} holds NaN or Inf")
            vote = self._check_vote(vote, header.step)
            with self._cond:
                self._worker(header.worker_id)
                if header.step < self._step and not self._takes_stale(worker, header):
                    return self._late(worker, header, received=True)  # its round completed while it came in
                self._check_push(worker, header, already_pushing=True)
                step = self._step
                self._accepted[(worker.rank, worker.worker_id)] = (received, float(header.batch_size))
                self._sum_in_rank_order(final=False)
                self._weight += header.batch_size
                worker.pushed_step, worker.pushed_as = step, header.step
                self._round_pushes.append({
                    "worker": worker.worker_id, "rank": worker.rank, "batch_size": header.batch_size,
                    "loss": header.loss, "vote": vote,
                    "phases": {k.name: getattr(header.phases, k.name) for k in header.phases.DESCRIPTOR.fields},
                    **({"stale": step - header.step} if header.step < step else {})})
                self._maybe_complete_round()
                return pb.PushReply(step=step, freeze=self._freeze_copy())
        finally:
            with self._cond:
                worker.pushing = False

    def _takes_stale(self, worker: _Worker, header: pb.PushHeader) -> bool:
        """Whether a push for a step the run has passed goes into the current round (call with
        the lock held): at most max_staleness rounds old, computed with the run's frozen prefix
        (no freeze since: it carries the blocks the PS expects), and the worker's first push of
        this round."""
        return (self._step - header.step <= self.settings.max_staleness and self._freeze.since_step <= header.step
                and worker.pushed_step < self._step and not self._finished())

    def _late(self, worker: _Worker, header: pb.PushHeader, received: bool) -> pb.PushReply:
        """The answer to a push whose round completed without it (call with the lock held);
        `received`: its payload was read (the round completed while it came in)."""
        log.info("[PS.Push] %s (rank %d): push for step %d came after its round; the run is at step %d",
                 worker.worker_id, worker.rank, header.step, self._step)
        self._on_record({"event": "late_push", "step": header.step, "worker": worker.worker_id, "rank": worker.rank,
                         "run_step": self._step, "received": received})
        worker.due_since = time.monotonic()
        return pb.PushReply(step=self._step, freeze=self._freeze_copy(), late=True)

    def _check_push(self, worker: _Worker, header: pb.PushHeader, already_pushing: bool = False) -> None:
        """Refuse a push that cannot go into the current round (push() has answered one for a
        passed step as late already, unless it goes in stale)."""
        if not self._started:
            raise FailedPrecondition("the run has not started: waiting for workers or initial values")
        if header.step > self._step:
            raise FailedPrecondition(f"push for step {header.step}, but the server is at step {self._step}")
        if self._finished():
            raise FailedPrecondition(f"push for step {header.step}, but the run ended at step {self._total_steps}")
        if worker.pushed_step == self._step:  # its late push for an earlier step went into this round
            raise FailedPrecondition(f"worker {worker.worker_id} already pushed into round {self._step}")
        if worker.pushing and not already_pushing:
            raise Busy(f"worker {worker.worker_id} has a push in flight: retry when it has ended")
        if header.batch_size == 0:
            raise InvalidArgument("batch_size must be at least 1")

    def _check_vote(self, vote: pb.Vote | None, step: int) -> pb.Vote | None:
        """The vote a push ended with, None where it abstained; refused where the run's decision
        is central, or missing where it is by votes (freezeps.proto, Vote: a push cancelled after
        its chunks may look whole), or naming blocks the run does not have, or weighing what
        cannot be a weight."""
        if not self.policy.uses_votes:
            if vote is not None:
                raise InvalidArgument(f"push for step {step} carries a vote, but this run decides centrally")
            return None
        if vote is None:
            raise InvalidArgument(f"push for step {step} ended without its vote (in votes mode every push "
                                  "ends with one, an abstention where the round tested nothing)")
        if vote.abstain:
            return None
        blocks = len(self._blocks)
        if vote.frozen_blocks > blocks:
            raise InvalidArgument(f"vote for step {step}: {vote.frozen_blocks} blocks frozen of {blocks}")
        if len(vote.eta) > blocks:
            raise InvalidArgument(f"vote for step {step}: {len(vote.eta)} eta values for {blocks} blocks")
        if not 0.0 <= vote.label_balance <= 1.0:  # also NaN
            raise InvalidArgument(f"vote for step {step}: label_balance {vote.label_balance} is not in [0, 1]")
        return vote

    def _sum_in_rank_order(self, final: bool) -> None:
        """Sum the accepted pushes whose turn has come: all of them when the round completes."""
        while self._accepted:
            key = min(self._accepted)
            if not final and not set(range(key[0])) <= self._summed_ranks:
                return  # a lower rank may still push: a live worker that has not, or one joining now
            received, batch_size = self._accepted.pop(key)
            self._store.accumulate(received, batch_size)
            self._summed_ranks.add(key[0])
        if final:
            self._summed_ranks = set()

    def _maybe_complete_round(self) -> None:
        waiting = [w for w in self._workers.values() if w.pushed_step != self._step]
        if len(waiting) > self.settings.backup_workers or not self._round_pushes:
            return
        pushes = self._round_pushes
        step = self._step
        active = self._active()
        lr = learning_rate(step, base_lr=self.settings.lr, schedule=self.settings.lr_schedule,
                           total_steps=self._total_steps, warmup_steps=self.settings.warmup_steps,
                           step_size=self.settings.lr_step_size, gamma=self.settings.lr_gamma)
        self._sum_in_rank_order(final=True)
        weight = self._weight
        grads = {}
        if self.policy.needs_gradients:  # the engine reads the averaged gradient
            self._store.average(active, weight)
            weight = 1.0
            grads = {b: self._store.param_grads(b) for b in active}
        frozen_before = self._freeze.frozen_blocks
        stats = RoundStats(step=step, num_blocks=len(self._blocks), frozen_blocks=frozen_before,
                           total_steps=self._total_steps, steps_per_epoch=self._steps_per_epoch, grads=grads)
        frozen, decision_info, self._freeze_history = decide(self.policy, self.engine, stats, pushes,
                                                             self._freeze_history)
        applying = time.perf_counter()
        norms = self._store.apply(active, weight, lr)
        optimizer_s = time.perf_counter() - applying
        if frozen > frozen_before:
            self._set_frozen(frozen, since_step=step + 1)
            self._on_record(self._freeze_record(step, frozen_before, frozen, decision_info, len(pushes)))
        self._store.publish(self._active())
        self._changes_step = step + 1
        now = time.monotonic()
        record = {
            "event": "round", "step": step, "round_s": round(now - self._round_started, 6), "lr": lr,
            "optimizer_s": round(optimizer_s, 6),  # the optimizer step (and buffer averaging) on this PS
            "frozen_blocks": frozen_before, "samples": int(self._weight),
            "loss": sum(p["loss"] * p["batch_size"] for p in pushes) / self._weight,
            "workers": {p["worker"]: {k: v for k, v in p.items() if k not in ("worker", "vote")} for p in pushes},
            "grad_norm": {self._blocks[b].name: norms[b] for b in active},
            **({"decision": decision_info} if decision_info else {}),
        }
        self._weight = 0.0
        self._round_pushes = []
        self._pull_cache.clear()
        for w in self._workers.values():
            if w.pushed_step == step:
                w.due_since = now
        self._step += 1
        self._round_started = now
        self._on_record(record)
        self._cond.notify_all()

    def _freeze_record(self, step: int, before: int, after: int, info: dict, workers: int) -> dict:
        def per_step(frozen: int) -> int:  # push (in push_dtype) + pull (in pull_dtype) payload of a round, all workers
            return workers * sum(p.nbytes + c.nbytes for p, c in zip(self._push_blocks[frozen:], self._change_blocks[frozen:]))
        epoch = (step + 1) / self._steps_per_epoch if self._steps_per_epoch else None
        log.info("[PS.Freeze] step %d: %d -> %d blocks frozen (%s)", step + 1, before, after,
                 ", ".join(b.name for b in self._blocks[before:after]))
        return {"event": "freeze", "step": step + 1, "epoch": epoch, "from": before, "to": after,
                "blocks": [b.name for b in self._blocks[before:after]],
                "bytes_per_step_before": per_step(before), "bytes_per_step_after": per_step(after), **info}

    def _set_frozen(self, frozen: int, since_step: int) -> None:
        before = self._freeze.frozen_blocks
        self._store.freeze(range(max(before, self._owned.start), min(frozen, self._owned.stop)))
        self._freeze = pb.FreezeState(frozen_blocks=frozen, version=self._freeze.version + 1, since_step=since_step)
        log.info("[PS.Freeze] blocks %s frozen from step %d", [b.name for b in self._blocks[:frozen]], since_step)

    # -- Leave / Status --------------------------------------------------------------------
    def leave(self, req: pb.LeaveRequest) -> pb.LeaveReply:
        with self._cond:
            self._worker(req.worker_id)  # NOT_FOUND for an unknown id
            del self._workers[req.worker_id]
            log.info("[PS.Leave] %s left; %d live", req.worker_id, len(self._workers))
            self._maybe_complete_round()
            self._cond.notify_all()
            return pb.LeaveReply(freeze=self._freeze_copy())

    def heartbeat(self, req: pb.HeartbeatRequest, now: float | None = None) -> pb.HeartbeatReply:
        """The worker is alive and working towards its push: its drop timer starts over."""
        now = time.monotonic() if now is None else now
        with self._cond:
            self._worker(req.worker_id).alive_at = now  # NOT_FOUND for an unknown (or dropped) id
            return pb.HeartbeatReply(step=self._step)

    def _finished(self) -> bool:
        """Every planned round is done (call with the lock held)."""
        return bool(self._total_steps) and self._step >= self._total_steps

    def _done(self) -> bool:
        """Every worker that joined has left after the last step, or all were gone for too long
        (call with the lock held)."""
        finished = not self._total_steps or self._step >= self._total_steps or self._abandoned
        return self._ever_joined > 0 and self._started and not self._workers and finished

    # -- deadlines -------------------------------------------------------------------------
    def enforce_deadlines(self, now: float | None = None) -> list[str]:
        """Apply worker_timeout_s and start_timeout_s; call it every fraction of them. Returns the
        dropped workers' ids.

        - A worker that has not pushed the current step worker_timeout_s after its push was due
          (the round began, or it joined, or its late push was answered), or after its last
          Heartbeat if that came later, is dropped (it may Join again); the round completes with
          the pushes that arrived, weighted by their batch sizes. Its shard is not trained on meanwhile.
          After the last step, one that has not left by then is let go ("gone"), not dropped.
        - A run (or a resumed run) waiting start_timeout_s for its workers starts with those present.
        - A run whose workers are all gone that long before its last step is abandoned.
        """
        now = time.monotonic() if now is None else now
        limit = self.settings.worker_timeout_s
        with self._cond:
            if not self._initialized:
                return []
            if not self._started:
                if self._workers and now - self._waiting_since > self.settings.start_timeout_s:
                    ranks = sorted(w.rank for w in self._workers.values())
                    log.warning("[PS] starting step %d with %d of %d workers (ranks %s) after %.0f s",
                                self._step, len(ranks), self.settings.num_workers, ranks,
                                self.settings.start_timeout_s)
                    self._on_record({"event": "start_short", "step": self._step, "ranks": ranks,
                                     "num_workers": self.settings.num_workers})
                    self._maybe_start(short=True)
                return []
            if not self._workers:
                if self._empty_since is None:
                    self._empty_since = now
                elif now - self._empty_since > limit and not self._done():
                    log.warning("[PS] no worker for %.0f s at step %d of %d: ending the run",
                                limit, self._step, self._total_steps)
                    self._abandoned = True
                    self._on_record({"event": "abandoned", "step": self._step})
                    self._cond.notify_all()
                return []
            late = [w for w in self._workers.values()
                    if w.pushed_step != self._step and now - max(w.due_since, w.alive_at) > limit]
            finished = self._finished()
            for w in late:
                del self._workers[w.worker_id]
                if finished:  # it pushed every step and then never said Leave: not a drop
                    log.info("[PS] %s (rank %d) did not leave %.0f s after the last step: stopped waiting",
                             w.worker_id, w.rank, now - self._round_started)
                    self._on_record({"event": "gone", "step": self._step, "worker": w.worker_id, "rank": w.rank})
                    continue
                self._dropped += 1
                log.warning("[PS] dropped %s (rank %d): no push for step %d after %.0f s",
                            w.worker_id, w.rank, self._step, now - w.due_since)
                self._on_record({"event": "drop", "step": self._step, "worker": w.worker_id, "rank": w.rank,
                                 "reason": f"no push {now - w.due_since:.1f} s after it was due"
                                           + (f", {now - w.alive_at:.1f} s after its last heartbeat"
                                              if w.alive_at > w.due_since else "")})
            if late:
                self._maybe_complete_round()
                self._cond.notify_all()
            return [w.worker_id for w in late]

    # -- checkpoints -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything needed to go on from the rounds applied so far, as copies: the manifest,
        values, optimizer state, freeze state, engine state and counters. Pushes of the round in
        progress are not part of it: after a restore, workers push that step again."""
        with self._cond:
            if not self._initialized:
                raise FailedPrecondition("nothing to checkpoint before the initial values arrived")
            return {"manifest": self._manifest.SerializeToString(), "step": self._step,
                    "total_steps": self._total_steps, "steps_per_epoch": self._steps_per_epoch,
                    "last_freeze_step": self._freeze_history.last_freeze_step,
                    "freeze_proposals": list(self._freeze_history.proposals),
                    "freeze": [self._freeze.frozen_blocks, self._freeze.version, self._freeze.since_step],
                    "engine_config": self.policy.engine_config().SerializeToString(),
                    "shard": [self.settings.shard, self.settings.num_shards],
                    "engine": self.engine.state_dict(), **self._store.state()}

    def restore(self, state: dict) -> None:
        """Go on from a snapshot(), before any worker joined. ValueError (nothing changed)
        when it does not fit: a different freeze engine, or values that do not fit the manifest."""
        with self._cond:
            if self._manifest is not None:
                raise FailedPrecondition("restore only into a fresh server")
            manifest = pb.Manifest.FromString(state["manifest"])
            if pb.EngineConfig.FromString(state["engine_config"]) != self.policy.engine_config():
                raise ValueError("the checkpoint was made with another freeze engine or engine settings: "
                                 f"{pb.EngineConfig.FromString(state['engine_config'])}")
            try:
                blocks = layout_from_manifest(manifest)
            except ManifestError as e:
                raise ValueError(f"bad manifest in checkpoint: {e}") from None
            shard = tuple(int(x) for x in state.get("shard", (0, 1)))  # before shards: the only PS
            if shard != (self.settings.shard, self.settings.num_shards):
                raise ValueError(f"the checkpoint is of PS shard {shard[0]} of {shard[1]}; this PS is shard "
                                 f"{self.settings.shard} of {self.settings.num_shards}")
            owned = self._owned_range(blocks)
            store = self._new_store(blocks, owned)
            store.load_state(state)
            frozen, version, since = (int(x) for x in state["freeze"])
            if not 0 <= frozen < len(blocks):
                raise ValueError(f"checkpoint freezes {frozen} of {len(blocks)} blocks")
            self.engine.load_state_dict(state["engine"])
            self._adopt(manifest, blocks, owned, store)
            self._store.freeze(range(owned.start, min(frozen, owned.stop)))
            self._freeze = pb.FreezeState(frozen_blocks=frozen, version=version, since_step=since)
            self._step, self._total_steps = int(state["step"]), int(state["total_steps"])
            self._steps_per_epoch = int(state["steps_per_epoch"])
            # Checkpoints from before the patience guard hold no proposals: the guard starts over.
            self._freeze_history = FreezeHistory(int(state["last_freeze_step"]),
                                                 tuple(int(k) for k in state.get("freeze_proposals", ())))
            self._initialized = True
            self._waiting_since = time.monotonic()
            log.info("[PS] restored step %d: %d blocks, %d frozen", self._step, len(blocks), frozen)

    def wait_done(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._done, timeout)

    def status(self) -> pb.StatusReply:
        with self._cond:
            return pb.StatusReply(
                step=self._step, total_steps=self._total_steps, live_workers=len(self._workers),
                num_workers=self.settings.num_workers, initialized=self._initialized,
                done=self._done(),
                freeze=self._freeze_copy(), blocks=[b.name for b in self._blocks])

    def values_by_name(self) -> dict[str, np.ndarray]:
        """A copy of every owned tensor's current value, by manifest name."""
        with self._cond:
            out = {}
            for b in self._owned:
                flat = self._store.values[b].numpy()
                for t in self._blocks[b].tensors:
                    out[t.name] = flat[t.offset // 4:(t.offset + t.nbytes) // 4].reshape(t.shape).copy()
            return out

    @property
    def step(self) -> int:
        with self._cond:
            return self._step

    def describe(self) -> dict:
        """Static facts about the run for the summary: block names and byte sizes."""
        with self._cond:
            return {"model": self._manifest.model if self._manifest else "",
                    "blocks": [{"name": b.name, "bytes": b.nbytes} for b in self._blocks],
                    "shard": self.settings.shard, "num_shards": self.settings.num_shards,
                    "owned": [self._owned.start, self._owned.stop],
                    "num_workers": self.settings.num_workers, "steps": self._step,
                    "frozen_blocks": self._freeze.frozen_blocks, "freeze_since_step": self._freeze.since_step,
                    "workers_dropped": self._dropped, "abandoned": self._abandoned,
                    "optimizer_state_bytes": self._store.optimizer_state_bytes() if self._store else 0}


def _stream(header: Frame, blocks: list[list[Frame]]) -> Iterator[Frame]:
    yield header
    for frames in blocks:
        yield from frames


def _first_header(messages: Iterator[Frame]) -> pb.PushHeader:
    first = next(messages, None)
    if first is not None and first.error:
        raise InvalidArgument(f"undecodable message: {first.error}")
    if first is None or first.header is None:
        raise InvalidArgument("a push stream must start with a header")
    return first.header


def _receive(receiver: ChunkReceiver, messages: Iterator[Frame], takes_vote: bool = False) -> pb.Vote | None:
    """Take a Push or Init stream's chunks (after its header) and, where `takes_vote` (Push),
    the vote that may end it (freezeps.proto, PushMessage)."""
    vote = None
    try:
        for msg in messages:
            if msg.error:
                raise WireError(f"undecodable message: {msg.error}")
            if vote is not None:
                raise WireError("the vote must be the last message of a push")
            if msg.vote is not None:
                if not takes_vote:
                    raise WireError("Init carries no vote")
                vote = msg.vote
            elif msg.chunk is None:
                raise WireError("only one header is allowed, at the start of the stream")
            else:
                receiver.accept(msg.chunk)
        receiver.finish()
    except WireError as e:
        raise InvalidArgument(str(e)) from None
    return vote


def _plan_diff(run: pb.DataPlan, worker: pb.DataPlan) -> str:
    return "; ".join(f"{f.name} {getattr(worker, f.name)!r} != {getattr(run, f.name)!r}"
                     for f in pb.DataPlan.DESCRIPTOR.fields if getattr(worker, f.name) != getattr(run, f.name))


def _manifest_diff(a: pb.Manifest, b: pb.Manifest) -> str:
    if a.model != b.model:
        return f"model {b.model!r} != {a.model!r}"
    if len(a.blocks) != len(b.blocks):
        return f"{len(b.blocks)} blocks != {len(a.blocks)}"
    for x, y in zip(a.blocks, b.blocks):
        if x.name != y.name or len(x.tensors) != len(y.tensors):
            return f"block {y.name!r} ({len(y.tensors)} tensors) != {x.name!r} ({len(x.tensors)} tensors)"
        for s, t in zip(x.tensors, y.tensors):
            if s != t:
                return f"tensor {t.name!r} {list(t.shape)} {t.dtype} != {s.name!r} {list(s.shape)} {s.dtype}"
    return "fields differ"


__all__ = ["ParameterServer", "ServerSettings", "PSError"]
