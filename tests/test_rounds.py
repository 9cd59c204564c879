"""Rounds under churn, against a model: whatever order pushes arrive in, and whoever leaves,
is dropped or joins mid-round, every round applies exactly the pushes it accepted, summed in
rank order, weighted by their batch sizes (ParameterServer._sum_in_rank_order), so a run's
values are a function of what was pushed, never of when. With backup workers a round
completes without its slowest pushes, and those, late, change nothing."""
from __future__ import annotations

import random
import time

import pytest
import torch

from proto import freezeps_pb2 as pb
from proto.codec import decode
from ps import server as server_module
from ps.errors import FailedPrecondition
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from ps.store import BlockStore, ReceivedPush
from tests.conftest import init_frames, push_frames
from worker.flat import FlatModel
from worker.models import build_model

NUM_WORKERS, ROUNDS, LR, TIMEOUT_S = 4, 12, 0.05, 5.0


class _Churn:
    """Drives one ParameterServer through random rounds; keeps what each round accepted."""

    def __init__(self, seed: int, push_dtype: str, backup_workers: int = 0, num_workers: int = NUM_WORKERS,
                 pull_dtype: str = "float32", max_staleness: int = 0):
        self.rng = random.Random(seed)
        self.push_dtype = push_dtype
        self.server = ParameterServer(
            ServerSettings(num_workers=num_workers, chunk_bytes=1 << 20, lr=LR, worker_timeout_s=TIMEOUT_S,
                           push_dtype=push_dtype, pull_dtype=pull_dtype, backup_workers=backup_workers,
                           max_staleness=max_staleness),
            FreezePolicy(), self._record)
        self.late = 0  # late pushes answered
        self.stale = 0  # late pushes applied in a later round
        torch.manual_seed(0)
        self.flat = FlatModel(build_model("mlp", 4))
        self.flat.set_push_dtype(push_dtype)
        self.initial = {b.index: self.flat.value_bytes(b.index).copy() for b in self.flat.layout}
        self.names = iter(f"w{i}" for i in range(1000))
        self.live: dict[str, int] = {}  # worker id -> rank
        self.records: list[dict] = []  # every run-log record, in order
        self.rounds: list[dict] = []  # the round records
        self.pushed: dict[tuple[int, str], tuple[int, dict[int, bytes]]] = {}  # (step, id) -> (batch, grads)
        for _ in range(num_workers):
            self.join()
        first = next(iter(self.live))
        self.server.init(iter(init_frames(pb.PushHeader(worker_id=first, total_steps=ROUNDS), self.flat)))
        self.started = self.server._round_started

    def _record(self, record: dict) -> None:
        self.records.append(record)
        if record["event"] == "round":
            self.rounds.append(record)

    def join(self) -> None:
        reply = self.server.join(pb.JoinRequest(worker_name=next(self.names), manifest=self.flat.manifest))
        self.live[reply.worker_id] = reply.rank

    def push(self, worker_id: str, step: int | None = None) -> pb.PushReply:
        step = self.server.step if step is None else step
        grads = {}
        for b in self.flat.push_layout:  # random gradients, rounded to what the push carries
            g = torch.randn(self.flat.layout[b.index].nbytes // 4, generator=torch.Generator().manual_seed(
                self.rng.randrange(1 << 30)))
            grads[b.index] = g.to(getattr(torch, self.push_dtype)).view(torch.uint8).numpy().tobytes()
        batch = self.rng.randint(1, 8)
        self.pushed[(step, worker_id)] = (batch, grads)
        header = pb.PushHeader(worker_id=worker_id, step=step, batch_size=batch)
        return self.server.push(iter(push_frames(header, self.flat, grads)))

    def run(self) -> None:
        """Each round: the live workers push in a random order; before any push, one may leave,
        be dropped past its deadline, or be replaced by a worker joining mid-round."""
        while self.server.step < ROUNDS:
            step = self.server.step
            waiting = list(self.live)
            self.rng.shuffle(waiting)
            while self.server.step == step:
                event = self.rng.random()
                pending = [w for w in waiting if (step, w) not in self.pushed and w in self.live]
                if event < 0.08 and len(pending) > 1:
                    leaving = self.rng.choice(pending)
                    self.server.leave(pb.LeaveRequest(worker_id=leaving))
                    del self.live[leaving]
                elif event < 0.14 and len(pending) > 1:
                    # The deadline drops every worker that has not pushed, and the round completes.
                    pushed_any = any((step, w) in self.pushed for w in self.live)
                    if not pushed_any:
                        continue
                    dropped = self.server.enforce_deadlines(self.server._round_started + TIMEOUT_S + 1)
                    assert sorted(dropped) == sorted(pending)
                    for w in dropped:
                        del self.live[w]
                elif event < 0.25 and len(self.live) < NUM_WORKERS:
                    self.join()
                    waiting.append(next(reversed(self.live)))
                elif pending:
                    self.push(pending[0])
                    waiting.remove(pending[0])
                else:  # everyone live has pushed or left: only a join can fill the round
                    self.join()
                    waiting.append(next(reversed(self.live)))
            # Backup workers: the round may have completed without some; they push it now, late:
            # thrown away, or (max_staleness) summed into the round in progress.
            for w in [w for w in waiting if (step, w) not in self.pushed and w in self.live]:
                if self.rng.random() < 0.5:
                    before = [v.clone() for v in self.server._store.values.values()]
                    now = self.server.step
                    reply = self.push(w, step)
                    pushed = self.pushed.pop((step, w))
                    if reply.late:
                        assert reply.step == self.server.step
                        assert all(torch.equal(a, b) for a, b in zip(before, self.server._store.values.values()))
                        self.late += 1
                    else:  # applied stale: it counts for the round it went into
                        assert reply.step == now and not reply.duplicate
                        self.pushed[(now, w)] = pushed
                        self.stale += 1


def _reference(churn: _Churn) -> dict[int, torch.Tensor]:
    """The rounds replayed on a bare BlockStore: each round's accepted pushes summed in rank
    order, then one optimizer step on their weighted average."""
    server = churn.server
    store = BlockStore(server._blocks, range(len(server._blocks)), server.settings.make_optimizer())
    for b, value in churn.initial.items():
        store.values[b].copy_(torch.frombuffer(bytearray(value), dtype=torch.float32))
    for step, record in enumerate(churn.rounds):
        assert record["step"] == step
        order = sorted(record["workers"], key=lambda w: record["workers"][w]["rank"])
        for worker_id in order:
            batch, grads = churn.pushed[(step, worker_id)]
            assert record["workers"][worker_id]["batch_size"] == batch
            received = ReceivedPush(churn.push_dtype)
            for b, data in grads.items():
                received.write(b, 0, memoryview(data))
            store.accumulate(received, float(batch))
        assert record["samples"] == sum(churn.pushed[(step, w)][0] for w in order)
        store.apply(range(len(server._blocks)), float(record["samples"]), LR)
    return store.values


@pytest.mark.parametrize("push_dtype,backup_workers,max_staleness", [
    ("float32", 0, 0), ("bfloat16", 0, 0), ("float32", 1, 0), ("float32", 2, 0), ("float32", 1, 1)])
@pytest.mark.parametrize("seed", range(6))
def test_rounds_apply_the_accepted_pushes_in_rank_order_whatever_the_churn(seed, push_dtype, backup_workers,
                                                                           max_staleness):
    churn = _Churn(seed, push_dtype, backup_workers, max_staleness=max_staleness)
    churn.run()
    # Late pushes happen only with backup workers; with max_staleness they are applied.
    assert (churn.late + churn.stale > 0) == (backup_workers > 0) and (churn.stale > 0) == (max_staleness > 0)
    stale = [w["stale"] for r in churn.rounds for w in r["workers"].values() if "stale" in w]
    assert len(stale) == churn.stale and all(k == 1 for k in stale)
    assert len(churn.rounds) == ROUNDS
    ranks_per_round = [sorted(r["rank"] for r in record["workers"].values()) for record in churn.rounds]
    assert all(len(set(ranks)) == len(ranks) for ranks in ranks_per_round)  # no rank twice in a round
    want = _reference(churn)
    for b, value in churn.server._store.values.items():
        assert torch.equal(value, want[b]), f"block {b} differs from the rank-order replay (seed {seed})"




class _Clock:
    """time.monotonic for the PS, moved by hand."""
    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = staticmethod(time.perf_counter)  # durations for the run log: real ones


def test_backup_workers_wait_out_the_slowest_but_drop_a_silent_one(monkeypatch):
    """With one backup worker of three, rounds go on without a worker that never pushes; it is
    still dropped worker_timeout_s after its first missed round began, however recent the
    current round. Its late push changes nothing and restarts its timer."""
    clock = _Clock()
    monkeypatch.setattr(server_module, "time", clock)
    churn = _Churn(0, "float32", backup_workers=1, num_workers=3)
    ids = list(churn.live)
    for step in range(3):  # ranks 0 and 1 push, a second a round; rank 2 is silent
        clock.now += 1
        churn.push(ids[0])
        assert churn.server.step == step
        churn.push(ids[1])
        assert churn.server.step == step + 1
    assert [sorted(w["rank"] for w in r["workers"].values()) for r in churn.rounds] == [[0, 1]] * 3
    clock.now = 1000 + TIMEOUT_S - 0.5
    assert churn.server.enforce_deadlines() == []
    # Rank 2 wakes: its push of step 0 is late, changes nothing, and restarts its timer.
    before = {b: v.clone() for b, v in churn.server._store.values.items()}
    reply = churn.push(ids[2], step=0)
    del churn.pushed[(0, ids[2])]
    assert reply.late and reply.step == 3 and churn.server.step == 3
    assert all(torch.equal(v, before[b]) for b, v in churn.server._store.values.items())
    assert churn.records[-1] == {"event": "late_push", "step": 0, "worker": ids[2], "rank": 2, "run_step": 3,
                                 "received": False}  # answered at its header
    clock.now = 1000 + TIMEOUT_S + 0.5  # past its first missed round's deadline, not its late push's
    assert churn.server.enforce_deadlines() == []
    # A worker silent from the start is dropped TIMEOUT_S after round 0 began, though the
    # current round began 3 s ago.
    clock.now = 2000.0
    silent = _Churn(0, "float32", backup_workers=1, num_workers=3)
    ids = list(silent.live)
    clock.now += 3
    for _ in range(3):
        silent.push(ids[0])
        silent.push(ids[1])
    clock.now = 2000 + TIMEOUT_S + 0.5
    assert silent.server.enforce_deadlines() == [ids[2]] and silent.server.step == 3
    drop = next(r for r in silent.records if r["event"] == "drop")
    assert drop["reason"] == f"no push {TIMEOUT_S + 0.5:.1f} s after it was due"
    want = _reference(churn)
    for b, value in churn.server._store.values.items():
        assert torch.equal(value, want[b])


def test_a_pull_behind_the_run_gets_the_current_step_whole():
    """A worker the rounds went on without asks for an older step: it gets the current one,
    PullHeader.step saying so; with bfloat16 pull changes, whole (what the others hold), since
    the changes lead from the step before, which it does not hold."""
    churn = _Churn(0, "float32", backup_workers=1, num_workers=3, pull_dtype="bfloat16")
    ids = list(churn.live)
    for step in range(2):
        churn.push(ids[0])
        churn.push(ids[1])
    assert churn.server.step == 2

    def pull(worker_id, step, base_step=None):
        frames = list(churn.server.pull(pb.PullRequest(worker_id=worker_id, step=step, base_step=base_step)))
        return frames[0].header, sum(f.chunk.payload for f in frames[1:])

    behind, behind_bytes = pull(ids[2], 0)
    assert behind.step == 2 and list(behind.delta) == [False] * len(churn.flat.layout)
    follows, follows_bytes = pull(ids[0], 2, base_step=1)
    assert follows.step == 2 and list(follows.delta) == [True] * len(churn.flat.layout)
    assert behind_bytes == 2 * follows_bytes == sum(b.nbytes for b in churn.flat.layout)
    stale, _ = pull(ids[2], 1, base_step=0)  # its base is two rounds old: whole again
    assert stale.step == 2 and not any(stale.delta)
    with pytest.raises(FailedPrecondition, match="pull for step 4, but the server is at step 2"):
        pull(ids[2], 4)


def test_a_pull_streams_the_values_of_its_step_though_the_round_completes_meanwhile():
    """With backup workers the round may complete while a slow worker's pull streams: the
    pull still carries its step's values, every block of them, never some of the next."""
    churn = _Churn(0, "float32", backup_workers=1, num_workers=3)
    ids = list(churn.live)
    want = {b: v.clone() for b, v in churn.server._store.values.items()}
    stream = iter(churn.server.pull(pb.PullRequest(worker_id=ids[2], step=0)))
    assert next(stream).header.step == 0  # the header has gone out; the blocks are still to come
    churn.push(ids[0])
    churn.push(ids[1])
    assert churn.server.step == 1 and not torch.equal(churn.server._store.values[0], want[0])
    got = {b: bytearray() for b in want}
    for frame in stream:  # as the wire has it: the frame's encoded bytes
        chunk = decode(frame.raw, pb.PullHeader).chunk
        got[chunk.block] += bytes(chunk.data)
    for b, value in want.items():
        assert torch.equal(torch.frombuffer(got[b], dtype=torch.float32), value), f"block {b}"



def test_a_stale_push_takes_its_workers_place_in_the_round_in_progress():
    """max_staleness 2, one backup worker of three: rank 2's push for step 0, after round 0,
    goes into round 1 as its push for that round; its push for step 1 is then refused (it
    pushed into round 1 already), a retry of the stale one is a duplicate, and round 1
    completes with ranks 0 and 2 (stale 1), which the replay reproduces."""
    churn = _Churn(0, "float32", backup_workers=1, num_workers=3, max_staleness=2)
    ids = list(churn.live)
    churn.push(ids[0])
    churn.push(ids[1])
    assert churn.server.step == 1
    reply = churn.push(ids[2], step=0)
    assert (reply.step, reply.late, reply.duplicate) == (1, False, False)
    stale = churn.pushed.pop((0, ids[2]))
    before = {b: v.clone() for b, v in churn.server._store.values.items()}
    with pytest.raises(FailedPrecondition, match="already pushed into round 1"):
        churn.push(ids[2], step=1)
    again = churn.push(ids[2], step=0)
    assert again.duplicate and again.step == 1
    assert all(torch.equal(v, before[b]) for b, v in churn.server._store.values.items())
    churn.pushed[(1, ids[2])] = stale  # what round 1 holds of rank 2: the stale push, not the two refused
    del churn.pushed[(0, ids[2])]
    churn.push(ids[0])  # two of three: with one backup worker, round 1 completes
    assert churn.server.step == 2
    assert {w["rank"]: w.get("stale") for w in churn.rounds[1]["workers"].values()} == {0: None, 2: 1}
    want = _reference(churn)
    for b, value in churn.server._store.values.items():
        assert torch.equal(value, want[b])
