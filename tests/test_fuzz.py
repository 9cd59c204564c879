"""Property-based fuzzing of the gRPC surface (hypothesis).

Every generated call must end in OK or a specific refusal (never UNKNOWN or INTERNAL),
with a message; the server must stay up; a refused call must leave the parameters
bit-identical and the step unchanged, an accepted push must advance exactly one round.
Examples are derandomized so CI is repeatable; `HYPOTHESIS_PROFILE=fuzz` runs many more,
randomly (see docs/reliability.md).
"""
from __future__ import annotations

import math
import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeze.engines import EngineSpec
from proto import freezeps_pb2 as pb
from ps.errors import PSError
from ps.policy import FreezePolicy
from ps.server import ParameterServer, ServerSettings
from tests.conftest import good_chunks, one_worker

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
U32, U64 = 2**32 - 1, 2**64 - 1


def _floats(nbytes: int, value: float) -> bytes:
    return np.full(nbytes // 4, value, dtype=np.float32).tobytes()


# One op per stream message, encoded when sent (the current step is known only then).
header_ops = st.tuples(st.just("header"), st.sampled_from(["me", "nobody", ""]),
                       st.sampled_from(["now", "old", "next", "huge"]), st.sampled_from([0, 1, 16, U32]))
chunk_ops = st.tuples(st.just("chunk"), st.one_of(st.integers(0, 4), st.just(U32)),
                      st.one_of(st.integers(0, 6), st.just(U32)),
                      st.one_of(st.integers(0, 64).map(lambda i: 4 * i), st.integers(0, U64)),
                      st.one_of(st.binary(max_size=96), st.sampled_from([_floats(64, math.nan), _floats(64, math.inf),
                                                                          _floats(64, 0.0)])))
# Votes (votes mode: every push ends with one): proposals past the model's 3 blocks up to the
# most a uint32 holds, too many η values, label balances outside [0, 1], abstentions.
vote_ops = st.tuples(st.just("vote"), st.one_of(st.integers(0, 4), st.just(U32)),
                     st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5),
                     st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True)), st.booleans())
raw_ops = st.tuples(st.just("raw"), st.binary(max_size=48))
good_ops = st.tuples(st.just("good"), st.integers(0, 1000))
cut_ops = st.tuples(st.just("cut"), st.integers(0, 1000), st.integers(0, 80))
poison_ops = st.tuples(st.just("poison"), st.integers(0, 1000), st.sampled_from([math.nan, math.inf, -math.inf]))
any_op = st.one_of(header_ops, chunk_ops, raw_ops, good_ops, cut_ops, poison_ops, vote_ops)


@st.composite
def push_streams(draw, chunks: int, votes: bool):
    """Random streams, or a whole valid push (`chunks` chunks, its header valid or random, in
    votes mode a random vote last) with up to two edits: drop, duplicate, swap or replace a
    message."""
    shape = draw(st.sampled_from(["random", "valid", "valid with a random header"]))
    if shape == "random":
        return draw(st.lists(any_op, max_size=10))
    header = ("header", "me", "now", 16) if shape == "valid" else draw(header_ops)
    ops = [header] + [("good", i) for i in range(chunks)] + ([draw(vote_ops)] if votes else [])
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(ops) - 1))
        edit = draw(st.sampled_from(["drop", "dup", "swap", "replace", "none"]))
        if edit == "drop":
            del ops[i]
        elif edit == "dup":
            ops.insert(i, ops[i])
        elif edit == "swap" and i + 1 < len(ops):
            ops[i], ops[i + 1] = ops[i + 1], ops[i]
        elif edit == "replace":
            ops[i] = draw(any_op)
    return ops


def _encode(op, me: str, step: int, good: list[pb.Chunk]) -> bytes:
    kind = op[0]
    if kind == "header":
        who = {"me": me, "nobody": "w9-9-00000000"}.get(op[1], op[1])
        at = {"now": step, "old": step - 1, "next": step + 1, "huge": U64}[op[2]]
        return pb.PushMessage(header=pb.PushHeader(worker_id=who, step=max(at, 0), batch_size=op[3])).SerializeToString()
    if kind == "chunk":
        return pb.PushMessage(chunk=pb.Chunk(block=op[1], tensor=op[2], offset=op[3], data=op[4])).SerializeToString()
    if kind == "vote":
        vote = pb.Vote(abstain=True) if op[4] else pb.Vote(frozen_blocks=op[1], eta=op[2], label_balance=op[3])
        return pb.PushMessage(vote=vote).SerializeToString()
    if kind == "raw":
        return op[1]
    chunk = pb.Chunk()
    chunk.CopyFrom(good[op[1] % len(good)])
    if kind == "poison":
        data = bytearray(chunk.data)
        data[:4] = np.float32(op[2]).tobytes()
        chunk.data = bytes(data)
    wire = pb.PushMessage(chunk=chunk).SerializeToString()
    return wire[:op[2]] if kind == "cut" else wire


def _state(ps) -> tuple[int, dict]:
    return ps.server.step, ps.server.values_by_name()


def _unchanged(before, after) -> bool:
    return before[0] == after[0] and all(np.array_equal(before[1][k], after[1][k]) for k in before[1])


@pytest.mark.parametrize("votes", [False, True], ids=["central", "votes"])
def test_fuzzed_pushes_are_answered_and_change_nothing_unless_valid(votes):
    outcomes: dict[str, int] = {}
    # Nothing may freeze (max_fraction 0): a push of every block stays valid throughout.
    policy = FreezePolicy(EngineSpec("gradnorm", interval=1), votes=True, vote_weights="equal",
                          max_fraction=0.0) if votes else None
    with one_worker(round_timeout_s=5.0, policy=policy) as (ps, stub, worker_id, flat), \
            grpc.insecure_channel(ps.address) as channel:
        raw_push = channel.stream_unary("/freezeps.ParameterServer/Push", request_serializer=lambda b: b,
                                        response_deserializer=pb.PushReply.FromString)
        flat.grads[0].fill_(0.25)
        good = good_chunks(flat)

        @given(stream=push_streams(len(good), votes))
        def check(stream):
            before = _state(ps)
            try:
                reply = raw_push(iter([_encode(op, worker_id, before[0], good) for op in stream]), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert code in REFUSALS, (code, e.details(), stream)
                assert e.details(), stream
            after = _state(ps)
            if code == grpc.StatusCode.OK and reply.duplicate:  # its push of that step was accepted before
                assert reply.step < before[0] and _unchanged(before, after), stream
                code = "duplicate"
            elif code == grpc.StatusCode.OK:
                assert after[0] == before[0] + 1  # one worker: an accepted push completes a round
                # The next round needs a pull first, as a worker would do it.
                list(stub.Pull(pb.PullRequest(worker_id=worker_id, step=after[0]), timeout=10))
            else:
                assert _unchanged(before, after), stream
            name = code if isinstance(code, str) else code.name
            outcomes[name] = outcomes.get(name, 0) + 1

        check()
        assert stub.Status(pb.StatusRequest(), timeout=5).live_workers == 1  # still serving, still joined
    print(f"push outcomes: {dict(sorted(outcomes.items()))}")  # shown with pytest -s
    # The generator reached both sides: refusals of each kind and accepted pushes.
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"} <= set(outcomes), outcomes


def test_fuzzed_pulls_and_leaves_are_answered_and_change_nothing():
    with one_worker(round_timeout_s=5.0) as (ps, stub, worker_id, flat):
        @given(worker=st.sampled_from(["me", "nobody", ""]), step=st.sampled_from([0, 2, 7, U64]),
               frozen=st.one_of(st.integers(0, 5), st.just(U32)), leave=st.booleans())
        def check(worker, step, frozen, leave):
            who = worker_id if worker == "me" else worker
            before = _state(ps)
            try:
                if leave and who != worker_id:
                    stub.Leave(pb.LeaveRequest(worker_id=who), timeout=5)
                else:
                    list(stub.Pull(pb.PullRequest(worker_id=who, step=step, frozen_blocks=frozen), timeout=5))
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
                assert code in REFUSALS and e.details(), (code, e.details())
            assert code != grpc.StatusCode.OK or (who == worker_id and step == 0 and frozen == 0)
            assert _unchanged(before, _state(ps))

        check()
        assert stub.Status(pb.StatusRequest(), timeout=5).live_workers == 1


tensor_specs = st.builds(
    lambda name, shape, dtype, kind: pb.TensorSpec(name=name, shape=shape, dtype=dtype, kind=kind),
    st.text("abcxyz./", max_size=6), st.lists(st.one_of(st.integers(0, 9), st.integers(0, 2**40)), max_size=3),
    st.sampled_from(["float32", "float64", "int8", ""]), st.sampled_from([0, 1, 2, 7]))
manifests = st.builds(lambda model, blocks: pb.Manifest(model=model, blocks=blocks), st.text(max_size=4),
                      st.lists(st.builds(lambda name, tensors: pb.BlockSpec(name=name, tensors=tensors),
                                         st.text("ab", max_size=3), st.lists(tensor_specs, max_size=3)), max_size=4))


@given(manifest=manifests)
def test_fuzzed_manifests_are_laid_out_or_refused_without_allocating(manifest):
    """A Join's manifest is checked (and its size bounded) before the PS allocates anything."""
    server = ParameterServer(ServerSettings(num_workers=2, chunk_bytes=1 << 20, max_model_bytes=1 << 20),
                             FreezePolicy(EngineSpec("none")))
    try:
        reply = server.join(pb.JoinRequest(worker_name="a", manifest=manifest))
    except PSError as e:
        assert e.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), e
        assert str(e)
        assert server.status().blocks == [] and server.describe()["blocks"] == []
        return
    assert reply.rank == 0 and reply.needs_init
    assert sum(b["bytes"] for b in server.describe()["blocks"]) <= 1 << 20


def test_a_stream_that_would_never_end_is_cut_at_the_first_bad_chunk(one_worker_run):
    """Memory stays bounded: the PS stops reading at the first chunk that does not fit."""
    ps, stub, worker_id, flat = one_worker_run
    sent = 0

    def endless():
        nonlocal sent
        yield pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=0, batch_size=1))
        while sent < 4096:  # 4 GiB if it were all read
            sent += 1
            # the last block: a push's first (freezeps.proto, PushMessage)
            yield pb.PushMessage(chunk=pb.Chunk(block=len(flat.layout) - 1, tensor=0, offset=0, data=b"\0" * (1 << 20)))

    with pytest.raises(grpc.RpcError) as err:
        stub.Push(endless(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "past the end" in err.value.details()
    assert sent < 64, f"the client got to send {sent} MiB"
    assert ps.server.step == 0


def test_a_message_over_the_limit_is_refused_by_the_transport(one_worker_run):
    ps, stub, worker_id, flat = one_worker_run
    big = pb.PushMessage(chunk=pb.Chunk(block=0, tensor=0, offset=0, data=b"\0" * (5 << 20)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(iter([pb.PushMessage(header=pb.PushHeader(worker_id=worker_id, step=0, batch_size=1)), big]),
                  timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ps.server.step == 0 and stub.Status(pb.StatusRequest(), timeout=5).live_workers == 1
