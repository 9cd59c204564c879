"""The PS's optimizers equal torch.optim's SGD and AdamW on the averaged gradient; buffers are
averaged; a frozen block's state is freed and the rest kept; state round-trips a checkpoint."""
from __future__ import annotations

import pytest
import torch

from proto import freezeps_pb2 as pb
from proto.layout import layout_from_manifest
from ps.optim import make_optimizer, torch_adamw
from ps.schedule import block_lr_scales
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


OPTIMIZERS = {
    "sgd": (dict(momentum=0.9, weight_decay=0.01), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov": (dict(momentum=0.9, weight_decay=0.01, nesterov=True),
                     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)),
    "adamw": (dict(weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6),
              lambda ps: torch_adamw(ps, lr=0.05, weight_decay=0.01, betas=(0.8, 0.99), eps=1e-6)),
}


def _store(kind: str, lr_block_decay: float = 1.0) -> BlockStore:
    return BlockStore(_layout(), range(2), make_optimizer(kind.split("-")[0], **OPTIMIZERS[kind][0]),
                      block_lr_scales(2, lr_block_decay))


@pytest.mark.parametrize("lr_block_decay", [1.0, 0.3])
@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_optimizer_matches_torch(kind, lr_block_decay):
    """With a layer-wise decay, block 0 steps at 0.3 of the rate: torch with a parameter group per block."""
    gen = torch.Generator().manual_seed(0)
    store = _store(kind, lr_block_decay)
    blocks = store.blocks
    for b in range(2):
        store.values[b].copy_(torch.randn(store.values[b].shape, generator=gen))
    ref = [store.values[b].clone() for b in range(2)]
    is_param = [torch.tensor([t.kind == pb.PARAMETER for t in blk.tensors for _ in range(t.numel)]) for blk in blocks]
    ref_params = [r[m].clone().requires_grad_(False) for r, m in zip(ref, is_param)]
    opt = OPTIMIZERS[kind][1]([{"params": [p], "lr": 0.05 * scale}
                               for p, scale in zip(ref_params, block_lr_scales(2, lr_block_decay))])
    for _ in range(3):
        pushes = [{b: torch.randn(store.values[b].shape, generator=gen) for b in range(2)} for _ in range(3)]
        weights = [16.0, 32.0, 8.0]
        for push, w in zip(pushes, weights):
            store.accumulate(_push(push), w)
        store.apply(range(2), sum(weights), lr=0.05)
        for b, p in enumerate(ref_params):
            summed = pushes[0][b] * weights[0]  # summed as the store sums: one rounding per push
            for push, w in zip(pushes[1:], weights[1:]):
                summed = summed.add(push[b], alpha=w)
            avg = summed / sum(weights)
            p.grad = avg[is_param[b]]
            buffer_avg = avg[~is_param[b]]
            torch.testing.assert_close(store.values[b][~is_param[b]], buffer_avg)
        opt.step()
    for b in range(2):
        # To the bit, with a total weight (56) that is not a power of two, as after a drop.
        torch.testing.assert_close(store.values[b][is_param[b]], ref_params[b], rtol=0, atol=0)
        assert not torch.allclose(store.values[b][is_param[b]], ref[b][is_param[b]])  # it did train


@pytest.mark.parametrize("kind,per_param", [("sgd", 1), ("adamw", 2)])
def test_freeze_frees_state_and_keeps_the_rest(kind, per_param):
    store = _store(kind)
    for _ in range(2):
        store.accumulate(_push({b: torch.ones(store.values[b].shape) for b in range(2)}), 1.0)
        store.apply(range(2), 1.0, lr=0.1)
    assert store.optimizer_state_bytes() == per_param * 2 * (15 + 3) * 4
    kept = store.state()["optimizer"]["blocks"][1]
    store.freeze(range(0, 1))
    assert store.optimizer_state_bytes() == per_param * (15 + 3) * 4
    # Block 1's state is the same object's, untouched: one more step goes on from it.
    after = store.state()["optimizer"]["blocks"][1]
    assert len(_tensors(kept)) == per_param * 2 + (2 if kind == "adamw" else 0)  # + AdamW's step counts
    assert all(torch.equal(a, b) for a, b in zip(_tensors(kept), _tensors(after)))


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_round_trips_and_bad_state_changes_nothing(kind):
    store = _store(kind)
    for _ in range(2):
        store.accumulate(_push({b: torch.randn(store.values[b].shape) for b in range(2)}), 1.0)
        store.apply(range(2), 1.0, lr=0.1)
    saved = store.state()
    other = _store(kind)
    other.load_state(saved)
    for s in (store, other):  # the same next step from the same state
        s.accumulate(_push({b: torch.full(store.values[b].shape, 0.5) for b in range(2)}), 1.0)
        s.apply(range(2), 1.0, lr=0.1)
    assert all(torch.equal(store.values[b], other.values[b]) for b in range(2))

    fresh = _store(kind)
    before = [v.clone() for v in fresh.values.values()]
    wrong_kind = {**saved, "optimizer": {**saved["optimizer"], "name": "adamw" if kind == "sgd" else "sgd"}}
    with pytest.raises(ValueError, match="optimizer"):
        fresh.load_state(wrong_kind)
    blocks = saved["optimizer"]["blocks"]
    if kind == "sgd":
        bad = {0: [torch.zeros(4)] * 2}
    else:
        bad = {0: {**blocks[0], "state": {**blocks[0]["state"], 0: {**blocks[0]["state"][0], "exp_avg": torch.zeros(4)}}}}
    with pytest.raises(ValueError, match="does not fit"):
        fresh.load_state({**saved, "optimizer": {"name": kind, "blocks": bad}})
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.values.values()))
    assert fresh.optimizer_state_bytes() == 0


def test_adamw_resumes_on_this_runs_settings_not_the_checkpoints():
    """torch's load_state_dict takes the group's settings from the checkpoint; the PS keeps its
    own, the kernel included (a checkpoint written before the fused kernel, on foreach, with
    other betas), and steps as a store that never stopped."""
    store = _store("adamw")
    store.accumulate(_push({b: torch.randn(store.values[b].shape) for b in range(2)}), 1.0)
    store.apply(range(2), 1.0, lr=0.1)
    saved = store.state()
    for group in (g for blk in saved["optimizer"]["blocks"].values() for g in blk["param_groups"]):
        group.update(foreach=True, fused=None, betas=(0.5, 0.5))  # as an older PS with other settings wrote it
    resumed = _store("adamw")
    resumed.load_state(saved)
    settings = [opt.param_groups[0] for opt in resumed.optimizer._per_block.values()]
    assert all(g["fused"] and not g["foreach"] and g["betas"] == (0.8, 0.99) for g in settings)
    for s in (store, resumed):
        s.accumulate(_push({b: torch.full(store.values[b].shape, 0.5) for b in range(2)}), 1.0)
        s.apply(range(2), 1.0, lr=0.1)
    assert all(torch.equal(store.values[b], resumed.values[b]) for b in range(2))


def test_bad_optimizer_settings_are_value_errors():
    for name, kwargs, words in [("adam", {}, "unknown optimizer"), ("sgd", {"momentum": 1.0}, "momentum"),
                                ("adamw", {"betas": (0.9, 1.0)}, "betas"), ("adamw", {"eps": 0.0}, "eps"),
                                ("sgd", {"weight_decay": -1.0}, "weight_decay")]:
        with pytest.raises(ValueError, match=words):
            make_optimizer(name, **kwargs)
