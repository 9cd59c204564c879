"""Faults: late workers are dropped and rejoin, the PS resumes from checkpoints after kill -9,
corrupted checkpoints are refused, and no acknowledged round is lost or applied twice."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from bench.soak import serial_training
from freeze.engines import EngineSpec, GradNormFreeze, NoFreeze, RoundStats, ThresholdFreeze
from freezeps.launch import free_port
from proto import freezeps_pb2 as pb
from proto.service import ParameterServerClient
from ps.checkpoint import CheckpointError, list_checkpoints, read_checkpoint, read_latest, write_checkpoint
from ps.errors import Busy, UnknownWorker
from ps.policy import FreezeHistory, FreezePolicy
from ps.server import ParameterServer, ServerSettings
from tests.conftest import init_frames, push_frames, run_workers, worker_settings
from worker.client import PSClient
from worker.flat import FlatModel
from worker.models import build_model

ROOT = Path(__file__).resolve().parent.parent


# -- checkpoint files ------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_the_newest(tmp_path):
    state = {"values": {0: torch.arange(6.0)}, "manifest": b"\x01\x02", "step": 3, "freeze": [1, 1, 2]}
    for step in (2, 4, 6):
        write_checkpoint(tmp_path, step, {**state, "step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000006.fzck", "ckpt-000000004.fzck"]
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]  # nothing half-written is left
    got = read_checkpoint(tmp_path / "ckpt-000000006.fzck")
    assert got["step"] == 6 and got["manifest"] == b"\x01\x02" and torch.equal(got["values"][0], torch.arange(6.0))


@pytest.mark.parametrize("damage,why", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:20], "truncated header"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 0x40]) + b[-4:], "checksum mismatch"),
    (lambda b: b"NOT-A-CHECKPOINT" + b[16:], "bad magic"),
])
def test_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path, damage, why):
    write_checkpoint(tmp_path, 2, {"step": 2, "values": {0: torch.ones(4)}})
    newest = write_checkpoint(tmp_path, 4, {"step": 4, "values": {0: torch.zeros(4)}})
    newest.write_bytes(damage(newest.read_bytes()))
    with pytest.raises(CheckpointError, match=why):
        read_checkpoint(newest)
    path, state, refused = read_latest(tmp_path)
    assert state["step"] == 2 and path.name == "ckpt-000000002.fzck"
    assert len(refused) == 1 and refused[0][0] == newest and why in refused[0][1]


def test_the_checkpoint_just_written_is_never_rotated_away(tmp_path):
    """A file of a higher step (a refused one, another run's) must not make the rotation delete
    the file it just wrote: with keep=1 that left only the bad one."""
    write_checkpoint(tmp_path, 9, {"step": 9})
    written = write_checkpoint(tmp_path, 4, {"step": 4}, keep=1)
    assert list_checkpoints(tmp_path) == [written]
    write_checkpoint(tmp_path, 2, {"step": 2})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000000004.fzck", "ckpt-000000002.fzck"]


def test_no_good_checkpoint_is_an_error_naming_each_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        read_latest(tmp_path)
    path = write_checkpoint(tmp_path, 1, {"step": 1})
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="no good checkpoint.*ckpt-000000001.fzck: truncated"):
        read_latest(tmp_path)


def test_a_checkpoint_cannot_run_code(tmp_path):
    """Even with a valid checksum, the payload is read with weights_only: no pickled objects."""
    path = write_checkpoint(tmp_path, 1, {"step": 1})
    import hashlib
    import io
    import pickle
    import struct

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    payload = io.BytesIO()
    torch.save({"x": Evil()}, payload, pickle_module=pickle)
    data = payload.getvalue()
    path.write_bytes(b"FREEZEPS-CKPT-1\n" + struct.pack("<Q32s", len(data), hashlib.sha256(data).digest()) + data)
    with pytest.raises(CheckpointError, match="unreadable payload"):
        read_checkpoint(path)


# -- engine state ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: GradNormFreeze(interval=2), lambda: ThresholdFreeze(interval=2, tau=1.2)])
def test_engine_state_survives_a_checkpoint(tmp_path, make):
    gen = torch.Generator().manual_seed(0)
    rounds = [{b: [torch.randn(5, generator=gen) * (b + 1) / (t + 1)] for b in range(4)} for t in range(12)]
    straight, resumed = make(), make()
    decisions = []
    for t, grads in enumerate(rounds):
        if t == 5:  # mid-interval: the accumulators hold one round
            write_checkpoint(tmp_path, t, {"engine": straight.state_dict()})
            resumed.load_state_dict(read_latest(tmp_path)[1]["engine"])
        stats = RoundStats(step=t, num_blocks=4, frozen_blocks=0, grads=grads)
        want = straight.decide(stats)
        if t >= 5:
            got = resumed.decide(stats)
            assert got.frozen_blocks == want.frozen_blocks
            np.testing.assert_array_equal(got.eta, want.eta)
        decisions.append(want)
    assert sum(d.tested for d in decisions) == 6


def test_freeze_guards_memory_survives_a_checkpoint():
    """The patience guard's last proposals and the last freeze step go into the PS's snapshot
    and come back on restore; a snapshot from before the guard existed starts it over."""
    policy = FreezePolicy(EngineSpec("gradnorm", interval=2), patience=2)
    server, _, _ = _joined_server(1, 1, policy)
    server._freeze_history = FreezeHistory(last_freeze_step=3, proposals=(1, 2))  # as after some tests
    state = server.snapshot()
    again = ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20), policy, lambda r: None)
    again.restore(state)
    assert again._freeze_history == FreezeHistory(3, (1, 2))
    older = {k: v for k, v in state.items() if k != "freeze_proposals"}
    oldest = ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20), policy, lambda r: None)
    oldest.restore(older)
    assert oldest._freeze_history == FreezeHistory(3, ())


def test_a_resumed_ps_trains_each_block_at_its_own_rate():
    """A PS resumed from a snapshot steps with the run's layer-wise rates (--lr-block-decay), as
    the one that wrote it: one round from the snapshot gives both the same values, and a PS
    at one rate for all blocks other ones."""
    def one_round(server, worker_id, flat):
        _push(server, worker_id, flat, 0)
        return server.values_by_name()

    def resumed(state, **settings):
        server = ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20, lr=0.1, **settings),
                                 FreezePolicy(), lambda r: None)
        server.restore(state)
        return server, server.join(pb.JoinRequest(worker_name="again", manifest=flat.manifest)).worker_id

    straight, ids, flat = _joined_server(1, 1, lr=0.1, lr_block_decay=0.5)
    torch.manual_seed(3)
    for g in flat.grads:
        g.copy_(torch.randn_like(g))
    state = straight.snapshot()
    want = one_round(straight, ids[0], flat)
    got = one_round(*resumed(state, lr_block_decay=0.5), flat)
    flat_rate = one_round(*resumed(state), flat)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert any(not np.array_equal(flat_rate[name], want[name]) for name in want)


def test_a_resumed_ps_keeps_what_the_workers_hold_of_bfloat16_pull_changes():
    """With --pull-dtype bfloat16 the PS keeps what its workers hold (the values as pulled plus
    each round's rounded change). A snapshot keeps it: the workers of a resumed PS pull the same
    values as those of the uninterrupted one, and the next change is the same, to the bit."""
    straight, ids, flat = _joined_server(1, 1, lr=0.1, pull_dtype="bfloat16")
    torch.manual_seed(3)
    for g in flat.grads:
        g.copy_(torch.randn_like(g))
    for step in range(2):
        _push(straight, ids[0], flat, step)
    held = straight._store.held
    assert any(not torch.equal(held[b], straight._store.values[b]) for b in held)  # the rounding is real
    again = ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20, lr=0.1, pull_dtype="bfloat16"),
                            FreezePolicy(), lambda r: None)
    again.restore(straight.snapshot())
    assert held.keys() == again._store.held.keys() and all(torch.equal(held[b], again._store.held[b]) for b in held)
    _push(straight, ids[0], flat, 2)
    _push(again, again.join(pb.JoinRequest(worker_name="again", manifest=flat.manifest)).worker_id, flat, 2)
    for b in held:
        assert torch.equal(again._store.changes[b], straight._store.changes[b])
        assert torch.equal(again._store.held[b], straight._store.held[b])


def test_stateless_engine_refuses_foreign_state():
    assert NoFreeze().state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        NoFreeze().load_state_dict({"rounds": 3})


# -- deadlines -------------------------------------------------------------------------------
def _joined_server(num_workers: int, joins: int, policy: FreezePolicy = FreezePolicy(),
                   **settings) -> tuple[ParameterServer, list[str], FlatModel]:
    """A server with `joins` workers joined and the first one's Init done."""
    records: list = []
    server = ParameterServer(ServerSettings(num_workers=num_workers, chunk_bytes=1 << 20, **settings),
                             policy, records.append)
    server.records = records
    flat = FlatModel(build_model("mlp", 4))
    ids = [server.join(pb.JoinRequest(worker_name=f"w{i}", manifest=flat.manifest)).worker_id for i in range(joins)]
    server.init(iter(init_frames(pb.PushHeader(worker_id=ids[0], total_steps=5), flat)))
    return server, ids, flat


def test_run_starts_short_handed_after_the_deadline():
    server, _, _ = _joined_server(3, 2, start_timeout_s=5.0)
    assert not server.status().done and server.enforce_deadlines(time.monotonic() + 1) == []
    assert [r["event"] for r in server.records] == ["join", "join"]  # still waiting for the third worker
    server.enforce_deadlines(time.monotonic() + 6)
    assert server.records[2:] == [{"event": "start_short", "step": 0, "ranks": [0, 1], "num_workers": 3}]


def test_run_without_workers_is_abandoned_not_hung():
    server, ids, _ = _joined_server(1, 1, worker_timeout_s=5.0)
    server.leave(pb.LeaveRequest(worker_id=ids[0]))  # at step 0 of 5: not finished
    assert not server.wait_done(0.01)
    now = time.monotonic()
    server.enforce_deadlines(now)
    assert not server.wait_done(0.01)
    server.enforce_deadlines(now + 6)
    assert server.wait_done(0.01) and server.records[-1] == {"event": "abandoned", "step": 0}


def _push(server, worker_id, flat, step, batch_size=4):
    server.push(iter(push_frames(pb.PushHeader(worker_id=worker_id, step=step, batch_size=batch_size), flat)))


def _push_every_step(server, ids, flat, steps):
    for step in range(steps):
        for worker_id in ids:
            _push(server, worker_id, flat, step)


def test_a_worker_joining_mid_round_is_summed_in_rank_order():
    """Rank 1 leaves; ranks 0 and 2 push; a replacement takes rank 1 and pushes in the same
    round; rank 3 last. Summing rank 2 before the free rank 1 was filled would make the
    result depend on when the replacement came (float addition is not associative)."""
    server, ids, flat = _joined_server(4, 4, worker_timeout_s=5.0)
    summed = []  # each push's batch size, which here is its rank + 1, in the order they were summed
    accumulate = server._store.accumulate
    server._store.accumulate = lambda received, weight: (summed.append(int(weight) - 1), accumulate(received, weight))
    server.leave(pb.LeaveRequest(worker_id=ids[1]))
    _push(server, ids[0], flat, 0, batch_size=1)
    _push(server, ids[2], flat, 0, batch_size=3)
    assert summed == [0]  # rank 2 waits: rank 1 is free, and a worker joining now pushes this round
    replacement = server.join(pb.JoinRequest(worker_name="replacement", manifest=flat.manifest))
    assert (replacement.rank, replacement.step) == (1, 0)
    _push(server, replacement.worker_id, flat, 0, batch_size=2)
    assert summed == [0, 1, 2]  # summing overlaps receiving: rank 3 has not pushed yet
    _push(server, ids[3], flat, 0, batch_size=4)
    assert summed == [0, 1, 2, 3] and server.step == 1


def test_every_join_is_logged_with_the_step_it_came_at():
    """The run log says who joined when; a worker that joins once every round is done (a late
    replacement) is told the run's last step, so it has nothing to push and leaves."""
    server, ids, flat = _joined_server(2, 2, worker_timeout_s=5.0)
    assert server.records == [{"event": "join", "step": 0, "worker": ids[0], "rank": 0},
                              {"event": "join", "step": 0, "worker": ids[1], "rank": 1}]
    _push_every_step(server, ids, flat, 5)  # total_steps=5
    server.leave(pb.LeaveRequest(worker_id=ids[0]))
    late = server.join(pb.JoinRequest(worker_name="late", manifest=flat.manifest))
    assert (late.rank, late.step, late.total_steps) == (0, 5, 5)
    assert server.records[-1] == {"event": "join", "step": 5, "worker": late.worker_id, "rank": 0}


def test_worker_that_never_leaves_after_the_last_step_is_let_go_not_dropped():
    server, ids, flat = _joined_server(2, 2, worker_timeout_s=5.0)
    _push_every_step(server, ids, flat, 5)  # total_steps=5: both push every step
    server.leave(pb.LeaveRequest(worker_id=ids[0]))
    assert server.status().step == 5 and not server.wait_done(0.01)  # waiting for the second Leave
    server.enforce_deadlines(time.monotonic() + 6)
    assert server.wait_done(0.01) and server.describe()["workers_dropped"] == 0
    assert server.records[-1] == {"event": "gone", "step": 5, "worker": ids[1], "rank": 1}


def test_heartbeat_restarts_a_workers_drop_timer():
    """A worker that has not pushed but says it is busy (a Heartbeat) is kept until
    worker_timeout_s after its last Heartbeat; an unknown id gets NOT_FOUND."""
    server, ids, flat = _joined_server(2, 2, worker_timeout_s=5.0)
    started = server._round_started
    _push(server, ids[0], flat, 0)
    assert server.heartbeat(pb.HeartbeatRequest(worker_id=ids[1]), now=started + 4).step == 0
    assert server.enforce_deadlines(started + 8) == []  # 8 s into the round, 4 s after the Heartbeat
    assert server.enforce_deadlines(started + 9.5) == [ids[1]]
    drop = next(r for r in server.records if r["event"] == "drop")
    assert drop["reason"] == "no push 9.5 s after it was due, 5.5 s after its last heartbeat"
    assert server.status().step == 1  # the round completed without it
    with pytest.raises(UnknownWorker, match="Join"):
        server.heartbeat(pb.HeartbeatRequest(worker_id=ids[1]))


def test_an_evaluation_longer_than_the_timeouts_neither_drops_the_evaluator_nor_fails_the_others(
        ps_factory, tmp_path, monkeypatch):
    """Rank 0 evaluates while the others wait for its next push. Its evaluation here takes
    longer than worker_timeout_s and round_timeout_s together; its Heartbeats keep it in the
    run and the others' pulls waiting, so every worker trains every step."""
    import worker.train
    make_batch = worker.train.make_batch

    def slow_evaluation_batches(*args, **kwargs):
        if "augment" in kwargs:  # evaluate() passes augment=False by name; training passes it in place
            time.sleep(1.0)
        return make_batch(*args, **kwargs)

    monkeypatch.setattr(worker.train, "make_batch", slow_evaluation_batches)
    monkeypatch.setattr(worker.train, "EVAL_BATCH", 4)  # 24 test samples: 6 batches, 6 s an evaluation
    log_path = tmp_path / "ps.jsonl"
    with ps_factory(2, log_path=log_path, worker_timeout_s=2.0, round_timeout_s=3.0) as ps:
        # Each may evaluate; the one that gets rank 0 does, all of the test set.
        settings = [worker_settings(ps.address, steps=4, evaluate=True, eval_every=2, test_samples=24,
                                    eval_split=False)] * 2
        summaries = run_workers(settings)
        assert ps.server.step == 4 and ps.server.describe()["workers_dropped"] == 0
    assert [s["steps"] for s in summaries] == [4, 4] and all(s["rejoins"] == 0 for s in summaries)
    evaluator = next(s for s in summaries if s["evals"])
    assert [e["step"] for e in evaluator["evals"]] == [2, 4] and min(e["eval_s"] for e in evaluator["evals"]) > 5.5
    assert sum(t["messages"] for t in evaluator["bytes"]["Heartbeat"]["out"].values()) >= 4  # counted like all bytes
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert not [r for r in records if r["event"] == "drop"]


class _DelayedClient(PSClient):
    """Before its first push for `step` or a later one (it may have skipped `step`), calls
    `delay(that step)`, once: a worker that hangs, then wakes; `delayed_at` says which step."""

    def __init__(self, address, step, delay, **kw):
        super().__init__(address, **kw)
        self.delay_step, self.delay, self.delayed_at = step, delay, None

    def push(self, header, flat, blocks, ready=None, vote=None):
        if self.delayed_at is None and header.step >= self.delay_step:
            self.delayed_at = header.step
            self.delay(header.step)
        return super().push(header, flat, blocks, ready, vote)


@dataclass
class _Run:
    weights: Path
    values: dict  # the PS's final values by name
    records: list[dict]  # its run log
    others: list[dict]  # the plain workers' summaries
    special: dict  # the summary of the worker with its own client
    client: PSClient  # that client
    steps: int  # the PS's step at the end


def _run_with_one_client(ps_factory, tmp_path, workers: int, client, steps: int = 10, on_start=lambda ps: None,
                         **ps_settings) -> _Run:
    """The tests' MLP on `workers` workers against a PS (lr 0.05, momentum 0.9, no weight decay,
    `ps_settings`; `on_start(ps)` once it runs), the last of them through `client(address)`, a
    PSClient that misbehaves."""
    torch.manual_seed(3)
    weights = tmp_path / "init.pt"
    torch.save(build_model("mlp", 4).state_dict(), weights)
    log_path = tmp_path / "ps.jsonl"
    with ps_factory(workers, log_path=log_path, lr=0.05, momentum=0.9, weight_decay=0.0, **ps_settings) as ps:
        on_start(ps)
        settings = [worker_settings(ps.address, weights=str(weights), steps=steps) for _ in range(workers)]
        from worker.train import run_worker
        special: dict = {}
        own = client(ps.address)
        thread = threading.Thread(target=lambda: special.update(run_worker(settings[-1], client=own)))
        thread.start()
        others = run_workers(settings[:-1])
        thread.join(60)
        assert not thread.is_alive() and special, "the worker with its own client did not finish"
        values, step = ps.server.values_by_name(), ps.server.step
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    return _Run(weights, values, records, others, special, own, step)


def _serial(run: _Run, workers: int, **kw) -> None:
    """The run's values are serial SGD over the pushes each round took, to the bit."""
    ranks_per_step = [sorted(w["rank"] for w in r["workers"].values()) for r in run.records if r["event"] == "round"]
    want = serial_training(run.weights, workers, ranks_per_step, batch_size=16, lr=0.05, momentum=0.9,
                           weight_decay=0.0, **kw)
    for name in want:
        np.testing.assert_array_equal(run.values[name], want[name], err_msg=name)


@pytest.mark.parametrize("pull_dtype", ["float32", "bfloat16"])
def test_late_worker_is_dropped_then_rejoins(ps_factory, tmp_path, pull_dtype):
    """With --pull-dtype bfloat16 too: the rejoined worker pulls what the others hold, whole,
    and goes on with their bits."""
    run = _run_with_one_client(ps_factory, tmp_path, 3, lambda address: _DelayedClient(
        address, 3, lambda step: time.sleep(2.0), connect_retries=3, rpc_timeout_s=30.0), worker_timeout_s=0.5,
        round_timeout_s=10.0, pull_dtype=pull_dtype)
    assert run.steps == 10
    drops = [r for r in run.records if r["event"] == "drop"]
    assert len(drops) == 1 and drops[0]["step"] == 3
    rounds = [r for r in run.records if r["event"] == "round"]
    assert sorted(w["rank"] for w in rounds[3]["workers"].values()) == sorted({0, 1, 2} - {drops[0]["rank"]})
    assert rounds[3]["samples"] == 32  # the round went on without it
    assert run.special["rejoins"] == 1 and run.special["steps"] < 10  # it missed the rounds it was away
    assert all(s["rejoins"] == 0 for s in run.others)
    _serial(run, 3, pull_dtype=pull_dtype)  # rounds of 48 samples, 32 after the drop


def test_backup_workers_go_on_without_a_stalled_worker_and_apply_only_what_came_in_time(ps_factory, tmp_path):
    """One backup worker of three: a worker that stalls is waited out, not dropped; its late
    push is not applied, it skips to the run's step, and the result is serial SGD over the
    pushes each round took, to the bit."""
    run = _run_with_one_client(ps_factory, tmp_path, 3, lambda address: _DelayedClient(
        address, 3, lambda step: time.sleep(1.5), connect_retries=3, rpc_timeout_s=30.0),
        worker_timeout_s=20.0, round_timeout_s=30.0, backup_workers=1)
    staller = run.client
    assert run.steps == 10 and not [r for r in run.records if r["event"] == "drop"]
    # Others may come late too (three workers share two cores), and so may the staller before it stalls.
    late = [r for r in run.records if r["event"] == "late_push" and r["worker"] == staller.worker_id]
    assert staller.delayed_at >= 3 and staller.delayed_at in [r["step"] for r in late]
    assert run.special["late_pushes"] == len(late) and run.special["rejoins"] == 0
    assert run.special["steps"] + run.special["late_pushes"] < 10  # it skipped the rounds that went on without it
    assert sum(s["steps"] for s in run.others) + run.special["steps"] == sum(
        len(r["workers"]) for r in run.records if r["event"] == "round")  # every push applied was counted once
    assert all(len(r["workers"]) >= 2 for r in run.records if r["event"] == "round")
    _serial(run, 3)


def test_with_max_staleness_a_late_push_goes_into_the_round_in_progress(ps_factory, tmp_path):
    """One backup worker of three, and late pushes applied: a worker whose push for step s
    comes after round s + 1 has completed is summed into the round in progress (its samples
    count), and goes on from the round after it; nothing is dropped or thrown away for it."""
    server = {}
    def until_two_rounds_ahead(step):
        _wait_for(lambda: server["ps"].step >= step + 2, 30, "the run to go on without this worker")

    run = _run_with_one_client(ps_factory, tmp_path, 3, lambda address: _DelayedClient(
        address, 3, until_two_rounds_ahead, connect_retries=3, rpc_timeout_s=30.0), steps=40,
        worker_timeout_s=20.0, round_timeout_s=30.0, backup_workers=1, max_staleness=1000,
        on_start=lambda ps: server.update(ps=ps.server))
    rounds = [r for r in run.records if r["event"] == "round"]
    mine = [(r["step"], w) for r in rounds for wid, w in r["workers"].items() if wid == run.client.worker_id]
    stale = [(step, w["stale"]) for step, w in mine if "stale" in w]  # others' slowness may make it stale too
    mine_events = [r for r in run.records if r.get("worker") == run.client.worker_id and r["event"] != "join"]
    waited = run.client.delayed_at
    assert [(step, k) for step, k in stale if step - k == waited and k >= 2], (waited, mine, mine_events)
    assert not [r for r in run.records if r["event"] == "drop"]
    # Thrown away only once the run was over (its last push, still computing when the others ended it).
    late = [r for r in run.records if r["event"] == "late_push" and r["worker"] == run.client.worker_id]
    assert all(r["run_step"] == 40 for r in late) and run.special["late_pushes"] == len(late) <= 1
    assert run.special["steps"] == len(mine)
    assert sum(s["steps"] for s in run.others) + run.special["steps"] == sum(len(r["workers"]) for r in rounds)


class _LostReply(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection broke before the reply arrived (simulated)"


class _LosingClient(PSClient):
    """Its push of `step` reaches the PS, but the reply is lost, once."""

    def __init__(self, address, step, **kw):
        super().__init__(address, **kw)
        self.lose_step = step

    def _push_once(self, header, flat, blocks, ready, vote):
        reply = super()._push_once(header, flat, blocks, ready, vote)
        if header.step == self.lose_step:
            self.lose_step = -1
            raise _LostReply()
        return reply


@pytest.mark.parametrize("pull_dtype", ["float32", "bfloat16"])
def test_a_push_whose_reply_was_lost_is_pushed_again_and_applied_once(ps_factory, tmp_path, pull_dtype):
    """The worker pushes the step again; the PS acknowledges it as a duplicate, and the run
    goes on as if nothing happened: no rejoin, every push applied once, to the bit."""
    run = _run_with_one_client(ps_factory, tmp_path, 2, lambda address: _LosingClient(
        address, step=2, connect_retries=3, backoff_s=0.05, rpc_timeout_s=30.0), steps=6, pull_dtype=pull_dtype)
    assert run.steps == 6 and run.special["steps"] == 6 and run.special["rejoins"] == 0
    duplicates = [r for r in run.records if r["event"] == "duplicate_push"]
    assert [(r["step"], r["worker"]) for r in duplicates] == [(2, run.client.worker_id)]
    assert [r["samples"] for r in run.records if r["event"] == "round"] == [32] * 6
    _serial(run, 2, pull_dtype=pull_dtype)


def test_a_push_retried_while_its_first_try_is_received_is_aborted_and_changes_nothing():
    """ABORTED (the worker tries again later), not FAILED_PRECONDITION (which would end it)."""
    server, ids, flat = _joined_server(2, 2)
    first_chunk_read, release = threading.Event(), threading.Event()
    frames = push_frames(pb.PushHeader(worker_id=ids[0], step=0, batch_size=4), flat)

    def slow():
        yield frames[0]
        first_chunk_read.set()
        assert release.wait(10)
        yield from frames[1:]

    first = threading.Thread(target=lambda: server.push(slow()))
    first.start()
    assert first_chunk_read.wait(10)
    with pytest.raises(Busy, match="push in flight") as err:
        _push(server, ids[0], flat, 0)
    assert err.value.code == grpc.StatusCode.ABORTED
    release.set()
    first.join(10)
    assert server._workers[ids[0]].pushed_step == 0 and server.step == 0  # the first try was accepted, once
    _push(server, ids[1], flat, 0)
    assert server.step == 1 and [r["samples"] for r in server.records if r["event"] == "round"] == [8]


# -- PS crash and resume -----------------------------------------------------------------------
def _ps_command(port, tmp_path, *extra):
    return [sys.executable, "-m", "freezeps", "ps", "--listen", f"127.0.0.1:{port}", "--num-workers", "2",
            "--lr", "0.05", "--momentum", "0.9", "--weight-decay", "0", "--freeze", "none",
            "--run-log", str(tmp_path / "ps.jsonl"), "--params-out", str(tmp_path / "params.pt"),
            "--worker-timeout-s", "20", "--log-level", "warning", *extra]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("corrupt_newest", [False, True])
def test_ps_killed_and_resumed_gives_the_uninterrupted_result(ps_factory, tmp_path, corrupt_newest):
    torch.manual_seed(5)
    weights = tmp_path / "init.pt"
    torch.save(build_model("mlp", 4).state_dict(), weights)
    steps = 10
    with ps_factory(2, lr=0.05, momentum=0.9, weight_decay=0.0) as ps:  # the uninterrupted run
        run_workers([worker_settings(ps.address, weights=str(weights), steps=steps) for _ in range(2)])
        want = ps.server.values_by_name()
        want_bytes = ps.server.describe()

    port, ckpt = free_port(), tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(_ps_command(port, tmp_path, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"),
                             cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        reached, release = threading.Event(), threading.Event()
        address = f"127.0.0.1:{port}"
        def hold(step):  # until the PS has died and come back
            reached.set()
            assert release.wait(60)

        holder = _DelayedClient(address, 7, hold, connect_retries=12, rpc_timeout_s=60.0)
        settings = worker_settings(address, weights=str(weights), steps=steps, connect_retries=12, rpc_timeout_s=60.0)
        from worker.train import run_worker
        results: dict = {}

        def work(name, client):
            try:
                results[name] = run_worker(settings, client=client)
            except BaseException as e:  # reported below, as data
                results[name] = e

        threads = [threading.Thread(target=work, args=("holder", holder), daemon=True),
                   threading.Thread(target=work, args=("other", None), daemon=True)]
        for t in threads:
            t.start()
        assert reached.wait(60), "the run did not reach step 7"
        _wait_for(lambda: len(list_checkpoints(ckpt)) == 2, 10, "the checkpoint of step 6")
        first.send_signal(signal.SIGKILL)  # no chance to save anything
        first.wait(10)
        assert [p.name for p in list_checkpoints(ckpt)] == ["ckpt-000000006.fzck", "ckpt-000000004.fzck"]
        if corrupt_newest:
            newest = list_checkpoints(ckpt)[0]
            data = bytearray(newest.read_bytes())
            data[len(data) // 2] ^= 0xFF
            newest.write_bytes(bytes(data))
        second = subprocess.Popen(_ps_command(port, tmp_path, "--resume", str(ckpt)), cwd=ROOT, env=env,
                                  stderr=subprocess.PIPE, text=True)
        release.set()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        errors = [r for r in results.values() if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        assert second.wait(30) == 0, second.stderr.read()
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    records = [json.loads(line) for line in (tmp_path / "ps.jsonl").read_text().splitlines()]
    resume = next(r for r in records if r["event"] == "resume")
    assert resume["step"] == (4 if corrupt_newest else 6)
    assert resume["rounds_lost"] == 7 - resume["step"]  # rounds 0..6 had completed before the kill
    assert len(resume["refused"]) == int(corrupt_newest)
    # The refused file is set aside, so the resumed run's rotation keeps its fallback.
    kept = ["ckpt-000000010.fzck", "ckpt-000000004.fzck" if corrupt_newest else "ckpt-000000006.fzck"]
    assert [p.name for p in list_checkpoints(ckpt)] == kept
    assert (ckpt / "ckpt-000000006.fzck.refused").is_file() == corrupt_newest
    assert all(r["rejoins"] == 1 for r in results.values())
    got = torch.load(tmp_path / "params.pt", weights_only=True)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name].numpy(), value, err_msg=name)  # same bits: nothing applied twice
    summary = records[-1]
    assert summary["event"] == "summary" and summary["steps"] == steps
    assert summary["push_payload"] == steps * 2 * sum(b["bytes"] for b in want_bytes["blocks"])


# -- vanished hosts: no RST, only silence (a stopped process stands in for a host gone) -----------
def test_a_worker_notices_a_vanished_ps_by_its_keepalive_not_its_rpc_deadline(tmp_path):
    """The PS process is stopped (SIGSTOP: its kernel still acknowledges TCP, as a cut link or a
    powered-off host would not even do) while a worker's pull waits for its round. The worker's
    keepalive ping goes unanswered, and the pull fails UNAVAILABLE (the worker joins again)
    within seconds, not at its RPC deadline."""
    port = free_port()
    ps = subprocess.Popen(_ps_command(port, tmp_path, "--keepalive-s", "1", "--start-timeout-s", "600"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = PSClient(f"127.0.0.1:{port}", connect_retries=10, rpc_timeout_s=30.0, keepalive_s=1.0)
    try:
        torch.manual_seed(0)
        flat = FlatModel(build_model("mlp", 4))
        joined = client.join(flat.manifest, "lonely")
        client.init(flat, range(len(flat.layout)), total_steps=4)
        assert joined.needs_init  # round 0 waits for a second worker that never comes
        threading.Timer(1.5, ps.send_signal, (signal.SIGSTOP,)).start()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            client.pull(0, 0, flat)
        waited = time.monotonic() - started
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        assert 1.5 < waited < 10, f"the pull failed {waited:.1f} s after it began"
    finally:
        client.close()
        ps.send_signal(signal.SIGCONT)
        ps.kill()
        ps.wait(30)


_HANGING_PUSH = """
import sys, time, grpc, torch
from proto import freezeps_pb2 as pb, freezeps_pb2_grpc as pb_grpc
from tests.conftest import init_messages
from worker.flat import FlatModel
from worker.models import build_model
torch.manual_seed(0)
flat = FlatModel(build_model("mlp", 4))
stub = pb_grpc.ParameterServerStub(grpc.insecure_channel(sys.argv[1]))  # no keepalive of its own
joined = stub.Join(pb.JoinRequest(worker_name="hanging", manifest=flat.manifest), timeout=10)
stub.Init(iter(init_messages(joined.worker_id, flat, 4, 1 << 20)), timeout=10)
print(joined.worker_id, flush=True)
def hang():
    yield pb.PushMessage(header=pb.PushHeader(worker_id=joined.worker_id, step=0, batch_size=1))
    time.sleep(600)
stub.Push(hang(), timeout=600)
"""


@pytest.mark.parametrize("keepalive_s", [1.0, 0.0])
def test_the_ps_ends_the_push_of_a_vanished_worker_by_its_keepalive(ps_factory, keepalive_s):
    """A worker process stops (SIGSTOP) in the middle of a push stream. With keepalive the PS's
    ping goes unanswered, it closes the connection and the push's handler ends (its thread is
    free again); without, the handler waits on the silent stream (what --keepalive-s 0 gives)."""
    with ps_factory(1, keepalive_s=keepalive_s) as ps:
        worker = subprocess.Popen([sys.executable, "-c", _HANGING_PUSH, ps.address], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            worker_id = worker.stdout.readline().strip()
            assert worker_id, "the stand-in worker did not join"
            _wait_for(lambda: ps.server._workers[worker_id].pushing, 10, "its push to begin")
            worker.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 6  # keepalive: ping after 1 s, closed 1 s later
            while ps.server._workers[worker_id].pushing and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ps.server._workers[worker_id].pushing == (keepalive_s == 0)
        finally:
            worker.send_signal(signal.SIGCONT)
            worker.kill()
            worker.wait(30)


def test_resume_without_a_fitting_checkpoint_fails_clearly(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "ckpt").mkdir()
    out = subprocess.run(_ps_command(port, tmp_path, "--resume", str(tmp_path / "ckpt")), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 5 and "cannot resume: no checkpoint in" in out.stderr
    assert not (tmp_path / "ps.jsonl").exists()
    # A checkpoint of a run with another freeze engine does not fit.
    server, _, _ = _joined_server(1, 1)
    write_checkpoint(tmp_path / "ckpt", 0, {"format": 1, "server": server.snapshot(), "bytes": {}, "pushes": 0,
                                            "wire_rounds": {}})
    out = subprocess.run(_ps_command(port, tmp_path, "--resume", str(tmp_path / "ckpt"), "--freeze", "static",
                                     "--freeze-blocks", "1"), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 5 and "does not fit this run" in out.stderr and "freeze engine" in out.stderr
    # A run that does not resume refuses a folder holding checkpoints: its files and another
    # run's would mix (and rotate each other away).
    out = subprocess.run(_ps_command(port, tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt")), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 5 and "already holds checkpoints (the newest ckpt-000000000.fzck)" in out.stderr
    assert not (tmp_path / "ps.jsonl").exists()


# -- soak ------------------------------------------------------------------------------------
def test_soak_with_worker_kills_loses_nothing_and_never_hangs(tmp_path):
    """16 worker processes, 100 rounds, 3 workers killed (SIGKILL) at random and replaced."""
    from bench.soak import params_mismatch, soak
    torch.manual_seed(0)
    weights = tmp_path / "init.pt"
    torch.save(build_model("mlp", 4).state_dict(), weights)
    result = soak(16, 100, 3, tmp_path / "run", weights, seed=1, worker_timeout_s=2.0, timeout_s=240.0)
    assert not result.hung, "a process was still running at the time limit"
    assert result.failed_processes == 0, (tmp_path / "run" / "processes.log").read_text()[-3000:]
    assert result.rounds_lost == 0 and result.applied_steps == list(range(100))
    assert result.drops == 3  # each killed worker was dropped, and nobody else
    assert result.ps_kills == 0 and result.recovery_s is None  # no PS restarted, so no recovery time
    assert any(len(ranks) < 16 for ranks in result.ranks_per_step)  # rounds went on without the dead
    # Each replacement either joined and pushed, or started too late (a loaded machine) to take part:
    # it found the run over, or joined after the last round.
    assert result.joined_replacements + result.late_replacements == 3
    assert params_mismatch(result, weights) == {}  # exactly the accepted pushes were applied, in rank order


def test_sigterm_writes_a_checkpoint_that_resumes(tmp_path):
    """A PS stopped with SIGTERM mid-run saves itself; --resume then starts from that step."""
    port, ckpt = free_port(), tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ps = subprocess.Popen(_ps_command(port, tmp_path, "--checkpoint-dir", str(ckpt)), cwd=ROOT, env=env)
    try:
        torch.manual_seed(0)
        flat = FlatModel(build_model("mlp", 4))
        client = PSClient(f"127.0.0.1:{port}", connect_retries=12)
        joined = client.join(flat.manifest, "solo")
        client.init(flat, range(joined.owned.first, joined.owned.end), total_steps=5)
        assert list_checkpoints(ckpt) == []  # --checkpoint-every 0: none until the end
        ps.send_signal(signal.SIGTERM)
        assert ps.wait(30) == 0
        client.close()
    finally:
        if ps.poll() is None:
            ps.kill()
            ps.wait(10)
    [path] = list_checkpoints(ckpt)
    state = read_checkpoint(path)
    assert state["server"]["step"] == 0 and state["server"]["total_steps"] == 5
    np.testing.assert_array_equal(state["server"]["values"][0].numpy().view(np.uint8), flat.value_bytes(0))
    # Restarted as systemd or Docker restart it, --auto-resume goes on from that checkpoint.
    again = subprocess.Popen(_ps_command(port, tmp_path, "--checkpoint-dir", str(ckpt), "--auto-resume"), cwd=ROOT,
                             env=env)
    try:
        def resumed():  # whole lines only: the PS may be writing the last one
            lines = (tmp_path / "ps.jsonl").read_text().split("\n")[:-1]
            return any(json.loads(line)["event"] == "resume" for line in lines)
        _wait_for(resumed, 60, "the resume record")
        # The record is written before the PS serves (and handles SIGTERM): wait until it answers.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            ParameterServerClient(channel).Status(pb.StatusRequest(), timeout=60, wait_for_ready=True)
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(30) == 0


def test_auto_resume_starts_fresh_without_a_checkpoint(tmp_path):
    from freezeps.config import load_config
    from freezeps.roles import resume_from
    cfg = load_config({"checkpoint_dir": str(tmp_path / "none-yet"), "auto_resume": True})
    assert resume_from(cfg) is None  # the first start of a run
    write_checkpoint(tmp_path / "none-yet", 3, {"format": 1})
    assert resume_from(cfg) == tmp_path / "none-yet"
    with pytest.raises(ValueError, match="auto_resume needs checkpoint_dir"):
        load_config({"auto_resume": True})
