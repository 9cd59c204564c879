"""Rounds under churn, against a model: whatever order pushes arrive in, and whoever leaves,
is dropped or joins mid-round, every round applies exactly the pushes it accepted, summed in
rank order, weighted by their batch sizes (ParameterServer._sum_in_rank_order), so a run's
values are a function of what was pushed, never of when."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from proto import freezeps_pb2 as pb
from proto.codec import encode_header
from proto.transport import iter_chunks
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from ps.store import BlockStore, ReceivedPush
from worker.flat import FlatModel
from worker.models import build_model

NUM_WORKERS, ROUNDS, LR, TIMEOUT_S = 4, 12, 0.05, 5.0


def _frames(worker_id: str, step: int, batch_size: int, flat: FlatModel, grads: dict[int, bytes]):
    frames = [encode_header(pb.PushHeader(worker_id=worker_id, step=step, batch_size=batch_size))]
    return frames + [f for b in flat.push_layout for f in iter_chunks(b, np.frombuffer(grads[b.index], np.uint8), 1 << 20)]


class _Churn:
    """Drives one ParameterServer through random rounds; keeps what each round accepted."""

    def __init__(self, seed: int, push_dtype: str):
        self.rng = random.Random(seed)
        self.push_dtype = push_dtype
        self.server = ParameterServer(
            ServerSettings(num_workers=NUM_WORKERS, chunk_bytes=1 << 20, lr=LR, worker_timeout_s=TIMEOUT_S,
                           push_dtype=push_dtype), FreezePolicy(), self._record)
        torch.manual_seed(0)
        self.flat = FlatModel(build_model("mlp", 4))
        self.flat.set_push_dtype(push_dtype)
        self.initial = {b.index: self.flat.value_bytes(b.index).copy() for b in self.flat.layout}
        self.names = iter(f"w{i}" for i in range(1000))
        self.live: dict[str, int] = {}  # worker id -> rank
        self.rounds: list[dict] = []  # the round records, in order
        self.pushed: dict[tuple[int, str], tuple[int, dict[int, bytes]]] = {}  # (step, id) -> (batch, grads)
        for _ in range(NUM_WORKERS):
            self.join()
        first = next(iter(self.live))
        init = [encode_header(pb.PushHeader(worker_id=first, total_steps=ROUNDS))]
        init += [f for b in self.flat.layout for f in iter_chunks(b, self.initial[b.index], 1 << 20)]
        self.server.init(iter(init))

    def _record(self, record: dict) -> None:
        if record["event"] == "round":
            self.rounds.append(record)

    def join(self) -> None:
        reply = self.server.join(pb.JoinRequest(worker_name=next(self.names), manifest=self.flat.manifest))
        self.live[reply.worker_id] = reply.rank

    def push(self, worker_id: str) -> None:
        step = self.server.step
        grads = {}
        for b in self.flat.push_layout:  # random gradients, rounded to what the push carries
            g = torch.randn(self.flat.layout[b.index].nbytes // 4, generator=torch.Generator().manual_seed(
                self.rng.randrange(1 << 30)))
            grads[b.index] = g.to(getattr(torch, self.push_dtype)).view(torch.uint8).numpy().tobytes()
        batch = self.rng.randint(1, 8)
        self.pushed[(step, worker_id)] = (batch, grads)
        self.server.push(iter(_frames(worker_id, step, batch, self.flat, grads)))

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


@pytest.mark.parametrize("push_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("seed", range(6))
def test_rounds_apply_the_accepted_pushes_in_rank_order_whatever_the_churn(seed, push_dtype):
    churn = _Churn(seed, push_dtype)
    churn.run()
    assert len(churn.rounds) == ROUNDS
    ranks_per_round = [sorted(r["rank"] for r in record["workers"].values()) for record in churn.rounds]
    assert all(len(set(ranks)) == len(ranks) for ranks in ranks_per_round)  # no rank twice in a round
    want = _reference(churn)
    for b, value in churn.server._store.values.items():
        assert torch.equal(value, want[b]), f"block {b} differs from the rank-order replay (seed {seed})"
