"""The worker's training loop, top to bottom: join, then per step pull, forward, backward, push.

The push runs beside backward: it sends each block as soon as backward has finished it,
last block first (worker.flat.GradsReady). The pull runs beside forward: forward takes
each block as soon as it has landed, while the pull brings the ones after it
(worker.flat.ValuesReady). The frozen prefix comes from the PS with every
pull; blocks before it run under no_grad in eval mode and their gradients are neither
computed nor sent. Of an embedding matrix a pull asks for only the rows the step's batch
reads (sparse pulls), except before an evaluation, which reads every row. With an
activation cache (worker/cached_prefix.py) the prefix's output is read from it instead of
computed, where it can be.

When the PS no longer knows this worker (it was dropped past its deadline, or the PS
restarted from a checkpoint) or cannot be reached, the worker joins again, up to
max_rejoins times, and goes on from the PS's step with everything pulled afresh. When the
rounds went on without it (the PS waits out its slowest backup workers: its push came late,
or its pull finds the run ahead), it skips its batches to the PS's step and goes on from there.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
import torch.nn.functional as F

from freeze.engines import EngineSpec, RoundStats, make_engine
from proto import freezeps_pb2 as pb
from proto.runlog import JsonlLog
from proto.security import Auth
from proto.transport import KEEPALIVE_S
from worker.cached_prefix import CachedPrefix, CacheSettings, cache_refusal
from worker.client import PSClient, ShardedClient
from worker.data import (
    batch_order,
    batch_positions,
    label_balance,
    load_dataset,
    make_batch,
    pipeline_spec,
    shard_indices,
)
from worker.device import resolve_device, synchronizer
from worker.flat import FlatModel, GradsReady, ValuesReady
from worker.models import BlockModel, build_model
from worker.text import TextSettings

log = logging.getLogger("freezeps.worker")


@dataclass(frozen=True)
class WorkerSettings:
    ps_addresses: tuple[str, ...]  # the PS's, or its shards' in shard order
    model: str
    weights: str
    dataset: str
    data_dir: Path
    download: bool
    train_samples: int
    test_samples: int
    image_size: int
    augment: bool
    sharding: str
    dirichlet_alpha: float
    batch_size: int
    epochs: int
    steps: int  # 0: epochs x steps per epoch
    seed: int
    threads: int
    evaluate: bool  # test accuracy is measured at each epoch end
    eval_every: int  # and every this many steps (0: epoch ends only)
    log_dir: Path | None
    connect_retries: int
    rpc_timeout_s: float
    max_rejoins: int = 20
    keepalive_s: float = KEEPALIVE_S  # pings the PS after this long without a frame (proto.transport)
    auth: Auth = Auth()  # TLS and token this worker presents to the PS
    cache: CacheSettings | None = None  # the activation cache; None: none
    text: TextSettings | None = None  # a text dataset's tokenizer and file; None: images
    sparse_push: bool = True  # embedding gradients as their nonzero rows when smaller
    sparse_pull: bool = True  # of an embedding matrix, pull only the rows the next batch reads
    overlap_push: bool = True  # push each block while backward computes the ones before it
    overlap_pull: bool = True  # run forward through each pulled block while the pull brings the ones after it
    eval_split: bool = True  # every worker scores its share of the test set; False: rank 0 all of it
    frozen_dropout: bool = False  # frozen blocks keep dropout on while training
    text_pooling: str = "cls"  # what a text model's head classifies (worker.models.bert)
    device: str = "cpu"  # where this worker computes (worker.device)
    local_rank: int = 0  # this worker's place among its host's processes: which GPU "cuda" means

    def __post_init__(self):
        if self.cache is not None and (why := cache_refusal(self.augment, self.frozen_dropout, self.device)):
            raise ValueError(why)


REJOIN_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


class SetupError(Exception):
    """This worker cannot train with its settings: its data, model or device does not fit them
    (a ValueError or FileNotFoundError before its first step; the message says why). An error
    once it trains is not this: a restart may get past it."""


@contextlib.contextmanager
def _setting_up():
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SetupError(str(e)) from e


@dataclass(frozen=True)
class Membership:
    """What one Join decided: this worker's place in the run and where it starts."""
    rank: int
    world: int
    step: int
    shard: np.ndarray
    label_balance: float
    voter: object  # this worker's freeze engine in votes mode, else None


def data_plan(train, settings: WorkerSettings) -> pb.DataPlan:
    """What this worker trains on and for how long, which every worker of the run must share
    (freezeps.proto, DataPlan): the PS refuses a worker whose plan differs from the others'."""
    return pb.DataPlan(train_set=f"{settings.dataset}: {len(train)} samples, {train.digest(with_labels=True)}",
                       sharding=settings.sharding, seed=settings.seed, batch_size=settings.batch_size,
                       dirichlet_alpha=settings.dirichlet_alpha if settings.sharding == "dirichlet" else 0.0,
                       steps=settings.steps, epochs=settings.epochs if not settings.steps else 0)


def join_run(client: PSClient | ShardedClient, flat: FlatModel, name: str, train, settings: WorkerSettings,
             total_steps, steps_per_epoch) -> Membership:
    """Join (and Init, when the PS asks for the first values); total_steps and steps_per_epoch
    are functions of the number of workers, which Join tells."""
    joined = client.join(flat.manifest, name, plan=data_plan(train, settings))
    flat.set_push_dtype(joined.push_dtype)
    flat.set_pull_dtype(joined.pull_dtype)
    world = joined.num_workers
    if joined.needs_init:
        client.init(flat, range(joined.owned.first, joined.owned.end), total_steps(world), steps_per_epoch(world))
    shard = shard_indices(train.labels.numpy(), joined.rank, world, settings.sharding, settings.dirichlet_alpha,
                          settings.seed)
    # In votes mode this worker runs the run's engine on its own gradients and sends its proposal.
    voter = make_engine(EngineSpec(**json.loads(joined.engine.spec_json))) if joined.engine.votes else None
    return Membership(joined.rank, world, joined.step, shard,
                      label_balance(train.labels.numpy()[shard], train.num_classes), voter)


EVAL_BATCH = 256


def eval_due(step: int, steps_per_epoch: int, eval_every: int) -> bool:
    """Whether the model is tested before step `step`: at each epoch's end and every `eval_every`
    steps (0: epoch ends only), never before the first step."""
    return step > 0 and (step % steps_per_epoch == 0 or bool(eval_every and step % eval_every == 0))


def eval_share(evaluate: bool, split: bool, rank: int, world: int) -> tuple[int, int] | None:
    """Which share `(rank, world)` of the test set this worker scores at an evaluation, or None
    where it does not evaluate: with `split` every worker scores its own, all at once; without,
    rank 0 scores all of it while the others wait for its next push."""
    if not evaluate or not (split or rank == 0):
        return None
    return (rank, world) if split else (0, 1)


def evaluate(model: BlockModel, ds, settings: WorkerSettings, channels: int, step: int,
             steps_per_epoch: int, cached: CachedPrefix | None = None,
             heartbeat: Callable[[], None] = lambda: None, share: tuple[int, int] = (0, 1)) -> dict:
    """The `eval` record of the model at `step` on share `share = (rank, world)` of `ds`: every
    world-th test sample from the rank-th, so the world's shares cover the test set once and
    freezeps.report.merge_evals adds them up into one evaluation.

    `wrong` lists the share's misclassified test samples by their index in the whole split, and
    `test_set` names the whole test set (a digest of its indices), so two runs scored on the
    same test set can be compared sample by sample (freezeps.report.paired_difference).
    `cached`: the frozen prefix's outputs for `ds` from the activation cache, where it can be
    (the test samples' input is the same at every evaluation). `eval_s` is the time it took.
    `heartbeat` is called after every batch: the PS waits for this worker's next push
    meanwhile, and a large test set takes longer than the PS waits for a silent worker.
    """
    rank, world = share
    if not 0 <= rank < world:
        raise ValueError(f"evaluation share {rank} of {world}: the rank must be in [0, world)")
    device = next(model.parameters()).device
    started = time.perf_counter()
    positions = np.arange(rank, len(ds), world)
    model.eval()
    if cached:
        cached.follow(model.frozen, len(positions))
    wrong, loss_sum = [], 0.0
    with torch.no_grad():
        for start in range(0, len(positions), EVAL_BATCH):
            idx = positions[start:start + EVAL_BATCH]
            x, y = (t.to(device) for t in make_batch(ds, idx, settings.image_size, channels, augment=False))
            h = cached.outputs(ds.sample_ids(idx), lambda rows, x=x: x[rows]) if cached else model.prefix(x)
            out = model.suffix(h)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            wrong += ds.sample_ids(idx)[(out.argmax(1) != y).cpu().numpy()].tolist()
            heartbeat()
    if cached:
        cached.end_epoch()  # every test sample was asked for
    model.train()
    scored = max(len(positions), 1)
    acc, loss = 1 - len(wrong) / scored, loss_sum / scored
    log.info("[Worker] step %d: test accuracy %.4f, loss %.4f on %d of %d test samples", step, acc, loss,
             len(positions), len(ds))
    return {"event": "eval", "step": step, "epoch": step / steps_per_epoch, "accuracy": acc, "loss": loss,
            "eval_s": time.perf_counter() - started, "share": [rank, world], "scored": len(positions),
            "test_samples": len(ds), "wrong": wrong,
            "test_set": ds.digest()}


def run_worker(settings: WorkerSettings, client: PSClient | ShardedClient | None = None) -> dict:
    """Train until the planned steps are done; returns this worker's summary."""
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    with _setting_up():
        train = load_dataset(settings.dataset, settings.data_dir, True, settings.download,
                             settings.train_samples, settings.seed, settings.text)
        test = load_dataset(settings.dataset, settings.data_dir, False, settings.download,
                            settings.test_samples, settings.seed, settings.text) if settings.evaluate else None
        model = build_model(settings.model, train.num_classes, settings.weights, settings.frozen_dropout,
                            settings.text_pooling)
        channels = input_channels(model)
        device = resolve_device(settings.device, settings.local_rank, torch.cuda.device_count())
        flat = FlatModel(model, settings.sparse_push, device, sparse_pull=settings.sparse_pull)
    sync = synchronizer(device)  # so that the phases' times are the device's, not its queue's
    reads_rows = settings.sparse_pull and any(t.row_sparse for b in flat.layout for t in b.tensors)
    client = client or ShardedClient(settings.ps_addresses, connect_retries=settings.connect_retries,
                                     rpc_timeout_s=settings.rpc_timeout_s, auth=settings.auth,
                                     keepalive_s=settings.keepalive_s)
    name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def keep_alive() -> None:
        """A Heartbeat while this worker evaluates. Advisory: if the PS dropped this worker or is
        restarting, the next pull finds out and joins again."""
        try:
            client.heartbeat()
        except grpc.RpcError as e:
            if e.code() not in REJOIN_CODES:
                raise

    # Join. Every worker plans the same steps, from the global sample count.
    def steps_per_epoch_for(world: int) -> int:
        return max(len(train) // (world * settings.batch_size), 1)

    def total_steps_for(world: int) -> int:
        return settings.steps or settings.epochs * steps_per_epoch_for(world)

    with _setting_up():  # its shard: the training set may not serve every worker
        member = join_run(client, flat, name, train, settings, total_steps_for, steps_per_epoch_for)
    rank, first_step = member.rank, member.step
    steps_per_epoch, total_steps = steps_per_epoch_for(member.world), total_steps_for(member.world)
    log.info("[Worker] rank %d/%d: %d samples, %d steps from step %d", rank, member.world, len(member.shard),
             total_steps, member.step)
    runlog = JsonlLog(settings.log_dir / f"worker-{rank}.jsonl" if settings.log_dir else None)
    gen = torch.Generator().manual_seed(settings.seed * 1000 + rank)
    cached = CachedPrefix.open(settings.cache, model, pipeline_spec(train, settings.image_size, channels, False),
                               settings.batch_size) if settings.cache else None
    eval_cached = CachedPrefix.open(settings.cache, model, pipeline_spec(test, settings.image_size, channels, False),
                                    EVAL_BATCH, cached.store) if cached and test is not None else None

    def batches(first: int, end: int) -> np.ndarray:
        """Positions in `train` of this worker's batches at steps first..end-1, one after the other
        (known ahead: the cache reads and runs coming rows ahead)."""
        return batch_positions(member.shard, rank, settings.seed, steps_per_epoch, settings.batch_size, first, end)

    def rows_for(step: int, frozen: int) -> list[pb.TensorRows]:
        """What the pull of step `step` asks of the embedding matrices (sparse pulls): the rows
        its batch reads, the only ones of them the step's forward and backward use."""
        if not reads_rows:
            return []
        ids = make_batch(train, batches(step, step + 1), settings.image_size, channels, False)[0]
        return flat.rows_asked(model.rows_read(ids), frozen)

    def cast_vote(step: int, active: range) -> pb.Vote:
        """Votes mode: this worker's vote from its gradients of step `step` where the step ends a
        test interval, else an abstention (the engine takes every step's gradients)."""
        stats = RoundStats(step=step, num_blocks=len(flat.layout), frozen_blocks=active.start,
                           total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                           grads={b: flat.param_grads(b) for b in active})
        decision = member.voter.decide(stats)
        if not decision.tested:
            return pb.Vote(abstain=True)
        return pb.Vote(frozen_blocks=decision.frozen_blocks, eta=decision.eta, shard_size=len(member.shard),
                       label_balance=member.label_balance)

    # With overlap_push, a step's push starts with its backward pass, in a thread of its own;
    # with overlap_pull, the rest of its pull after the header comes while forward runs.
    ready = GradsReady(flat) if settings.overlap_push else None
    pusher = ThreadPoolExecutor(1, thread_name_prefix="push") if ready else None
    landing = ValuesReady(flat) if settings.overlap_pull else None
    puller = ThreadPoolExecutor(1, thread_name_prefix="pull") if landing else None
    frozen = 0  # the prefix this worker applies; the PS's may be ahead until the next pull
    phases = pb.PhaseTimes()
    totals = {"forward_s": 0.0, "backward_s": 0.0, "pull_s": 0.0, "wait_s": 0.0, "push_s": 0.0}
    evals = []
    epoch = -1
    step, steps_done, rejoins, late_pushes = member.step, 0, 0, 0
    started = time.perf_counter()
    try:
        while step < total_steps:
            share = eval_share(settings.evaluate, settings.eval_split, rank, member.world)
            evaluating = bool(share) and eval_due(step, steps_per_epoch, settings.eval_every)
            # An evaluation reads every row: its pull asks for all of them.
            rows = [] if evaluating else rows_for(step, frozen)
            try:
                # Pull: the new values of every block not frozen here, and the freeze state. The
                # forward pass takes each block as soon as it has landed, unless something must
                # see the whole pull first: a new freeze (the activation cache keys on the frozen
                # blocks' values), an evaluation, or a later step than asked.
                pulling = client.open_pull(step, frozen, flat, rows, landing)
                header, wait_s = pulling.header, pulling.wait_s
                overlapped = (landing is not None and header.step == step
                              and header.freeze.frozen_blocks == frozen and not evaluating)
                if overlapped:
                    receiving = puller.submit(pulling.receive)
                else:
                    pull_s = pulling.receive()
                if header.step != step:  # the rounds went on without this worker (backup workers): on from the run's
                    log.info("[Worker] rank %d: pulled step %d for step %d; skipping to it", rank, header.step, step)
                    step = header.step
                    if step >= total_steps:
                        break
                    if rows:  # they were the rows of another batch: pull again, for this one's
                        continue
                if header.freeze.frozen_blocks != frozen:
                    frozen = header.freeze.frozen_blocks
                    model.set_frozen(frozen)
                    log.info("[Worker] rank %d: %d blocks frozen from step %d", rank, frozen, step)
                if cached:
                    cached.follow(frozen, len(member.shard))
                if share and eval_due(step, steps_per_epoch, settings.eval_every):  # the step may be a later one
                    evals.append(evaluate(model, test, settings, channels, step, steps_per_epoch, eval_cached,
                                          keep_alive, share))
                    runlog.write(evals[-1])

                if step // steps_per_epoch != epoch:
                    epoch = step // steps_per_epoch
                    if cached:
                        cached.end_epoch()
                        cached.arrange(train.sample_ids(batch_order(member.shard, epoch, rank, settings.seed)))
                idx = batches(step, step + 1)
                y = train.labels[torch.from_numpy(idx)].to(device)

                def inputs(rows: np.ndarray, positions: np.ndarray = idx) -> torch.Tensor:
                    return make_batch(train, positions[rows], settings.image_size, channels, settings.augment,
                                      gen)[0].to(device)

                def upcoming(n: int, step: int = step) -> tuple[np.ndarray, Callable]:
                    """The next n batches' samples, in order, and their inputs (for the cache)."""
                    positions = batches(step + 1, min(step + 1 + n, total_steps))
                    return train.sample_ids(positions), lambda rows: inputs(rows, positions)

                # Forward (the frozen prefix's output from the cache, where it can be) and backward
                # through the active blocks only.
                flat.zero_grads(frozen)
                t0 = time.perf_counter()
                if cached:
                    h = cached.outputs(train.sample_ids(idx), inputs, upcoming)
                else:
                    h = model.prefix(inputs(np.arange(len(idx))))
                loss = F.cross_entropy(model.suffix(h), y)
                sync()
                t1 = time.perf_counter()
                if overlapped:  # every block has landed; the rest of the stream, and any error of it
                    receiving.result()
                    pull_s = landing.waited_s + time.perf_counter() - t1
            except grpc.RpcError as e:  # the pull failed (under way: the forward pass raises its error)
                if e.code() not in REJOIN_CODES or rejoins >= settings.max_rejoins:
                    raise
                rejoins += 1
                log.warning("[Worker] rank %d: the PS answered %s (%s) at step %d; joining again (%d/%d)",
                            rank, e.code().name, e.details(), step, rejoins, settings.max_rejoins)
                member = join_run(client, flat, name, train, settings, total_steps_for, steps_per_epoch_for)
                rank, step, frozen, epoch = member.rank, member.step, 0, -1
                model.set_frozen(0)
                if cached:  # the PS may have restarted elsewhere: key the prefix afresh from what is pulled
                    cached.follow(0, len(member.shard))
                runlog.write({"event": "rejoin", "step": step, "rank": rank, "code": e.code().name})
                continue
            forward_s = t1 - t0 - (landing.waited_s if overlapped else 0.0)

            # Backward, and push the active blocks' gradients (and running statistics): while
            # backward runs, each block as soon as it is done, last first; in votes mode the
            # vote last, worked out from the whole gradient once backward has ended.
            push_header = pb.PushHeader(step=step, batch_size=len(y), loss=loss.item(), phases=phases)
            active = range(frozen, len(flat.layout))
            try:
                if ready is not None:
                    ready.arm(frozen)
                    pushing = pusher.submit(client.push, push_header, flat, active, ready,
                                            ready.vote if member.voter is not None else None)
                    try:
                        loss.backward()
                        sync()
                        ready.finish()
                        t2 = time.perf_counter()
                        if member.voter is not None:
                            ready.cast(cast_vote(step, active))
                    except BaseException:
                        ready.abandon()  # the push under way is cancelled, not sent half-computed
                        raise
                    reply = pushing.result()
                else:
                    loss.backward()
                    sync()
                    t2 = time.perf_counter()
                    vote = cast_vote(step, active) if member.voter is not None else None
                    reply = client.push(push_header, flat, active, vote=(lambda: vote) if vote is not None else None)
            except grpc.RpcError as e:
                if e.code() not in REJOIN_CODES:
                    raise
                continue  # the next pull finds out why, and joins again

            t3 = time.perf_counter()
            phases = pb.PhaseTimes(forward_s=forward_s, backward_s=t2 - t1, pull_s=pull_s, wait_s=wait_s, push_s=t3 - t2)
            for k in totals:
                totals[k] += getattr(phases, k)
            record = {"event": "step", "step": step, "loss": loss.item(), "frozen_blocks": frozen,
                      "phases": {k: getattr(phases, k) for k in totals}}
            if cached:
                record["cache"] = cached.last_batch
            runlog.write({**record, "late": True} if reply.late else record)
            if reply.late:  # its round completed without it (backup workers): on from where the run is
                log.info("[Worker] rank %d: push for step %d came late; skipping to step %d", rank, step, reply.step)
                late_pushes += 1
                step = reply.step
            else:  # the step it was applied to: a later one when it came late but fresh enough (max_staleness)
                step = reply.step + 1
                steps_done += 1
        share = eval_share(settings.evaluate, settings.eval_split, rank, member.world)
        if share and total_steps > 0:
            client.pull(step, frozen, flat)  # the last push's update, to be tested
            evals.append(evaluate(model, test, settings, channels, step, steps_per_epoch, eval_cached,
                                  keep_alive, share))
            runlog.write(evals[-1])
    finally:
        try:
            client.leave()
        except grpc.RpcError as e:  # the PS is gone or dropped us: nothing to leave
            log.warning("[Worker] rank %d: Leave answered %s", rank, e.code().name)
        client.close()
        for pool in (pusher, puller):
            if pool:
                pool.shutdown()
        for c in (cached, eval_cached):
            if c:
                c.close()
    summary = {"event": "worker_summary", "rank": rank, "steps": steps_done, "first_step": first_step,
               "rejoins": rejoins, "late_pushes": late_pushes,
               "wall_s": time.perf_counter() - started, "phases_s": totals, "evals": evals,
               "bytes": client.meter.totals()}
    if cached:
        summary["cache"] = cached.report()
    if eval_cached:
        summary["eval_cache"] = {k: v for k, v in eval_cached.report().items() if k != "store"}  # store: in "cache"
    runlog.write(summary)
    runlog.close()
    return summary


def input_channels(model: BlockModel) -> int:
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    return first.in_channels if isinstance(first, torch.nn.Conv2d) else 3

