"""Block layouts and chunking, without a network."""
from __future__ import annotations

import math

import numpy as np
import pytest

from proto import freezeps_pb2 as pb
from proto.codec import RawChunk, decode, decoder, encode_chunk, encode_header, encode_vote
from proto.layout import ManifestError, layout_from_manifest
from proto.transport import (
    ByteMeter,
    ChunkReceiver,
    WireError,
    copy_into,
    iter_chunks,
    metered,
    nonzero_rows,
    sparse_rows,
)


def _manifest():
    m = pb.Manifest(model="toy")
    a = m.blocks.add(name="a")
    a.tensors.add(name="a/w", shape=[3, 5], dtype="float32", kind=pb.PARAMETER)
    a.tensors.add(name="a/b", shape=[5], dtype="float32", kind=pb.PARAMETER)
    a.tensors.add(name="a/mean", shape=[5], dtype="float32", kind=pb.BUFFER)
    b = m.blocks.add(name="b")
    b.tensors.add(name="b/w", shape=[7], dtype="float32", kind=pb.PARAMETER)
    return m


def test_layout_offsets():
    blocks = layout_from_manifest(_manifest())
    assert [b.nbytes for b in blocks] == [100, 28]
    assert [t.offset for t in blocks[0].tensors] == [0, 60, 80]
    assert blocks[0].locate(64) == (1, 4)
    assert blocks[0].block_offset(2, 8) == 88


@pytest.mark.parametrize("chunk_bytes", [4, 12, 24, 100, 1 << 20])
def test_chunks_round_trip(chunk_bytes):
    blocks = layout_from_manifest(_manifest())
    src = {b.index: np.random.default_rng(b.index).integers(0, 255, b.nbytes, dtype=np.uint8) for b in blocks}
    dst = {b.index: np.zeros(b.nbytes, dtype=np.uint8) for b in blocks}
    receiver = ChunkReceiver(blocks, [0, 1], copy_into(dst), chunk_bytes)
    count = 0
    for b in blocks:
        for frame in iter_chunks(b, src[b.index], chunk_bytes):
            assert len(frame.chunk.data) <= chunk_bytes
            receiver.accept(decode(frame.raw, pb.PushHeader).chunk)
            count += 1
    receiver.finish()
    assert all(np.array_equal(src[k], dst[k]) for k in src)
    assert count == sum(-(-b.nbytes // chunk_bytes) for b in blocks)


def test_receiver_refuses_a_block_not_expected():
    blocks = layout_from_manifest(_manifest())
    receiver = ChunkReceiver(blocks, [1], copy_into({1: np.zeros(28, np.uint8)}), 64)
    with pytest.raises(WireError, match="not expected"):
        receiver.accept(RawChunk(block=0, tensor=0, offset=0, data=memoryview(b"\0" * 4)))


def test_manifest_errors():
    m = _manifest()
    m.blocks[1].tensors[0].shape[:] = [-1]
    with pytest.raises(ManifestError, match="negative"):
        layout_from_manifest(m)


def test_meter_counts_payload_and_messages():
    meter = ByteMeter()
    msgs = [encode_header(pb.PushHeader(step=1)), encode_chunk(1, 0, 0, memoryview(b"\0" * 40))]
    assert list(metered(msgs, meter, "Push", "out", "w0")) == msgs
    window = meter.take_window()
    by_block = window["by_block"]["Push"]["out"]
    assert by_block["1"]["payload"] == 40 and by_block["1"]["message"] == len(msgs[1].raw)
    assert by_block["-1"]["payload"] == 0 and by_block["-1"]["message"] == len(msgs[0].raw)
    assert window["by_worker"]["Push"]["out"]["w0"]["messages"] == 2
    assert meter.take_window() == {"by_block": {}, "by_worker": {}}
    assert meter.payload_total("out") == 40


@pytest.mark.parametrize("block,tensor,offset,size", [(0, 0, 0, 4), (1, 2, 3, 0), (300, 70000, 2**40, 1 << 20)])
def test_codec_writes_exactly_what_protobuf_writes(block, tensor, offset, size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = encode_chunk(block, tensor, offset, memoryview(data))
    theirs = pb.PushMessage(chunk=pb.Chunk(block=block, tensor=tensor, offset=offset, data=data))
    assert ours.raw == theirs.SerializeToString() and ours.size == theirs.ByteSize()
    back = pb.PullMessage.FromString(ours.raw)
    assert (back.chunk.block, back.chunk.tensor, back.chunk.offset, back.chunk.data) == (block, tensor, offset, data)
    got = decode(theirs.SerializeToString(), pb.PushHeader).chunk
    assert (got.block, got.tensor, got.offset, bytes(got.data)) == (block, tensor, offset, data)
    header = pb.PullHeader(step=7, blocks=[1, 2], freeze=pb.FreezeState(frozen_blocks=1))
    assert encode_header(header).raw == pb.PullMessage(header=header).SerializeToString()
    assert decode(encode_header(header).raw, pb.PullHeader).header == header


def test_a_vote_is_a_push_message_of_its_own():
    """A push's vote (PushMessage.vote) is what protobuf writes, decodes back as one, and is
    no PullMessage: a pull's decoder, which takes no vote, reports it as neither a header nor
    a chunk."""
    vote = pb.Vote(frozen_blocks=2, eta=[0.5, math.nan, 0.25], shard_size=300, label_balance=0.75)
    frame = encode_vote(vote)
    assert frame.raw == pb.PushMessage(vote=vote).SerializeToString() and frame.size == len(frame.raw)
    back = decode(frame.raw, pb.PushHeader, pb.Vote)
    assert back.vote.SerializeToString() == vote.SerializeToString() and back.header is None and back.chunk is None
    assert pb.PushMessage.FromString(frame.raw).WhichOneof("kind") == "vote"
    pulled = decoder(pb.PullHeader)(frame.raw)
    assert pulled.vote is None and "neither a header nor a chunk" in pulled.error
    assert "bad vote" in decoder(pb.PushHeader, pb.Vote)(b"\x1a\x02\x08\x80").error  # a truncated varint in it


@pytest.mark.parametrize("raw,words", [(b"", "neither"), (b"\x12\x05\x08", "past the end"),
                                       (b"\x12\x80", "varint"), (b"\x0b", "wire type")])
def test_codec_reports_bad_bytes(raw, words):
    frame = decoder(pb.PushHeader)(raw)
    assert frame.header is None and frame.chunk is None and words in frame.error


def test_codec_skips_unknown_fields():
    msg = pb.PushMessage(chunk=pb.Chunk(block=2, data=b"abcd")).SerializeToString()
    extra = b"\x58\x01" + b"\x65\x00\x00\x00\x00"  # field 11 varint, field 12 fixed32
    assert bytes(decode(extra + msg, pb.PushHeader).chunk.data) == b"abcd"


def test_assign_blocks_contiguous_and_balanced():
    from proto.layout import assign_blocks
    sizes = [37632, 1024, 593920, 2107392, 8409088, 33595392, 20520]  # resnet18
    assert assign_blocks(sizes, 1) == [range(0, 7)]
    two = assign_blocks(sizes, 2)
    assert two[0].start == 0 and two[0].stop == two[1].start and two[1].stop == 7
    assert assign_blocks([1] * 4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError):
        assign_blocks([1, 2], 3)
    # The largest range is as small as can be: resnet18-fine (MB) in three, where cutting at a third
    # of the bytes would put conv1..layer4.0 (25.9) on one server.
    fine = [0, 0, 3, 3, 9, 12, 37, 47, 147, 189, 1]
    three = assign_blocks(fine, 3)
    assert [sum(fine[i] for i in r) for r in three] == [111, 147, 190]
    assert assign_blocks([5, 1, 1, 1, 5], 3) == [range(0, 1), range(1, 4), range(4, 5)]
    assert assign_blocks([0, 0, 9], 3) == [range(0, 1), range(1, 2), range(2, 3)]  # empty blocks still one each


def test_assign_blocks_is_optimal_against_every_split():
    import itertools

    from proto.layout import assign_blocks
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 100, size=int(rng.integers(1, 8))).tolist()
        servers = int(rng.integers(1, len(sizes) + 1))
        got = assign_blocks(sizes, servers)
        assert got[0].start == 0 and got[-1].stop == len(sizes) and all(len(r) for r in got)
        assert all(a.stop == b.start for a, b in zip(got, got[1:]))
        best = min(max(sum(sizes[a:b]) for a, b in zip((0, *cuts), (*cuts, len(sizes))))
                   for cuts in itertools.combinations(range(1, len(sizes)), servers - 1))
        assert max(sum(sizes[i] for i in r) for r in got) == best


# -- row-sparse tensors ------------------------------------------------------------------------
def _sparse_layout():
    m = pb.Manifest(model="emb")
    a = m.blocks.add(name="emb")
    a.tensors.add(name="emb/bias", shape=[3], dtype="float32", kind=pb.PARAMETER)
    a.tensors.add(name="emb/table", shape=[10, 4], dtype="float32", kind=pb.PARAMETER, row_sparse=True)
    b = m.blocks.add(name="head")
    b.tensors.add(name="head/table", shape=[6, 2], dtype="float32", kind=pb.PARAMETER, row_sparse=True)
    return layout_from_manifest(m)


def _gradient(rows_per_tensor: dict[tuple[int, int], list[int]], blocks) -> dict[int, np.ndarray]:
    grads = {b.index: np.zeros(b.nbytes // 4, np.float32) for b in blocks}
    for (b, t), rows in rows_per_tensor.items():
        tensor = blocks[b].tensors[t]
        matrix = grads[b][tensor.offset // 4:(tensor.offset + tensor.nbytes) // 4].reshape(tensor.shape)
        matrix[rows] = np.arange(1, len(rows) * tensor.shape[1] + 1, dtype=np.float32).reshape(len(rows), -1)
    grads[0][:3] = [0.5, -1.0, 2.0]  # the dense bias
    return grads


def _sparse_frames(blocks, grads, chunk_bytes):
    return [f for b in blocks
            for f in iter_chunks(b, grads[b.index].view(np.uint8), chunk_bytes, sparse_rows(b, grads[b.index]))]


@pytest.mark.parametrize("chunk_bytes", [16, 32, 1 << 20])
def test_row_chunks_round_trip_and_count_indices_as_payload(chunk_bytes):
    """Nonzero rows go as (indices, rows), split over chunks of at most chunk_bytes of data;
    a gradient with no nonzero row still sends one empty row chunk; a receiver rebuilds the
    dense gradient; the meter counts the indices as payload."""
    blocks = _sparse_layout()
    grads = _gradient({(0, 1): [1, 4, 7]}, blocks)  # head/table: all zero
    frames = _sparse_frames(blocks, grads, chunk_bytes)
    kinds = [(f.chunk.block, f.chunk.tensor, f.chunk.rows is not None) for f in frames]
    assert (0, 0, False) in kinds and (0, 1, True) in kinds and kinds[-1] == (1, 0, True)
    assert all(len(f.chunk.data) <= chunk_bytes for f in frames)
    got = {b.index: np.zeros(b.nbytes // 4, np.float32) for b in blocks}

    def write_rows(block, tensor, rows, data):
        t = blocks[block].tensors[tensor]
        got[block][t.offset // 4:(t.offset + t.nbytes) // 4].reshape(t.shape)[rows] = np.frombuffer(data, np.float32).reshape(len(rows), t.shape[1])

    receiver = ChunkReceiver(blocks, [0, 1], copy_into({b: got[b].view(np.uint8) for b in got}), chunk_bytes,
                             write_rows=write_rows)
    meter = ByteMeter()
    for frame in metered(frames, meter, "Push", "in", "w"):
        received = decode(frame.raw, pb.PushHeader).chunk
        assert (received.rows is None) == (frame.chunk.rows is None)
        receiver.accept(received)
    receiver.finish()
    assert all(np.array_equal(got[b], grads[b]) for b in grads)
    assert meter.payload_total("in") == 12 + 3 * (16 + 4)  # the dense bias, 3 rows with their indices, 0 rows
    # protobuf's own parser reads the same rows
    first_rows = next(f for f in frames if f.chunk.rows is not None)
    parsed = pb.PushMessage.FromString(first_rows.raw).chunk
    assert np.frombuffer(parsed.rows, "<u4").tolist() == np.frombuffer(first_rows.chunk.rows, "<u4").tolist()
    empty = pb.PushMessage.FromString(frames[-1].raw)  # an all-zero table: one row chunk of no rows
    assert empty.chunk.block == 1 and empty.chunk.HasField("rows") and empty.chunk.rows == b""
    assert decode(frames[-1].raw, pb.PushHeader).chunk.rows is not None
    assert decode(empty.SerializeToString(), pb.PushHeader).chunk.rows is not None  # protobuf's encoder keeps it


def test_a_block_lands_once_all_of_it_has_come_rows_included():
    """landed(b) comes once for each block, in order, as soon as all of it has come: right
    after its last chunk where that is bytes; where the block ends with row chunks (more rows
    of the tensor may follow), when the next block's first chunk comes or the stream ends."""
    events = []
    dense = layout_from_manifest(_manifest())
    receiver = ChunkReceiver(dense, [0, 1], lambda b, start, data: events.append(("bytes", b)), 64,
                             landed=lambda b: events.append(("landed", b)))
    for b in dense:
        for frame in iter_chunks(b, np.zeros(b.nbytes, np.uint8), 64):
            receiver.accept(decode(frame.raw, pb.PushHeader).chunk)
    assert events == [("bytes", 0), ("bytes", 0), ("landed", 0), ("bytes", 1), ("landed", 1)]
    receiver.finish()
    assert events[-1] == ("landed", 1)  # not again

    events.clear()
    blocks = _sparse_layout()
    receiver = ChunkReceiver(blocks, [0, 1], lambda b, start, data: events.append(("bytes", b)), 16,
                             write_rows=lambda b, t, rows, data: events.append(("rows", b)),
                             landed=lambda b: events.append(("landed", b)))
    for frame in _sparse_frames(blocks, _gradient({(0, 1): [1, 4, 7], (1, 0): [2]}, blocks), 16):
        receiver.accept(decode(frame.raw, pb.PushHeader).chunk)  # a row of emb/table a chunk
    assert events == [("bytes", 0), ("rows", 0), ("rows", 0), ("rows", 0), ("landed", 0), ("rows", 1)]
    receiver.finish()
    assert events[-1] == ("landed", 1)


def test_dense_is_kept_when_rows_would_not_be_smaller():
    matrix = np.ones((4, 2), np.float32)
    assert nonzero_rows(matrix.reshape(-1), 2) is None  # every row: indices would only add bytes
    matrix[1:] = 0
    rows, values = nonzero_rows(matrix.reshape(-1), 2)
    assert rows.tolist() == [0] and values.tolist() == [[1.0, 1.0]]


def _row_chunk(block, tensor, rows, row_elems, offset=0, data=None):
    rows = np.asarray(rows, dtype="<u4")
    data = data if data is not None else np.ones(len(rows) * row_elems, np.float32).tobytes()
    return RawChunk(block, tensor, offset, memoryview(data), memoryview(rows.tobytes()))


@pytest.mark.parametrize("chunks,words", [
    ([_row_chunk(0, 1, [0], 4)], "expected block 0 at byte 0"),  # before the bias
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 0, [0], 4)], "does not mark row_sparse"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [3, 3], 4)], "strictly increasing"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [3], 4), _row_chunk(0, 1, [2], 4)],
     "strictly increasing"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [10], 4)], "below 10"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [1], 4, data=b"\0" * 12)], "12 bytes of data for 1 rows"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [1], 4, offset=4)], "offset 0"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)),
      RawChunk(0, 1, 0, memoryview(b"\0" * 16), memoryview(b"\0" * 3))], "whole number of uint32"),
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, [1], 4), _row_chunk(1, 0, [0], 2),
      _row_chunk(0, 1, [5], 4)], "out of order"),  # the tensor's rows resumed after another's
    ([RawChunk(0, 0, 0, memoryview(b"\0" * 12)), _row_chunk(0, 1, list(range(9)), 4)], "must be 1..64"),
])
def test_bad_row_chunks_are_refused(chunks, words):
    receiver = ChunkReceiver(_sparse_layout(), [0, 1], lambda *a: None, 64, write_rows=lambda *a: None)
    with pytest.raises(WireError, match=words):
        for chunk in chunks:
            receiver.accept(chunk)


def test_row_chunks_only_where_rows_may_come_and_only_for_2d_parameters():
    blocks = _sparse_layout()
    pull = ChunkReceiver(blocks, [0, 1], lambda *a: None, 64)  # no write_rows: an Init, a pull that asked no rows
    pull.accept(RawChunk(0, 0, 0, memoryview(b"\0" * 12)))
    with pytest.raises(WireError, match="only in a push or a pull that asked for rows"):
        pull.accept(_row_chunk(0, 1, [0], 4))
    m = pb.Manifest(model="bad")
    m.blocks.add(name="a").tensors.add(name="a/v", shape=[4], dtype="float32", kind=pb.PARAMETER, row_sparse=True)
    with pytest.raises(ManifestError, match="2-D PARAMETER"):
        layout_from_manifest(m)
