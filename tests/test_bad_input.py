"""Malformed and hostile messages are refused with a specific status and change nothing.

These tests talk to the PS through protobuf's generated stub, not freezeps' own client:
they also show that the wire is plain protobuf.
"""
from __future__ import annotations

import math
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch

from freeze.engines import EngineSpec
from proto import freezeps_pb2 as pb
from proto import freezeps_pb2_grpc as pb_grpc
from proto.service import SERVICE
from proto.transport import WireError
from ps.policy import FreezePolicy
from tests.conftest import good_chunks as _good_chunks
from tests.conftest import init_messages, one_worker
from worker.client import PSClient
from worker.flat import FlatModel
from worker.models import build_model


def _push(stub, worker_id, step, chunks, batch_size=8):
    msgs = [pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=step, batch_size=batch_size))]
    msgs += [pb.PushMessage(chunk=c) for c in chunks]
    return stub.Push(iter(msgs), timeout=10)


def _mutations(flat):
    """(description, chunks, expected status): each a push that must be refused."""
    good = _good_chunks(flat)

    def edit(i, **kw):
        out = [pb.Chunk() for _ in good]
        for o, g in zip(out, good):
            o.CopyFrom(g)
        for k, v in kw.items():
            setattr(out[i], k, v)
        return out

    nan = bytearray(good[0].data)
    nan[0:4] = np.float32(math.nan).tobytes()
    inf = bytearray(good[-1].data)
    inf[-4:] = np.float32(math.inf).tobytes()
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("unknown block", edit(0, block=99), invalid, "unknown block"),
        ("unknown tensor", edit(0, tensor=17), invalid, "unknown tensor"),
        ("offset past tensor", edit(0, offset=10**9), invalid, "past the end"),
        ("gap in offsets", edit(1, offset=good[1].offset + 4), invalid, "expected"),
        ("odd size", edit(0, data=good[0].data[:-1]), invalid, "aligned"),
        ("missing last chunk", good[:-1], invalid, "ended early"),
        ("duplicate chunk", good[:1] + good, invalid, "expected"),
        ("out of order", [good[1], good[0]] + good[2:], invalid, "expected"),
        ("NaN", edit(0, data=bytes(nan)), invalid, "NaN"),
        ("Inf", edit(len(good) - 1, data=bytes(inf)), invalid, "NaN or Inf"),
        ("oversized chunk", [pb.Chunk(block=good[0].block, tensor=0, offset=0, data=b"\0" * ((1 << 20) + 4))],
         invalid, "must be"),
        # a push carries its blocks last first (freezeps.proto, PushMessage), as Init does not
        ("blocks in block order", sorted(good, key=lambda c: c.block), invalid, "expected block 2"),
    ]


def test_bad_pushes_are_refused_and_change_nothing(one_worker_run):
    ps, stub, worker_id, flat = one_worker_run
    before = ps.server.values_by_name()
    flat.grads[0].fill_(0.5)
    for what, chunks, code, words in _mutations(flat):
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, worker_id, 0, chunks)
        assert err.value.code() == code, what
        assert words in err.value.details(), (what, err.value.details())
        assert ps.server.step == 0, what
        after = ps.server.values_by_name()
        assert all(np.array_equal(before[k], after[k]) for k in before), what
    # A valid push still goes through afterwards, and changes the values.
    _push(stub, worker_id, 0, _good_chunks(flat))
    assert ps.server.step == 1
    assert not np.array_equal(before["fc1/fc.weight"], ps.server.values_by_name()["fc1/fc.weight"])


def test_a_bfloat16_ps_takes_half_the_bytes_and_refuses_float32_or_misaligned_pushes():
    """With push_dtype bfloat16 the PS says so at Join and reads pushes of 2 bytes an element:
    a float32 push, a chunk cut inside an element, or a bfloat16 NaN is refused and changes
    nothing; a good push is half the float32 one's bytes and applies."""
    with one_worker(push_dtype="bfloat16") as (ps, stub, worker_id, flat):
        joined = stub.Join(pb.JoinRequest(worker_name="t", manifest=flat.manifest), timeout=10)  # the same one again
        assert joined.push_dtype == "bfloat16"
        flat.grads[0].fill_(0.5)
        wide = _good_chunks(flat)
        flat.set_push_dtype(joined.push_dtype)
        good = _good_chunks(flat)
        assert sum(len(c.data) for c in good) * 2 == sum(len(c.data) for c in wide)
        cut = pb.Chunk()
        cut.CopyFrom(good[0])
        cut.data = good[0].data[:-1]
        nan = pb.Chunk()
        nan.CopyFrom(good[0])
        nan.data = b"\xc0\x7f" + good[0].data[2:]  # bfloat16 NaN, little-endian
        before = ps.server.values_by_name()
        for what, chunks, words in [("float32", wide, "past the end"), ("cut", [cut] + good[1:], "aligned to bfloat16"),
                                    ("NaN", [nan] + good[1:], "NaN")]:
            with pytest.raises(grpc.RpcError) as err:
                _push(stub, worker_id, 0, chunks)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert words in err.value.details(), (what, err.value.details())
            assert ps.server.step == 0, what
            after = ps.server.values_by_name()
            assert all(np.array_equal(before[k], after[k]) for k in before), what
        _push(stub, worker_id, 0, good)
        assert ps.server.step == 1
        assert not np.array_equal(before["fc1/fc.weight"], ps.server.values_by_name()["fc1/fc.weight"])


def channel_bytes_call(address: str, raw: bytes) -> grpc.RpcError:
    """Send raw bytes as a Push stream message; returns the error the PS answered with."""
    with grpc.insecure_channel(address) as channel:
        push = channel.stream_unary("/freezeps.ParameterServer/Push", request_serializer=lambda b: b,
                                    response_deserializer=pb.PushReply.FromString)
        with pytest.raises(grpc.RpcError) as err:
            push(iter([raw]), timeout=10)
    return err.value


def test_wrong_step_and_unknown_worker(one_worker_run):
    ps, stub, worker_id, flat = one_worker_run
    cases = [(worker_id, 5, grpc.StatusCode.FAILED_PRECONDITION, "server is at step 0"),
             ("nobody", 0, grpc.StatusCode.NOT_FOUND, "unknown worker")]
    for who, step, code, words in cases:
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, who, step, _good_chunks(flat))
        assert err.value.code() == code and words in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, worker_id, 0, _good_chunks(flat), batch_size=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Pull(pb.PullRequest(worker_id="nobody", step=0), timeout=10))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Pull(pb.PullRequest(worker_id=worker_id, step=3), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter([]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in err.value.details()
    garbage = channel_bytes_call(ps.address, b"\x12\xff\xff\xff")  # a chunk whose length runs past the end
    assert garbage.code() == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in garbage.details()
    assert ps.server.step == 0
    # The same worker's push for step 0 is accepted once; pushed again (its reply lost, say),
    # it is acknowledged as a duplicate and not applied again, though its round is over.
    assert not _push(stub, worker_id, 0, _good_chunks(flat)).duplicate
    after = ps.server.values_by_name()
    again = _push(stub, worker_id, 0, _good_chunks(flat))
    assert again.duplicate and again.step == 0 and ps.server.step == 1
    assert all(np.array_equal(v, after[k]) for k, v in ps.server.values_by_name().items())


def _vote(frozen_blocks: int = 1, eta=(0.1, 0.2, math.nan), label_balance: float = 0.5) -> pb.PushMessage:
    return pb.PushMessage(vote=pb.Vote(frozen_blocks=frozen_blocks, eta=eta, shard_size=10,
                                       label_balance=label_balance))


def test_bad_votes_are_refused_and_change_nothing():
    """In votes mode every push ends with a vote, after its last chunk (freezeps.proto, Vote):
    a push without one (cancelled once its chunks were out, say), one anywhere else, a second
    one, or one naming more blocks than the run has (the PS would weigh every prefix up to it)
    or a label balance outside [0, 1] is refused INVALID_ARGUMENT and nothing is applied. An
    abstention decides nothing; a vote decides the round's freeze."""
    policy = FreezePolicy(EngineSpec("gradnorm", interval=1), votes=True, vote_weights="equal")
    with one_worker(policy=policy) as (ps, stub, worker_id, flat):
        flat.grads[0].fill_(0.5)
        header = pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=0, batch_size=8))
        good = [pb.PushMessage(chunk=c) for c in _good_chunks(flat)]
        cases = [
            ("no vote", good, "ended without its vote"),
            ("a vote before the last chunk", good[:1] + [_vote()] + good[1:], "the vote must be the last message"),
            ("two votes", good + [_vote(), _vote()], "the vote must be the last message"),
            ("more blocks than the run has", good + [_vote(frozen_blocks=4)], "4 blocks frozen of 3"),
            ("the most a uint32 holds", good + [_vote(frozen_blocks=2**32 - 1)], "4294967295 blocks frozen of 3"),
            ("eta for more blocks", good + [_vote(eta=[0.0] * 4)], "4 eta values for 3 blocks"),
            ("label balance NaN", good + [_vote(label_balance=math.nan)], "label_balance nan is not in [0, 1]"),
            ("label balance over 1", good + [_vote(label_balance=1.5)], "label_balance 1.5 is not in [0, 1]"),
        ]
        before = ps.server.values_by_name()
        for what, msgs, words in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Push(iter([header] + msgs), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert words in err.value.details(), (what, err.value.details())
            assert ps.server.step == 0, what
            assert all(np.array_equal(v, before[k]) for k, v in ps.server.values_by_name().items()), what
        abstain = pb.PushMessage(vote=pb.Vote(abstain=True))
        reply = stub.Push(iter([header] + good + [abstain]), timeout=10)
        assert reply.step == 0 and ps.server.step == 1 and reply.freeze.frozen_blocks == 0
        header.header.step = 1
        reply = stub.Push(iter([header] + good + [_vote()]), timeout=10)
        assert reply.step == 1 and ps.server.step == 2 and reply.freeze.frozen_blocks == 1  # the vote's prefix


def test_a_run_that_decides_centrally_takes_no_vote(one_worker_run):
    ps, stub, worker_id, flat = one_worker_run
    header = pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=0, batch_size=8))
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter([header] + [pb.PushMessage(chunk=c) for c in _good_chunks(flat)] + [_vote()]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decides centrally" in err.value.details()
    assert ps.server.step == 0


def test_init_carries_no_vote(ps_factory):
    flat = FlatModel(build_model("mlp", 4))
    with ps_factory(num_workers=1) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        worker_id = stub.Join(pb.JoinRequest(worker_name="a", manifest=flat.manifest), timeout=10).worker_id
        init = init_messages(worker_id, flat, 4)
        with pytest.raises(grpc.RpcError) as err:
            stub.Init(iter(init + [_vote()]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Init carries no vote" in err.value.details()
        assert not stub.Status(pb.StatusRequest(), timeout=10).initialized
        stub.Init(iter(init), timeout=10)  # and without it, the run starts
        assert stub.Status(pb.StatusRequest(), timeout=10).initialized
        assert ps.server.step == 0


def test_manifest_mismatch_is_refused(ps_factory):
    flat = FlatModel(build_model("mlp", 4))
    other = FlatModel(build_model("mlp", 5))  # a different head shape
    with ps_factory(num_workers=2) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        stub.Join(pb.JoinRequest(worker_name="a", manifest=flat.manifest), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(worker_name="b", manifest=other.manifest), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "head/fc.weight" in err.value.details()
        assert stub.Status(pb.StatusRequest(), timeout=10).live_workers == 1


def test_a_worker_whose_data_plan_differs_is_refused(ps_factory):
    """Workers that shard with different seeds would train some samples twice and others
    never; the PS keeps the first plan and refuses one that differs, naming the field."""
    from pathlib import Path

    from tests.conftest import worker_settings
    from worker.data import load_dataset
    from worker.train import data_plan

    train = load_dataset("synthetic", Path("data"), True)
    plan = data_plan(train, worker_settings("127.0.0.1:1"))
    assert plan == data_plan(train, worker_settings("127.0.0.1:1", log_dir=None, rpc_timeout_s=5.0))  # not data
    other = data_plan(train, worker_settings("127.0.0.1:1", seed=1))
    flat = FlatModel(build_model("mlp", 4))
    with ps_factory(num_workers=3) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        stub.Join(pb.JoinRequest(worker_name="a", manifest=flat.manifest, plan=plan), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(worker_name="b", manifest=flat.manifest, plan=other), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.details() == "data plan differs from the run's: seed 1 != 0"
        assert stub.Status(pb.StatusRequest(), timeout=10).live_workers == 1
        stub.Join(pb.JoinRequest(worker_name="b", manifest=flat.manifest, plan=plan), timeout=10)
        stub.Join(pb.JoinRequest(worker_name="c", manifest=flat.manifest), timeout=10)  # no plan: not compared
        assert stub.Status(pb.StatusRequest(), timeout=10).live_workers == 3


def test_a_worker_name_past_512_bytes_is_refused(ps_factory):
    flat = FlatModel(build_model("mlp", 4))
    with ps_factory(num_workers=1) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(worker_name="é" * 257, manifest=flat.manifest), timeout=10)  # 514 bytes
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "worker_name of 514 bytes: at most 512" in err.value.details()
        status = stub.Status(pb.StatusRequest(), timeout=10)
        assert status.live_workers == 0 and not status.blocks  # nothing was kept
        assert stub.Join(pb.JoinRequest(worker_name="é" * 256, manifest=flat.manifest), timeout=10).worker_id


@pytest.mark.parametrize("edit,words", [
    (lambda m: m.blocks[0].tensors[0].__setattr__("dtype", "float64"), "dtype"),
    (lambda m: m.blocks[1].__setattr__("name", m.blocks[0].name), "repeated"),
    (lambda m: m.blocks[0].tensors[0].__setattr__("kind", pb.TENSOR_KIND_UNSPECIFIED), "kind"),
    (lambda m: m.ClearField("blocks"), "no blocks"),
])
def test_bad_manifest_is_refused(ps_factory, edit, words):
    manifest = pb.Manifest()
    manifest.CopyFrom(FlatModel(build_model("mlp", 4)).manifest)
    edit(manifest)
    with ps_factory(num_workers=1) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Join(pb.JoinRequest(worker_name="a", manifest=manifest), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert not stub.Status(pb.StatusRequest(), timeout=10).blocks  # nothing was kept


def _embedding_manifest() -> pb.Manifest:
    """One block: an 8 x 4 table marked row_sparse, then a bias of 4 (36 values)."""
    manifest = pb.Manifest(model="emb")
    block = manifest.blocks.add(name="emb")
    block.tensors.add(name="emb/table", shape=[8, 4], dtype="float32", kind=pb.PARAMETER, row_sparse=True)
    block.tensors.add(name="emb/bias", shape=[4], dtype="float32", kind=pb.PARAMETER)
    return manifest


def test_bad_row_sparse_pushes_are_refused_and_a_good_one_updates_only_its_rows(ps_factory):
    """Through protobuf's stub: a model with an embedding table marked row_sparse. Malformed
    row chunks are INVALID_ARGUMENT and change nothing; a good push moves exactly its rows."""
    manifest = _embedding_manifest()
    rows = np.array([2, 5], "<u4").tobytes()
    two_rows = np.ones(8, np.float32).tobytes()
    bias = np.ones(4, np.float32).tobytes()

    def push(stub, worker_id, chunks):
        return _push(stub, worker_id, 0, chunks)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad = [
        ("rows of a tensor not marked", [pb.Chunk(tensor=1, rows=rows, data=two_rows)], "does not mark row_sparse"),
        ("row past the table", [pb.Chunk(rows=np.array([2, 8], "<u4").tobytes(), data=two_rows),
                                pb.Chunk(tensor=1, data=bias)], "below 8"),
        ("repeated row", [pb.Chunk(rows=np.array([5, 5], "<u4").tobytes(), data=two_rows),
                          pb.Chunk(tensor=1, data=bias)], "strictly increasing"),
        ("short rows", [pb.Chunk(rows=rows, data=two_rows[:-4]), pb.Chunk(tensor=1, data=bias)], "bytes of data"),
        ("NaN in a row", [pb.Chunk(rows=rows, data=np.full(8, np.nan, np.float32).tobytes()),
                          pb.Chunk(tensor=1, data=bias)], "NaN"),
        ("bias missing", [pb.Chunk(rows=rows, data=two_rows)], "ended early"),
        # Only a tensor's first row chunk may be empty (a zero gradient); more would never end a stream.
        ("empty row chunks", [pb.Chunk(rows=rows, data=two_rows), pb.Chunk(rows=b"", data=b""),
                              pb.Chunk(tensor=1, data=bias)], "continues without rows"),
    ]
    with ps_factory(num_workers=1, lr=0.5, momentum=0.0, weight_decay=0.0) as ps, \
            grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        worker_id = stub.Join(pb.JoinRequest(worker_name="a", manifest=manifest), timeout=10).worker_id
        init = [pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, total_steps=2)),
                pb.PushMessage(chunk=pb.Chunk(data=np.zeros(36, np.float32).tobytes()))]
        stub.Init(iter(init), timeout=10)
        for what, chunks, words in bad:
            with pytest.raises(grpc.RpcError) as err:
                push(stub, worker_id, chunks)
            assert err.value.code() == invalid and words in err.value.details(), (what, err.value.details())
            assert ps.server.step == 0 and not ps.server.values_by_name()["emb/table"].any(), what
        push(stub, worker_id, [pb.Chunk(rows=rows, data=two_rows), pb.Chunk(tensor=1, data=bias)])
        values = ps.server.values_by_name()
    want = np.zeros((8, 4), np.float32)
    want[[2, 5]] = -0.5  # lr 0.5 x gradient 1, the other rows untouched
    assert ps.server.step == 1 and np.array_equal(values["emb/table"], want)
    assert np.array_equal(values["emb/bias"], np.full(4, -0.5, np.float32))


def test_a_pull_carries_the_rows_asked_and_bad_asks_are_refused(ps_factory):
    """Through protobuf's stub: a pull that asks rows of the row_sparse table gets exactly those
    rows (float32 row chunks) and the rest of the block whole; an ask that names a tensor not
    marked row_sparse, one the model lacks, a tensor twice, or rows out of order, past the table
    or not whole uint32s is INVALID_ARGUMENT with what is wrong, and the PS goes on as before."""
    def ask(*entries):
        return [pb.TensorRows(block=b, tensor=t, rows=np.array(r, "<u4").tobytes()) for b, t, r in entries]

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad = [
        ("bias", ask((0, 1, [1])), "does not mark row_sparse"),
        ("no such block", ask((3, 0, [1])), "which the model lacks"),
        ("no such tensor", ask((0, 5, [1])), "which the model lacks"),
        ("twice", ask((0, 0, [1]), (0, 0, [2])), "asked for twice"),
        ("out of order", ask((0, 0, [6, 1])), "strictly increasing"),
        ("repeated", ask((0, 0, [1, 1])), "strictly increasing"),
        ("past the table", ask((0, 0, [1, 8])), "below 8"),
        ("not uint32", [pb.TensorRows(block=0, tensor=0, rows=b"\1\0\0")], "not a whole number of uint32"),
    ]
    values = np.arange(36, dtype=np.float32)
    with ps_factory(num_workers=1) as ps, grpc.insecure_channel(ps.address) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        worker_id = stub.Join(pb.JoinRequest(worker_name="a", manifest=_embedding_manifest()), timeout=10).worker_id
        stub.Init(iter([pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, total_steps=2)),
                        pb.PushMessage(chunk=pb.Chunk(data=values.tobytes()))]), timeout=10)
        for what, rows, words in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Pull(pb.PullRequest(worker_id=worker_id, step=0, rows=rows), timeout=10))
            assert err.value.code() == invalid and words in err.value.details(), (what, err.value.details())
        assert ps.server.step == 0 and np.array_equal(ps.server.values_by_name()["emb/bias"], values[32:])
        replies = list(stub.Pull(pb.PullRequest(worker_id=worker_id, step=0, rows=ask((0, 0, [1, 6]))), timeout=10))
    assert list(replies[0].header.blocks) == [0]
    table_rows, bias = replies[1].chunk, replies[2].chunk
    assert np.array_equal(np.frombuffer(table_rows.rows, "<u4"), [1, 6])
    assert np.array_equal(np.frombuffer(table_rows.data, np.float32), np.r_[values[4:8], values[24:28]])
    assert bias.tensor == 1 and np.array_equal(np.frombuffer(bias.data, np.float32), values[32:])
    assert len(replies) == 3


def test_a_worker_takes_only_the_rows_it_asked_for():
    """The worker's side of a row pull (FlatModel's sink): rows of a tensor it did not ask rows
    of, rows other than those asked, or fewer of them, are a WireError; the rows asked land in
    their places of the table and nowhere else."""
    from worker.models import BlockModel
    model = BlockModel("emb", [("emb", torch.nn.Embedding(8, 4)), ("head", torch.nn.Linear(4, 2))])
    flat = FlatModel(model, sparse_pull=True)
    before = flat.values[0].clone()
    header = pb.PullHeader(step=0, blocks=[0, 1])
    asked = flat.rows_asked({"emb/weight": torch.tensor([1, 6])}, 0)
    row = np.full(4, 7.0, np.float32).tobytes()
    sink = flat.pull_sink(header, asked)
    with pytest.raises(WireError, match="whose rows were not asked for"):
        sink.write_rows(1, 0, np.array([0], np.uint32), memoryview(row))
    with pytest.raises(WireError, match="rows other than those asked"):
        sink.write_rows(0, 0, np.array([2], np.uint32), memoryview(row))
    sink.write_rows(0, 0, np.array([1], np.uint32), memoryview(row))
    with pytest.raises(WireError, match="got 1 of the 2 rows asked"):
        sink.land(0)
    sink.write_rows(0, 0, np.array([6], np.uint32), memoryview(row))
    sink.land(0)
    table = flat.values[0].view(8, 4)
    assert (table[[1, 6]] == 7).all() and torch.equal(table[[0, 2, 3, 4, 5, 7]], before.view(8, 4)[[0, 2, 3, 4, 5, 7]])
    assert flat.rows_asked({"emb/weight": torch.tensor([1, 6])}, 1) == []  # the table's block frozen: nothing asked
    assert FlatModel(model).rows_asked({"emb/weight": torch.tensor([1])}, 0) == []  # no sparse pulls


@pytest.mark.parametrize("replies,words", [
    ([], "ended before its header"),
    ([pb.PullMessage(chunk=pb.Chunk(block=0, tensor=0, offset=0, data=b"\0" * 4))], "did not start with a header"),
    ([pb.PullMessage(header=pb.PullHeader(step=0, blocks=[0], delta=[True]))],
     "marks 1 of 1 blocks as changes, with pull changes in float32"),
])
def test_a_worker_refuses_a_pull_stream_without_its_header(replies, words):
    """The other direction: a broken or hostile PS answering a pull with nothing, with a chunk
    first, or with changes the worker did not ask for, gets a WireError saying so, not a
    StopIteration or a write into the model."""
    server = grpc.server(futures.ThreadPoolExecutor(1))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Pull": grpc.unary_stream_rpc_method_handler(lambda request, context: iter(replies),
                                                     request_deserializer=pb.PullRequest.FromString,
                                                     response_serializer=pb.PullMessage.SerializeToString)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = PSClient(f"127.0.0.1:{port}", rpc_timeout_s=10.0)
    flat = FlatModel(build_model("mlp", 4))
    before = [v.clone() for v in flat.model.state_dict().values()]
    try:
        with pytest.raises(WireError, match=words):
            client.pull(0, 0, flat)
        assert all(torch.equal(a, b) for a, b in zip(before, flat.model.state_dict().values()))
    finally:
        client.close()
        server.stop(None)


def test_a_worker_refuses_wire_dtypes_it_does_not_know():
    """A PS (a newer one, or a hostile one) naming a dtype at Join that this worker cannot send
    or read is refused with a message saying which, before anything is sent or written."""
    flat = FlatModel(build_model("mlp", 4))
    with pytest.raises(ValueError, match="the PS asks for pushes in 'int8', which this worker does not know"):
        flat.set_push_dtype("int8")
    with pytest.raises(ValueError, match="the PS sends pull changes in 'int8', which this worker does not know"):
        flat.set_pull_dtype("int8")
    flat.set_pull_dtype("")  # an older PS: whole float32 values
    assert flat.pull_dtype == "float32" and flat.held == [] and flat.pulled_step is None
