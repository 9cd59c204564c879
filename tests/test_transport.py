"""Block layouts and chunking, without a network."""
from __future__ import annotations

import numpy as np
import pytest

from proto import freezeps_pb2 as pb
from proto.codec import RawChunk, decode, decoder, encode_chunk, encode_header
from proto.layout import ManifestError, layout_from_manifest
from proto.transport import (
    ByteMeter,
    ChunkReceiver,
    WireError,
    copy_into,
    iter_chunks,
    metered,
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
