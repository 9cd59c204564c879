"""Block layouts and chunking, without a network."""
from __future__ import annotations

import numpy as np
import pytest

from proto import freezeps_pb2 as pb
from proto.layout import ManifestError, layout_from_manifest
from proto.transport import ByteMeter, ChunkReceiver, WireError, iter_chunks, metered


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
    receiver = ChunkReceiver(blocks, [0, 1], dst, chunk_bytes)
    count = 0
    for b in blocks:
        for chunk in iter_chunks(b, src[b.index], chunk_bytes):
            assert len(chunk.data) <= chunk_bytes
            receiver.accept(chunk)
            count += 1
    receiver.finish()
    assert all(np.array_equal(src[k], dst[k]) for k in src)
    assert count == sum(-(-b.nbytes // chunk_bytes) for b in blocks)


def test_receiver_refuses_a_block_not_expected():
    blocks = layout_from_manifest(_manifest())
    receiver = ChunkReceiver(blocks, [1], {1: np.zeros(28, np.uint8)}, 64)
    with pytest.raises(WireError, match="not expected"):
        receiver.accept(pb.Chunk(block=0, tensor=0, offset=0, data=b"\0" * 4))


def test_manifest_errors():
    m = _manifest()
    m.blocks[1].tensors[0].shape[:] = [-1]
    with pytest.raises(ManifestError, match="negative"):
        layout_from_manifest(m)


def test_meter_counts_payload_and_messages():
    meter = ByteMeter()
    msgs = [pb.PushMessage(header=pb.PushHeader(step=1)),
            pb.PushMessage(chunk=pb.Chunk(block=1, data=b"\0" * 40))]
    assert list(metered(msgs, meter, "Push", "out", "w0")) == msgs
    window = meter.take_window()
    by_block = window["by_block"]["Push"]["out"]
    assert by_block["1"]["payload"] == 40 and by_block["1"]["message"] == msgs[1].ByteSize()
    assert by_block["-1"]["payload"] == 0 and by_block["-1"]["message"] == msgs[0].ByteSize()
    assert window["by_worker"]["Push"]["out"]["w0"]["messages"] == 2
    assert meter.take_window() == {"by_block": {}, "by_worker": {}}
    assert meter.payload_total("out") == 40
