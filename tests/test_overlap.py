"""Pushes that overlap backward (worker.flat.GradsReady): a block goes out as soon as backward
has finished it, last block first, while backward computes the blocks before it. Pulls that
overlap forward (worker.flat.ValuesReady): forward runs a block as soon as it has landed,
while the pull brings the blocks after it."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from freeze.engines import EngineSpec
from proto import freezeps_pb2 as pb
from ps.policy import FreezePolicy
from tests.conftest import run_workers, running_ps, worker_settings
from worker.client import PSClient, ShardedClient
from worker.flat import FlatModel, GradsReady, ValuesReady
from worker.models import build_model

SLEEP_S = 0.5
VOTES = FreezePolicy(EngineSpec("gradnorm", interval=1), votes=True, vote_weights="equal")


def _joined(address: str, flat: FlatModel) -> PSClient:
    client = PSClient(address, connect_retries=3, rpc_timeout_s=30.0)
    client.join(flat.manifest, "t")
    client.init(flat, range(len(flat.layout)), total_steps=4)
    return client


def _loss(flat: FlatModel, hook) -> torch.Tensor:
    """The MLP's loss on a fixed batch, with `hook` on the gradient that reaches fc1's output:
    backward calls it after finishing fc2 and the head, before fc1."""
    torch.manual_seed(1)
    x, y = torch.randn(16, 192), torch.randint(0, 4, (16,))
    fc1, fc2, head = flat.model.blocks
    h = fc1(x)
    h.register_hook(hook)
    return F.cross_entropy(head(fc2(h)), y)


def _recording(flat: FlatModel) -> list[tuple[int, float]]:
    """Record (block, time) each time the push encodes a block's gradients."""
    sent, encode = [], flat.push_bytes

    def push_bytes(b: int):
        sent.append((b, time.perf_counter()))
        return encode(b)
    flat.push_bytes = push_bytes
    return sent


def _recorded_mlp() -> tuple[FlatModel, GradsReady, list[tuple[int, float]]]:
    """The MLP (seed 0), a GradsReady on it, and the record of what its pushes send (_recording)."""
    torch.manual_seed(0)
    flat = FlatModel(build_model("mlp", 4))
    return flat, GradsReady(flat), _recording(flat)


def _slow_backward(slept: list[float]):
    """A gradient hook that holds backward back by SLEEP_S, noting when in `slept`."""
    def hold_back(grad):
        slept.append(time.perf_counter())
        time.sleep(SLEEP_S)
    return hold_back


def test_a_block_goes_out_while_backward_computes_the_ones_before_it():
    """fc1's backward is held back by SLEEP_S: the head and fc2 are sent meanwhile, last first,
    and fc1 after it; the PS applies what a push after backward applies, to the bit."""
    values = []
    for overlap in (True, False):
        flat, ready, sent = _recorded_mlp()
        slept = []
        hold_back = _slow_backward(slept)
        with running_ps(num_workers=1) as ps, ThreadPoolExecutor(1) as pool:
            client = _joined(ps.address, flat)
            flat.zero_grads(0)
            loss = _loss(flat, hold_back)
            header = pb.PushHeader(step=0, batch_size=16, loss=loss.item())
            if overlap:
                ready.arm(0)
                pushing = pool.submit(client.push, header, flat, range(3), ready)
                loss.backward()
                ready.finish()
                ended = time.perf_counter()
                reply = pushing.result(timeout=30)
            else:
                loss.backward()
                ended = time.perf_counter()
                reply = client.push(header, flat, range(3))
            assert reply.step == 0 and not reply.late
            assert ps.server.step == 1
            values.append(ps.server.values_by_name())
            client.close()
        assert [b for b, _ in sent] == [2, 1, 0]  # last block first, overlapped or not
        at = dict(sent)
        if overlap:
            assert at[2] < at[1] < slept[0] + SLEEP_S - 0.1  # during fc1's held-back backward
            assert at[0] >= slept[0] + SLEEP_S  # fc1 only once backward finished it
        else:
            assert at[2] >= ended
    for name in values[0]:
        np.testing.assert_array_equal(values[0][name], values[1][name], err_msg=name)


def test_in_votes_mode_the_vote_follows_the_blocks_sent_while_backward_ran():
    """Votes mode: the head and fc2 go out while fc1's backward is held back, the vote (worked
    out once backward has ended) after fc1; the PS takes it and freezes the prefix it names."""
    flat, ready, sent = _recorded_mlp()
    slept = []
    with running_ps(num_workers=1, policy=VOTES) as ps, ThreadPoolExecutor(1) as pool:
        client = _joined(ps.address, flat)
        flat.zero_grads(0)
        loss = _loss(flat, _slow_backward(slept))
        ready.arm(0)
        pushing = pool.submit(client.push, pb.PushHeader(step=0, batch_size=16), flat, range(3), ready, ready.vote)
        loss.backward()
        ready.finish()
        ended = time.perf_counter()
        ready.cast(pb.Vote(frozen_blocks=1, shard_size=1, label_balance=1.0))
        reply = pushing.result(timeout=30)
        client.close()
    assert reply.step == 0 and reply.freeze.frozen_blocks == 1 and ps.server.step == 1
    assert [b for b, _ in sent] == [2, 1, 0]
    at = dict(sent)
    assert at[2] < at[1] < slept[0] + SLEEP_S - 0.1 < ended  # during fc1's held-back backward


def test_a_vote_that_fails_cancels_its_push_once_all_its_chunks_are_out():
    """Working out the vote fails after every chunk went out: the push is cancelled and nothing
    is applied (the PS's gRPC may see the stream end normally, as it did here under load: it
    ended without its vote, which test_bad_input checks without a race); the step's push is
    taken afterwards, not as a duplicate."""
    flat, ready, _ = _recorded_mlp()
    with running_ps(num_workers=1, policy=VOTES) as ps, ThreadPoolExecutor(1) as pool:
        client = _joined(ps.address, flat)
        before = ps.server.values_by_name()
        flat.zero_grads(0)
        _loss(flat, lambda grad: None).backward()
        ready.arm(0)
        ready.finish()
        pushing = pool.submit(client.push, pb.PushHeader(step=0, batch_size=16), flat, range(3), ready, ready.vote)
        time.sleep(0.2)  # the chunks are out; the push waits for its vote
        ready.abandon()  # as the train loop does when working out the vote raised
        with pytest.raises(grpc.RpcError):
            pushing.result(timeout=30)
        assert ps.server.step == 0
        assert all(np.array_equal(v, before[k]) for k, v in ps.server.values_by_name().items())
        ready.arm(0)
        ready.finish()
        ready.cast(pb.Vote(abstain=True))
        reply = client.push(pb.PushHeader(step=0, batch_size=16), flat, range(3), ready, ready.vote)
        assert reply.step == 0 and not reply.duplicate and ps.server.step == 1
        client.close()


def test_votes_mode_pushes_while_backward_runs_and_trains_the_same(tmp_path):
    """Two workers voting every other round, pushes overlapping backward or after it: the same
    votes (proposals and η to the bit), the same freezes and the same parameters."""
    weights = tmp_path / "init.pt"  # worker threads share torch's RNG: give them one initial model
    torch.save(build_model("mlp", 4).state_dict(), weights)
    votes = FreezePolicy(EngineSpec("gradnorm", interval=2), votes=True, vote_weights="equal")  # a test every 2
    runs = []
    for overlap in (True, False):
        log = tmp_path / f"ps-{overlap}.jsonl"
        with running_ps(num_workers=2, policy=votes, log_path=log) as ps:
            run_workers([worker_settings(ps.address, steps=8, weights=str(weights), overlap_push=overlap)
                         for _ in range(2)])
            values = ps.server.values_by_name()
        records = [json.loads(line) for line in log.read_text().splitlines()]
        cast = [(r["step"], sorted((v["rank"], v["proposal"], v["eta"]) for v in r["decision"]["votes"]))
                for r in records if r["event"] == "round" and "votes" in r.get("decision", {})]
        freezes = [(r["step"], r["to"]) for r in records if r["event"] == "freeze"]
        runs.append((values, cast, freezes))
    (values, cast, freezes), (values_after, cast_after, freezes_after) = runs
    assert [step for step, _ in cast] == [1, 3, 5, 7] and all(len(v) == 2 for _, v in cast)
    assert cast == cast_after and freezes == freezes_after and freezes
    for name in values:
        np.testing.assert_array_equal(values[name], values_after[name], err_msg=name)


def test_a_failed_backward_cancels_its_push_and_the_ps_keeps_its_state():
    """Backward fails after fc2 and the head were sent: the push is cancelled, not completed with
    fc1's half-computed gradients; the PS applies nothing and takes the step's push again."""
    flat, ready, sent = _recorded_mlp()

    def fail(grad):
        time.sleep(0.2)  # the push has the head and fc2 on the wire
        raise RuntimeError("backward broke")
    with running_ps(num_workers=1) as ps, ThreadPoolExecutor(1) as pool:
        client = _joined(ps.address, flat)
        before = ps.server.values_by_name()
        flat.zero_grads(0)
        loss = _loss(flat, fail)
        header = pb.PushHeader(step=0, batch_size=16, loss=loss.item())
        ready.arm(0)
        pushing = pool.submit(client.push, header, flat, range(3), ready)
        with pytest.raises(RuntimeError, match="backward broke"):
            try:
                loss.backward()
            except BaseException:
                ready.abandon()
                raise
        with pytest.raises(grpc.RpcError) as err:
            pushing.result(timeout=30)
        # gRPC ends a call whose request iterator raised as UNKNOWN, "Exception iterating requests!"
        assert err.value.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)
        assert [b for b, _ in sent] == [2, 1]
        assert ps.server.step == 0
        after = ps.server.values_by_name()
        assert all(np.array_equal(before[k], after[k]) for k in before)
        # The step's push, whole this time, is taken.
        flat.zero_grads(0)
        _loss(flat, lambda grad: None).backward()
        assert client.push(pb.PushHeader(step=0, batch_size=16), flat, range(3)).step == 0
        assert ps.server.step == 1
        client.close()


def test_a_block_without_gradients_is_done_when_backward_returns():
    """A step whose loss reads fc1 only: fc1 is done when its gradient is, fc2 and the head (no
    gradient this step) only at finish(); a frozen prefix is done from the start."""
    torch.manual_seed(0)
    flat = FlatModel(build_model("mlp", 4))
    ready = GradsReady(flat)

    failed = []

    def wait(b: int) -> None:
        try:
            ready.wait(b)
        except RuntimeError as e:
            failed.append((b, str(e)))

    def waiter(b: int) -> threading.Thread:
        t = threading.Thread(target=wait, args=(b,), daemon=True)
        t.start()
        return t
    ready.arm(0)
    waiting = [waiter(b) for b in range(3)]
    flat.model.blocks[0](torch.randn(4, 192)).sum().backward()
    waiting[0].join(5)
    assert not waiting[0].is_alive()
    time.sleep(0.1)
    assert waiting[1].is_alive() and waiting[2].is_alive()
    ready.finish()
    for t in waiting:
        t.join(5)
        assert not t.is_alive()
    flat.model.set_frozen(2)
    ready.arm(2)
    for b in (0, 1):
        t = waiter(b)
        t.join(5)
        assert not t.is_alive()
    head = waiter(2)
    time.sleep(0.1)
    assert head.is_alive()
    ready.abandon()  # backward failed: a wait under way raises, and so does the next
    head.join(5)
    assert failed == [(2, "backward failed: the push is abandoned")]
    with pytest.raises(RuntimeError, match="backward failed"):
        ready.wait(2)


# -- pulls that overlap forward ---------------------------------------------------------------
def _holding_back(flat: FlatModel, block: int, hold) -> dict[int, float]:
    """Make every pull call hold() before it lands `block` (as if its bytes were slow to come);
    returns {block: when it landed}, filled in as they land."""
    landed_at, sink_for = {}, flat.pull_sink

    def pull_sink(header, asked=()):
        sink = sink_for(header, asked)
        land = sink.land

        def land_late(b: int) -> None:
            if b == block:
                hold()
            land(b)
            landed_at[b] = time.perf_counter()
        sink.land = land_late
        return sink
    flat.pull_sink = pull_sink
    return landed_at


def test_forward_runs_the_blocks_pulled_while_the_pull_brings_the_ones_after_them():
    """The head's values are held back by SLEEP_S: fc1 and fc2 run forward meanwhile, the head
    once it has landed; the output is the one of a forward after the whole pull, to the bit."""
    outputs = []
    for overlap in (True, False):
        torch.manual_seed(0)
        flat = FlatModel(build_model("mlp", 4))
        landing = ValuesReady(flat)
        landed_at = _holding_back(flat, 2, lambda: time.sleep(SLEEP_S))
        started = {}  # when each block's forward began: its hook comes after ValuesReady's wait

        def start(b: int) -> None:
            started.setdefault(b, time.perf_counter())
        for b, block in enumerate(flat.model.blocks):
            block.register_forward_pre_hook(lambda module, args, b=b: start(b))
        with running_ps(num_workers=1) as ps, ThreadPoolExecutor(1) as pool:
            client = _joined(ps.address, flat)
            flat.zero_grads(0)
            _loss(flat, lambda grad: None).backward()
            client.push(pb.PushHeader(step=0, batch_size=16), flat, range(3))
            held = flat.values[2].clone()
            started.clear()
            pulling = client.open_pull(1, 0, flat, (), landing if overlap else None)
            x = torch.randn(16, 192, generator=torch.Generator().manual_seed(2))
            if overlap:
                receiving = pool.submit(pulling.receive)
                outputs.append(flat.model(x))
                receiving.result(timeout=30)
            else:
                pulling.receive()
                outputs.append(flat.model(x))
            client.close()
        assert not torch.equal(held, flat.values[2])  # the pull brought round 0's update
        if overlap:
            assert started[0] <= started[1] < landed_at[2] - SLEEP_S / 2  # while the head was held back
            assert started[2] >= landed_at[2]
            assert SLEEP_S / 2 < landing.waited_s < landed_at[2] - started[0] + 0.01
        else:
            assert started[0] >= landed_at[2]
    assert torch.equal(outputs[0], outputs[1])


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "the connection broke off mid-pull (test)"


class _BreakingLanding:
    """A ValuesReady whose pull breaks off UNAVAILABLE, as a lost connection does, just before
    it lands `block`; `raised` lists the blocks whose forward then raised the pull's error."""

    def __init__(self, landing: ValuesReady, block: int):
        self._landing, self._block = landing, block
        self.raised: list[tuple[int, str]] = []
        wait = landing.wait

        def wait_recording(b: int) -> None:  # what the forward pre-hooks call
            try:
                wait(b)
            except grpc.RpcError as e:
                self.raised.append((b, e.code().name))
                raise
        landing.wait = wait_recording

    def arm(self, blocks):
        self._landing.arm(blocks)

    def landed(self, b: int) -> None:
        if b == self._block:
            raise _Unavailable()
        self._landing.landed(b)

    def fail(self, error):
        self._landing.fail(error)


class _PullBreaker(ShardedClient):
    """Breaks off its pull of step `step` (once) just before `block` lands."""

    def __init__(self, address: str, step: int, block: int, **kw):
        super().__init__((address,), **kw)
        self.step, self.block, self.broken = step, block, None

    def open_pull(self, step, frozen_blocks, flat, rows=(), landing=None):
        if step == self.step and landing is not None and self.broken is None:
            landing = self.broken = _BreakingLanding(landing, self.block)
        return super().open_pull(step, frozen_blocks, flat, rows, landing)


@pytest.mark.parametrize("pull_dtype", ["float32", "bfloat16"])
def test_a_pull_that_breaks_off_under_forward_makes_the_worker_join_again(tmp_path, pull_dtype):
    """The pull of step 1 breaks off after fc1 landed, while forward runs: forward raises the
    pull's error, the worker joins again, pulls whole and goes on; the run ends with the bits of
    a run without the break (with bfloat16 changes too: what the worker held of the broken
    pull is dropped)."""
    from worker.train import run_worker
    weights = tmp_path / "init.pt"  # worker threads share torch's RNG: give them one initial model
    torch.save(build_model("mlp", 4).state_dict(), weights)
    values = []
    for breaking in (True, False):
        with running_ps(num_workers=2, pull_dtype=pull_dtype) as ps:
            settings = worker_settings(ps.address, steps=4, weights=str(weights), log_dir=tmp_path / f"logs-{breaking}")
            client = _PullBreaker(ps.address, step=1, block=1 if breaking else -1, connect_retries=3,
                                  rpc_timeout_s=30.0)
            with ThreadPoolExecutor(1) as pool:
                broken = pool.submit(run_worker, settings, client)
                other, = run_workers([settings])
                summary = broken.result(timeout=120)
            values.append(ps.server.values_by_name())
        assert summary["steps"] == other["steps"] == 4 and summary["rejoins"] == int(breaking)
        if breaking:
            log = (tmp_path / f"logs-{breaking}" / f"worker-{summary['rank']}.jsonl").read_text().splitlines()
            rejoin, = [r for r in map(json.loads, log) if r["event"] == "rejoin"]
            assert (rejoin["step"], rejoin["code"]) == (1, "UNAVAILABLE")
            assert client.broken.raised == [(1, "UNAVAILABLE")]  # fc2's forward raised it
    for name in values[0]:
        np.testing.assert_array_equal(values[0][name], values[1][name], err_msg=name)
