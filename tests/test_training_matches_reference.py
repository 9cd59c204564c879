"""Distributed rounds over real gRPC equal serial training (SGD or AdamW) on the workers' batches,
each rank's gradient on its own batch (bench.soak.serial_training, which the fault tests use too)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.soak import serial_training
from freeze.engines import EngineSpec
from ps.policy import FreezePolicy
from tests.conftest import run_workers, worker_settings
from worker.flat import FlatModel
from worker.models import build_model


@pytest.mark.parametrize("num_workers,freeze,optimizer,push_dtype,pull_dtype", [
    (2, None, "sgd", "float32", "float32"), (3, (1, 3), "sgd", "float32", "float32"),
    (4, None, "sgd", "float32", "float32"), (3, (1, 3), "adamw", "float32", "float32"),
    (3, None, "sgd", "bfloat16", "float32"), (3, (1, 3), "adamw", "bfloat16", "float32"),
    (3, None, "sgd", "float32", "bfloat16"), (3, (1, 3), "adamw", "bfloat16", "bfloat16")])
def test_ps_matches_serial_training(ps_factory, tmp_path, num_workers, freeze, optimizer, push_dtype, pull_dtype):
    torch.manual_seed(7)
    weights = tmp_path / "init.pt"
    torch.save(build_model("mlp", 4, "random").state_dict(), weights)
    # BlockModel's state_dict names are those of its blocks; mlp loads its own file.
    steps, lr, momentum, wd = 6, 0.05, 0.9, 1e-3
    policy = FreezePolicy(EngineSpec("static", blocks=freeze[0], from_step=freeze[1])) if freeze else None
    if optimizer == "adamw":
        lr = 0.01
    with ps_factory(num_workers, policy=policy, lr=lr, optimizer=optimizer, momentum=momentum, weight_decay=wd,
                    push_dtype=push_dtype, pull_dtype=pull_dtype) as ps:
        run_workers([worker_settings(ps.address, weights=str(weights), steps=steps) for _ in range(num_workers)])
        got = ps.server.values_by_name()
        assert ps.server.step == steps
        # Optimizer state (momentum; AdamW's two moments) is kept only for blocks that still
        # train: frozen blocks' state is freed.
        trained = [t for b in FlatModel(build_model("mlp", 4)).layout[freeze[0] if freeze else 0:] for t in b.tensors]
        per_param = 2 if optimizer == "adamw" else 1
        assert ps.server.describe()["optimizer_state_bytes"] == per_param * sum(t.nbytes for t in trained)
    freeze_blocks, freeze_step = freeze or (0, 0)
    def reference(push_dtype: str, pull_dtype: str) -> dict:
        return serial_training(weights, num_workers, [list(range(num_workers))] * steps, batch_size=16, lr=lr,
                               momentum=momentum, weight_decay=wd, freeze_blocks=freeze_blocks,
                               freeze_step=freeze_step, optimizer=optimizer, push_dtype=push_dtype,
                               pull_dtype=pull_dtype)
    want = reference(push_dtype, pull_dtype)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # to the bit
    # The rounding is real: unrounded gradients, or the PS's values themselves, train elsewhere.
    for exact in ([reference("float32", pull_dtype)] if push_dtype != "float32" else []) + \
                 ([reference(push_dtype, "float32")] if pull_dtype != "float32" else []):
        assert any(not np.array_equal(exact[name], want[name]) for name in want)
    # The check can fail: training moved the parameters away from where they started.
    init = build_model("mlp", 4, str(weights))
    assert not np.allclose(next(init.parameters()).detach().numpy(), want["fc1/fc.weight"]) or freeze


def test_runs_are_bit_reproducible(ps_factory, tmp_path):
    """Pushes are summed in rank order, not arrival order: the same run gives the same bits."""
    weights = tmp_path / "init.pt"  # worker threads share torch's RNG: give them one initial model
    torch.save(build_model("tiny_cnn", 4).state_dict(), weights)
    finals = []
    for _ in range(2):
        with ps_factory(3, lr=0.05) as ps:
            run_workers([worker_settings(ps.address, model="tiny_cnn", steps=5, weights=str(weights))
                         for _ in range(3)])
            finals.append(ps.server.values_by_name())
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])
