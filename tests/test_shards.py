"""A PS split into shards, ps-lite style: each owns a contiguous block range, every shard makes
the same freeze decision, and a sharded run trains exactly as one PS does."""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from freeze.engines import EngineSpec
from freezeps.config import load_config
from freezeps.report import summarize_run
from proto import freezeps_pb2 as pb
from proto import freezeps_pb2_grpc as pb_grpc
from proto.security import Auth, open_channel
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from tests.conftest import run_workers, worker_settings
from worker.client import ShardedClient, ShardMismatch
from worker.flat import FlatModel
from worker.models import build_model

FREEZEPS = [sys.executable, "-m", "freezeps"]


def test_settings_refuse_what_shards_cannot_do():
    with pytest.raises(ValueError, match="shard 2 of 2"):
        ServerSettings(num_workers=1, chunk_bytes=1 << 20, shard=2, num_shards=2)
    central = FreezePolicy(EngineSpec("gradnorm", interval=2))
    with pytest.raises(ValueError, match="needs every block's averaged gradient on one PS"):
        ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20, num_shards=2), central)
    ParameterServer(ServerSettings(num_workers=1, chunk_bytes=1 << 20, num_shards=2),
                    FreezePolicy(EngineSpec("gradnorm", interval=2), votes=True))  # votes: the same on every shard
    with pytest.raises(ValueError, match="ps_shards 2 with freeze 'gradnorm'"):
        load_config({"ps_shards": 2, "freeze": "gradnorm"})
    with pytest.raises(ValueError, match="ps_shard 3 must be in 0..ps_shards-1"):
        load_config({"ps_shards": 2, "ps_shard": 3})
    with pytest.raises(ValueError, match="'nowhere' is not host:port"):
        load_config({"ps_address": "127.0.0.1:5000,nowhere"})
    with pytest.raises(ValueError, match="mode 'ddp' has no PS"):
        load_config({"ps_shards": 2, "mode": "ddp", "freeze": "none"})


def test_join_gives_one_rank_on_every_shard_and_the_blocks_in_order(ps_factory):
    torch.manual_seed(0)
    flat = FlatModel(build_model("mlp", 4))
    with ps_factory(3, shard=0, num_shards=2) as s0, ps_factory(3, shard=1, num_shards=2) as s1:
        # Another worker holds rank 0 on shard 1 only: shard 1 must still give this one shard 0's rank.
        with open_channel(s1.address, Auth()) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            stub.Join(pb.JoinRequest(worker_name="other", manifest=flat.manifest, rank=1), timeout=10)
            with pytest.raises(grpc.RpcError) as taken:
                stub.Join(pb.JoinRequest(worker_name="third", manifest=flat.manifest, rank=1), timeout=10)
            assert taken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "rank 1 asked for is held by another worker" in taken.value.details()
            with pytest.raises(grpc.RpcError) as out_of_range:
                stub.Join(pb.JoinRequest(worker_name="fourth", manifest=flat.manifest, rank=7), timeout=10)
            assert out_of_range.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        client = ShardedClient([s0.address, s1.address], connect_retries=2)
        try:
            joined = client.join(flat.manifest, "w")
            assert joined.rank == 0 and joined.owned.first == 0 and joined.owned.end == len(flat.layout)
            assert joined.needs_init  # each shard asks its first worker for its blocks
            owned = [s.server.describe()["owned"] for s in (s0, s1)]
            assert owned[0][0] == 0 and owned[0][1] == owned[1][0] and owned[1][1] == len(flat.layout)
        finally:
            client.close()
        backwards = ShardedClient([s1.address, s0.address], connect_retries=2)
        try:
            with pytest.raises(ShardMismatch, match="do not follow each other"):
                backwards.join(flat.manifest, "w2")
        finally:
            backwards.close()


def test_sharded_run_freezes_together_and_moves_no_frozen_bytes(ps_factory, tmp_path):
    policy = FreezePolicy(EngineSpec("static", blocks=1, from_step=3))
    logs = [tmp_path / "ps.jsonl", tmp_path / "ps-shard1.jsonl"]
    with ps_factory(2, policy=policy, log_path=logs[0], shard=0, num_shards=2) as s0, \
            ps_factory(2, policy=policy, log_path=logs[1], shard=1, num_shards=2) as s1:
        run_workers([worker_settings((s0.address, s1.address), steps=6) for _ in range(2)])
        states = [s.server.status().freeze for s in (s0, s1)]
        assert states[0] == states[1] and states[0].frozen_blocks == 1 and states[0].since_step == 3
        assert s0.server.describe()["owned"] == [0, 1]  # the mlp's fc1 holds most of its bytes
    rounds = [[json.loads(line) for line in log.read_text().splitlines() if '"round"' in line] for log in logs]
    assert [r["step"] for r in rounds[0]] == [r["step"] for r in rounds[1]] == list(range(6))
    for r in rounds[0]:  # shard 0 owns only the block that froze: from step 3 on, headers only
        pushed = r["bytes"]["by_block"]["Push"]["in"]
        assert ("0" in pushed) == (r["step"] < 3)
        assert set(pushed) <= {"-1", "0"}
    for r in rounds[1]:
        assert set(r["bytes"]["by_block"]["Push"]["in"]) == {"-1", "1", "2"}


def _run(run_dir, *flags):
    out = subprocess.run(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                     "--image-size", "8", "--num-workers", "2", "--steps", "6", "--batch-size", "16",
                                     "--evaluate", "--eval-every", "3", "--test-samples", "64",
                                     "--run-dir", str(run_dir), *flags],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.parametrize("freeze", [["--freeze", "static", "--freeze-blocks", "1", "--freeze-step", "3"],
                                    ["--freeze", "threshold", "--freeze-interval", "2", "--freeze-tau", "100",
                                     "--freeze-rate", "1", "--freeze-decision", "votes", "--vote-quorum", "1"],
                                    ["--freeze", "static", "--freeze-blocks", "1", "--freeze-step", "3",
                                     "--push-dtype", "bfloat16", "--pull-dtype", "bfloat16"]],
                         ids=["static", "votes", "static-bfloat16"])
def test_two_shards_train_exactly_as_one_ps(tmp_path, freeze):
    _run(tmp_path / "one", *freeze)
    _run(tmp_path / "two", "--ps-shards", "2", *freeze)
    want = torch.load(tmp_path / "one" / "params.pt")
    got = [torch.load(tmp_path / "two" / name) for name in ("params.pt", "params-shard1.pt")]
    assert not set(got[0]) & set(got[1]) and set(got[0]) | set(got[1]) == set(want)
    for name, value in {**got[0], **got[1]}.items():
        assert torch.equal(value, want[name]), name  # bit for bit: same blocks, same sums, same optimizer
    one, two = summarize_run(tmp_path / "one"), summarize_run(tmp_path / "two")
    assert one["freezes"] == two["freezes"] and one["freezes"]  # the same decision, made on both shards
    assert one["accuracy"] == two["accuracy"]
    # The shards' tallies add up to the one PS's: the same tensors moved, split between two.
    for key in ("push_payload", "pull_payload", "push_payload_no_freeze", "pull_payload_no_freeze"):
        assert one[key] == two[key], key
    assert one["payload_per_step"] == two["payload_per_step"]
    assert two["ps_shards"] == 2 and one["ps_shards"] == 1


def test_more_shards_than_blocks_is_refused_with_the_reason(tmp_path):
    out = subprocess.run(FREEZEPS + ["run", "--model", "mlp", "--dataset", "synthetic", "--weights", "random",
                                     "--image-size", "8", "--num-workers", "1", "--steps", "2", "--ps-shards", "4", "--freeze", "none",
                                     "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED_PRECONDITION" in out.stderr and "cannot split 3 blocks over 4 servers" in out.stderr


def test_a_pull_from_shards_takes_each_shards_changes_whatever_order_the_shards_answer_in(ps_factory):
    """With bfloat16 pull changes, every shard of a pull is asked for the changes since the same
    last pull, even when one shard's pull has ended (and the worker holds its blocks' new values)
    before another's begins: each shard then sends its changes, not its whole held values."""
    torch.manual_seed(0)
    flat = FlatModel(build_model("mlp", 4))
    settings = dict(pull_dtype="bfloat16", lr=0.1)
    with ps_factory(1, shard=0, num_shards=2, **settings) as s0, ps_factory(1, shard=1, num_shards=2, **settings) as s1:
        client = ShardedClient([s0.address, s1.address], connect_retries=2)
        client._pool.shutdown()
        client._pool = ThreadPoolExecutor(1)  # the shards' calls one after the other: shard 0's pull ends first
        try:
            joined = client.join(flat.manifest, "w")
            flat.set_pull_dtype(joined.pull_dtype)
            client.init(flat, range(len(flat.layout)), total_steps=3)
            blocks = range(len(flat.layout))
            first, _, _ = client.pull(0, 0, flat)
            assert list(first.delta) == [False] * len(flat.layout)  # whole values after the Join
            for g in flat.grads:
                g.fill_(1.0)
            client.push(pb.PushHeader(step=0, batch_size=1), flat, blocks)
            second, _, _ = client.pull(1, 0, flat)
            assert list(second.blocks) == list(blocks) and list(second.delta) == [True] * len(flat.layout)
            want = {**s0.server.values_by_name(), **s1.server.values_by_name()}
        finally:
            client.close()
    for name, value in flat.values_by_name().items():  # the changes, rounded, landed where the PS holds them
        held = want[name]
        assert np.allclose(value.numpy(), held, rtol=1e-2, atol=1e-3), name
