"""The PS's in-place SGD equals torch.optim.SGD on the averaged gradient; buffers are averaged."""
from __future__ import annotations

import pytest
import torch

from proto import freezeps_pb2 as pb
from proto.layout import layout_from_manifest
from ps.store import BlockStore, ReceivedPush


def _layout():
    m = pb.Manifest(model="t")
    for b in range(2):
        block = m.blocks.add(name=f"b{b}")
        block.tensors.add(name=f"b{b}/w", shape=[5, 3], dtype="float32", kind=pb.PARAMETER)
        block.tensors.add(name=f"b{b}/mean", shape=[3], dtype="float32", kind=pb.BUFFER)
        block.tensors.add(name=f"b{b}/bias", shape=[3], dtype="float32", kind=pb.PARAMETER)
    return layout_from_manifest(m)


def _push(flats: dict[int, torch.Tensor]) -> ReceivedPush:
    push = ReceivedPush()
    for b, flat in flats.items():
        push.write(b, 0, memoryview(flat.numpy().tobytes()))
    return push


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch(nesterov):
    gen = torch.Generator().manual_seed(0)
    blocks = _layout()
    store = BlockStore(blocks, range(2), momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    for b in range(2):
        store.values[b].copy_(torch.randn(store.values[b].shape, generator=gen))
    ref = [store.values[b].clone() for b in range(2)]
    is_param = [torch.tensor([t.kind == pb.PARAMETER for t in blk.tensors for _ in range(t.numel)]) for blk in blocks]
    ref_params = [r[m].clone().requires_grad_(False) for r, m in zip(ref, is_param)]
    opt = torch.optim.SGD(ref_params, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    for _ in range(3):
        pushes = [{b: torch.randn(store.values[b].shape, generator=gen) for b in range(2)} for _ in range(3)]
        weights = [16.0, 32.0, 8.0]
        for push, w in zip(pushes, weights):
            store.accumulate(_push(push), w)
        store.apply(range(2), sum(weights), lr=0.05)
        for b, p in enumerate(ref_params):
            avg = sum(w * push[b] for push, w in zip(pushes, weights)) / sum(weights)
            p.grad = avg[is_param[b]]
            buffer_avg = avg[~is_param[b]]
            torch.testing.assert_close(store.values[b][~is_param[b]], buffer_avg)
        opt.step()
    for b in range(2):
        torch.testing.assert_close(store.values[b][is_param[b]], ref_params[b], rtol=1e-5, atol=1e-6)


def test_freeze_frees_momentum():
    store = BlockStore(_layout(), range(2), momentum=0.9, weight_decay=0.0)
    store.accumulate(_push({b: torch.ones(store.values[b].shape) for b in range(2)}), 1.0)
    store.apply(range(2), 1.0, lr=0.1)
    assert store.optimizer_state_bytes() == 2 * (15 + 3) * 4
    store.freeze(range(0, 1))
    assert store.optimizer_state_bytes() == (15 + 3) * 4
